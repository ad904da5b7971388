"""ImplicitLayer, the batched Newton solver and the Krylov solvers.

References: the worked example of Zhang et al. (closed form), finite differences
(``torch.autograd.gradcheck`` in float64), ``torch.linalg.eigh`` differentiated by
autograd, ``scipy.linalg.eigh`` and ``torch.linalg.solve``.
"""
import functools
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from declarative.implicit_layers import (
    ConvergenceWarning,
    ImplicitLayer,
    SingularJacobianWarning,
    newton,
)
from solvers.krylov import cg, gmres

DOUBLE = torch.float64


# --- the worked example of Zhang et al.: F1 = x^2 + |y|^2 - 4, F2 = x y1 - 1 -----------

def seed_residual(x, y):
    return torch.stack([x[:, 0] ** 2 + y[:, 0] ** 2 + y[:, 1] ** 2 - 4, x[:, 0] * y[:, 0] - 1], dim=1)


def seed_closed_form(x):
    y1 = 1 / x[:, 0]
    return torch.stack([y1, torch.sqrt(4 - x[:, 0] ** 2 - y1 ** 2)], dim=1)


def seed_derivative(x):
    """Analytic dy/dx on the branch y2 > 0: (-1/x^2, (1/x^3 - x) / y2)."""
    y = seed_closed_form(x)
    return torch.stack([-1 / x[:, 0] ** 2, (1 / x[:, 0] ** 3 - x[:, 0]) / y[:, 1]], dim=1)


def jacobian_wrt_scalar_input(layer, x):
    """(B, 2): dy_i/dx per instance, for x of shape (B, 1)."""
    x = x.clone().requires_grad_(True)
    y = layer(x)
    rows = [torch.autograd.grad(y[:, i].sum(), x, retain_graph=True)[0][:, 0] for i in range(y.shape[1])]
    return torch.stack(rows, dim=1)


SEED_SOLVERS = {
    "closed_form": seed_closed_form,
    "newton": newton,
    "newton_partial": functools.partial(newton, max_iter=30, line_search=False),
}


@pytest.mark.parametrize("solver", sorted(SEED_SOLVERS))
def test_seed_example_gradient_is_the_papers_value(solver):
    layer = ImplicitLayer(seed_residual, SEED_SOLVERS[solver], tol=1e-12,
                          initial_guess=torch.tensor([1.2, 1.2], dtype=DOUBLE))
    x = torch.tensor([[1.0]], dtype=DOUBLE)
    y = layer(x)
    torch.testing.assert_close(y, torch.tensor([[1.0, math.sqrt(2)]], dtype=DOUBLE))
    # -[[2, 2 sqrt 2], [1, 0]]^-1 [2, 1] = (-1, 0): equation (24) of the paper.
    expected = -torch.linalg.solve(torch.tensor([[2, 2 * math.sqrt(2)], [1, 0]], dtype=DOUBLE),
                                   torch.tensor([2.0, 1.0], dtype=DOUBLE))
    torch.testing.assert_close(jacobian_wrt_scalar_input(layer, x)[0], expected)
    torch.testing.assert_close(expected, torch.tensor([-1.0, 0.0], dtype=DOUBLE))
    assert layer.info.status == ["converged"]


def test_seed_example_batched_matches_closed_form_and_gradcheck():
    x = torch.tensor([[1.0], [1.2], [0.8], [1.35]], dtype=DOUBLE)
    layer = ImplicitLayer(seed_residual, newton, initial_guess=torch.tensor([1.0, 1.0], dtype=DOUBLE), tol=1e-12)
    torch.testing.assert_close(layer(x), seed_closed_form(x))
    torch.testing.assert_close(jacobian_wrt_scalar_input(layer, x), seed_derivative(x))
    assert torch.autograd.gradcheck(layer, (x.clone().requires_grad_(True),))
    assert layer.info.iterations.shape == (4,)


# --- normalized-cuts eigenvector layer --------------------------------------------------

def symmetrize(W):
    return (W + W.transpose(-1, -2)) / 2


