"""QP and LP layers against CVXPY/Clarabel, finite differences and gradcheck."""
import math

import cvxpy as cp
import numpy as np
import pytest
import torch

import declarative as dl
from conftest import random_qp
from references import qp_reference, solve


def qp_problem(n, m, p):
    x = dl.Variable(n, name="x")
    Q = dl.Parameter((n, n), name="Q")
    q = dl.Parameter(n, name="q")
    G = dl.Parameter((m, n), name="G")
    h = dl.Parameter(m, name="h")
    A = dl.Parameter((p, n), name="A")
    b = dl.Parameter(p, name="b")
    return dl.Problem(dl.Minimize(0.5 * dl.quad_form(x, Q) + q @ x), [G @ x <= h, A @ x == b])


def assert_matches_cvxpy(x, data, instances, atol):
    """x[i] (B, n) against CVXPY on instance i of the batched QP ``data``, for each i in
    ``instances``."""
    for i in instances:
        xr, _, _ = qp_reference(*(t[i].detach().numpy() for t in data))
        np.testing.assert_allclose(x[i].detach().numpy(), xr, atol=atol)


def test_batched_qp_matches_cvxpy():
    n, m, p, B = 10, 6, 2, 8
    prob = qp_problem(n, m, p)
    assert prob.problem_class == "QP"
    data = random_qp(B, n, m, p, seed=1)
    layer = prob.to_torch(return_duals=True, tol=1e-11)
    x, lam, nu = layer(*data)
    assert x.shape == (B, n) and lam.shape == (B, m) and nu.shape == (B, p)
    assert layer.info.status == ["optimal"] * B
    for i in range(B):
        xr, lr, nr = qp_reference(*(t[i].numpy() for t in data))
        np.testing.assert_allclose(x[i].numpy(), xr, atol=1e-6)
        np.testing.assert_allclose(lam[i].numpy(), lr, atol=1e-6)
        np.testing.assert_allclose(nu[i].numpy(), nr, atol=1e-6)


