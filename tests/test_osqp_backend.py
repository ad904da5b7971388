"""The OSQP forward backend against CVXPY/Clarabel (solutions, duals, statuses) and,
through the implicit backward it feeds, against cvxpylayers' gradients."""
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

from conftest import random_qp
from references import qp_reference, solve
from solvers import interior_point as ipm

pytest.importorskip("osqp")
from solvers.osqp_backend import OSQPCache, solve_qp_osqp  # noqa: E402


def _check_against_clarabel(data, res, atol):
    """z, lam, nu of every instance against Clarabel at tight tolerance."""
    m, p = data[2].shape[-2], data[4].shape[-2]
    for i in range(data[0].shape[0]):
        xr, lr, nr = qp_reference(*(t[i].double().numpy() for t in data))
        np.testing.assert_allclose(res.z[i].double().numpy(), xr, atol=atol, rtol=0)
        if m:
            np.testing.assert_allclose(res.lam[i].double().numpy(), lr, atol=atol, rtol=0)
        if p:
            np.testing.assert_allclose(res.nu[i].double().numpy(), nr, atol=atol, rtol=0)


@pytest.mark.parametrize("shape", [(6, 10, 6, 2), (4, 20, 30, 0), (3, 12, 0, 3)])
def test_random_qps_match_clarabel(shape):
    data = random_qp(*shape, seed=1)
    res, cache = solve_qp_osqp(*data)
    assert isinstance(cache, OSQPCache)
    assert res.status.tolist() == [ipm.OPTIMAL] * shape[0]
    assert res.z.dtype == torch.float64 and res.z.shape == (shape[0], shape[1])
    # strictly positive, with the active set exact: one of s, lam is ~eps^2 per row
    if shape[2]:
        assert bool((res.s > 0).all() and (res.lam > 0).all())
        assert bool((torch.minimum(res.s, res.lam) < 1e-30).all())
    assert float(res.dual_residual.max()) < 1e-8 and float(res.primal_residual.max()) < 1e-8
    _check_against_clarabel(data, res, atol=1e-7)


def test_lp_and_shared_data_match_clarabel():
    # an LP (Q = 0) whose matrices are shared across the batch (stride-0 expand)
    n, m, B = 8, 20, 4
    g = torch.Generator().manual_seed(5)
    G0 = torch.cat([torch.randn(m, n, generator=g, dtype=torch.float64), torch.eye(n, dtype=torch.float64),
                    -torch.eye(n, dtype=torch.float64)])
    G = G0.expand(B, -1, -1)
    h = torch.cat([torch.rand(B, m, generator=g, dtype=torch.float64) + 0.5,
                   torch.ones(B, 2 * n, dtype=torch.float64)], 1)
    c = torch.randn(B, n, generator=g, dtype=torch.float64)
    Q = torch.zeros(n, n, dtype=torch.float64).expand(B, n, n)
    A = torch.zeros(B, 0, n, dtype=torch.float64)
    b = torch.zeros(B, 0, dtype=torch.float64)
    res, _ = solve_qp_osqp(Q, c, G, h, A, b)
    assert res.status.tolist() == [ipm.OPTIMAL] * B
    for i in range(B):
        x = cp.Variable(n)
        solve(cp.Problem(cp.Minimize(c[i].numpy() @ x), [G0.numpy() @ x <= h[i].numpy()]))
        np.testing.assert_allclose(res.z[i].numpy(), x.value, atol=1e-7)


