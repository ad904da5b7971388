"""dl.from_cvxpy as a drop-in for CvxpyLayer: the same solutions and gradients as
cvxpylayers on the examples of its README, and the translated atoms against
CVXPY/Clarabel."""
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import declarative as dl
from references import solve

cvxpylayers_torch = pytest.importorskip("cvxpylayers.torch")
CvxpyLayer = cvxpylayers_torch.CvxpyLayer

# cvxpylayers differentiates SCS's solution (diffcp). At eps 1e-10 the two layers were
# measured to agree to ~1e-10 in the solutions and ~1e-7 in the gradients on these
# examples; the tolerances below leave a 10x margin over that.
SCS_ARGS = {"solve_method": "SCS", "eps_abs": 1e-10, "eps_rel": 1e-10, "max_iters": 100000}
SOLUTION_ATOL, GRADIENT_ATOL = 1e-8, 1e-6


def _compare(problem, parameters, variables, inputs):
    """Solutions and gradients of a random linear functional of the outputs, w.r.t.
    every parameter, against cvxpylayers."""
    ours = dl.from_cvxpy(problem).to_torch(parameters=parameters, variables=variables)
    theirs = CvxpyLayer(problem, parameters=parameters, variables=variables)
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    out_ours = ours(*a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # inside diffcp
        out_theirs = theirs(*b, solver_args=SCS_ARGS)
    assert isinstance(out_ours, tuple) and len(out_ours) == len(out_theirs)
    assert ours.info.status == ["optimal"] * len(ours.info.status)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in out_theirs]
    for o, t in zip(out_ours, out_theirs):
        assert o.shape == t.shape
        np.testing.assert_allclose(o.detach().numpy(), t.detach().numpy(), atol=SOLUTION_ATOL, rtol=0)
    sum((w * o).sum() for w, o in zip(weights, out_ours)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sum((w * o).sum() for w, o in zip(weights, out_theirs)).backward()
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.grad.numpy(), y.grad.numpy(), atol=GRADIENT_ATOL, rtol=0)
    return ours


def test_least_squares_layer_batched_and_unbatched():
    # cvxpylayers' README example: min ||Ax - b||^2 + ||x||^2 s.t. x >= 0 (A, b parameters)
    n, m, B = 2, 3, 5
    x = cp.Variable(n, name="x")
    A = cp.Parameter((m, n), name="A")
    b = cp.Parameter(m, name="b")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + cp.sum_squares(x)), [x >= 0])
    gen = torch.Generator().manual_seed(1)
    A_t = torch.randn(m, n, generator=gen, dtype=torch.float64)
    b_t = torch.randn(m, generator=gen, dtype=torch.float64)
    A_b = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    b_b = torch.randn(B, m, generator=gen, dtype=torch.float64)
    layer = _compare(problem, [A, b], [x], [A_t, b_t])
    assert layer(A_t, b_t)[0].shape == (n,)
    _compare(problem, [A, b], [x], [A_b, b_b])
    _compare(problem, [A, b], [x], [A_t, b_b])  # shared A, batched b


