"""The compiler: passes, size independence, generated code against torch autograd."""
import re
from pathlib import Path

import cvxpy as cp
import numpy as np
import pytest
import torch

import compiler
import declarative as dl
import solvers
from compiler import ir
from compiler.canonicalize import epigraph_nonsmooth, flip_maximize, split_constraints, stack
from references import solve
from test_qp import qp_problem


def _graph_size(kkt):
    outs = (list(kkt.stationarity) + [kkt.inequalities, kkt.equalities] + list(kkt.ineq_jacobian)
            + list(kkt.eq_jacobian) + [b for row in kkt.hessian for b in row] + list(kkt.parameter_vjp))
    return len(ir.topological(outs))


def _entropy_problem(n):
    z = dl.Variable(n, name="z")
    theta = dl.Parameter(n, name="theta")
    W = dl.Parameter((3, n), name="W")
    return dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z)) - dl.sum_squares(W @ z)),
                      [dl.sum(z) == 1, z >= 0, dl.exp(W @ z) <= 5])


@pytest.mark.parametrize("build", [lambda n: qp_problem(n, 3, 2), _entropy_problem])
def test_derivation_does_not_grow_with_n(build):
    small, large = build(5).compile(), build(5000).compile()
    # same graph, node for node, and the same generated code up to the sizes in it
    assert _graph_size(small.kkt) == _graph_size(large.kkt)
    strip = lambda src: re.sub(r"\d+", "N", src.split('"""', 2)[2])  # noqa: E731
    assert strip(small.code.source) == strip(large.code.source)
    # constants are data, not code: none is an n x n matrix
    assert all(np.asarray(c).size <= 5000 for c in large.code.constants)


def test_passes_apply_one_by_one():
    x = dl.Variable(3, name="x")
    a = dl.Parameter(3, name="a")
    prob = dl.Problem(dl.Maximize(-dl.norm1(x - a) - dl.sum_squares(x)), [x >= -1, dl.sum(x) == 1])
    spec = prob.spec()
    flipped = flip_maximize(spec)
    assert flipped.sense == "minimize"
    sf = split_constraints(flipped, -1.0)
    assert len(sf.inequalities) == 1 and len(sf.equalities) == 1
    epi = epigraph_nonsmooth(sf)
    assert len(epi.variables) == 2 and epi.variables[1].auxiliary
    assert len(epi.inequalities) == 3  # x >= -1 and t >= +-(x - a)
    st = stack(epi)
    assert (st.n, st.m, st.p) == (6, 9, 1)
    assert st.constraint_rows == (("ineq", 0, (3,)), ("eq", 0, ()))


def test_a_scalar_broadcast_by_zeros_or_a_sum_keeps_its_shape():
    # t + zeros(3) simplified to a node of shape (3,) with the scalar t alone below it,
    # and the QP's code generation failed ("einsum spec 'a->': operand 'a' has shape ()").
    # min (sum(y + t) - s)^2 + |y|^2 + t^2: y_i = s / 13, t = 3 s / 13.
    t, y, s = dl.Variable(name="t"), dl.Variable(3, name="y"), dl.Parameter(name="s")
    s_t = torch.tensor(0.4, dtype=torch.float64)
    for inner in (lambda: dl.sum(y + t), lambda: np.ones(3) @ (y + t), lambda: dl.sum(y) + dl.sum(t + np.zeros(3))):
        prob = dl.Problem(dl.Minimize(dl.square(inner() - s) + dl.sum_squares(y) + dl.square(t)))
        assert prob.problem_class == "QP"
        out = dict(zip((v.name for v in prob.variables()), prob.to_torch()(s_t)))
        torch.testing.assert_close(out["y"], torch.full((3,), 0.4 / 13, dtype=torch.float64))
        torch.testing.assert_close(out["t"], torch.tensor(1.2 / 13, dtype=torch.float64))


def test_domain_bounds_pass_bounds_a_whole_variable_under_a_log_once():
    from compiler.canonicalize import domain_bounds

    z, x, P = dl.Variable(4, name="z"), dl.Variable(3, name="x"), dl.Variable((2, 2), name="P")
    objective = dl.sum(dl.entropy(z)) + dl.sum(dl.log(x[1:3])) + dl.sum(dl.log(x + 3)) + dl.sum(dl.sqrt(P))

    def added(*constraints):
        spec = dl.Problem(dl.Maximize(objective), list(constraints)).spec()
        sf = split_constraints(flip_maximize(spec), -1.0)
        return len(domain_bounds(sf).inequalities) - len(sf.inequalities)

    # z and P (whole, P through its reshape), not x (a slice, an expression)
    assert added() == 2
    assert added(z >= 0) == 1 and added(z >= 0.01, P >= 0) == 0
    assert added(z >= -1) == 2 and added(z[1:3] >= 0) == 2