def test_statuses_infeasible_unbounded_skipped():
    B, n, m, p = 4, 5, 4, 1
    Q, c, G, h, A, b = (t.clone() for t in random_qp(B, n, m, p, seed=2))
    # instance 1: x0 <= -1 and -x0 <= -1 (x0 >= 1) cannot both hold
    G[1, :2] = 0.0
    G[1, 0, 0], G[1, 1, 0] = 1.0, -1.0
    h[1, :2] = -1.0
    # instance 3 has a NaN input: not solved
    c[3, 0] = float("nan")
    res, _ = solve_qp_osqp(Q, c, G, h, A, b, skip=torch.tensor([False, False, True, False]))
    assert res.status.tolist() == [ipm.OPTIMAL, ipm.INFEASIBLE, ipm.NUMERICAL_ERROR, ipm.NUMERICAL_ERROR]
    x = cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, cp.psd_wrap(Q[1].numpy())) + c[1].numpy() @ x),
                         [G[1].numpy() @ x <= h[1].numpy(), A[1].numpy() @ x == b[1].numpy()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problem.solve(solver=cp.CLARABEL)
    assert problem.status == cp.INFEASIBLE  # the outside reference agrees
    _check_against_clarabel([t[:1] for t in (Q, c, G, h, A, b)], res, atol=1e-7)
    # an LP without constraints on its cost direction is unbounded
    res, _ = solve_qp_osqp(torch.zeros_like(Q[:1]), c[:1], G[:1, :0], h[:1, :0], A[:1], b[:1])
    assert res.status.tolist() == [ipm.UNBOUNDED]


def test_cache_reused_with_warm_start_and_rebuilt_on_new_pattern():
    B, n, m, p = 5, 15, 10, 2
    data = random_qp(B, n, m, p, seed=3)
    # plain ADMM to the target tolerance (no loose first stages), where a warm start
    # shows most clearly
    first, cache = solve_qp_osqp(*data, eps_start=None)
    assert cache.setups == B
    # a nearby problem (new c and h, same matrices): same solvers, no refactorization,
    # started from the previous solutions
    Q, c, G, h, A, b = data
    moved = (Q, c + 1e-3, G, h + 1e-3, A, b)
    second, cache2 = solve_qp_osqp(*moved, cache=cache, eps_start=None)
    assert cache2 is cache and cache.setups == B
    assert bool((second.iterations <= first.iterations).all())
    assert int(second.iterations.sum()) < int(first.iterations.sum())
    _check_against_clarabel(moved, second, atol=1e-7)
    # new matrices with the same pattern: updated in place, still correct
    other = random_qp(B, n, m, p, seed=4)
    third, cache3 = solve_qp_osqp(*other, cache=cache)
    assert cache3 is cache and cache.setups == B
    _check_against_clarabel(other, third, atol=1e-7)
    # a diagonal Q fits the dense pattern; a denser G than a cached sparse one does not
    sparse = list(other)
    sparse[2] = torch.where(torch.rand(other[2].shape, generator=torch.Generator().manual_seed(0)) < 0.5,
                            other[2], torch.zeros_like(other[2]))
    _, sparse_cache = solve_qp_osqp(*sparse)
    _, rebuilt = solve_qp_osqp(*other, cache=sparse_cache)
    assert rebuilt is not sparse_cache


def test_float32_inputs():
    data = random_qp(4, 10, 6, 2, seed=6, dtype=torch.float32)
    res, _ = solve_qp_osqp(*data)
    assert res.status.tolist() == [ipm.OPTIMAL] * 4
    for name in ("z", "s", "lam", "nu", "primal_residual", "dual_residual"):
        assert getattr(res, name).dtype == torch.float32, name
    assert bool((res.s > 0).all() and (res.lam > 0).all())  # eps(float32)^2 is representable
    # OSQP works in float64; the float32 data are solved to the float32 rounding
    _check_against_clarabel(data, res, atol=1e-5)


def test_implicit_backward_at_osqp_active_set_matches_cvxpylayers():
    cvxpylayers_torch = pytest.importorskip("cvxpylayers.torch")
    n, m, p, B = 6, 8, 1, 3
    Q, c, G, h, A, b = random_qp(B, n, m, p, seed=7)
    # shared matrices (constants for cvxpylayers: DPP), batched c, h, b
    Q, G, A = Q[0], G[0], A[0]
    h = (G @ torch.randn(n, B, dtype=torch.float64, generator=torch.Generator().manual_seed(1))).T + 0.3
    h[:, :3] -= 1.0  # make some constraints active
    res, _ = solve_qp_osqp(Q.expand(B, n, n), c, G.expand(B, m, n), h, A.expand(B, p, n), b)
    assert res.status.tolist() == [ipm.OPTIMAL] * B
    w = torch.randn(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    u_z, u_lam, u_nu, failed, _ = ipm.kkt_adjoint(
        Q.expand(B, n, n), G.expand(B, m, n), A.expand(B, p, n), res.s, res.lam, w,
        torch.zeros(B, m, dtype=torch.float64), torch.zeros(B, p, dtype=torch.float64))
    assert not bool(failed.any())
    # F = [Qz + c + G'lam + A'nu; lam * (Gz - h); Az - b]: dL/dtheta = -u' dF/dtheta
    grad_c, grad_h, grad_b = -u_z, res.lam * u_lam, u_nu

    x = cp.Variable(n)
    c_p, h_p, b_p = cp.Parameter(n), cp.Parameter(m), cp.Parameter(p)
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, cp.psd_wrap(Q.numpy())) + c_p @ x),
                         [G.numpy() @ x <= h_p, A.numpy() @ x == b_p])
    layer = cvxpylayers_torch.CvxpyLayer(problem, parameters=[c_p, h_p, b_p], variables=[x])
    inputs = [t.clone().requires_grad_() for t in (c, h, b)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # inside diffcp
        (x_ref,) = layer(*inputs, solver_args={"solve_method": "SCS", "eps_abs": 1e-10, "eps_rel": 1e-10,
                                                "max_iters": 100000})
        (w * x_ref).sum().backward()
    np.testing.assert_allclose(res.z.numpy(), x_ref.detach().numpy(), atol=1e-7)
    for ours, ref in zip((grad_c, grad_h, grad_b), inputs):
        np.testing.assert_allclose(ours.numpy(), ref.grad.numpy(), atol=1e-6)


def test_layer_with_osqp_matches_cvxpylayers():
    # end to end: the cvxpy problem converted by dl.from_cvxpy, solved by the layer with
    # solver="osqp" (forward) and the shared implicit backward, against CvxpyLayer
    cvxpylayers_torch = pytest.importorskip("cvxpylayers.torch")
    import declarative as dl

    n, m, B = 8, 12, 4
    g = torch.Generator().manual_seed(8)
    F = torch.randn(n, n, generator=g, dtype=torch.float64)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = cp.Variable(n, name="x")
    q = cp.Parameter(n, name="q")
    h = cp.Parameter(m, name="h")
    b = cp.Parameter(name="b")
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(F.numpy() @ x) + 0.05 * cp.sum_squares(x) + q @ x),
                         [G.numpy() @ x <= h, cp.sum(x) == b])
    inputs = [torch.randn(B, n, generator=g, dtype=torch.float64),
              torch.rand(B, m, generator=g, dtype=torch.float64) * 0.5,
              torch.tensor(0.3, dtype=torch.float64)]
    ours = dl.from_cvxpy(problem).to_torch(parameters=[q, h, b], variables=[x], solver="osqp")
    theirs = cvxpylayers_torch.CvxpyLayer(problem, parameters=[q, h, b], variables=[x])
    a = [t.clone().requires_grad_() for t in inputs]
    c = [t.clone().requires_grad_() for t in inputs]
    w = torch.randn(B, n, generator=g, dtype=torch.float64)
    (x_ours,) = ours(*a)
    assert ours.info.status == ["optimal"] * B
    (w * x_ours).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # inside diffcp
        (x_ref,) = theirs(*c, solver_args={"solve_method": "SCS", "eps_abs": 1e-10, "eps_rel": 1e-10,
                                           "max_iters": 100000})
        (w * x_ref).sum().backward()
    np.testing.assert_allclose(x_ours.detach().numpy(), x_ref.detach().numpy(), atol=1e-7)
    for ours_t, ref_t in zip(a, c):
        np.testing.assert_allclose(ours_t.grad.numpy(), ref_t.grad.numpy(), atol=1e-6)