def ncut_residual(W, y):
    W = symmetrize(W)
    n = W.shape[-1]
    v, eigenvalue = y[:, :n], y[:, n:]
    degree = W.sum(dim=-1)
    laplacian_v = degree * v - (W @ v.unsqueeze(-1)).squeeze(-1)
    return torch.cat([laplacian_v - eigenvalue * degree * v, (v * v).sum(dim=1, keepdim=True) - 1], dim=1)


def fix_sign(v):
    largest = v.abs().argmax(dim=1, keepdim=True)
    return v * torch.sign(v.gather(1, largest))


def ncut_eigh(W):
    """Second smallest generalized eigenpair of (L, D) through eigh; differentiable."""
    W = symmetrize(W)
    n = W.shape[-1]
    s = W.sum(dim=-1).rsqrt()
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.eye(n, dtype=W.dtype) - s[:, :, None] * W * s[:, None, :])
    v = s * eigenvectors[:, :, 1]
    v = fix_sign(v / torch.linalg.vector_norm(v, dim=1, keepdim=True))
    return torch.cat([v, eigenvalues[:, 1:2]], dim=1)


def ncut_scipy(W):
    """The same pair from scipy's generalized symmetric solver (a user's numpy forward)."""
    out = []
    for w in symmetrize(W).numpy():
        degree = np.diag(w.sum(axis=1))
        values, vectors = scipy.linalg.eigh(degree - w, degree, subset_by_index=[1, 1])
        v = vectors[:, 0] / np.linalg.norm(vectors[:, 0])
        v = v * np.sign(v[np.argmax(np.abs(v))])
        out.append(np.concatenate([v, values]))
    return np.stack(out)


def random_affinity(batch, n, seed):
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(batch, n, 2, generator=g, dtype=DOUBLE)
    distance = (points[:, :, None, :] - points[:, None, :, :]).square().sum(dim=-1)
    return torch.exp(-distance / 2)


@pytest.mark.parametrize("linear_solver", ["dense", "gmres"])
def test_eigenvector_layer_matches_finite_differences(linear_solver):
    W = random_affinity(2, 5, seed=1).requires_grad_(True)
    layer = ImplicitLayer(ncut_residual, ncut_eigh, linear_solver=linear_solver, tol=1e-10)
    assert torch.autograd.gradcheck(layer, (W,))
    assert layer.info.linear_solver == linear_solver


def test_eigenvector_layer_matches_differentiating_eigh():
    W = random_affinity(3, 8, seed=2).requires_grad_(True)
    weights = torch.randn(3, 9, dtype=DOUBLE, generator=torch.Generator().manual_seed(3))
    layer = ImplicitLayer(ncut_residual, ncut_eigh)
    y = layer(W)
    reference = ncut_eigh(W)
    torch.testing.assert_close(y, reference)
    (grad_layer,) = torch.autograd.grad((y * weights).sum(), W)
    (grad_eigh,) = torch.autograd.grad((reference * weights).sum(), W)
    torch.testing.assert_close(grad_layer, grad_eigh, rtol=1e-7, atol=1e-9)
    assert layer.info.status == ["converged"] * 3

    # The eigenvalue alone against its closed form: lambda = v'Lv / v'Dv, so
    # d lambda / dW_ij = (v_i^2 - v_i v_j - lambda v_i^2) / v'Dv on the symmetric part.
    (grad_eigenvalue,) = torch.autograd.grad(layer(W)[:, -1].sum(), W)
    v, eigenvalue = y[:, :-1].detach(), y[:, -1].detach()
    Ws = symmetrize(W.detach())
    vDv = (Ws.sum(dim=-1) * v * v).sum(dim=1)
    G = ((1 - eigenvalue)[:, None, None] * (v * v)[:, :, None] - v[:, :, None] * v[:, None, :]) / vDv[:, None, None]
    torch.testing.assert_close(grad_eigenvalue, symmetrize(G))