@pytest.mark.parametrize("compose", [lambda x: dl.exp(dl.log(x)), lambda x: dl.square(dl.sqrt(x)),
                                     lambda x: dl.sqrt(x) * dl.sqrt(x)])
def test_composed_atoms_keep_their_domain(compose):
    # sympy folds exp(log(x)) and sqrt(x)**2 to x as they meet: the compiler saw sum(x),
    # dropped the domain x > 0, and answered x = (-1.5, 1.5). Reference: CVXPY on x >= 0
    x, q = dl.Variable(2, name="x"), dl.Parameter(2, name="q")
    layer = dl.Problem(dl.Minimize(dl.sum(compose(x)) + dl.sum_squares(x - q))).to_torch()
    out = layer(torch.tensor([-1.0, 2.0], dtype=torch.float64))
    xv = cp.Variable(2)
    solve(cp.Problem(cp.Minimize(cp.sum(xv) + cp.sum_squares(xv - np.array([-1.0, 2.0]))), [xv >= 0]))
    assert layer.info.status == ["optimal"]
    np.testing.assert_allclose(out.numpy(), xv.value, atol=1e-7)


def _random_nlp():
    x = dl.Variable(4, name="x")
    y = dl.Variable((2, 2), name="y")
    P = dl.Parameter((4, 4), name="P")
    c = dl.Parameter(4, name="c")
    s = dl.Parameter((), name="s")
    obj = (dl.quad_form(x, P) + c @ dl.exp(x) + s * dl.sum(dl.softplus(y)) + dl.sum(dl.log(x + 3))
           + dl.sum(y * y) / (1 + s * s) + x[1:3] @ dl.sum(y, axis=0) + dl.sum(dl.sqrt(x * x + 1)))
    cons = [dl.power(x, 3) + dl.sigmoid(c) <= 2, y.T @ x[0:2] == c[2:4] * s, dl.square(x[0]) >= -1]
    return dl.Problem(dl.Minimize(obj), cons)


def _sums_and_entropies():
    # sums and signs leave constants of ones and minus ones: the compiler folds them
    # (ir.elementwise, ir.einsum), and reshapes the (1, 1) identity of one equality
    z = dl.Variable(5, name="z")
    theta, w = dl.Parameter(5, name="theta"), dl.Parameter(5, name="w")
    return dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z)) - w @ dl.exp(-z) - 2 * dl.sum(z)),
                      [dl.sum(z) == 1, -dl.sum(dl.log(z)) <= 20, z >= 0.01])


def _entropy_with_rows():
    # the gradient with respect to G of G z <= h is a difference of two outer products
    # (lam u_lam z' and lam u_z'): one _outer_sum with a weight of -1
    z = dl.Variable(5, name="z")
    theta, w = dl.Parameter(5, name="theta"), dl.Parameter(5, name="w")
    G, h = dl.Parameter((3, 5), name="G"), dl.Parameter(3, name="h")
    return dl.Problem(dl.Maximize(theta @ z + w @ dl.entropy(z)), [dl.sum(z) == 1, z >= 0, G @ z <= h])


@pytest.mark.parametrize("build, positive", [(_random_nlp, False), (_sums_and_entropies, True),
                                             (_entropy_with_rows, True)])