@pytest.mark.parametrize("objective_scale, row_scale", [(1e-6, 1e6), (1.0, 1e-6), (1e-6, 1e-6)])
def test_badly_scaled_rows_and_objectives_solve_as_at_unit_scale(objective_scale, row_scale):
    # Scaling the objective or a row changes no solution, but OSQP's tolerances are
    # absolute: an LP came back optimal 0.65 off, a feasible problem with a row times
    # 1e-6 infeasible. Rows and objective are now scaled first, as the interior point
    # does. Reference: Clarabel on the unscaled data.
    Q, q, G, h, A, b = random_qp(4, 6, 5, 1, seed=12)
    for box in (False, True):
        data = [Q, q, G, h, A, b]
        if box:  # an LP with the box |x| <= 10 (x0, the point that made it feasible, is inside)
            eye = torch.eye(6, dtype=torch.float64).expand(4, 6, 6)
            data = [torch.zeros_like(Q), q, torch.cat([G, eye, -eye], 1),
                    torch.cat([h, torch.full((4, 12), 10.0, dtype=torch.float64)], 1), A, b]
        scaled = [t.clone() for t in data]
        scaled[0], scaled[1] = scaled[0] * objective_scale, scaled[1] * objective_scale
        scaled[2][:, 0] *= row_scale
        scaled[3][:, 0] *= row_scale
        # (ADMM crawls on one of these LPs at any scale: 8450 iterations at unit scale, and
        # 20000, the default limit, just short with a row times 1e-6 after rounding)
        res, _ = solve_qp_osqp(*scaled, max_iter=100000)
        assert res.status.tolist() == [ipm.OPTIMAL] * 4
        for i in range(4):
            xr, _, _ = qp_reference(*(t[i].numpy() for t in data))
            np.testing.assert_allclose(res.z[i].numpy(), xr, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-7), (torch.float32, 1e-4)])