def test_eigenvector_layer_with_a_scipy_forward():
    W = random_affinity(2, 6, seed=4).requires_grad_(True)
    weights = torch.randn(2, 7, dtype=DOUBLE, generator=torch.Generator().manual_seed(5))
    scipy_layer = ImplicitLayer(ncut_residual, lambda W: ncut_scipy(W.detach()))
    y = scipy_layer(W)
    torch.testing.assert_close(y, ncut_eigh(W.detach()))
    (grad_scipy,) = torch.autograd.grad((y * weights).sum(), W)
    (grad_eigh,) = torch.autograd.grad((ncut_eigh(W) * weights).sum(), W)
    torch.testing.assert_close(grad_scipy, grad_eigh, rtol=1e-6, atol=1e-8)


# --- linear solvers in the backward pass -------------------------------------------------

class ConvexGradient(nn.Module):
    """F(x, y) = A y + y^3 / 3 - x: the gradient of a strictly convex function, so dF/dy
    = A + diag(y^2) is symmetric positive definite; A is a shared trainable parameter."""

    def __init__(self, n, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        M = torch.randn(n, n, dtype=DOUBLE, generator=g) / math.sqrt(n)
        self.A = nn.Parameter(M @ M.T + torch.eye(n, dtype=DOUBLE))

    def forward(self, x, y):
        return y @ self.A.T + y ** 3 / 3 - x


@pytest.mark.parametrize("linear_solver", ["dense", "gmres", "cg"])
def test_linear_solvers_agree_with_finite_differences(linear_solver):
    residual = ConvexGradient(6, seed=6)
    x = torch.randn(3, 6, dtype=DOUBLE, generator=torch.Generator().manual_seed(7), requires_grad=True)
    layer = ImplicitLayer(residual, newton, initial_guess=torch.zeros(6, dtype=DOUBLE), tol=1e-13,
                          linear_solver=linear_solver)
    assert torch.autograd.gradcheck(layer, (x,))
    # The shared parameter A: directional finite difference of a scalar loss.
    loss = layer(x).square().sum()
    (grad_A,) = torch.autograd.grad(loss, residual.A)
    direction = torch.randn(6, 6, dtype=DOUBLE, generator=torch.Generator().manual_seed(8))
    step = 1e-6
    with torch.no_grad():
        residual.A += step * direction
        plus = layer(x).square().sum()
        residual.A -= 2 * step * direction
        minus = layer(x).square().sum()
        residual.A += step * direction
    torch.testing.assert_close((grad_A * direction).sum(), (plus - minus) / (2 * step), rtol=1e-6, atol=1e-8)


def test_auto_picks_krylov_above_the_threshold_and_agrees_with_dense():
    n = 150
    residual = ConvexGradient(n, seed=9)
    x = torch.randn(2, n, dtype=DOUBLE, generator=torch.Generator().manual_seed(10), requires_grad=True)
    weights = torch.randn(2, n, dtype=DOUBLE, generator=torch.Generator().manual_seed(11))
    grads = {}
    for linear_solver in ["auto", "dense"]:
        layer = ImplicitLayer(residual, newton, initial_guess=torch.zeros(n, dtype=DOUBLE), tol=1e-12,
                              linear_solver=linear_solver)
        (grads[linear_solver],) = torch.autograd.grad((layer(x) * weights).sum(), x)
        if linear_solver == "auto":
            assert layer.info.linear_solver == "gmres"
            assert layer.info.backward_status == ["ok", "ok"]
    torch.testing.assert_close(grads["auto"], grads["dense"], rtol=1e-8, atol=1e-10)
    small = ImplicitLayer(residual, newton, initial_guess=torch.zeros(n, dtype=DOUBLE), dense_threshold=n)
    small(x)
    assert small.info.linear_solver == "dense"


def test_shared_and_batched_inputs_gradcheck():
    """A shared input (no batch dimension) gets the batch-summed gradient."""
    def residual(x, c, y):
        return y + 0.3 * torch.sin(y) * c - x

    layer = ImplicitLayer(residual, newton, input_batched=(True, False),
                          initial_guess=torch.zeros(4, dtype=DOUBLE), tol=1e-13)
    x = torch.randn(3, 4, dtype=DOUBLE, generator=torch.Generator().manual_seed(12), requires_grad=True)
    c = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=DOUBLE, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x, c))


# --- bad input --------------------------------------------------------------------------