def test_generated_derivatives_match_torch_autograd(build, positive):
    prob = build()
    cp_ = prob.compile()
    st, code = cp_.problem, cp_.code
    n, m, p = st.n, st.m, st.p
    torch.manual_seed(0)
    z = 0.5 * torch.randn(1, n, dtype=torch.float64)
    if positive:  # (inside the domain of log and entropy)
        z = z.abs() + 0.1
    lam, nu = torch.rand(1, m, dtype=torch.float64), torch.randn(1, p, dtype=torch.float64)
    params = [torch.randn((1,) + par.shape, dtype=torch.float64) for par in st.parameters]
    consts = tuple(torch.tensor(c).unsqueeze(0) for c in code.constants)

    def lagrangian(zz, lam_, nu_, *ps):
        f, _, g, h = code["residuals"](zz, lam_, nu_, consts, *ps)
        return (f + (lam_ * g).sum(-1) + (nu_ * h).sum(-1)).sum()

    def gh(zz):
        _, _, g, h = code["residuals"](zz, lam, nu, consts, *params)
        return torch.cat([g.expand(1, m), h.expand(1, p)], -1)

    rd, g, h, Jg, Jh, H = code["derivatives"](z, lam, nu, consts, *params)
    grad = torch.autograd.functional.jacobian(lambda zz: lagrangian(zz, lam, nu, *params), z)
    torch.testing.assert_close(rd.expand(1, n), grad)
    hess = torch.autograd.functional.hessian(lambda zz: lagrangian(zz, lam, nu, *params), z)[0, :, 0, :]
    torch.testing.assert_close(H.expand(1, n, n)[0], hess)
    jac = torch.autograd.functional.jacobian(gh, z)[0, :, 0, :]
    torch.testing.assert_close(torch.cat([Jg.expand(1, m, n), Jh.expand(1, p, n)], -2)[0], jac)

    # parameter side: -d/dtheta [u_z' grad_z L + (lam*u_lam)' g + u_nu' h]
    u_z, u_lam, u_nu = torch.randn(1, n, dtype=torch.float64), torch.randn(1, m, dtype=torch.float64), torch.randn(1, p, dtype=torch.float64)
    ps = [t.clone().requires_grad_() for t in params]
    rd_, g_, h_ = [o for o in code["residuals"](z, lam, nu, consts, *ps)[1:]]
    phi = (u_z * rd_).sum() + (lam * u_lam * g_).sum() + (u_nu * h_).sum()
    expected = torch.autograd.grad(phi, ps)
    got = code["parameter_vjp"](z, lam, nu, u_z, u_lam, u_nu, consts, *params)
    for e, gt in zip(expected, got):
        torch.testing.assert_close(gt.expand_as(e), -e)


def test_constants_of_sums_fold_out_of_the_generated_derivatives():
    # softmax as an optimization: the gradient of sum(entr(z)) and the Jacobian of
    # sum(z) == 1 are made of ones. Folded, the derivatives multiply by no constant,
    # the Jacobian of the equality is a constant, and 1/z is one call
    z, theta = dl.Variable(6, name="z"), dl.Parameter(6, name="theta")
    code = dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))), [dl.sum(z) == 1, z >= 0]).compile().code
    source = code.source
    body = source.split("def derivatives_diagonal", 1)[1].split("\ndef ", 1)[0]
    assert "* consts" not in body and "consts[0] *" not in body and "1.0 /" not in body
    assert re.search(r"out4 = consts\[\d+\]", body)  # Jh
    assert "torch.reciprocal(z)" in body
    assert body.count("\n    t") <= 10  # (18 before the folds)


def test_a_difference_of_outer_products_is_one_product():
    body = _entropy_with_rows().compile().code.source.split("def parameter_vjp", 1)[1].split("\ndef ", 1)[0]
    assert re.search(r"_outer_sum\(\(\(\w+, \w+\), \(\w+, \w+\),\), [-0-9.]+, \(-1\.0,\)\)", body), body


def test_generated_source_is_valid_python_with_readable_tracebacks():
    layer = _random_nlp().to_torch()
    src = layer.source
    compile(src, "<check>", "exec")
    assert "def derivatives(" in src and "def parameter_vjp(" in src
    import linecache

    filename = layer.compiled.code.filename
    assert linecache.getline(filename, 1).startswith('"""Generated by declarative')


@pytest.mark.parametrize("name", ["_eye", "_scatter", "_vecmat", "_in_domain", "slice", "torch", "consts"])
def test_a_parameter_may_be_named_like_a_helper_of_the_generated_code(name):
    # (a parameter named _eye once shadowed the generated code's helper of that name, and
    # one named slice the builtin: "'Tensor' object is not callable")
    import cvxpy as cp
    from references import solve

    a_np, G_np = np.array([0.5, 2.0, 4.0]), 0.1 * np.ones((2, 3))
    x = dl.Variable(3, name="x")
    a, G = dl.Parameter(3, name=name), dl.Parameter((2, 3), name="G")
    prob = dl.Problem(dl.Minimize(dl.sum(dl.exp(x)) - a @ x - dl.sum(dl.log(1 - G @ x))), [x[2] <= a[0] + 1])
    got = prob.to_torch()(torch.tensor(a_np), torch.tensor(G_np))
    x_ref = cp.Variable(3)
    solve(cp.Problem(cp.Minimize(cp.sum(cp.exp(x_ref)) - a_np @ x_ref - cp.sum(cp.log(1 - G_np @ x_ref))),
                     [x_ref[2] <= a_np[0] + 1]))
    np.testing.assert_allclose(got.numpy(), x_ref.value, atol=1e-6)