def test_shared_and_batched_parameters_mix():
    n, m, p, B = 6, 5, 1, 4
    prob = qp_problem(n, m, p)
    Q, q, G, h, A, b = random_qp(B, n, m, p, seed=2)
    layer = prob.to_torch(tol=1e-11)
    # Q, G and A shared (unbatched), q, h, b batched; h must stay feasible for G[0]
    x0 = torch.randn(B, n, dtype=torch.float64)
    h = (G[0] @ x0.T).T + 0.5
    b = (A[0] @ x0.T).T
    x = layer(Q[0], q, G[0], h, A[0], b)
    assert x.shape == (B, n)
    for i in range(B):
        xr, _, _ = qp_reference(Q[0].numpy(), q[i].numpy(), G[0].numpy(), h[i].numpy(), A[0].numpy(), b[i].numpy())
        np.testing.assert_allclose(x[i].numpy(), xr, atol=1e-6)
    # nothing batched: no batch dimension in the output
    x1 = layer(Q[0], q[0], G[0], h[0], A[0], b[0])
    assert x1.shape == (n,)
    np.testing.assert_allclose(x1.numpy(), x[0].numpy(), atol=1e-7)
    # the layer remembers its checks by the parameters' shapes: each signature keeps
    # its own answer, and a wrong one is still an error after right ones
    torch.testing.assert_close(layer(Q[0], q, G[0], h, A[0], b), x)
    x2 = layer(Q[0].expand(2, n, n), q[:2], G[0].expand(2, m, n), h[:2], A[0].expand(2, p, n), b[:2])
    assert x2.shape == (2, n)
    torch.testing.assert_close(x2, x[:2], atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        layer(Q[0], q, G[0], h[:2], A[0], b)


def test_keyword_call_and_parameter_order():
    n, m, p = 5, 4, 1
    prob = qp_problem(n, m, p)
    Q, q, G, h, A, b = random_qp(2, n, m, p, seed=3)
    names = [par.name for par in prob.parameters()]
    assert names == ["Q", "q", "G", "h", "A", "b"]  # order of first appearance
    layer = prob.to_torch()
    x_pos = layer(Q, q, G, h, A, b)
    x_kw = layer(b=b, A=A, h=h, G=G, q=q, Q=Q)
    torch.testing.assert_close(x_pos, x_kw)
    params = {par.name: par for par in prob.parameters()}
    reordered = prob.to_torch(parameters=[params[k] for k in ["q", "h", "b", "Q", "G", "A"]])
    torch.testing.assert_close(reordered(q, h, b, Q, G, A), x_pos)


def test_lp_matches_cvxpy():
    n, m, B = 8, 20, 5
    x = dl.Variable(n, name="x")
    c = dl.Parameter(n, name="c")
    G = dl.Parameter((m, n), name="G")
    h = dl.Parameter(m, name="h")
    prob = dl.Problem(dl.Minimize(c @ x), [G @ x <= h, x >= -10, x <= 10])
    assert prob.problem_class == "LP"
    gen = torch.Generator().manual_seed(4)
    c_t = torch.randn(B, n, generator=gen, dtype=torch.float64)
    G_t = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    h_t = torch.rand(B, m, generator=gen, dtype=torch.float64) + 0.5
    xs = prob.to_torch(tol=1e-11)(c_t, G_t, h_t)
    for i in range(B):
        xv = cp.Variable(n)
        solve(cp.Problem(cp.Minimize(c_t[i].numpy() @ xv), [G_t[i].numpy() @ xv <= h_t[i].numpy(), xv >= -10, xv <= 10]))
        np.testing.assert_allclose(xs[i].numpy(), xv.value, atol=1e-6)


def test_float32_follows_inputs():
    n, m, p, B = 6, 4, 1, 3
    prob = qp_problem(n, m, p)
    data32 = random_qp(B, n, m, p, seed=5, dtype=torch.float32)
    layer = prob.to_torch()
    x = layer(*data32)
    assert x.dtype == torch.float32
    assert layer.info.status == ["optimal"] * B
    x64 = layer(*(t.double() for t in data32))
    np.testing.assert_allclose(x.numpy(), x64.numpy(), atol=2e-3)


def test_float32_solutions_are_polished_and_infeasible_instances_certified():
    # float32, m = 30 rows on n - p = 16 free dimensions (the interior point's path):
    # iterates whose active set _polish could not take (its residual in constraint
    # space) were returned, up to 5e-3 off (now 4e-5); and a float32 Farkas ray carries ~1e-4 of
    # rounding, so no certificate met float64's radius: infeasible instances ended
    # numerical_error. Instances 0 and 5 are made infeasible (row 1 = -row 0, shifted).
    n, m, p, B = 20, 30, 4, 16
    Q, q, G, h, A, b = (t.clone() for t in random_qp(B, n, m, p, seed=3))
    q = 2.0 * q
    bad = torch.zeros(B, dtype=torch.bool)
    bad[[0, 5]] = True
    G[:, 1] = torch.where(bad[:, None], -G[:, 0], G[:, 1])
    h[:, 1] = torch.where(bad, -h[:, 0] - 1.0, h[:, 1])
    layer = qp_problem(n, m, p).to_torch(warn=False)
    x = layer(*(t.float() for t in (Q, q, G, h, A, b)))
    expected = ["infeasible" if flag else "optimal" for flag in bad.tolist()]
    assert layer.info.status == expected
    for i in range(B):
        if not bad[i]:
            xr, _, _ = qp_reference(*(t[i].numpy() for t in (Q, q, G, h, A, b)))
            np.testing.assert_allclose(x[i].double().numpy(), xr, atol=3e-4 * max(1.0, np.abs(xr).max()))


def test_outputs_and_report_are_ordinary_tensors():
    # the solver runs in inference mode; what it hands out must be usable like any tensor
    n, m, p, B = 6, 4, 1, 3
    layer = qp_problem(n, m, p).to_torch(return_duals=True)
    data = random_qp(B, n, m, p, seed=6)
    outputs = layer(*data)  # no parameter requires grad
    report = [layer.info.status_code, layer.info.iterations, layer.info.primal_residual,
              layer.info.dual_residual, layer.info.complementarity]
    for t in (*outputs, *report):
        assert not t.is_inference()
        t.add_(0)  # in place, outside inference mode
    weight = torch.ones(B, n, dtype=torch.float64, requires_grad=True)
    (weight * outputs[0]).sum().backward()  # saved for an autograd graph of the caller's
    torch.testing.assert_close(weight.grad, outputs[0])
    with torch.inference_mode():  # and called inside the caller's own inference mode
        torch.testing.assert_close(layer(*data)[0], outputs[0])
    # the backward's adjoint solve runs in inference mode too: no gradient it hands out
    # (db is its u_nu) may be an inference tensor
    params = [t.clone().requires_grad_() for t in data]
    for _ in range(2):  # the second accumulates in place
        (layer(*params)[0] * weight.detach()).sum().backward()
    grads = torch.autograd.grad(layer(*params)[0].sum(), params)
    for g in (*grads, *(t.grad for t in params)):
        assert not g.is_inference()
        g.add_(0)
    (weight * grads[-1].sum()).sum().backward()  # saved for an autograd graph of the caller's


def test_gradients_match_finite_differences():
    n, m, p, B = 6, 5, 2, 2
    prob = qp_problem(n, m, p)
    layer = prob.to_torch(tol=1e-12)
    data = [t.clone().requires_grad_() for t in random_qp(B, n, m, p, seed=6)]
    w = torch.randn(B, n, dtype=torch.float64)
    (layer(*data) * w).sum().backward()
    eps = 1e-6
    gen = torch.Generator().manual_seed(0)
    for k, t in enumerate(data):
        direction = torch.randn(t.shape, generator=gen, dtype=torch.float64)
        plus = [d.detach() + (eps * direction if j == k else 0) for j, d in enumerate(data)]
        minus = [d.detach() - (eps * direction if j == k else 0) for j, d in enumerate(data)]
        fd = ((layer(*plus) - layer(*minus)) * w).sum() / (2 * eps)
        analytic = (t.grad * direction).sum()
        assert abs(fd - analytic) <= 1e-5 * (1 + abs(fd)), (k, fd, analytic)


def test_gradcheck_qp_with_duals():
    n, m, p = 4, 3, 1
    prob = qp_problem(n, m, p)
    layer = prob.to_torch(tol=1e-13, return_duals=True)
    data = random_qp(2, n, m, p, seed=7)
    # gradcheck needs strict complementarity; this seed has no degenerate constraint
    inputs = tuple(t.clone().requires_grad_() for t in data)
    assert torch.autograd.gradcheck(lambda *a: layer(*a), inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_shared_parameter_gradient_is_a_sum_over_the_batch():
    n, m, p, B = 5, 4, 1, 3
    prob = qp_problem(n, m, p)
    layer = prob.to_torch(tol=1e-12)
    Q, q, G, h, A, b = random_qp(B, n, m, p, seed=8)
    q_shared = q[0].clone().requires_grad_()
    layer(Q, q_shared, G, h, A, b).sum().backward()
    total = torch.zeros(n, dtype=torch.float64)
    for i in range(B):
        qi = q[0].clone().requires_grad_()
        layer(Q[i], qi, G[i], h[i], A[i], b[i]).sum().backward()
        total += qi.grad
    torch.testing.assert_close(q_shared.grad, total, atol=1e-8, rtol=1e-6)


def test_equality_only_and_unconstrained():
    n = 4
    x = dl.Variable(n, name="x")
    a = dl.Parameter(n, name="a")
    unconstrained = dl.Problem(dl.Minimize(dl.sum_squares(x - a)))
    a_t = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    x_t = unconstrained.to_torch()(a_t)
    torch.testing.assert_close(x_t, a_t.detach())
    x_t.sum().backward()
    torch.testing.assert_close(a_t.grad, torch.ones(3, n, dtype=torch.float64))
    # projection onto the hyperplane sum(x) = 1: closed form x = a - (sum(a) - 1)/n
    eq = dl.Problem(dl.Minimize(dl.sum_squares(x - a)), [dl.sum(x) == 1])
    x_eq = eq.to_torch()(a_t.detach())
    torch.testing.assert_close(x_eq, a_t.detach() - (a_t.detach().sum(-1, keepdim=True) - 1) / n)


def test_matrix_variable_and_multiple_outputs():
    # min ||X - P||^2 + ||y - r||^2 s.t. X @ 1 == y: closed-form check via CVXPY
    X = dl.Variable((3, 2), name="X")
    y = dl.Variable(3, name="y")
    P = dl.Parameter((3, 2), name="P")
    r = dl.Parameter(3, name="r")
    prob = dl.Problem(dl.Minimize(dl.sum_squares(X - P) + dl.sum_squares(y - r)), [dl.sum(X, axis=1) == y, X >= 0])
    gen = torch.Generator().manual_seed(9)
    P_t = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    r_t = torch.randn(3, generator=gen, dtype=torch.float64)
    layer = prob.to_torch(tol=1e-11)
    X_t, y_t = layer(P_t, r_t)
    assert X_t.shape == (3, 2) and y_t.shape == (3,)
    Xv, yv = cp.Variable((3, 2)), cp.Variable(3)
    solve(cp.Problem(cp.Minimize(cp.sum_squares(Xv - P_t.numpy()) + cp.sum_squares(yv - r_t.numpy())),
                     [cp.sum(Xv, axis=1) == yv, Xv >= 0]))
    np.testing.assert_allclose(X_t.numpy(), Xv.value, atol=1e-6)
    np.testing.assert_allclose(y_t.numpy(), yv.value, atol=1e-6)
    only_y = prob.to_torch(variables=[y])
    torch.testing.assert_close(only_y(P_t, r_t), y_t)


def test_gradcheck_lp():
    # an LP's solution is a vertex x = G_a^-1 h_a: differentiable in G and h, flat in c
    n, m = 3, 7
    x = dl.Variable(n, name="x")
    c = dl.Parameter(n, name="c")
    G = dl.Parameter((m, n), name="G")
    h = dl.Parameter(m, name="h")
    layer = dl.Problem(dl.Minimize(c @ x), [G @ x <= h]).to_torch(tol=1e-12)
    gen = torch.Generator().manual_seed(11)
    G_t = torch.randn(m, n, generator=gen, dtype=torch.float64)
    G_t[:n] += 5 * torch.eye(n, dtype=torch.float64)  # keeps the polytope bounded in the c direction
    c_t = -torch.ones(n, dtype=torch.float64)
    h_t = torch.rand(m, generator=gen, dtype=torch.float64) + 1.0
    x_t = layer(c_t, G_t, h_t)
    xv = cp.Variable(n)
    solve(cp.Problem(cp.Minimize(c_t.numpy() @ xv), [G_t.numpy() @ xv <= h_t.numpy()]))
    np.testing.assert_allclose(x_t.numpy(), xv.value, atol=1e-6)
    inputs = tuple(t.clone().requires_grad_() for t in (c_t, G_t, h_t))
    assert torch.autograd.gradcheck(layer, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradients_with_a_singular_q_match_the_active_set_derivative():
    # Q PSD with a 3-dimensional null space, which the box |x_i| <= 2, random rows and
    # an equality fix: the loop runs in n-space, and the backward's elimination through
    # the (1, 1) block must not lean on the singular Q. Reference: the derivative of the
    # equality QP on CVXPY's active set, K^-1 of its KKT matrix (numpy).
    B, n, m, p = 4, 8, 5, 1
    gen = torch.Generator().manual_seed(81)
    U, _ = torch.linalg.qr(torch.randn(B, n, n, generator=gen, dtype=torch.float64))
    eig = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    eig[:3] = 0.0
    Q = U @ torch.diag_embed(eig.expand(B, n)) @ U.transpose(-1, -2)
    Q = 0.5 * (Q + Q.transpose(-1, -2))
    q = torch.randn(B, n, generator=gen, dtype=torch.float64)
    G_r, x0 = torch.randn(B, m, n, generator=gen, dtype=torch.float64), 0.3 * torch.randn(B, n, generator=gen, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64).expand(B, n, n)
    G = torch.cat([eye, -eye, G_r], 1)
    h = torch.cat([torch.full((B, 2 * n), 2.0, dtype=torch.float64),
                   (G_r @ x0.unsqueeze(-1)).squeeze(-1) + torch.rand(B, m, generator=gen, dtype=torch.float64) + 0.1], 1)
    A = torch.randn(B, p, n, generator=gen, dtype=torch.float64)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1)
    w = torch.randn(B, n, generator=gen, dtype=torch.float64)
    layer = qp_problem(n, 2 * n + m, p).to_torch(tol=1e-12)
    q_leaf, h_leaf = q.clone().requires_grad_(), h.clone().requires_grad_()
    x = layer(Q, q_leaf, G, h_leaf, A, b)
    (w * x).sum().backward()
    assert layer.info.status == ["optimal"] * B
    for i in range(B):
        Qi, qi, Gi, hi, Ai, bi = (t[i].numpy() for t in (Q, q, G, h, A, b))
        xr, lam, _ = qp_reference(Qi, qi, Gi, hi, Ai, bi)
        np.testing.assert_allclose(x[i].detach().numpy(), xr, atol=1e-7)
        active = lam > 1e-6
        slack = hi - Gi @ xr
        assert np.all(slack[~active] > 1e-6), "a degenerate constraint: the derivative is not unique"
        C = np.vstack([Ai, Gi[active]])
        K = np.block([[Qi, C.T], [C, np.zeros((C.shape[0], C.shape[0]))]])
        K_inv = np.linalg.inv(K)
        grad_q = -K_inv[:n, :n].T @ w[i].numpy()
        grad_h = np.zeros(Gi.shape[0])
        grad_h[active] = K_inv[:n, n + p:].T @ w[i].numpy()
        np.testing.assert_allclose(q_leaf.grad[i].numpy(), grad_q, atol=1e-6)
        np.testing.assert_allclose(h_leaf.grad[i].numpy(), grad_h, atol=1e-6)


@pytest.mark.parametrize("k", [1e-6, 1e6])
def test_objective_scale_changes_nothing_but_the_multipliers(k):
    # (kQ, kq) has the same minimizer for any k > 0, multipliers k times larger and
    # derivatives in Q, q 1/k times: at k = 1e-6 every instance used to end in
    # numerical_error, at 1e6 some "optimal" ones were 3e-5 off.
    n, m, p, B = 10, 20, 2, 16
    Q, q, G, h, A, b = random_qp(B, n, m, p, seed=3)
    w = torch.randn(B, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def solve(scale):
        layer = qp_problem(n, m, p).to_torch(tol=1e-10)
        leaves = [t.clone().requires_grad_() for t in (scale * Q, scale * q, G, h, A, b)]
        x = layer(*leaves)
        (w * x).sum().backward()
        assert layer.info.status == ["optimal"] * B
        return x.detach(), [t.grad for t in leaves]

    x1, grads1 = solve(1.0)
    xk, gradsk = solve(k)
    # (CVXPY on the unscaled problem: Clarabel's own tolerances are not scale-free)
    assert_matches_cvxpy(xk, (Q, q, G, h, A, b), (0, 7, B - 1), atol=1e-7)
    torch.testing.assert_close(xk, x1, atol=1e-9, rtol=0)
    for j, (g1, gk) in enumerate(zip(grads1, gradsk)):
        expected = g1 / k if j < 2 else g1
        torch.testing.assert_close(gk, expected, atol=1e-7 * float(expected.abs().max()), rtol=1e-6)


def _box_qp_with_null_space(B, n, m, p, seed, eps, nzero):
    """Q = U diag(eig) U' with ``nzero`` eigenvalues ``eps`` (the others in [0.5, 1.5)),
    the box |x_i| <= 2 and m random rows through a strictly feasible point."""
    gen = torch.Generator().manual_seed(seed)
    kw = dict(generator=gen, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(B, n, n, **kw))
    eig = torch.rand(n, **kw) + 0.5
    eig[:nzero] = eps
    Q = U @ torch.diag_embed(eig.expand(B, n)) @ U.transpose(-1, -2)
    Q = 0.5 * (Q + Q.transpose(-1, -2))
    q = torch.randn(B, n, **kw)
    G_r, x0 = torch.randn(B, m, n, **kw), 0.3 * torch.randn(B, n, **kw)
    eye = torch.eye(n, dtype=torch.float64).expand(B, n, n)
    G = torch.cat([eye, -eye, G_r], 1)
    h = torch.cat([torch.full((B, 2 * n), 2.0, dtype=torch.float64),
                   (G_r @ x0.unsqueeze(-1)).squeeze(-1) + torch.rand(B, m, **kw) + 0.1], 1)
    A = torch.randn(B, p, n, **kw)
    return Q, q, G, h, A, (A @ x0.unsqueeze(-1)).squeeze(-1)


def test_singular_q_solutions_are_polished():
    # Q with three zero eigenvalues: the general loop, whose iterates converge along
    # Q's null space only as complementarity does (up to 6e-4 off at the default tol);
    # the equality QP of the suggested active set, solved by LU, makes them exact
    # (instance 31 after a correction of the suggested set).
    B, n, m, p = 32, 20, 5, 1
    data = _box_qp_with_null_space(B, n, m, p, seed=8, eps=0.0, nzero=3)
    layer = qp_problem(n, 2 * n + m, p).to_torch()
    x = layer(*data)
    assert layer.info.status == ["optimal"] * B
    assert_matches_cvxpy(x, data, range(B), atol=1e-7)


def test_an_instance_status_does_not_depend_on_its_batch():
    # Instance 1's Q (one eigenvalue 1e-11) passes the constraint-space path's
    # definiteness test, whose solves then carry the rounding: alone it ended
    # numerical_error, while in a batch with an instance whose Q fails the test the
    # whole batch took the general loop and it was optimal. Now an instance the
    # constraint-space path fails gets the general loop on its own.
    data = _box_qp_with_null_space(8, 10, 10, 2, seed=80, eps=1e-11, nzero=1)
    layer = qp_problem(10, 30, 2).to_torch()
    x_alone = layer(*(t[1:2] for t in data))
    assert layer.info.status == ["optimal"]
    x_batch = layer(*(t[:3] for t in data))
    assert layer.info.status == ["optimal"] * 3
    xr, _, _ = qp_reference(*(t[1].numpy() for t in data))
    np.testing.assert_allclose(x_alone[0].numpy(), xr, atol=1e-6)
    np.testing.assert_allclose(x_batch[1].numpy(), xr, atol=1e-6)


@pytest.mark.parametrize("n, m, p", [(20, 20, 5), (50, 50, 10)])
def test_an_instance_comes_out_alone_as_in_any_batch_to_rounding(n, m, p):
    # The solver picks some kernels by the size of the whole batch (pivots on the whole
    # tableau or on its rows, a row or a column product, a subset re-solved on its own
    # rows), which round differently (benchmarks/batch_consistency.py: up to 3e-15).
    # Anything more would be instances reaching each other: the first instance's solution
    # and gradients must agree alone and first in batches of 2, 7 and 300.
    data = random_qp(300, n, m, p, seed=23)
    layer = qp_problem(n, m, p).to_torch()
    w = torch.randn(300, n, dtype=torch.float64, generator=torch.Generator().manual_seed(24))

    def first(B):
        leaves = [t[:B].clone().requires_grad_() for t in data]
        x = layer(*leaves)
        assert layer.info.status[0] == "optimal"
        grads = torch.autograd.grad((w[:B] * x).sum(), leaves)
        return [x[0].detach()] + [g[0] for g in grads]

    alone = first(1)
    for B in (2, 7, 300):
        for got, expected in zip(first(B), alone):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))


def test_osqp_forward_shares_the_implicit_backward():
    pytest.importorskip("osqp")
    n, m, p, B = 8, 6, 2, 3
    prob = qp_problem(n, m, p)
    data = random_qp(B, n, m, p, seed=12)
    a = [t.clone().requires_grad_() for t in data]
    b = [t.clone().requires_grad_() for t in data]
    osqp_layer = prob.to_torch(solver="osqp")
    x_osqp = osqp_layer(*a)
    assert osqp_layer.info.status == ["optimal"] * B
    assert_matches_cvxpy(x_osqp, data, range(B), atol=1e-6)
    x_ipm = prob.to_torch()(*b)
    w = torch.randn(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (w * x_osqp).sum().backward()
    (w * x_ipm).sum().backward()
    for u, v in zip(a, b):
        torch.testing.assert_close(u.grad, v.grad, atol=1e-6, rtol=1e-5)


def test_osqp_refuses_nonlinear_problems():
    z = dl.Variable(3, name="z")
    theta = dl.Parameter(3, name="theta")
    prob = dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))), [dl.sum(z) == 1])
    with pytest.raises(ValueError, match="osqp.*NLP"):
        prob.to_torch(solver="osqp")
    with pytest.raises(ValueError, match="unknown solver"):
        prob.to_torch(solver="gurobi")


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-7), (torch.float32, 1e-3)])
def test_degenerate_and_redundant_constraints_match_the_closed_form(dtype, atol):
    # projection onto a box with every upper bound written twice (redundant active rows:
    # their multipliers are not unique) and some points exactly on a face (active with a
    # zero multiplier): x* = clamp(c, l, u). The crossover's first active-set guesses are
    # singular or wrong here; the solver must still get the exact answer.
    n, B = 6, 16
    x = dl.Variable(n, name="x")
    c, l, u = (dl.Parameter(n, name=k) for k in "clu")
    prob = dl.Problem(dl.Minimize(0.5 * dl.sum_squares(x - c)), [x <= u, x >= l, 2 * x <= 2 * u])
    layer = prob.to_torch()
    gen = torch.Generator().manual_seed(21)
    c_t = 2.0 * torch.randn(B, n, generator=gen, dtype=torch.float64)
    l_t = -torch.rand(B, n, generator=gen, dtype=torch.float64)
    u_t = torch.rand(B, n, generator=gen, dtype=torch.float64)
    on_face = torch.rand(B, n, generator=gen, dtype=torch.float64) < 0.3
    c_t = torch.where(on_face, u_t, c_t)  # exactly on the upper face: degenerate
    out = layer(c=c_t.to(dtype), l=l_t.to(dtype), u=u_t.to(dtype))
    assert bool(layer.info.ok.all()), layer.info.status
    torch.testing.assert_close(out, torch.minimum(torch.maximum(c_t, l_t), u_t).to(dtype), atol=atol, rtol=0)


