"""dl.from_cvxpy as a drop-in for CvxpyLayer: same solutions and gradients as
cvxpylayers on the examples of its README (checked against cvxpylayers itself)."""
import cvxpy as cp
import numpy as np
import pytest
import torch

import declarative as dl
from references import solve

cvxpylayers_torch = pytest.importorskip("cvxpylayers.torch")
CvxpyLayer = cvxpylayers_torch.CvxpyLayer

# cvxpylayers differentiates SCS's solution; at this accuracy the two agree to ~1e-5
SCS_ARGS = {"solve_method": "SCS", "eps_abs": 1e-10, "eps_rel": 1e-10, "max_iters": 100000}


def _compare(problem, parameters, variables, inputs, atol=1e-5):
    ours = dl.from_cvxpy(problem).to_torch(parameters=parameters, variables=variables)
    theirs = CvxpyLayer(problem, parameters=parameters, variables=variables)
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    out_ours = ours(*a)
    out_theirs = theirs(*b, solver_args=SCS_ARGS)
    assert isinstance(out_ours, tuple) and len(out_ours) == len(out_theirs)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in out_theirs]
    for o, t in zip(out_ours, out_theirs):
        np.testing.assert_allclose(o.detach().numpy(), t.detach().numpy(), atol=atol)
    sum((w * o).sum() for w, o in zip(weights, out_ours)).backward()
    sum((w * o).sum() for w, o in zip(weights, out_theirs)).backward()
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.grad.numpy(), y.grad.numpy(), atol=10 * atol)
    return ours


def test_least_squares_layer():
    # cvxpylayers' README example: min ||Ax - b||^2 + ||x||^2 s.t. x >= 0 (A, b parameters)
    n, m = 2, 3
    x = cp.Variable(n, name="x")
    A = cp.Parameter((m, n), name="A")
    b = cp.Parameter(m, name="b")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + cp.sum_squares(x)), [x >= 0])
    gen = torch.Generator().manual_seed(1)
    A_t = torch.randn(m, n, generator=gen, dtype=torch.float64)
    b_t = torch.randn(m, generator=gen, dtype=torch.float64)
    layer = _compare(problem, [A, b], [x], [A_t, b_t])
    # batched, like CvxpyLayer
    (xb,) = layer(A_t.expand(4, m, n), torch.randn(4, m, generator=gen, dtype=torch.float64))
    assert xb.shape == (4, n)


def test_relu_as_projection():
    n = 5
    x = cp.Variable(n, name="x")
    y = cp.Parameter(n, name="y")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= 0])
    y_t = torch.linspace(-1, 1, n, dtype=torch.float64).expand(3, n) + 0.13
    (out,) = dl.from_cvxpy(problem).to_torch(parameters=[y], variables=[x])(y_t)
    torch.testing.assert_close(out, torch.relu(y_t), atol=1e-8, rtol=0)
    _compare(problem, [y], [x], [y_t])


def test_simplex_projection():
    n = 6
    x = cp.Variable(n, name="x")
    y = cp.Parameter(n, name="y")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [cp.sum(x) == 1, x >= 0])
    y_t = torch.randn(4, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _compare(problem, [y], [x], [y_t])


def test_names_kept_and_nonsmooth_atoms_translated():
    x = cp.Variable(3, name="x")
    a = cp.Parameter(3, name="a")
    problem = cp.Problem(cp.Minimize(cp.norm1(x - a) + cp.sum_squares(x) + cp.maximum(x[0], 0.9)), [cp.abs(x) <= 2])
    prob = dl.from_cvxpy(problem)
    assert [p.name for p in prob.parameters()] == ["a"]
    assert [v.name for v in prob.variables()] == ["x"]
    a_t = torch.tensor([1.0, -2.0, 0.3], dtype=torch.float64)
    (x_t,) = prob.to_torch(parameters=[a], variables=[x], tol=1e-11)(a_t)
    a.value = a_t.numpy()
    solve(problem)
    np.testing.assert_allclose(x_t.numpy(), x.value, atol=1e-6)


def test_unsupported_atom_is_named():
    x = cp.Variable(3, name="x")
    problem = cp.Problem(cp.Minimize(cp.log_sum_exp(x)), [x >= 0])
    with pytest.raises(TypeError, match="log_sum_exp"):
        dl.from_cvxpy(problem)