def test_kkt_printout_has_the_three_parts():
    text = str(qp_problem(4, 3, 1).kkt())
    for part in ("Stationarity", "Primal feasibility", "Complementarity", "G.T @ lam", "A.T @ nu"):
        assert part in text


def test_problem_classes():
    assert qp_problem(3, 2, 1).problem_class == "QP"
    assert _random_nlp().problem_class == "NLP"
    x = dl.Variable(3, name="x")
    assert dl.Problem(dl.Minimize(dl.sum(x)), [x >= 0]).problem_class == "LP"


def test_installed_packages_are_ours():
    # `compiler` and `solvers` are generic names: make sure the ones imported are this project's
    root = Path(dl.__file__).resolve().parent.parent
    assert Path(compiler.__file__).resolve().parent.parent == root
    assert Path(solvers.__file__).resolve().parent.parent == root
    assert hasattr(solvers.interior_point, "solve_qp")


EINSUM_FORMS = [
    "ab->ba", "abc->cab", "ab->ab", "a->", "ab->a", "ab->b", "abc->ac", "ab->",
    ",a->a", "b,a->ba", "a,b->ab", "a,a->a", "ab,b->ab", "a,ab->ab", ",->",
    "i,i->", "ij,j->i", "ji,j->i", "i,ij->j", "i,ji->j", "ij,jk->ik", "ji,jk->ik", "ij,kj->ik",
    "ji,kj->ik", "ai,ij->aj", "j,jk->k",
    # left to torch.einsum: a reversed output, three operands, a diagonal, a kept batch letter
    "ij,jk->ki", "i,ij,j->", "aa->a", "ab,ab->a",
]


@pytest.mark.parametrize("form", EINSUM_FORMS)
def test_lowered_einsum_matches_torch_einsum(form):
    """Generated code takes common einsums as direct calls (codegen.einsum_text); each must
    equal torch.einsum, also when one operand has a shared (size-1) batch dimension."""
    from compiler.codegen import _PRELUDE, einsum_text

    prelude = {}
    exec(_PRELUDE, prelude)  # the helpers generated code calls
    ins, out = form.split("->")
    ins = ins.split(",")
    sizes = dict(zip("abcijk", (2, 3, 4, 3, 4, 5)))
    gen = torch.Generator().manual_seed(0)
    for batches in [(5,) * len(ins), (1,) + (5,) * (len(ins) - 1), (5,) * (len(ins) - 1) + (1,), (1,) * len(ins)]:
        tensors = [torch.randn((b,) + tuple(sizes[c] for c in s), generator=gen, dtype=torch.float64)
                   for b, s in zip(batches, ins)]
        names = [f"x{i}" for i in range(len(ins))]
        text = einsum_text(ins, out, names)
        expected = torch.einsum(",".join("..." + s for s in ins) + "->..." + out, *tensors)
        if form in EINSUM_FORMS[-4:]:
            assert text is None
            continue
        got = eval(text, prelude, dict(zip(names, tensors)))
        assert got.shape == expected.shape, (text, got.shape, expected.shape)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch, r, c", [(5, 3, 4), (300, 20, 20)])
def test_outer_sum_matches_explicit_outer_products(batch, r, c):
    """The prelude's _outer_sum (gradients of matrix parameters) must equal scale times
    the sum of the outer products, on its small path (outer products accumulated in
    place) and its large one (one matrix product), also when pairs have a shared (size-1)
    batch dimension."""
    from compiler.codegen import _PRELUDE

    prelude = {}
    exec(_PRELUDE, prelude)
    gen = torch.Generator().manual_seed(1)
    for batches in [(batch, batch, batch), (1, batch, batch), (batch, 1, 1)]:
        pairs = [(torch.randn(k, r, generator=gen, dtype=torch.float64),
                  torch.randn(k, c, generator=gen, dtype=torch.float64)) for k in batches]
        for scale in (1.0, -0.5):
            for weights in (None, (-1.0, 2.5)):
                w = (1.0,) + (weights or (1.0, 1.0))
                expected = scale * sum(w_k * torch.einsum("bi,bj->bij", a, b_) for w_k, (a, b_) in zip(w, pairs))
                got = prelude["_outer_sum"](tuple(pairs), scale, weights)
                assert got.shape == (batch, r, c)
                torch.testing.assert_close(got, expected.expand(batch, r, c), rtol=1e-12, atol=1e-12)