def test_relu_as_projection():
    n = 5
    x = cp.Variable(n, name="x")
    y = cp.Parameter(n, name="y")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0])
    y_t = torch.randn(6, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (out,) = dl.from_cvxpy(problem).to_torch(parameters=[y], variables=[x])(y_t)
    torch.testing.assert_close(out, torch.relu(y_t), atol=1e-9, rtol=0)
    _compare(problem, [y], [x], [y_t])
    _compare(problem, [y], [x], [y_t[0]])


def test_simplex_projection():
    n = 6
    x = cp.Variable(n, name="x")
    y = cp.Parameter(n, name="y")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [cp.sum(x) == 1, x >= 0])
    y_t = torch.randn(4, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _compare(problem, [y], [x], [y_t])
    _compare(problem, [y], [x], [y_t[1]])


def _against_clarabel(problem, parameters, values, variables, atol=1e-6):
    layer = dl.from_cvxpy(problem).to_torch(parameters=parameters, variables=variables, tol=1e-11)
    outs = layer(*[torch.as_tensor(v, dtype=torch.float64) for v in values])
    assert layer.info.status == ["optimal"]
    for p, v in zip(parameters, values):
        p.value = v
    solve(problem)
    for out, var in zip(outs, variables):
        np.testing.assert_allclose(out.numpy(), var.value, atol=atol, rtol=0)


rng = np.random.default_rng(0)
x4 = cp.Variable(4, name="x")
a4 = cp.Parameter(4, name="a")
X34 = cp.Variable((3, 4), name="X")
M34 = cp.Parameter((3, 4), name="M")
t_pos = cp.Parameter(pos=True, name="t")
A_VAL, M_VAL = rng.standard_normal(4), rng.standard_normal((3, 4))

ATOM_CASES = {
    "norm1_norm_inf_maximum_minimum": (
        cp.Problem(cp.Minimize(cp.norm1(x4 - a4) + cp.norm(x4, "inf") + cp.sum(cp.maximum(x4, a4, 0.3))
                               + cp.sum(cp.neg(x4 + 1)) + 2 * cp.sum_squares(x4 - 1))),
        [a4], [A_VAL], [x4],
    ),
    "entr_exp_log_logistic": (
        cp.Problem(cp.Maximize(a4 @ x4 + cp.sum(cp.entr(x4)) - cp.sum(cp.exp(x4)) + cp.sum(cp.log(x4 + 1))
                               - cp.sum(cp.logistic(x4))), [cp.sum(x4) == 1]),
        [a4], [A_VAL], [x4],
    ),
    "odd_power_keeps_cvxpy_domain": (  # cvxpy's x^3 is +inf for x < 0
        cp.Problem(cp.Minimize(cp.sum(cp.power(x4, 3)) + cp.sum(cp.power(x4 + 2, 1.5)) - a4 @ x4)),
        [a4], [A_VAL], [x4],
    ),
    "quad_form_quad_over_lin_division": (
        cp.Problem(cp.Minimize(cp.quad_form(x4, cp.psd_wrap(np.diag([1.0, 2.0, 3.0, 4.0])))
                               + cp.quad_over_lin(x4 - a4, t_pos) + cp.sum_squares(x4 / t_pos - 1)), [x4 <= 0.5]),
        [a4, t_pos], [A_VAL, np.array(2.0)], [x4],
    ),
    "indexing_reshape_stack_axis_sums": (
        cp.Problem(
            cp.Minimize(cp.sum_squares(X34 - M34) + cp.sum_squares(cp.vec(X34, order="F") - np.arange(12.0) / 12)
                        + cp.sum_squares(cp.hstack([X34[:, 0], X34[::-1, 3]]) - 1) + cp.trace(X34[:, :3])),
            [X34[0, :] >= 0.2, X34[[0, 2]][:, 1] <= 0.3, X34[1, 2] == 0.3,
             cp.sum(X34, axis=0, keepdims=True) <= 1, cp.sum(X34, axis=1) >= -1,
             cp.reshape(X34, (4, 3), order="C")[0] <= 0.9, cp.vstack([X34[0], X34[2]]) >= -2],
        ),
        [M34], [M_VAL], [X34],
    ),
    "variable_attributes": (
        cp.Problem(cp.Minimize(cp.sum_squares(cp.Variable(4, nonneg=True, name="y") - a4)
                               + cp.sum_squares(cp.Variable(4, bounds=[-0.5, 0.5], name="z") - a4))),
        [a4], [A_VAL], None,
    ),
}


@pytest.mark.parametrize("case", sorted(ATOM_CASES))
def test_translated_atoms_match_clarabel(case):
    problem, parameters, values, variables = ATOM_CASES[case]
    _against_clarabel(problem, parameters, values, variables or problem.variables())


def test_names_order_and_compat_conventions():
    x = cp.Variable(3, name="x")
    a = cp.Parameter(3, name="a")
    unnamed = cp.Parameter(3)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a) + unnamed @ x), [x >= -1])
    prob = dl.from_cvxpy(problem)
    assert {p.name for p in prob.parameters()} == {"a", unnamed.name()}
    assert [v.name for v in prob.variables()] == ["x"]
    # default order: cvxpy's problem.parameters(); keywords use the names
    layer = prob.to_torch()
    a_t = torch.tensor([1.0, -2.0, 0.3], dtype=torch.float64)
    u_t = torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64)
    values = {id(a): a_t, id(unnamed): u_t}
    (x_pos,) = layer(*[values[id(p)] for p in problem.parameters()])
    (x_kw,) = layer(**{"a": a_t, unnamed.name(): u_t})
    torch.testing.assert_close(x_pos, x_kw)
    a.value, unnamed.value = a_t.numpy(), u_t.numpy()
    solve(problem)
    np.testing.assert_allclose(x_pos.numpy(), x.value, atol=1e-7)
    with pytest.warns(UserWarning, match="solver_args"):
        layer(*[values[id(p)] for p in problem.parameters()], solver_args={"eps": 1e-3})