def test_gradients_of_a_badly_scaled_problem_through_osqp(dtype, atol):
    # The backward solved the unscaled KKT system and told active rows by lam / s > 1: a
    # row times 1e6 in an objective times 1e-6 read lam / s ~ 1e-5 while active, and dh
    # came out 0.02 (float64) to 1.0 (float32) off a gradient of 0.99. Reference: central
    # differences of the float64 solution.
    import declarative as dl

    n, m = 4, 5
    g = torch.Generator().manual_seed(0)
    G = torch.randn(m, n, dtype=torch.float64, generator=g)
    G[0] *= 1e6
    x = dl.Variable(n, name="x")
    q, h = dl.Parameter(n, name="q"), dl.Parameter(m, name="h")
    prob = dl.Problem(dl.Minimize(1e-6 * (0.5 * dl.sum_squares(x) + q @ x)), [G.numpy() @ x <= h])
    q_t = 3 * torch.randn(3, n, dtype=torch.float64, generator=g)
    h_t = 0.5 * torch.rand(3, m, dtype=torch.float64, generator=g)
    h_t[:, 0] *= 1e6
    w = torch.arange(1.0, n + 1, dtype=torch.float64)
    qq, hh = q_t.to(dtype).requires_grad_(), h_t.to(dtype).requires_grad_()
    (prob.to_torch(solver="osqp")(qq, hh) * w.to(dtype)).sum().backward()
    reference = prob.to_torch()

    def difference(which, i, step):
        d = torch.zeros(3, n if which == "q" else m, dtype=torch.float64)
        d[:, i] = step
        args = lambda sign: (q_t + sign * d, h_t) if which == "q" else (q_t, h_t + sign * d)  # noqa: E731
        return ((reference(*args(1)) - reference(*args(-1))) * w).sum(-1) / (2 * step)

    fd_q = torch.stack([difference("q", i, 1e-6) for i in range(n)], -1)
    fd_h = torch.stack([difference("h", i, 1e-6 * (1e6 if i == 0 else 1)) for i in range(m)], -1)
    torch.testing.assert_close(qq.grad.double(), fd_q, atol=atol, rtol=0)
    torch.testing.assert_close(hh.grad.double(), fd_h, atol=atol, rtol=0)