def test_interior_point_alone_ends_instances_at_different_iterations(monkeypatch):
    # No crossover during the loop: the instances converge one by one and are
    # classified as they do, while the others iterate on; the active set is then only
    # polished after the loop.
    import solvers.interior_point as ipm

    monkeypatch.setattr(ipm, "_CROSSOVER", 0.0)
    n, m, p, B = 8, 12, 2, 16
    data = random_qp(B, n, m, p, seed=9)
    layer = qp_problem(n, m, p).to_torch(tol=1e-10, active_set_rounds=0)  # the interior point from the start
    x = layer(*data)
    assert layer.info.status == ["optimal"] * B
    assert len(set(layer.info.iterations.tolist())) > 1, "all ended together: the test lost its point"
    assert_matches_cvxpy(x, data, range(B), atol=1e-7)


def test_crossover_tried_too_early_still_ends_exact(monkeypatch):
    # Force the crossover at the first iterations, when most active-set guesses are
    # wrong: failed attempts must leave their instances to the interior point (and to
    # later attempts), and every answer must still match the reference.
    import solvers.interior_point as ipm

    attempts = []
    original = ipm._active_set_solution

    def spy(*args, **kwargs):
        sol = original(*args, **kwargs)
        attempts.append((int(sol.kkt.numel()), int(sol.kkt.sum())))
        return sol

    monkeypatch.setattr(ipm, "_CROSSOVER", 1e3)
    monkeypatch.setattr(ipm, "_CROSSOVER_RETRY", 0.1)
    monkeypatch.setattr(ipm, "_active_set_solution", spy)
    n, m, p, B = 8, 12, 2, 12
    data = random_qp(B, n, m, p, seed=5)
    layer = qp_problem(n, m, p).to_torch(tol=1e-10, active_set_rounds=0)  # the interior point from the start
    x = layer(*data)
    assert layer.info.status == ["optimal"] * B
    assert any(done < tried for tried, done in attempts), "no attempt failed: the test lost its point"
    assert_matches_cvxpy(x, data, range(B), atol=1e-7)