def test_wrong_residual_shape_is_a_value_error():
    def residual(x, y):
        return torch.cat([seed_residual(x, y), y[:, :1]], dim=1)   # 3 equations, 2 unknowns

    layer = ImplicitLayer(residual, seed_closed_form)
    with pytest.raises(ValueError, match="residual returned shape"):
        layer(torch.ones(2, 1, dtype=DOUBLE))


def test_solver_output_with_wrong_batch_is_a_value_error():
    layer = ImplicitLayer(seed_residual, lambda x: seed_closed_form(x)[:1])
    with pytest.raises(ValueError, match="solve returned shape"):
        layer(torch.ones(3, 1, dtype=DOUBLE))


def test_options_are_checked():
    with pytest.raises(ValueError, match="'ift'"):
        ImplicitLayer(seed_residual, seed_closed_form, backward="jfb")
    with pytest.raises(ValueError, match="'dense'.*'gmres'"):
        ImplicitLayer(seed_residual, seed_closed_form, linear_solver="lu")
    with pytest.raises(TypeError):
        ImplicitLayer(seed_residual, seed_closed_form, "ift")     # options are keyword-only
    with pytest.raises(TypeError, match="input 0"):
        ImplicitLayer(seed_residual, seed_closed_form)([1.0])
    with pytest.raises(ValueError, match="initial_guess"):
        ImplicitLayer(seed_residual, newton)(torch.ones(1, 1, dtype=DOUBLE))


def test_a_bad_solver_instance_is_flagged_and_isolated():
    """Instance 1 comes back far from F = 0: reported, NaN gradient, others exact, and the
    shared parameter's gradient is what the good instances alone give."""
    def residual(x, c, y):
        return torch.stack([x[:, 0] ** 2 + y[:, 0] ** 2 + y[:, 1] ** 2 - 4 * c, x[:, 0] * y[:, 0] - 1], dim=1)

    def solve(x, c):
        y1 = 1 / x[:, 0]
        return torch.stack([y1, torch.sqrt(4 * c - x[:, 0] ** 2 - y1 ** 2)], dim=1)

    def broken(x, c):
        y = solve(x, c)
        y[1] += 0.5
        return y

    x = torch.tensor([[1.0], [1.1], [0.9]], dtype=DOUBLE, requires_grad=True)
    c = torch.tensor(1.0, dtype=DOUBLE, requires_grad=True)
    layer = ImplicitLayer(residual, broken, input_batched=(True, False))
    with pytest.warns(ConvergenceWarning, match=r"instances \[1\]"):
        y = layer(x, c)
    assert layer.info.status == ["converged", "residual_above_tol", "converged"]
    assert layer.info.residual[1] > 0.1
    grad_x, grad_c = torch.autograd.grad(y.sum(), (x, c))
    assert torch.isnan(grad_x[1]).all()
    assert layer.info.backward_status == ["ok", "skipped", "ok"]

    good = torch.tensor([0, 2])
    reference = ImplicitLayer(residual, solve, input_batched=(True, False))
    x_good = x.detach()[good].requires_grad_(True)
    ref_x, ref_c = torch.autograd.grad(reference(x_good, c).sum(), (x_good, c))
    torch.testing.assert_close(grad_x[good], ref_x)
    torch.testing.assert_close(grad_c, ref_c)
    torch.testing.assert_close(grad_x[good], seed_derivative(x.detach()[good]).sum(dim=1, keepdim=True))


@pytest.mark.parametrize("linear_solver", ["dense", "gmres"])
def test_singular_jacobian_is_flagged_in_the_backward(linear_solver):
    """F = y^3 - x has dF/dy = 3 y^2 = 0 at x = 0: that instance gets NaN, the others
    the exact derivative 1 / (3 y^2)."""
    def residual(x, y):
        return y ** 3 - x

    def cube_root(x):
        return torch.sign(x) * x.abs() ** (1 / 3)

    layer = ImplicitLayer(residual, cube_root, linear_solver=linear_solver)
    x = torch.tensor([[8.0], [0.0], [27.0]], dtype=DOUBLE, requires_grad=True)
    y = layer(x)
    assert layer.info.status == ["converged"] * 3
    with pytest.warns(SingularJacobianWarning, match=r"instances \[1\]") as record:
        (grad,) = torch.autograd.grad(y.sum(), x)
    assert record[0].filename == __file__  # (the line that asked for the gradient)
    assert torch.isnan(grad[1]).all()
    torch.testing.assert_close(grad[[0, 2], 0], torch.tensor([1 / 12, 1 / 27], dtype=DOUBLE))
    expected = "singular_jacobian" if linear_solver == "dense" else "linear_solve_failed"
    assert layer.info.backward_status == ["ok", expected, "ok"]


