"""Nonsmooth atoms: epigraph rewrites checked against CVXPY, and the compile-time errors
for uses the rewrite cannot make exact."""
import cvxpy as cp
import numpy as np
import pytest
import torch

import declarative as dl
from references import solve


def _data(seed, *shapes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def test_lasso_with_norm1():
    n, k = 6, 10
    x = dl.Variable(n, name="x")
    M = dl.Parameter((k, n), name="M")
    y = dl.Parameter(k, name="y")
    prob = dl.Problem(dl.Minimize(dl.sum_squares(M @ x - y) + 0.5 * dl.norm1(x)))
    M_t, y_t = _data(0, (k, n), (k,))
    x_t = prob.to_torch(tol=1e-11)(M_t, y_t)
    xv = cp.Variable(n)
    solve(cp.Problem(cp.Minimize(cp.sum_squares(M_t.numpy() @ xv - y_t.numpy()) + 0.5 * cp.norm1(xv))))
    np.testing.assert_allclose(x_t.numpy(), xv.value, atol=1e-6)


def test_abs_pos_maximum_norm_inf():
    n = 5
    x = dl.Variable(n, name="x")
    a = dl.Parameter(n, name="a")
    c = dl.Parameter(n, name="c")
    prob = dl.Problem(
        dl.Minimize(dl.sum(dl.abs(x - a)) + 2 * dl.sum(dl.pos(c - x)) + dl.norm_inf(x) + dl.sum_squares(x)),
        [dl.sum(dl.maximum(x, 0.5 * a, c)) <= 4],
    )
    a_t, c_t = _data(1, (n,), (n,))
    x_t = prob.to_torch(tol=1e-11)(a_t, c_t)
    xv = cp.Variable(n)
    an, cn = a_t.numpy(), c_t.numpy()
    solve(cp.Problem(
        cp.Minimize(cp.sum(cp.abs(xv - an)) + 2 * cp.sum(cp.pos(cn - xv)) + cp.norm_inf(xv) + cp.sum_squares(xv)),
        [cp.sum(cp.maximum(xv, 0.5 * an, cn)) <= 4],
    ))
    np.testing.assert_allclose(x_t.numpy(), xv.value, atol=1e-6)


def test_relu_as_projection_and_its_gradient():
    # argmin ||x - v||^2 s.t. x >= 0 is relu(v); also written with pos in a constraint
    n = 6
    x = dl.Variable(n, name="x")
    v = dl.Parameter(n, name="v")
    layer = dl.Problem(dl.Minimize(dl.sum_squares(x - v)), [x >= 0]).to_torch(tol=1e-12)
    (v_t,) = _data(2, (3, n))
    v_t.requires_grad_()
    out = layer(v_t)
    torch.testing.assert_close(out, torch.relu(v_t.detach()), atol=1e-8, rtol=0)
    out.sum().backward()
    torch.testing.assert_close(v_t.grad, (v_t.detach() > 0).double(), atol=1e-6, rtol=0)


def test_kkt_shows_epigraph_variables():
    x = dl.Variable(3, name="x")
    a = dl.Parameter(3, name="a")
    prob = dl.Problem(dl.Minimize(dl.norm1(x - a) + dl.sum_squares(x)), [x <= 2])
    text = str(prob.kkt())
    assert "(epigraph)" in text and "grad_x L" in text
    assert prob.kkt().problem.n == 6  # x and its epigraph variable
    # each block of rows says where it comes from
    assert text.count("; constraint 0)") == 1 and text.count("; added by the compiler)") == 2


@pytest.mark.parametrize("build,atom", [
    (lambda x, a: dl.Maximize(dl.norm1(x - a)), "dl.norm1"),
    (lambda x, a: dl.Minimize(-dl.sum(dl.abs(x))), "dl.abs"),
    (lambda x, a: dl.Minimize(a @ dl.pos(x)), "dl.pos"),
    # a parameter beside a log: only the log's argument is known positive (t = -1 came
    # back 'optimal' at x = 1, where the minimizer of -log(1 + x) + (x - 1)^2 is 1.22)
    (lambda x, a: dl.Minimize(dl.sum(a * dl.log(1 + dl.pos(x))) + dl.sum_squares(x - 1)), "dl.pos"),
    (lambda x, a: dl.Minimize(dl.sum(a * dl.sqrt(dl.pos(x))) + dl.sum_squares(x - 1)), "dl.pos"),
])
def test_nonconvex_use_of_nonsmooth_atom_is_a_compile_error(build, atom):
    x = dl.Variable(3, name="x")
    a = dl.Parameter(3, name="a")
    prob = dl.Problem(build(x, a), [x <= 1, x >= -1])
    with pytest.raises(dl.CompileError, match=atom.replace(".", r"\.")):
        prob.to_torch()


def test_nonsmooth_atom_in_equality_is_a_compile_error():
    x = dl.Variable(3, name="x")
    prob = dl.Problem(dl.Minimize(dl.sum_squares(x)), [dl.sum(dl.abs(x)) == 1])
    with pytest.raises(dl.CompileError, match=r"dl\.abs.*equality"):
        prob.to_torch()


def test_nonsmooth_atom_on_the_larger_side_of_a_constraint_is_an_error():
    x = dl.Variable(3, name="x")
    prob = dl.Problem(dl.Minimize(dl.sum_squares(x - 2)), [1 <= dl.norm_inf(x)])
    with pytest.raises(dl.CompileError, match=r"dl\.norm_inf"):
        prob.to_torch()


@pytest.mark.parametrize("build", [
    lambda x, a: dl.Problem(dl.Minimize(dl.sum_squares(x - 3)), [x <= dl.pos(a)]),
    lambda x, a: dl.Problem(dl.Minimize(dl.sum_squares(x - dl.abs(a)))),
    lambda x, a: dl.Problem(dl.Minimize(dl.norm1(a) * dl.sum_squares(x) - a @ x)),
    lambda x, a: dl.Problem(dl.Minimize(dl.sum_squares(x)), [x == dl.abs(a)]),
])
def test_a_nonsmooth_atom_of_parameters_alone_says_to_compute_it_first(build):
    # (the error said the problem was not nondecreasing in it, or that it appeared in an
    # equality, which did not say what to do)
    x, a = dl.Variable(3, name="x"), dl.Parameter(3, name="a")
    with pytest.raises(dl.CompileError, match="of parameters alone.*compute it with torch"):
        build(x, a).compile()


def test_a_nonsmooth_atom_of_parameters_where_its_rewrite_is_valid_still_solves():
    # (the refusal above once came before the test of the rewrite's validity)
    x, a = dl.Variable(3, name="x"), dl.Parameter(3, name="a")
    a_t = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    # min |x|^2 s.t. norm1(a) <= sum(x): x_i = norm1(a) / 3
    layer = dl.Problem(dl.Minimize(dl.sum_squares(x)), [dl.norm1(a) <= dl.sum(x)]).to_torch()
    torch.testing.assert_close(layer(a_t), torch.full((3,), 3.5 / 3, dtype=torch.float64), atol=1e-8, rtol=0)
    # min sum(max(x, |a|)) + |x|^2: x = 0 where |a| > 0
    layer = dl.Problem(dl.Minimize(dl.sum(dl.maximum(x, dl.abs(a))) + dl.sum_squares(x))).to_torch()
    torch.testing.assert_close(layer(a_t), torch.zeros(3, dtype=torch.float64), atol=1e-8, rtol=0)


def test_a_lasso_weight_declared_nonneg():
    # lam * norm1(x) with a learnable weight: refused for a parameter of unknown sign,
    # compiled for one declared nonneg (in the DSL, and imported from CVXPY's
    # Parameter(nonneg=True), which the import had dropped), and a negative value is an
    # error naming it. Reference: CVXPY's lasso; the weight's gradient by gradcheck
    n, k = 5, 8
    x, M, y = dl.Variable(n, name="x"), dl.Parameter((k, n), name="M"), dl.Parameter(k, name="y")
    with pytest.raises(dl.CompileError, match=r"dl\.norm1"):
        lam = dl.Parameter(name="lam")
        dl.Problem(dl.Minimize(dl.sum_squares(M @ x - y) + lam * dl.norm1(x))).to_torch()
    lam = dl.Parameter(name="lam", nonneg=True)
    layer = dl.Problem(dl.Minimize(dl.sum_squares(M @ x - y) + lam * dl.norm1(x))).to_torch(tol=1e-11)
    M_t, y_t = _data(4, (k, n), (k,))
    lam_t = torch.tensor(1.5, dtype=torch.float64)
    xv, Mc, yc, lc = cp.Variable(n), cp.Parameter((k, n)), cp.Parameter(k), cp.Parameter(nonneg=True)
    lasso = cp.Problem(cp.Minimize(cp.sum_squares(Mc @ xv - yc) + lc * cp.norm1(xv)))
    Mc.value, yc.value, lc.value = M_t.numpy(), y_t.numpy(), 1.5
    solve(lasso)
    np.testing.assert_allclose(layer(M_t, y_t, lam_t).numpy(), xv.value, atol=1e-6)
    imported = dl.from_cvxpy(lasso).to_torch(parameters=[Mc, yc, lc], variables=[xv], tol=1e-11)
    np.testing.assert_allclose(imported(M_t, y_t, lam_t)[0].numpy(), xv.value, atol=1e-6)
    leaf = lam_t.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: layer(M_t, y_t, t), (leaf,), eps=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="'lam' is declared nonneg"):
        layer(M_t, y_t, torch.tensor(-0.5, dtype=torch.float64))


def test_the_root_of_a_square_is_an_abs():
    # power(square(x), 0.5): with the exponent a float, sympy left Abs(x)**1.0 and the
    # compiler refused it as a nonsmooth atom inside another, naming an abs the user never
    # wrote. As the exact 1/2 it is |x|, rewritten as dl.abs is. Reference: CVXPY
    x, q = dl.Variable(3, name="x"), dl.Parameter(3, name="q")
    layer = dl.Problem(dl.Minimize(dl.sum(dl.power(dl.square(x), 0.5)) + dl.sum_squares(x - q))).to_torch(tol=1e-11)
    (q_t,) = _data(7, (3,))
    xv = cp.Variable(3)
    solve(cp.Problem(cp.Minimize(cp.norm1(xv) + cp.sum_squares(xv - q_t.numpy()))))
    np.testing.assert_allclose(layer(q_t).numpy(), xv.value, atol=1e-7)