def test_repeated_names_renamed_and_vanished_parameter_accepted():
    x = cp.Variable(2, name="x")
    a1, a2 = cp.Parameter(2, name="a"), cp.Parameter(2, name="a")
    gone = cp.Parameter(2, name="gone")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a1) + a2 @ x + 0 * (gone @ x)))
    with pytest.warns(UserWarning, match="'a' -> 'a_2'"):
        prob = dl.from_cvxpy(problem)
    layer = prob.to_torch(parameters=[a1, a2, gone], variables=[x])
    one = torch.ones(2, dtype=torch.float64)
    (out,) = layer(one, one, one)  # CvxpyLayer takes a tensor for every parameter
    a1.value, a2.value, gone.value = np.ones(2), np.ones(2), np.ones(2)
    solve(problem)
    np.testing.assert_allclose(out.numpy(), x.value, atol=1e-7)


def test_unsupported_atom_is_named():
    x = cp.Variable(3, name="x")
    with pytest.raises(TypeError, match="log_sum_exp"):
        dl.from_cvxpy(cp.Problem(cp.Minimize(cp.log_sum_exp(x)), [x >= 0]))
    with pytest.raises(TypeError, match="'SOC'"):
        dl.from_cvxpy(cp.Problem(cp.Minimize(cp.sum_squares(x)), [cp.SOC(x[0], x[1:])]))
    with pytest.raises(TypeError, match="quad_over_lin"):
        dl.from_cvxpy(cp.Problem(cp.Minimize(cp.quad_over_lin(x, cp.Variable(pos=True)))))
    with pytest.raises(TypeError, match="integer"):
        dl.from_cvxpy(cp.Problem(cp.Minimize(cp.sum_squares(cp.Variable(2, integer=True, name="k")))))
    with pytest.raises(ValueError, match="not a Python identifier"):
        dl.from_cvxpy(cp.Problem(cp.Minimize(cp.sum_squares(cp.Variable(2, name="my x")))))
    with pytest.raises(TypeError, match="cvxpy.Problem"):
        dl.from_cvxpy("min x")


def test_inv_pos_keeps_its_domain():
    # cvxpy's inv_pos(x) is +inf for x <= 0, the DSL's x^-1 is defined for x != 0: the
    # domain becomes x >= 0, else sum(inv_pos(x)) + exp(th)'x was 'unbounded' towards
    # x -> 0- on half the instances. Closed form: x = exp(-th / 2).
    n = 5
    x = cp.Variable(n, name="x")
    th = cp.Parameter(n, name="th")
    prob = cp.Problem(cp.Minimize(cp.sum(cp.inv_pos(x)) + cp.exp(th) @ x))
    layer = dl.from_cvxpy(prob).to_torch(parameters=[th], variables=[x])
    theta = torch.randn(16, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (out,) = layer(theta)
    assert layer.info.status == ["optimal"] * 16
    torch.testing.assert_close(out, torch.exp(-theta / 2), atol=1e-6, rtol=0)