def test_a_closure_parameter_without_a_gradient_is_reported():
    scale = torch.tensor(2.0, dtype=DOUBLE, requires_grad=True)
    layer = ImplicitLayer(lambda x, y: scale * y - x, lambda x: x / 2)
    x = torch.ones(2, 1, dtype=DOUBLE, requires_grad=True)
    with pytest.warns(UserWarning, match="extra_parameters"):
        layer(x).sum().backward()
    declared = ImplicitLayer(lambda x, y: scale * y - x, lambda x: x / scale.detach(), extra_parameters=[scale])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = declared(x)
        (grad_scale,) = torch.autograd.grad(out.sum(), scale)
    torch.testing.assert_close(grad_scale, torch.tensor(-2 * 1 / 4, dtype=DOUBLE))  # d(x/s)/ds = -x/s^2


# --- the batched Newton solver ---------------------------------------------------------

def test_newton_reports_each_instance():
    """y^2 = x: x = 4 converges; x = -1 from y0 = 0 meets dF/dy = 0; x = -1 from
    y0 = 0.5 has no real root and runs out of iterations."""
    x = torch.tensor([[4.0], [-1.0], [-1.0]], dtype=DOUBLE)
    y0 = torch.tensor([[1.0], [0.0], [0.5]], dtype=DOUBLE)
    result = newton(lambda x, y: y ** 2 - x, x, y0=y0, max_iter=25)
    assert result.status_names() == ["converged", "singular_jacobian", "max_iter"]
    torch.testing.assert_close(result.solution[0], torch.tensor([2.0], dtype=DOUBLE))
    assert result.iterations[0] < 10
    # Instance 0 alone gives the same answer: failures do not leak.
    alone = newton(lambda x, y: y ** 2 - x, x[:1], y0=y0[:1])
    torch.testing.assert_close(alone.solution, result.solution[:1])


def test_newton_inside_a_layer_flags_a_singular_instance():
    layer = ImplicitLayer(lambda x, y: y ** 2 - x, newton)
    x = torch.tensor([[4.0], [-1.0]], dtype=DOUBLE, requires_grad=True)
    with pytest.warns(ConvergenceWarning):
        y = layer(x, y0=torch.tensor([[1.0], [0.0]], dtype=DOUBLE))
    assert layer.info.status == ["converged", "singular_jacobian"]
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad[0], torch.tensor([0.25], dtype=DOUBLE))   # 1 / (2 y)
    assert torch.isnan(grad[1]).all()


# --- Krylov solvers ----------------------------------------------------------------------