def test_active_set_phase_agrees_with_the_interior_point():
    # The active-set iteration that runs first solves most instances without an
    # interior-point iteration; solutions and gradients must be those of the interior
    # point alone, and of CVXPY.
    n, m, p, B = 12, 12, 3, 24
    data = random_qp(B, n, m, p, seed=11)
    w = torch.randn(B, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def solve(**options):
        layer = qp_problem(n, m, p).to_torch(tol=1e-11, **options)
        leaves = [t.clone().requires_grad_() for t in data]
        x = layer(*leaves)
        (w * x).sum().backward()
        return layer.info, x.detach(), [t.grad for t in leaves]

    info, x, grads = solve()
    assert info.status == ["optimal"] * B
    assert int((info.iterations == 0).sum()) >= B // 2, "the active-set phase solved few: the test lost its point"
    assert bool((info.active_set_rounds >= 1).all())
    info_ipm, x_ipm, grads_ipm = solve(active_set_rounds=0)
    assert bool((info_ipm.iterations > 0).all()) and info_ipm.active_set_rounds is None
    torch.testing.assert_close(x, x_ipm, atol=1e-9, rtol=0)
    for g, g_ipm in zip(grads, grads_ipm):
        torch.testing.assert_close(g, g_ipm, atol=1e-7, rtol=1e-7)
    assert_matches_cvxpy(x, data, range(0, B, 5), atol=1e-7)


def test_active_set_phase_gives_up_where_it_does_not_converge(monkeypatch):
    # A large linear term makes half the constraints active: the active-set iteration
    # wanders instead of converging, and must hand over to the interior point after a
    # few rounds rather than run all of them. (Such a batch is handed over after the
    # first solve, test below; here that is off, to test the patience alone.)
    import solvers.interior_point as ipm

    monkeypatch.setattr(ipm, "_crawls", lambda *args: False)
    n, m, p, B = 20, 40, 5, 8
    Q, q, G, h, A, b = random_qp(B, n, m, p, seed=13)
    q = 100.0 * q
    layer = qp_problem(n, m, p).to_torch(tol=1e-10)
    x = layer(Q, q, G, h, A, b)
    assert layer.info.status == ["optimal"] * B
    assert bool((layer.info.iterations > 0).all()), "the active-set phase converged: the test lost its point"
    assert int(layer.info.active_set_rounds.max()) < ipm.ACTIVE_SET_ROUNDS
    assert_matches_cvxpy(x, (Q, q, G, h, A, b), (0, B - 1), atol=1e-7)


@pytest.mark.parametrize("crowded", [8, 3])
def test_active_set_phase_hands_over_a_batch_that_starts_crowded(crowded):
    # The first ``crowded`` instances violate every row at the minimizer under the
    # equalities (20 rows, n - p = 15 free dimensions): their first active sets'
    # matrices are singular, and the iteration wanders. A batch where most instances
    # start so goes to the interior point after the first solve; where a few do, the
    # iteration runs and solves the others, and the interior point takes what it leaves.
    n, m, p, B = 20, 20, 5, 8
    Q, q, G, h, A, b = (t.clone() for t in random_qp(B, n, m, p, seed=13))
    z = -torch.linalg.solve(Q, q)  # the unconstrained minimizer
    u = torch.randn(B, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    Gu = (G @ u.unsqueeze(-1)).squeeze(-1)
    G_crowded = G * torch.sign(Gu).unsqueeze(-1)  # G u > 0 on every row
    x0 = z - 3.0 * u  # the strictly feasible point (h, b below follow it), far from z against every row
    h_crowded = (G_crowded @ x0.unsqueeze(-1)).squeeze(-1) + 0.1
    b_crowded = (A @ x0.unsqueeze(-1)).squeeze(-1)
    G[:crowded], h[:crowded], b[:crowded] = G_crowded[:crowded], h_crowded[:crowded], b_crowded[:crowded]
    layer = qp_problem(n, m, p).to_torch(tol=1e-10)
    x = layer(Q, q, G, h, A, b)
    assert layer.info.status == ["optimal"] * B
    rounds, iterations = layer.info.active_set_rounds, layer.info.iterations
    if crowded == B:
        assert bool((rounds == 1).all()) and bool((iterations > 0).all())
    else:
        assert int(rounds.max()) > 1 and bool((iterations[crowded:] == 0).all())
    assert_matches_cvxpy(x, (Q, q, G, h, A, b), (0, B - 1), atol=1e-7)


@pytest.mark.parametrize("family", ["random", "box"])
def test_active_set_phase_hands_over_a_batch_that_would_crawl(family, monkeypatch):
    # Twice as many rows as free dimensions n - p: on the random family most of the
    # first active sets (from the constraints the minimizer under the equalities
    # violates: no pivots first) need correcting after the first solve, and the
    # iteration would crawl, so the batch goes to the interior point; on a box
    # intersected with a hyperplane (a sparsemax-like projection) few do, and it solves
    # them all.
    import solvers.interior_point as ipm

    monkeypatch.setattr(ipm, "_pivots_first", lambda B, m: False)
    B = 16
    if family == "random":
        n, m, p = 12, 20, 2
        Q, q, G, h, A, b = random_qp(B, n, m, p, seed=4)
    else:
        n, m, p = 10, 20, 1
        gen = torch.Generator().manual_seed(4)
        eye = torch.eye(n, dtype=torch.float64)
        Q, G = eye.expand(B, n, n), torch.cat([eye, -eye]).expand(B, m, n)
        q = -3.0 * torch.randn(B, n, generator=gen, dtype=torch.float64)
        h = torch.rand(B, m, generator=gen, dtype=torch.float64)
        A, b = torch.ones(B, p, n, dtype=torch.float64), torch.zeros(B, p, dtype=torch.float64)
    layer = qp_problem(n, m, p).to_torch(tol=1e-10)
    x = layer(Q, q, G, h, A, b)
    assert layer.info.status == ["optimal"] * B
    rounds, iterations = layer.info.active_set_rounds, layer.info.iterations
    if family == "random":
        assert bool((rounds == 1).all()) and bool((iterations > 0).all())
    else:
        assert bool((iterations == 0).all())
    assert_matches_cvxpy(x, (Q, q, G, h, A, b), (0, B - 1), atol=1e-7)


@pytest.mark.parametrize("B", [16, 8])
def test_many_rows_are_guessed_by_pivots_where_the_iteration_would_crawl(B):
    # Four rows per free dimension (m = 80, above the bound for pivots first): from the
    # constraints the minimizer violates the iteration would crawl; a batch of 16 is
    # guessed by pivots next and solved by the active set, one of 8 (where pivots cost
    # more than the interior point's few iterations) goes to the interior point.
    # Solutions must be CVXPY's either way.
    n, m, p = 20, 80, 1
    data = random_qp(B, n, m, p, seed=61)
    layer = qp_problem(n, m, p).to_torch(tol=1e-10)
    x = layer(*data)
    info = layer.info
    assert info.status == ["optimal"] * B
    if B == 16:
        assert int(info.active_set_pivots.min()) > 0 and bool((info.iterations == 0).all())
        assert bool((info.active_set_rounds == 2).all())
    else:
        assert info.active_set_pivots is None and bool((info.iterations > 0).all())
    assert_matches_cvxpy(x, data, (0, B - 1), atol=1e-7)


def test_many_rows_with_infeasible_instances_after_the_crawl():
    # The pivots after a crawl on a batch where a quarter of the instances have two
    # contradicting rows (G_1 = -G_0, h_1 < -h_0): those must come back infeasible, the
    # others optimal and CVXPY's, in float64 and in float32.
    B, n, m, p = 16, 20, 80, 1
    Q, q, G, h, A, b = random_qp(B, n, m, p, seed=62)
    G, h = G.clone(), h.clone()
    G[:4, 1], h[:4, 1] = -G[:4, 0], -h[:4, 0] - 1.0
    data = (Q, q, G, h, A, b)
    for dtype, atol in ((torch.float64, 1e-7), (torch.float32, 2e-3)):
        layer = qp_problem(n, m, p).to_torch(warn=False)
        x = layer(*(t.to(dtype) for t in data))
        assert layer.info.status == ["infeasible"] * 4 + ["optimal"] * (B - 4)
        assert layer.info.active_set_pivots is not None
        assert_matches_cvxpy(x.double(), data, (4, B - 1), atol=atol)


@pytest.mark.parametrize("rounds", [20, 0])
def test_an_iterate_suggests_no_more_active_constraints_than_free_dimensions(rounds):
    # A projection onto a box and a hyperplane (n = 50, 49 bounds active at the
    # solution): the interior point stopped with one inactive bound (slack 1.5e-3) at
    # lam > s, and the active set it suggested (51 constraints in 50 dimensions) was
    # singular; the iterate, 1.1e-5 from the solution, came back as optimal.
    B, n, i = 32, 50, 13
    gen = torch.Generator().manual_seed(50)
    eye = torch.eye(n, dtype=torch.float64)
    h = torch.cat([torch.rand(B, n, generator=gen, dtype=torch.float64),
                   torch.rand(B, n, generator=gen, dtype=torch.float64)], -1)[i:i + 1]
    q = (-10.0 * torch.randn(B, n, generator=gen, dtype=torch.float64))[i:i + 1]
    Q, G = eye.expand(1, n, n), torch.cat([eye, -eye]).expand(1, 2 * n, n)
    A, b = torch.ones(1, 1, n, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    layer = qp_problem(n, 2 * n, 1).to_torch(active_set_rounds=rounds)
    x = layer(Q, q, G, h, A, b)
    assert layer.info.status == ["optimal"]
    xr, _, _ = qp_reference(*(t[0].numpy() for t in (Q, q, G, h, A, b)))
    np.testing.assert_allclose(x[0].numpy(), xr, atol=1e-8)


def test_degenerate_vertices_end_optimal_and_exact():
    # Constructed solutions x*: 16 active constraints in n - p = 16 free dimensions,
    # 3 of them with zero multipliers (the KKT conditions hold by construction). The
    # crossover's active set for instance 26 passed in constraint space but its true
    # residual was 6e-7: it ended numerical_error, or optimal alone; one step of
    # refinement against the true residuals makes it exact.
    B, n, m, p = 32, 20, 40, 4
    gen = torch.Generator().manual_seed(15)
    kw = dict(generator=gen, dtype=torch.float64)
    L = torch.randn(B, n, n, **kw)
    Q = L @ L.transpose(-1, -2) / n + 0.1 * torch.eye(n, dtype=torch.float64)
    G, A = torch.randn(B, m, n, **kw), torch.randn(B, p, n, **kw)
    x_star = torch.randn(B, n, **kw)
    slack = torch.rand(B, m, **kw) + 0.1
    slack[:, :16] = 0.0
    lam = torch.rand(B, m, **kw) + 0.1
    lam[:, :3], lam[:, 16:] = 0.0, 0.0
    nu = torch.randn(B, p, **kw)
    mv = lambda M, v: (M @ v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    q = -mv(Q, x_star) - mv(G.transpose(-1, -2), lam) - mv(A.transpose(-1, -2), nu)
    data = (Q, q, G, mv(G, x_star) + slack, A, mv(A, x_star))
    for rounds in (20, 0):
        layer = qp_problem(n, m, p).to_torch(active_set_rounds=rounds)
        x = layer(*data)
        assert layer.info.status == ["optimal"] * B
        torch.testing.assert_close(x, x_star, atol=1e-7, rtol=0)


def test_ill_conditioned_q_ends_optimal():
    # Q's eigenvalues spread over 1e8 (still positive definite: the constraint-space
    # path). The interior point's tracked residuals passed but the true ones did not,
    # and the polish on the right active set was rejected for its residual in
    # constraint space, where W = G Q^-1 G' carries the rounding: every instance ended
    # numerical_error. Now the active set's solution, refined once against the true
    # residuals, is verified instead.
    B, n, m, p = 8, 20, 40, 2
    gen = torch.Generator().manual_seed(8)
    U, _ = torch.linalg.qr(torch.randn(B, n, n, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, -8, n, dtype=torch.float64)
    Q = U @ torch.diag_embed(eig.expand(B, n)) @ U.transpose(-1, -2)
    Q = 0.5 * (Q + Q.transpose(-1, -2))
    _, q, G, h, A, b = random_qp(B, n, m, p, seed=9)
    layer = qp_problem(n, m, p).to_torch()
    x = layer(Q, q, G, h, A, b)
    assert layer.info.status == ["optimal"] * B
    assert_matches_cvxpy(x, (Q, q, G, h, A, b), (0, 3, B - 1), atol=1e-6)


def test_redundant_equalities_end_polished():
    # A with 3 rows that combine its 4 others (consistent b): n - p = 13 understates
    # the 16 free dimensions, so an active set capped at n - p constraints is wrong on
    # instances with 14-16 active; the cap is a second try only, after lam > s.
    n, m, p, B = 20, 40, 4, 16
    Q, q, G, h, A, b = random_qp(B, n, m, p, seed=19)
    C = torch.randn(B, 3, p, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    A2, b2 = torch.cat([A, C @ A], 1), torch.cat([b, (C @ b.unsqueeze(-1)).squeeze(-1)], 1)
    data = (Q, 2.0 * q, G, h, A2, b2)
    layer = qp_problem(n, m, p + 3).to_torch()
    x = layer(*data)
    assert layer.info.status == ["optimal"] * B
    assert_matches_cvxpy(x, data, range(B), atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("quadratic", [True, False])
def test_a_far_bound_does_not_loosen_the_other_constraints(dtype, quadratic):
    # A bound meant as no limit (sum(x) <= 1e10) made the primal tolerance 1e10 times
    # tol for every row (it is relative to the largest |h|): the projection of
    # (5, -2, 3) onto x <= 0 came back 'optimal' at (5, -2, 3). The LP has the box
    # x >= -1 and the closed form x_i = 0 where q_i < 0, -1 where q_i > 0.
    n = 3
    x = dl.Variable(n, name="x")
    t, h = dl.Parameter(n, name="t"), dl.Parameter(n + 1, name="h")
    G = torch.cat([torch.eye(n), torch.ones(1, n)])
    if quadratic:
        layer = dl.Problem(dl.Minimize(0.5 * dl.sum_squares(x - t)), [G @ x <= h]).to_torch()
        expected = torch.tensor([0.0, -2.0, 0.0])
    else:
        layer = dl.Problem(dl.Minimize(t @ x), [G @ x <= h, x >= -1]).to_torch()
        expected = torch.tensor([0.0, -1.0, 0.0])
    target = torch.tensor([5.0, -2.0, 3.0]) if quadratic else torch.tensor([-1.0, 1.0, -2.0])
    for far in (1e6, 1e10, 1e15):
        out = layer(target.to(dtype), torch.tensor([0.0, 0.0, 0.0, far], dtype=dtype))
        assert layer.info.status == ["optimal"]
        torch.testing.assert_close(out, expected.to(dtype), atol=1e-4 if dtype == torch.float32 else 1e-9, rtol=0)


def _lp_with_a_far_row(seed, far, B=16, n=5):
    """LPs min q'x s.t. G x <= h, A x = b with a box |x_i| <= 1 among their rows and a
    first row bounded by ``far``."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, n, generator=g, dtype=torch.float64) - 0.5
    G_rand = torch.randn(B, 3, n, generator=g, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64).expand(B, n, n)
    G = torch.cat([G_rand, eye, -eye], 1)
    h = torch.cat([_mv(G_rand, x0) + 0.1 * torch.rand(B, 3, generator=g, dtype=torch.float64),
                   torch.ones(B, 2 * n, dtype=torch.float64)], 1)
    h[:, 0] = far
    A = torch.randn(B, 1, n, generator=g, dtype=torch.float64)
    b = _mv(A, x0)
    q = 3 * torch.randn(B, n, generator=g, dtype=torch.float64)
    return torch.zeros(B, n, n, dtype=torch.float64), q, G, h, A, b


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("far", [1e10, 1e15, 1e20])
def test_lps_with_a_far_row_are_solved(dtype, far):
    # A row bounded by 1e15 or more (as "no limit") left 59-64 of 64 such LPs
    # numerical_error, and in float32 one of 1e12 let others come back optimal 2e-2 off.
    # Reference: Clarabel on the LP without that row, whose solution keeps far within it
    # (so it solves the whole LP too)
    Q, q, G, h, A, b = _lp_with_a_far_row(seed=1, far=far)
    layer = qp_problem(5, 13, 1).to_torch(warn=False)
    out = layer(*(t.to(dtype) for t in (Q, q, G, h, A, b)))
    assert layer.info.status == ["optimal"] * 16
    for i in range(16):
        xv = cp.Variable(5)
        solve(cp.Problem(cp.Minimize(q[i].numpy() @ xv), [G[i, 1:].numpy() @ xv <= h[i, 1:].numpy(),
                                                           A[i].numpy() @ xv == b[i].numpy()]))
        assert G[i, 0].numpy() @ xv.value < far
        np.testing.assert_allclose(out[i].double().numpy(), xv.value, atol=1e-7 if dtype == torch.float64 else 2e-4)


def test_gradients_of_an_lp_with_a_far_row():
    # the far row is left out of the loop and its multiplier is 0: its G and h get no
    # gradient, and the others theirs (finite differences, by gradcheck)
    Q, q, G, h, A, b = (t[:2] for t in _lp_with_a_far_row(seed=2, far=1e20))
    layer = qp_problem(5, 13, 1).to_torch(tol=1e-12)
    inputs = tuple(t.clone().requires_grad_() for t in (q, G, h, A, b))
    assert torch.autograd.gradcheck(lambda *args: layer(Q, *args), inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    layer(Q, *inputs).sum().backward()
    assert not inputs[1].grad[:, 0].any() and not inputs[2].grad[:, 0].any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_lp_whose_far_bound_binds(dtype):
    # max x1 + c x2 s.t. x1 <= 1e8, x1 + x2 <= 1e9, 0 <= x2 <= 1: both bounds count as far;
    # without them the LP is unbounded, and with them its solution is x1 = 1e8
    x = dl.Variable(2, name="x")
    c, h = dl.Parameter(2, name="c"), dl.Parameter(2, name="h")
    G = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    layer = dl.Problem(dl.Minimize(c @ x), [G @ x <= h, x[1] >= 0, x[1] <= 1]).to_torch()
    out = layer(torch.tensor([[-1.0, -0.5], [-1.0, 0.5]], dtype=dtype), torch.tensor([1e8, 1e9], dtype=dtype))
    assert layer.info.status == ["optimal"] * 2
    torch.testing.assert_close(out, torch.tensor([[1e8, 1.0], [1e8, 0.0]], dtype=dtype),
                               atol=1e-9 if dtype == torch.float64 else 1e-4, rtol=1e-12)


def _mv(M, v):
    return (M @ v.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unbounded_lps_are_reported_in_either_dtype(dtype):
    # min q'x s.t. x <= h is unbounded where some q_i > 0, else solved at x = h. Float32
    # ended those numerical_error (its float64 re-solve said unbounded, and was dropped).
    n, B = 5, 16
    g = torch.Generator().manual_seed(3)
    q = -torch.rand(B, n, generator=g, dtype=torch.float64) - 0.1
    q[::2, 0] = 1.0
    h = torch.randn(B, n, generator=g, dtype=torch.float64)
    x = dl.Variable(n, name="x")
    qp, hp = dl.Parameter(n, name="q"), dl.Parameter(n, name="h")
    layer = dl.Problem(dl.Minimize(qp @ x), [x <= hp]).to_torch()
    with pytest.warns(RuntimeWarning, match="unbounded"):
        out = layer(q.to(dtype), h.to(dtype))
    assert layer.info.status == ["unbounded", "optimal"] * (B // 2)
    torch.testing.assert_close(out[1::2].double(), h[1::2], atol=1e-5 if dtype == torch.float32 else 1e-9, rtol=0)
    assert bool(out[::2].isnan().all())


def test_float32_qps_with_an_equality_written_twice_solve():
    # The factorizations' second, larger shift was a flat 1e-8, below float32's first
    # (1e-7): 5 of these 64 instances ended numerical_error, NaN.
    rng = np.random.default_rng(61)
    n, m, p, B = 6, 8, 2, 64
    L = rng.standard_normal((B, n, n))
    Q = L @ L.transpose(0, 2, 1) + np.eye(n)
    q, x0 = rng.standard_normal((B, n)), rng.uniform(-0.5, 0.5, (B, n))
    G = rng.standard_normal((B, m, n))
    h = np.einsum("bij,bj->bi", G, x0) + rng.random((B, m))
    A = rng.standard_normal((B, p, n))
    b = np.einsum("bij,bj->bi", A, x0)
    A, b = np.concatenate([A, 2 * A[:, :1]], 1), np.concatenate([b, 2 * b[:, :1]], 1)
    data = tuple(torch.tensor(v, dtype=torch.float32) for v in (Q, q, G, h, A, b))
    layer = qp_problem(n, m, p + 1).to_torch()
    x = layer(*data)
    assert layer.info.status == ["optimal"] * B
    assert_matches_cvxpy(x.double(), tuple(t.double() for t in data), range(0, B, 4), atol=2e-4)


def test_active_set_iteration_leaves_a_cycle(monkeypatch):
    # Instance 8 of this batch, from the constraints its equality-constrained minimizer
    # violates (no pivots first), cycles through four active sets (the iteration is
    # deterministic in the set); back at a set it had, it switches only its worst
    # constraint, leaves the cycle and is solved without the interior point.
    import solvers.interior_point as ipm

    monkeypatch.setattr(ipm, "_pivots_first", lambda B, m: False)
    n, m, p, B = 10, 10, 2, 32
    data = random_qp(B, n, m, p, seed=1)
    layer = qp_problem(n, m, p).to_torch(tol=1e-9)
    x = layer(*data)
    assert layer.info.status == ["optimal"] * B
    assert int(layer.info.iterations.max()) == 0
    assert int(layer.info.active_set_rounds[8]) > 5
    xr, _, _ = qp_reference(*(t[8].numpy() for t in data))
    np.testing.assert_allclose(x[8].numpy(), xr, atol=1e-7)


@pytest.mark.parametrize("B", [8, 160])
def test_instances_the_active_set_phase_leaves_go_on_with_the_interior_point(monkeypatch, B):
    # Two infeasible instances and one with a NaN input stay with the interior point:
    # at B = 8 the loop runs on the whole batch with the solved instances retired, at
    # B = 160 on those alone. Statuses, solutions and gradients of the others must
    # not notice. (The layer finds the NaN after a first solve and solves again with
    # that instance skipped: the loop batches counted are the last solve's.)
    import solvers.interior_point as ipm

    loop_batches = []
    original, original_solve = ipm._constraint_space_ipm, ipm.solve_qp

    def spy(f, *args, **kwargs):
        loop_batches.append(f.W.shape[0])
        return original(f, *args, **kwargs)

    def solve_spy(*args, **kwargs):
        loop_batches.clear()
        return original_solve(*args, **kwargs)

    monkeypatch.setattr(ipm, "_constraint_space_ipm", spy)
    monkeypatch.setattr(ipm, "solve_qp", solve_spy)
    n, m, p = 12, 12, 2
    Q, q, G, h, A, b = (t.clone() for t in random_qp(B, n, m, p, seed=12))
    for i in (0, 1):  # G_i1 x <= h_i1 contradicts G_i0 x <= h_i0
        G[i, 1], h[i, 1] = -G[i, 0], -h[i, 0] - 1.0
    q[2, 0] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (Q, q, G, h, A, b)]
    layer = qp_problem(n, m, p).to_torch(tol=1e-10, warn=False)
    x = layer(*leaves)
    assert layer.info.status == ["infeasible", "infeasible", "numerical_error"] + ["optimal"] * (B - 3)
    # (at B = 160 with the few instances the active-set iteration cycles on)
    assert loop_batches == [8] if B == 8 else (len(loop_batches) == 1 and 3 <= loop_batches[0] <= 10)
    x[3:].sum().backward()  # (the failed instances, not read, get zeros)
    for t in leaves:
        assert not t.grad[:3].any() and torch.isfinite(t.grad[3:]).all()
    assert_matches_cvxpy(x, leaves, (3, 4, B - 1), atol=1e-7)


@pytest.mark.parametrize("B,k,r", [(1024, 2, 10), (512, 3, 16), (512, 5, 20), (256, 8, 16), (32, 2, 10), (8, 20, 3),
                                   (2, 40, 5), (64, 1, 1), (200, 20, 20)])
def test_cholesky_solve_paths_match_lu_solve(B, k, r):
    """Every path of the solver's (L L')^-1 b (a division for k = 1, vectorized
    substitution for tiny systems with many right-hand sides, cholesky_solve, two
    triangular solves) against LU."""
    from solvers.interior_point import _chol_solve

    g = torch.Generator().manual_seed(k)
    M = torch.randn(B, k, k, generator=g, dtype=torch.float64)
    K = M @ M.mT + 0.1 * torch.eye(k, dtype=torch.float64)
    b = torch.randn(B, k, r, generator=g, dtype=torch.float64)
    x = _chol_solve(b, torch.linalg.cholesky(K))
    torch.testing.assert_close(x, torch.linalg.solve(K, b), rtol=1e-10, atol=1e-12)


def test_large_batch_with_few_equalities_matches_cvxpy():
    """B m >= 4096 with p m <= 64: K22^-1 K21 goes by vectorized substitution."""
    n, m, p, B = 8, 16, 3, 256
    data = random_qp(B, n, m, p, seed=7)
    x, lam, nu = qp_problem(n, m, p).to_torch(return_duals=True, tol=1e-11)(*data)
    for i in range(0, B, 37):
        xr, lr, nr = qp_reference(*(t[i].numpy() for t in data))
        np.testing.assert_allclose(x[i].numpy(), xr, atol=1e-6)
        np.testing.assert_allclose(lam[i].numpy(), lr, atol=1e-6)
        np.testing.assert_allclose(nu[i].numpy(), nr, atol=1e-6)


def test_a_nan_instance_leaves_the_others_bit_for_bit():
    # solve_qp called directly (the layer replaces a bad instance's data itself): an
    # instance with NaN data must leave the others' solutions exactly those of the batch
    # without it (its NaN once made the whole batch's objective scaling kick in:
    # differences of 2e-14).
    import solvers.interior_point as ipm

    data = [t.clone() for t in random_qp(8, 10, 10, 2, seed=3)]
    without = ipm.solve_qp(*(t[1:] for t in data))
    data[1][0, 0] = float("nan")
    result = ipm.solve_qp(*data)
    assert result.status[0] != ipm.OPTIMAL and bool((result.status[1:] == ipm.OPTIMAL).all())
    assert torch.equal(result.z[1:], without.z)


def test_active_sets_factored_on_their_own_rows_match_all_rows(monkeypatch):
    # From _COMPACT_ROWS constraints on, in large enough batches, an active set's matrix
    # is factored on its own rows (padded with inactive ones to the batch's largest
    # set); the factors of the few instances re-solved on their own (padded to their own
    # largest set) are merged into the batch's at another size. Solutions and gradients
    # (which reuse the last factor) must be those of factoring all m rows, and CVXPY's.
    import solvers.interior_point as ipm

    n, m, p, B = 40, 48, 6, 96
    data = random_qp(B, n, m, p, seed=21)
    w = torch.randn(B, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    calls = []
    original = ipm.QPFactor.solve_active_set

    def spy(self, g0, a, info=None, size=None):
        calls.append((a.shape[0], size))
        return original(self, g0, a, info, size)

    monkeypatch.setattr(ipm.QPFactor, "solve_active_set", spy)
    # (without the pivots' guess, which is right at once here: the iteration's rounds
    # re-solve some instances)
    monkeypatch.setattr(ipm, "_pivots_first", lambda B, m: False)

    def solve(**options):
        # (active_set_rounds=0: the interior point's crossover merges the sets it solves
        # into its placeholder, on all rows)
        layer = qp_problem(n, m, p).to_torch(tol=1e-11, **options)
        leaves = [t.clone().requires_grad_() for t in data]
        x = layer(*leaves)
        (w * x).sum().backward()
        assert layer.info.status == ["optimal"] * B
        return x.detach(), [t.grad for t in leaves]

    for options in ({}, dict(active_set_rounds=0)):
        monkeypatch.setattr(ipm, "_COMPACT_ROWS", m)
        calls.clear()
        x, grads = solve(**options)
        assert any(size is not None and size < m for _, size in calls), "no set was factored on its own rows"
        assert any(batch < B for batch, _ in calls), "no instances were re-solved on their own"
        assert len({size for _, size in calls}) > 1, "every factor had the same size: none was padded"
        monkeypatch.setattr(ipm, "_COMPACT_ROWS", m + 1)  # all rows, always
        calls.clear()
        x_all, grads_all = solve(**options)
        assert {size for _, size in calls} == {None}
        torch.testing.assert_close(x, x_all, atol=1e-10, rtol=0)
        for g, g_all in zip(grads, grads_all):
            torch.testing.assert_close(g, g_all, atol=1e-8, rtol=1e-8)
        assert_matches_cvxpy(x, data, (0, 17, B - 1), atol=1e-7)


def test_factor_row_orders_merge_with_all_rows_in_order():
    # None stands for "all rows, in order": merged with an explicit order it is made
    # explicit, and each instance keeps the order of the factor it keeps.
    from solvers.interior_point import _put_order

    explicit = torch.tensor([[2, 0, 1], [1, 2, 0]])
    natural = torch.tensor([[0, 1, 2], [0, 1, 2]])
    rows = torch.arange(2)
    take_first = torch.tensor([True, False])
    assert _put_order(None, take_first, rows, None) is None
    assert torch.equal(_put_order(explicit, take_first, rows, None), torch.stack([natural[0], explicit[1]]))
    assert torch.equal(_put_order(None, take_first, rows, explicit), torch.stack([explicit[0], natural[1]]))
    # a subset: the second instance alone, re-solved
    second = torch.tensor([1])
    merged = _put_order(explicit, torch.tensor([False, True]), second, None)
    assert torch.equal(merged, torch.stack([explicit[0], natural[1]]))


@pytest.fixture(params=["tableau", "rows"])
def pivot_layout(request, monkeypatch):
    """Pivots on the whole tableau or on its rows alone (solvers.interior_point
    _tableau_pivots, _row_pivots), whatever the size."""
    import solvers.interior_point as ipm

    monkeypatch.setattr(ipm, "_ROW_PIVOTS_FROM", 0 if request.param == "rows" else 1 << 62)
    return request.param


@pytest.fixture(params=["argmin", "min"])
def rule_index(request, monkeypatch):
    """The pivot rule's index by argmin or by min (solvers.interior_point._argmin_rows),
    whatever the size."""
    import solvers.interior_point as ipm

    monkeypatch.setattr(ipm, "_MIN_INDICES", 1 << 62 if request.param == "argmin" else 0)
    return request.param


@pytest.mark.parametrize("shape", [(8, 5), (300, 20), (2, 3000)])
def test_the_rule_index_is_the_first_smallest_entry(shape):
    # The pivots' index of each row's smallest entry, by argmin on small tensors and by
    # min on large ones, must be torch.argmin's on both: the first smallest entry (ties
    # abound in the rule's scores of untouched rows), NaN before any number.
    from solvers.interior_point import _argmin_rows

    x = torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(5)).double()
    x[0] = math.inf
    x[1, ::2] = math.nan
    index = _argmin_rows(x)
    assert index.shape == (shape[0], 1)
    assert torch.equal(index, torch.argmin(x, -1, keepdim=True))


@pytest.mark.parametrize("shape", [(32, 10, 10, 2), (16, 12, 20, 2), (32, 40, 40, 8)])
def test_pivots_guess_the_active_set_of_small_blocks(shape, pivot_layout, rule_index, monkeypatch):
    # Small blocks guess the active set by single pivots from the empty set; the
    # iteration's first solve confirms the guess (one round, where the constraints the
    # minimizer violates took 6 rounds at (32, 10, 10, 2), and the batch with twice as
    # many rows as free dimensions went to the interior point). Solutions must be CVXPY's,
    # gradients those of the path without pivots.
    import solvers.interior_point as ipm

    B, n, m, p = shape
    data = random_qp(B, n, m, p, seed=31)
    w = torch.randn(B, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def solve():
        layer = qp_problem(n, m, p).to_torch(tol=1e-11)
        leaves = [t.clone().requires_grad_() for t in data]
        x = layer(*leaves)
        (w * x).sum().backward()
        assert layer.info.status == ["optimal"] * B
        return x.detach(), [t.grad for t in leaves], layer.info

    x, grads, info = solve()
    assert info.active_set_pivots is not None and int(info.active_set_pivots.min()) > 0
    assert bool((info.active_set_rounds == 1).all()) and bool((info.iterations == 0).all())
    assert_matches_cvxpy(x, data, range(0, B, 3), atol=1e-8)
    monkeypatch.setattr(ipm, "_pivots_first", lambda B, m: False)
    monkeypatch.setattr(ipm, "_pivots_after_crawl", lambda B, m, free: False)
    x_plain, grads_plain, info_plain = solve()
    assert info_plain.active_set_pivots is None
    torch.testing.assert_close(x, x_plain, atol=1e-10, rtol=0)
    for g, g_plain in zip(grads, grads_plain):
        torch.testing.assert_close(g, g_plain, atol=1e-8, rtol=1e-8)


def test_pivots_in_float32_and_on_infeasible_instances(pivot_layout):
    # The tableau in float32 (tolerances 1e-5 or so), and instances whose constraints
    # contradict each other: the pivots stop at the contradiction (the second of the
    # pair would be a dependent pivot), the iteration and the interior point certify
    # them infeasible, and the others are not disturbed.
    n, m, p, B = 10, 10, 2, 32
    Q, q, G, h, A, b = (t.clone() for t in random_qp(B, n, m, p, seed=32))
    for i in (3, 17):  # G_i1 x <= h_i1 contradicts G_i0 x <= h_i0
        G[i, 1], h[i, 1] = -G[i, 0], -h[i, 0] - 1.0
    data = [t.float() for t in (Q, q, G, h, A, b)]
    layer = qp_problem(n, m, p).to_torch(warn=False)
    x = layer(*data)
    expected = ["infeasible" if i in (3, 17) else "optimal" for i in range(B)]
    assert layer.info.status == expected
    assert layer.info.active_set_pivots is not None
    assert_matches_cvxpy(x.double(), [t.double() for t in data], [0, 5, 31], atol=2e-4)


def test_a_pivot_on_a_dependent_constraint_is_not_taken(pivot_layout):
    # Two constraints all but parallel (their matrix's Schur complement 2e-9 against a
    # diagonal of 1), both violated: once the first is active the second is violated
    # still (by 1e3 tolerances), on a pivot below sqrt(eps) of its diagonal. Pivoting
    # would divide by it: the exchange steps swap the two instead (the set holds one of
    # them), and the iteration takes it from there. Instances 1 and 2 have independent
    # constraints, the first violated. Two constraints that contradict each other leave
    # nothing to exchange: where most of the batch has such, the pivots give up (None).
    import solvers.interior_point as ipm

    c = 1.0 - 1e-9
    dependent_pair, independent_pair, contradicting_pair = [[1.0, c], [c, 1.0]], [[1.0, 0.0], [0.0, 1.0]], \
        [[1.0, -1.0], [-1.0, 1.0]]
    factor = type("Factor", (), {})()
    factor.n, factor.p = 2, 0  # (as many free dimensions as rows: single pivots first)
    factor.W = torch.tensor([dependent_pair, independent_pair, independent_pair], dtype=torch.float64)
    factor.delta = torch.zeros(3, dtype=torch.float64)
    g0 = torch.tensor([[1.0, 1.0], [1.0, -1.0], [1.0, -1.0]], dtype=torch.float64)
    tol = torch.full((3, 1), 1e-12, dtype=torch.float64)
    guess, pivots = ipm._pivoted_active_set(factor, g0, tol, tol)
    assert guess[0].sum() == 1 and guess[1:].tolist() == [[True, False]] * 2
    assert bool((pivots > 0).all())
    factor.W = torch.tensor([contradicting_pair, contradicting_pair, independent_pair], dtype=torch.float64)
    g0[1] = 1.0
    guess, pivots = ipm._pivoted_active_set(factor, g0, tol, tol)
    assert guess is None and bool((pivots > 0).all())


@pytest.mark.parametrize("start", ["exchange", "restart"])
def test_exchange_steps_reach_the_vertices(start, pivot_layout, rule_index, monkeypatch):
    # A large linear term puts the solutions at vertices, where single pivots stop at a
    # violated constraint that depends on the active ones (by about step n - p). With
    # more than 1.5 (n - p) rows the pivots are the dual active-set method's exchange
    # steps from the start; else ("restart": the rule moved) the batch starts over with
    # them at the first such stop. The iteration's first solve confirms their guess: no
    # second round, no interior point. Solutions must be CVXPY's.
    import solvers.interior_point as ipm

    if start == "restart":
        monkeypatch.setattr(ipm, "_CRAWL_ROWS", 1e9)
    B, n, m, p = 32, 20, 40, 5
    Q, q, G, h, A, b = random_qp(B, n, m, p, seed=33)
    data = [Q, 100.0 * q, G, h, A, b]
    layer = qp_problem(n, m, p).to_torch(tol=1e-9)
    x = layer(*data)
    info = layer.info
    assert info.status == ["optimal"] * B
    assert int(info.active_set_pivots.max()) > n - p
    assert bool((info.active_set_rounds == 1).all()) and bool((info.iterations == 0).all())
    assert_matches_cvxpy(x, data, range(0, B, 4), atol=1e-8)


@pytest.mark.parametrize("p", [0, 1, 3])  # (p = 1: K22's factor is a square root)
def test_the_constraint_space_blocks_match_their_closed_forms(p):
    # QPFactor's blocks (from one triangular solve on [G' A' -c]) and the floor's
    # setup_kernel against numpy's inverses: W = G P G' with P = Q^-1 - Q^-1 A' (A Q^-1 A')^-1
    # A Q^-1, the unconstrained minimizer -Q^-1 c and its images G qc, A qc.
    import solvers.interior_point as ipm

    B, n, m = 5, 9, 7
    Q, c, G, _, A, _ = random_qp(B, n, m, p, seed=52)
    Q = (Q + Q.mT) / 2  # (a layer hands the solver an exactly symmetric Q)
    Qi = np.linalg.inv(Q.numpy())
    Gn, An, cn = G.numpy(), A.numpy(), c.numpy()[..., None]
    P = Qi
    if p:
        QiAt = Qi @ An.transpose(0, 2, 1)
        P = Qi - QiAt @ np.linalg.inv(An @ QiAt) @ QiAt.transpose(0, 2, 1)
    W = Gn @ P @ Gn.transpose(0, 2, 1)
    qc = -(Qi @ cn)[..., 0]
    f = ipm.QPFactor(Q, c, G, A)
    assert bool(f.usable.all())
    np.testing.assert_allclose(f.W.numpy(), W, atol=1e-10, rtol=1e-10)
    np.testing.assert_allclose(ipm.setup_kernel(Q, c, G, A).numpy(), W, atol=1e-10, rtol=1e-10)
    np.testing.assert_allclose(f.from_half(f.qc_half).numpy(), qc, atol=1e-11, rtol=1e-11)
    np.testing.assert_allclose(f.G_qc.numpy(), (Gn @ qc[..., None])[..., 0], atol=1e-10, rtol=1e-10)
    np.testing.assert_allclose(f.A_qc.numpy(), (An @ qc[..., None])[..., 0], atol=1e-10, rtol=1e-10)
    # Q^-1 (r - G'y - A'nu), in one product for G'y + A'nu, for the whole batch and for
    # instances selected from it (whose half-solve views follow their block's copy)
    gen = np.random.default_rng(5)
    r, y, nu = gen.standard_normal((B, n)), gen.standard_normal((B, m)), gen.standard_normal((B, p))
    z = (Qi @ (r - (Gn.transpose(0, 2, 1) @ y[..., None])[..., 0]
               - (An.transpose(0, 2, 1) @ nu[..., None])[..., 0])[..., None])[..., 0]
    r, y, nu = (torch.from_numpy(t) for t in (r, y, nu))
    np.testing.assert_allclose(f.from_half(f.half_solve(r), y, nu).numpy(), z, atol=1e-10, rtol=1e-10)
    rows = torch.tensor([3, 1])
    sub = f.select(rows, None)
    np.testing.assert_allclose(sub.from_half(sub.half_solve(r[rows]), y[rows], nu[rows]).numpy(), z[[3, 1]],
                               atol=1e-10, rtol=1e-10)


def test_factor_blocks_are_reused_only_once_their_graph_is_gone():
    # A layer keeps the QP factor's large blocks for its next call (solvers.buffers):
    # a block comes back only when the factor holding it is collected. Two forwards
    # before either backward must not share blocks (the first backward would read the
    # second call's factor), and a third call after both backwards reuses them. Gradients
    # against a fresh layer per call. (Blocks of 64 x 32 x 32: the pool serves blocks from
    # 2^16 entries on.)
    B, n, m, p = 64, 32, 32, 4
    first, second = random_qp(B, n, m, p, seed=41), random_qp(B, n, m, p, seed=42)
    w = torch.randn(B, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def grads(layer, data):
        leaves = [t.clone().requires_grad_() for t in data]
        return leaves, (w * layer(*leaves)).sum()

    def expected(data):
        leaves, loss = grads(qp_problem(n, m, p).to_torch(tol=1e-10), data)
        loss.backward()
        return [t.grad for t in leaves]

    layer = qp_problem(n, m, p).to_torch(tol=1e-10)
    leaves_1, loss_1 = grads(layer, first)
    leaves_2, loss_2 = grads(layer, second)
    loss_1.backward()
    loss_2.backward()
    for got, want in zip([t.grad for t in leaves_1] + [t.grad for t in leaves_2], expected(first) + expected(second)):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    del loss_1, loss_2
    taken = []
    pool = layer._block_pool
    original = pool.take

    def spy(shape, dtype, device):
        before = sum(len(v) for v in pool._free.values())
        block = original(shape, dtype, device)
        taken.append(sum(len(v) for v in pool._free.values()) < before)
        return block

    pool.take = spy
    leaves_3, loss_3 = grads(layer, first)
    loss_3.backward()
    assert taken and all(taken), "a block was allocated anew though the pool held one"
    for got, want in zip([t.grad for t in leaves_3], expected(first)):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_buffer_pool_bounds_and_copies():
    import copy
    import pickle

    from solvers.buffers import BufferPool

    pool = BufferPool(max_keys=2, per_key=1)
    owner = type("Owner", (), {})()
    cpu = torch.device("cpu")
    block = pool.take((3, 4), torch.float64, cpu)
    pool.hold(owner, block)
    assert pool.take((3, 4), torch.float64, cpu) is not block  # held: not free
    del owner
    assert pool.take((3, 4), torch.float64, cpu) is block  # its owner is gone
    pool.give_back(torch.empty(1), torch.empty(1))  # one per key is kept
    assert len(pool._free[((1,), torch.float32, torch.device("cpu"))]) == 1
    pool.give_back(torch.empty(2), torch.empty(3, dtype=torch.float64))  # at most two shapes
    assert len(pool._free) == 2 and ((1,), torch.float32, torch.device("cpu")) not in pool._free
    for other in (copy.deepcopy(pool), pickle.loads(pickle.dumps(pool))):
        assert not other._free and other.max_keys == 2
    layer = qp_problem(4, 3, 1).to_torch()
    layer(*random_qp(2, 4, 3, 1, seed=0))
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert not other._block_pool._free
        other(*random_qp(2, 4, 3, 1, seed=0))


@pytest.mark.parametrize("B", [96, 16])
def test_an_lp_batch_goes_on_without_its_finished_instances(kept_batches, B):
    # LPs take the general loop, which drops a batch's finished instances once they are
    # most of it (every eighth cost vector is large: those take longer): a large batch,
    # and a small one, whose (n, n) systems cost per instance. Each instance comes out as
    # it does alone, and as CVXPY says.
    kept = kept_batches
    n, m = 8, 20
    x = dl.Variable(n, name="x")
    c, G, h = dl.Parameter(n, name="c"), dl.Parameter((m, n), name="G"), dl.Parameter(m, name="h")
    layer = dl.Problem(dl.Minimize(c @ x), [G @ x <= h, x >= -10, x <= 10]).to_torch(tol=1e-11)
    gen = torch.Generator().manual_seed(7)
    c_t = torch.randn(B, n, generator=gen, dtype=torch.float64)
    c_t[::8] *= 50
    G_t = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    h_t = torch.rand(B, m, generator=gen, dtype=torch.float64) + 0.5
    xs = layer(c_t, G_t, h_t)
    iterations = layer.info.iterations.clone()
    assert layer.info.status == ["optimal"] * B and kept and all(len(rows) <= B // 2 for rows in kept)
    for i in (0, 1, int(iterations.argmax())):
        assert torch.equal(layer(c_t[i], G_t[i], h_t[i]), xs[i])
        assert int(layer.info.iterations[0]) == int(iterations[i])
        xv = cp.Variable(n)
        solve(cp.Problem(cp.Minimize(c_t[i].numpy() @ xv), [G_t[i].numpy() @ xv <= h_t[i].numpy(), xv >= -10, xv <= 10]))
        np.testing.assert_allclose(xs[i].numpy(), xv.value, atol=1e-6)


def test_float32_lps_the_loop_cannot_finish_are_solved_again_in_float64(monkeypatch):
    # Float32 LPs with 50 variables, 100 rows and a box: on some instances the general
    # loop's complementarity collapsed while stationarity stayed a few times the
    # tolerance, and they ended max_iter or numerical_error (2 of these 32). They are
    # stopped as soon as complementarity collapses and solved again in float64: every
    # instance is optimal, its objective and feasibility within the float32 tolerance of
    # HiGHS' vertex, and no instance runs on to the iteration limit first (116 iterations
    # in all before the early stop, 35 now).
    from scipy.optimize import linprog

    n, m, B = 50, 100, 32
    x = dl.Variable(n, name="x")
    c, G, h = dl.Parameter(n, name="c"), dl.Parameter((m, n), name="G"), dl.Parameter(m, name="h")
    layer = dl.Problem(dl.Minimize(c @ x), [G @ x <= h, x >= -3, x <= 3]).to_torch()
    gen = torch.Generator().manual_seed(5)
    c_t = torch.randn(B, n, generator=gen)
    c_t[::8] *= 30
    G_t = torch.randn(B, m, n, generator=gen)
    h_t = torch.rand(B, m, generator=gen) + 0.1
    xs = layer(c_t, G_t, h_t)
    assert xs.dtype == torch.float32
    assert layer.info.status == ["optimal"] * B and int(layer.info.iterations.max()) < 60
    for i in range(B):
        ci, Gi, hi, xi = (t[i].double().numpy() for t in (c_t, G_t, h_t, xs))
        ref = linprog(ci, A_ub=Gi, b_ub=hi, bounds=(-3, 3), method="highs")
        assert ref.status == 0
        assert abs(ci @ xi - ref.fun) <= 1e-4 * (1 + abs(ref.fun))
        assert max((Gi @ xi - hi).max(), np.abs(xi).max() - 3) <= 1e-4
    # an iteration limit is the caller's: instances it stops are not solved again
    import solvers.interior_point as ipm

    dtypes = []
    general = ipm._general_qp
    monkeypatch.setattr(ipm, "_general_qp", lambda Q, *rest: dtypes.append(Q.dtype) or general(Q, *rest))
    short = dl.Problem(dl.Minimize(c @ x), [G @ x <= h, x >= -3, x <= 3]).to_torch(max_iter=2, warn=False)
    short(c_t, G_t, h_t)
    assert "max_iter" in short.info.status and dtypes == [torch.float32]


@pytest.mark.parametrize("seed", [3, 9])
def test_float32_lps_come_out_at_their_vertex(seed):
    # Random float32 LPs (20 variables, 40 rows, an equality and a box): some instances
    # ended 'optimal' as loose iterates, their residuals within the float32 tolerance but
    # x up to 0.26 from HiGHS' vertex (the polish had not found the active set; in these
    # two batches at worst 1.7e-2 and 1.5e-3). They are solved again in float64, whose
    # polish does. HiGHS solves the float32 data in float64
    from scipy.optimize import linprog

    n, m, B = 20, 40, 32
    x = dl.Variable(n, name="x")
    c, G, h, a = (dl.Parameter(n, name="c"), dl.Parameter((m, n), name="G"), dl.Parameter(m, name="h"),
                  dl.Parameter(n, name="a"))
    layer = dl.Problem(dl.Minimize(c @ x), [G @ x <= h, a @ x == 0, x >= -3, x <= 3]).to_torch()
    gen = torch.Generator().manual_seed(seed)
    c_t, G_t = torch.randn(B, n, generator=gen), torch.randn(B, m, n, generator=gen)
    c_t[::8] *= 30
    h_t, a_t = torch.rand(B, m, generator=gen) + 0.1, torch.randn(B, n, generator=gen)
    xs = layer(c_t, G_t, h_t, a_t)
    assert xs.dtype == torch.float32 and layer.info.status == ["optimal"] * B
    for i in range(B):
        ci, Gi, hi, ai = (t[i].double().numpy() for t in (c_t, G_t, h_t, a_t))
        ref = linprog(ci, A_ub=Gi, b_ub=hi, A_eq=ai[None], b_eq=[0.0], bounds=(-3, 3), method="highs")
        assert ref.status == 0
        np.testing.assert_allclose(xs[i].double().numpy(), ref.x, atol=1e-4)


@pytest.mark.parametrize("kind", ["lp", "qp", "nlp"])
def test_an_empty_batch_gives_empty_outputs_and_gradients(kind):
    # A batch of no instances (the last, filtered batch of a data loader, say): empty
    # outputs and report, zero-size gradients for batched parameters and zeros for
    # shared ones; the layer then solves a real batch as before.
    n, m = 4, 6
    x = dl.Variable(n, name="x")
    c, G = dl.Parameter(n, name="c"), dl.Parameter((m, n), name="G")
    objective = {"lp": c @ x, "qp": dl.sum_squares(x) + c @ x, "nlp": -dl.sum(dl.entropy(x)) - c @ x}[kind]
    layer = dl.Problem(dl.Minimize(objective), [G @ x <= 1, x >= -2, x <= 2]).to_torch(return_duals=True)
    c_t = torch.zeros(0, n, dtype=torch.float64, requires_grad=True)
    G_t = torch.randn(m, n, dtype=torch.float64, requires_grad=True)  # shared by the batch
    outputs = layer(c_t, G_t)
    assert [tuple(o.shape) for o in outputs] == [(0, n), (0, m), (0, n), (0, n)]
    assert layer.info.status == [] and layer.info.iterations.shape == (0,)
    assert "batch=0" in repr(layer.info)  # (it took the max of no iterations, and raised)
    sum(o.sum() for o in outputs).backward()
    assert c_t.grad.shape == (0, n) and torch.equal(G_t.grad, torch.zeros(m, n, dtype=torch.float64))
    c_1 = torch.randn(3, n, dtype=torch.float64)
    assert layer(c_1, G_t)[0].shape == (3, n) and layer.info.status == ["optimal"] * 3


def test_a_variable_only_the_equalities_fix():
    # Projection onto range(B) through a latent y in no objective: min |x - q|^2 s.t.
    # x = B y. Q is singular along y, which only the equality fixes; the loop's reduction
    # regularized Q there and ended max_iter after 100 iterations, up to 1.5e-2 off.
    # Closed form: x = P q, y = (B'B)^-1 B'q; the gradients by gradcheck
    n, k = 6, 3
    x, y = dl.Variable(n, name="x"), dl.Variable(k, name="y")
    Bm, q = dl.Parameter((n, k), name="Bm"), dl.Parameter(n, name="q")
    layer = dl.Problem(dl.Minimize(dl.sum_squares(x - q)), [x == Bm @ y]).to_torch(tol=1e-12)
    g = torch.Generator().manual_seed(0)
    B_t = (3 * torch.randn(4, n, k, generator=g, dtype=torch.float64)).requires_grad_()
    q_t = (3 * torch.randn(4, n, generator=g, dtype=torch.float64)).requires_grad_()
    x_t, y_t = layer(Bm=B_t, q=q_t)
    assert layer.info.status == ["optimal"] * 4
    y_ref = torch.linalg.solve(B_t.mT @ B_t, (B_t.mT @ q_t.unsqueeze(-1))).squeeze(-1)
    torch.testing.assert_close(y_t, y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(x_t, (B_t @ y_ref.unsqueeze(-1)).squeeze(-1), atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(lambda B_, q_: layer(Bm=B_, q=q_), (B_t[:2], q_t[:2]), eps=1e-6, atol=1e-5,
                                    rtol=1e-4)


@pytest.mark.parametrize("dtype,far,d", [(torch.float64, 1e8, 0.3), (torch.float32, 5000.0, 0.04)])
def test_a_far_row_the_relaxed_point_reaches_binds(dtype, far, d):
    # max x s.t. x <= B, x - y <= d, y = Y with B = Y far: without the row x <= B the
    # point is x = B + d, which missed that row by only d (within the tolerance times B),
    # and was kept with the row's multiplier 0: x = B + d, 'optimal', and the gradient
    # on d and Y instead of B. Closed form: x = min(B, Y + d) = B, dx/d(B, d, Y) = (1, 0, 0)
    x, y = dl.Variable(name="x"), dl.Variable(name="y")
    B, dd, Y = dl.Parameter(name="B"), dl.Parameter(name="d"), dl.Parameter(name="Y")
    layer = dl.Problem(dl.Maximize(x), [x <= B, x - y <= dd, y == Y]).to_torch(variables=[x])
    leaves = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in (far, d, far)]
    out = layer(*leaves)
    assert layer.info.status == ["optimal"]
    torch.testing.assert_close(out.detach(), torch.tensor(far, dtype=dtype), atol=0, rtol=1e-12)
    out.backward()
    torch.testing.assert_close(torch.stack([t.grad for t in leaves]), torch.tensor([1.0, 0.0, 0.0], dtype=dtype),
                               atol=1e-6, rtol=0)