def batched_matvec(matrices):
    return lambda v: (matrices @ v.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("restart", [5, 40])
def test_gmres_solves_nonsymmetric_systems(restart):
    g = torch.Generator().manual_seed(13)
    A = torch.randn(4, 40, 40, dtype=DOUBLE, generator=g) / math.sqrt(40) + 2 * torch.eye(40, dtype=DOUBLE)
    b = torch.randn(4, 40, dtype=DOUBLE, generator=g)
    result = gmres(batched_matvec(A), b, tol=1e-12, restart=restart, max_iter=400)
    assert result.converged.all()
    torch.testing.assert_close(result.solution, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    assert (result.residual <= 1e-12).all()


def test_cg_solves_spd_systems_and_rejects_indefinite_ones():
    g = torch.Generator().manual_seed(14)
    M = torch.randn(3, 30, 30, dtype=DOUBLE, generator=g)
    A = M @ M.transpose(1, 2) / 30 + 0.5 * torch.eye(30, dtype=DOUBLE)
    A[2] = -A[2]  # negative definite: CG must not claim success
    b = torch.randn(3, 30, dtype=DOUBLE, generator=g)
    result = cg(batched_matvec(A), b, tol=1e-12)
    assert result.converged.tolist() == [True, True, False]
    torch.testing.assert_close(result.solution[:2], torch.linalg.solve(A[:2], b[:2]), rtol=1e-9, atol=1e-10)


def test_gmres_failure_is_per_instance():
    g = torch.Generator().manual_seed(15)
    A = torch.randn(3, 20, 20, dtype=DOUBLE, generator=g) / math.sqrt(20) + 2 * torch.eye(20, dtype=DOUBLE)
    A[1] = 0.0
    A[1, :5, :5] = torch.eye(5, dtype=DOUBLE)  # singular: b outside its range
    b = torch.randn(3, 20, dtype=DOUBLE, generator=g)
    result = gmres(batched_matvec(A), b, tol=1e-12)
    assert result.converged.tolist() == [True, False, True]
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(result.solution[keep], torch.linalg.solve(A[keep], b[keep]), rtol=1e-9, atol=1e-10)


def test_a_nan_solution_does_not_reach_shared_gradients():
    """A solver that returns NaN for one instance: status 'diverged', NaN gradient there
    where the loss reads it (zero where it does not: nan_to_num's cotangent there is 0),
    and the shared input's gradient is exactly what the other instances give."""
    def residual(x, c, y):
        return y + c * torch.tanh(y) - x

    def solve(x, c):
        y = newton(residual, x, c, y0=torch.zeros_like(x), tol=1e-13).solution
        y[1] = float("nan")
        return y

    x = torch.randn(3, 2, dtype=DOUBLE, generator=torch.Generator().manual_seed(16), requires_grad=True)
    c = torch.tensor([0.5, 2.0], dtype=DOUBLE, requires_grad=True)
    layer = ImplicitLayer(residual, solve, input_batched=(True, False))
    with pytest.warns(ConvergenceWarning):
        y = layer(x, c)
    assert layer.info.status == ["converged", "diverged", "converged"]
    (read,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    assert torch.isnan(read[1]).all()
    grad_x, grad_c = torch.autograd.grad(y.nan_to_num().sum(), (x, c))
    assert not grad_x[1].any()
    good = torch.tensor([0, 2])
    x_good = x.detach()[good].requires_grad_(True)
    reference = ImplicitLayer(residual, newton, input_batched=(True, False), initial_guess=torch.zeros(2, dtype=DOUBLE))
    ref_x, ref_c = torch.autograd.grad(reference(x_good, c).sum(), (x_good, c))
    torch.testing.assert_close(grad_x[good], ref_x)
    torch.testing.assert_close(grad_c, ref_c)


def test_an_output_aliasing_the_input_is_copied():
    """solve may hand back its input (here F = y - x, so y = x); the output must not share
    memory with it."""
    layer = ImplicitLayer(lambda x, y: y - x, lambda x: x)
    x = torch.randn(3, 2, dtype=DOUBLE, requires_grad=True)
    y = layer(x)
    assert y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    (grad,) = torch.autograd.grad((y * 2).sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, 2.0))


def test_an_output_edited_in_place_keeps_the_papers_gradient():
    # the output once shared memory with the point the backward linearizes at, so
    # y.add_(1) moved that point: dy/dx came out (-2, 1.24) instead of (-1, 0)
    layer = ImplicitLayer(seed_residual, newton, tol=1e-12, initial_guess=torch.tensor([1.2, 1.2], dtype=DOUBLE))
    x = torch.tensor([[1.0]], dtype=DOUBLE, requires_grad=True)
    y = layer(x)
    y.add_(1.0)
    rows = [torch.autograd.grad(y[0, i], x, retain_graph=True)[0].item() for i in range(2)]
    assert rows == pytest.approx([-1.0, 0.0], abs=1e-9)


def test_a_float32_initial_guess_serves_float64_inputs_and_moves_with_the_model():
    # the guess was a plain attribute: model.double() left it float32, and Newton failed
    # inside its LU solve on the mix
    model = nn.Sequential(ImplicitLayer(seed_residual, newton, tol=1e-12,
                                        initial_guess=torch.tensor([1.2, 1.2])))
    x = torch.tensor([[1.0], [1.5]], dtype=DOUBLE)
    torch.testing.assert_close(model(x), seed_closed_form(x))
    model = model.double()
    assert model[0].initial_guess.dtype == DOUBLE
    torch.testing.assert_close(model(x), seed_closed_form(x))
    assert list(model.state_dict()) == []


@pytest.mark.parametrize("solver", ["newton", "user"])
def test_an_implicit_layer_passes_an_empty_batch_through(solver):
    # An ImplicitLayer's output shape is its solver's: an empty batch goes through it
    # (Newton included) and comes out empty, with zero-size gradients.
    residual = lambda x, y: y ** 3 + y - x  # noqa: E731
    if solver == "newton":
        layer = ImplicitLayer(residual, newton, initial_guess=torch.zeros(4, dtype=torch.float64))
    else:
        layer = ImplicitLayer(residual, lambda x: x / 2)
    x = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 4) and layer.info.status == []
    y.sum().backward()
    assert x.grad.shape == (0, 4)


@pytest.mark.parametrize("dtype,spread", [(torch.float32, (1e3, 1.0, 1e-4)), (torch.float64, (1e8, 1.0, 1e-8))])
def test_equations_of_different_units_are_not_singular(dtype, spread):
    # F = D M (y - x) with D spreading the equations over 7 (16) decades: dF/dy = D M is
    # as regular as M, and dy/dx = I. The pivot test compared the smallest LU pivot
    # with the largest, and called it singular: Newton stayed at its start, the dense
    # backward gave NaN
    M = torch.tensor([[2.0, 0.5, 0.0], [0.3, 1.0, 0.2], [0.0, -0.4, 1.5]], dtype=dtype)
    D = torch.tensor(spread, dtype=dtype)

    def residual(x, y):
        return D * ((y - x) @ M.T)

    x = torch.randn(4, 3, dtype=dtype, generator=torch.Generator().manual_seed(3)).requires_grad_()
    layer = ImplicitLayer(residual, newton, initial_guess=torch.zeros(3, dtype=dtype), linear_solver="dense")
    y = layer(x)
    assert layer.info.status == ["converged"] * 4
    torch.testing.assert_close(y, x.detach())
    (g,) = torch.autograd.grad((y * torch.arange(3.0, dtype=dtype)).sum(), x)
    torch.testing.assert_close(g, torch.arange(3.0, dtype=dtype).expand(4, 3))


@pytest.mark.parametrize("layer_tol", [None, 1e-12])
def test_newton_given_a_tolerance_is_judged_by_it(layer_tol):
    # functools.partial(newton, tol=1e-2), the documented way to set Newton's options:
    # the status held Newton's answer to the default tolerance instead, and reported
    # 'max_iter' (NaN gradients) for an instance Newton had solved to its own. Newton
    # solves to the partial's tol even where the layer has one, so that is the one held.
    # y^3 + y = x; dy/dx = 1 / (3 y^2 + 1) at the answer Newton gives
    def residual(x, y):
        return y ** 3 + y - x

    x = torch.tensor([[0.5], [2.0]], dtype=DOUBLE, requires_grad=True)
    layer = ImplicitLayer(residual, functools.partial(newton, tol=1e-2), initial_guess=torch.zeros(1, dtype=DOUBLE),
                          tol=layer_tol)
    y = layer(x)
    assert layer.info.status == ["converged"] * 2
    assert bool((layer.info.residual <= 1e-2).all())
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, 1 / (3 * y.detach() ** 2 + 1))


@pytest.mark.parametrize("shape", [(2,), (1, 2)])
def test_a_start_of_the_wrong_batch_size_is_named(shape):
    # y0 of (2,) or (1, 2) for B = 3 failed inside the user's residual, or blamed it
    def residual(x, y):
        return y - x

    layer = ImplicitLayer(residual, newton)
    with pytest.raises(ValueError, match=r"y0 gives a start of shape .*batch size B = 3"):
        layer(torch.ones(3, 2, dtype=DOUBLE), y0=torch.zeros(shape, dtype=DOUBLE))
