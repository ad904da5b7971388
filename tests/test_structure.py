"""The structured Newton step: diagonal Hessians and bound rows found by the compiler.

Each solve is checked against CVXPY/Clarabel, against the dense n-space step on the same
problem, and its gradients against finite differences (gradcheck), with bounds active
so that every branch of the structured adjoint runs."""
import cvxpy as cp
import numpy as np
import pytest
import torch

import declarative as dl
from compiler import ir
from compiler.structure import diagonal_of
from references import solve

GEN = torch.Generator().manual_seed(11)


def _rand(*shape):
    return torch.rand(*shape, generator=GEN, dtype=torch.float64)


def _dense_twin(layer):
    """The same layer forced onto the dense n-space Newton step."""
    twin = layer.problem.to_torch(tol=layer.tol, max_iter=layer.max_iter)
    twin._structured = lambda: False
    return twin


def test_structure_found():
    n, k = 6, 2
    z = dl.Variable(n, name="z")
    theta = dl.Parameter(n, name="theta")
    u = dl.Parameter(n, name="u")
    G = dl.Parameter((k, n), name="G")
    h = dl.Parameter(k, name="h")
    prob = dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))),
                      [dl.sum(z) == 1, z >= 0, z <= u, G @ z <= h, z[1:4] >= 0.01])
    s = prob.compile().kkt.structure
    assert s is not None and s.k == k
    # rows of g in constraint order: -z (6), z - u (6), G z - h (2), 0.01 - z[1:4] (3)
    np.testing.assert_array_equal(s.bound_rows, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 15, 16])
    np.testing.assert_array_equal(s.bound_cols, [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 1, 2, 3])
    np.testing.assert_array_equal(s.bound_signs, [-1] * 6 + [1] * 6 + [-1] * 3)
    np.testing.assert_array_equal(s.general_rows, [12, 13])


def test_no_structure_when_the_hessian_couples_entries():
    n = 4
    z = dl.Variable(n, name="z")
    W = dl.Parameter((3, n), name="W")
    theta = dl.Parameter(n, name="theta")
    coupled = dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z)) - dl.sum_squares(W @ z)), [dl.sum(z) == 1])
    assert coupled.compile().kkt.structure is None
    # a nonlinear constraint couples entries through its Hessian too
    nonlinear = dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))), [dl.exp(W @ z) <= 5])
    assert nonlinear.compile().kkt.structure is None


def test_diagonal_of_graph_nodes():
    v = ir.input_node("v", (3,), "parameter")
    P = ir.input_node("P", (3, 3), "parameter")
    eye = ir.eye(3)
    assert diagonal_of(ir.mul(eye, v)) is not None
    assert diagonal_of(ir.add(ir.mul(eye, v), eye)) is not None
    assert diagonal_of(ir.einsum("ij,jk->ik", ir.mul(eye, v), eye)) is not None
    assert diagonal_of(P) is None
    assert diagonal_of(ir.add(ir.mul(eye, v), P)) is None
    assert diagonal_of(ir.einsum("ij,jk->ik", ir.mul(eye, v), P)) is None
    assert diagonal_of(ir.const(np.diag([1.0, 2.0, 3.0]))) is not None
    assert diagonal_of(ir.const(np.ones((3, 3)))) is None


def _exp_with_bounds(n):
    # min sum(exp(z)) - theta'z  s.t.  l <= z <= u, sum(z) == c: box bounds, many active
    z = dl.Variable(n, name="z")
    theta, l, u = dl.Parameter(n, name="theta"), dl.Parameter(n, name="l"), dl.Parameter(n, name="u")
    c = dl.Parameter((), name="c")
    return dl.Problem(dl.Minimize(dl.sum(dl.exp(z)) - theta @ z), [z >= l, z <= u, dl.sum(z) == c])


def test_active_bounds_match_cvxpy_and_dense_step():
    n, B = 6, 3
    layer = _exp_with_bounds(n).to_torch(tol=1e-11)
    assert layer._structured()
    theta = 3.0 * (2.0 * _rand(B, n) - 1.0)
    l, u = -0.5 * _rand(B, n) - 0.1, 0.5 * _rand(B, n) + 0.1
    c = 0.2 * _rand(B)
    z = layer(theta, l, u, c)
    assert bool(layer.info.ok.all())
    for i in range(B):
        x = cp.Variable(n)
        solve(cp.Problem(cp.Minimize(cp.sum(cp.exp(x)) - theta[i].numpy() @ x),
                         [x >= l[i].numpy(), x <= u[i].numpy(), cp.sum(x) == c[i].item()]))
        np.testing.assert_allclose(z[i].numpy(), x.value, atol=1e-6)
    active = ((z - l).abs() < 1e-6) | ((u - z).abs() < 1e-6)
    assert int(active.sum()) >= B, "the instance family should have active bounds"
    torch.testing.assert_close(_dense_twin(layer)(theta, l, u, c), z, atol=1e-9, rtol=0)


def test_active_bounds_gradcheck_and_dense_adjoint():
    n = 5
    layer = _exp_with_bounds(n).to_torch(tol=1e-12)
    theta = torch.tensor([[2.5, -2.0, 0.3, 1.0, -0.4]], dtype=torch.float64)
    l = torch.full((1, n), -0.6, dtype=torch.float64)
    u = torch.full((1, n), 0.6, dtype=torch.float64)
    c = torch.tensor([0.3], dtype=torch.float64)
    z = layer(theta, l, u, c)
    # entries 0 and 1 sit on their bounds, the others are free: both adjoint branches run
    assert abs(z[0, 0].item() - 0.6) < 1e-9 and abs(z[0, 1].item() + 0.6) < 1e-9
    inputs = tuple(t.clone().requires_grad_() for t in (theta, l, u, c))
    assert torch.autograd.gradcheck(layer, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
    w = torch.randn(1, n, generator=GEN, dtype=torch.float64)
    grads = []
    for lay in (layer, _dense_twin(layer)):
        xs = tuple(t.clone().requires_grad_() for t in (theta, l, u, c))
        (w * lay(*xs)).sum().backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-6)


def test_weighted_entropy_with_general_rows():
    # entropy with weights, sum(z) == 1 and linear inequalities of which some are active
    n, k, B = 8, 4, 4
    z = dl.Variable(n, name="z")
    theta, wt = dl.Parameter(n, name="theta"), dl.Parameter(n, name="wt")
    G, h = dl.Parameter((k, n), name="G"), dl.Parameter(k, name="h")
    prob = dl.Problem(dl.Maximize(theta @ z + wt @ dl.entropy(z)), [dl.sum(z) == 1, z >= 0, G @ z <= h])
    layer = prob.to_torch(tol=1e-11)
    assert layer._structured()
    theta_t = 3.0 * torch.randn(B, n, generator=GEN, dtype=torch.float64)
    wt_t = 0.5 + _rand(B, n)
    G_t = torch.randn(B, k, n, generator=GEN, dtype=torch.float64)
    h_t = G_t.sum(-1) / n + 0.05 * _rand(B, k)
    out = layer(theta_t, wt_t, G_t, h_t)
    assert bool(layer.info.ok.all())
    for i in range(B):
        x = cp.Variable(n)
        solve(cp.Problem(cp.Maximize(theta_t[i].numpy() @ x + wt_t[i].numpy() @ cp.entr(x)),
                         [cp.sum(x) == 1, x >= 0, G_t[i].numpy() @ x <= h_t[i].numpy()]))
        np.testing.assert_allclose(out[i].numpy(), x.value, atol=1e-6)
    slack = h_t - (G_t @ out.unsqueeze(-1)).squeeze(-1)
    assert int((slack < 1e-7).sum()) >= 1, "the instance family should have active rows"
    torch.testing.assert_close(_dense_twin(layer)(theta_t, wt_t, G_t, h_t), out, atol=1e-9, rtol=0)
    inputs = tuple(t[:1].clone().requires_grad_() for t in (theta_t, wt_t, G_t, h_t))
    assert torch.autograd.gradcheck(layer, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flat_directions_fall_back_to_the_dense_step(dtype):
    # t enters only linearly (zero curvature) and has no bound row (2 t >= -2 is a general
    # row): diag H has a zero, so the structured step is not usable and the dense one
    # must take over
    n = 4
    x = dl.Variable(n, name="x")
    t = dl.Variable((), name="t")
    a = dl.Parameter(n, name="a")
    prob = dl.Problem(dl.Minimize(dl.sum(dl.exp(x)) - dl.sum(x) + t), [a @ x - t <= -1, 2 * t >= -2])
    layer = prob.to_torch(tol=1e-11 if dtype == torch.float64 else None)
    assert layer.compiled.kkt.structure is not None and layer.compiled.kkt.structure.k == 2
    a_t = torch.tensor([[1.0, -1.0, 0.5, 2.0], [0.2, 0.1, -0.3, 0.4]], dtype=dtype)
    x_out, t_out = layer(a_t)
    assert bool(layer.info.ok.all())
    for i in range(2):
        xv, tv = cp.Variable(n), cp.Variable()
        ref = cp.Problem(cp.Minimize(cp.sum(cp.exp(xv)) - cp.sum(xv) + tv),
                         [a_t[i].double().numpy() @ xv - tv <= -1, tv >= -1])
        # exponential cones: Clarabel's default path stops near 1e-6 here; ask for 1e-12
        ref.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        assert ref.status == cp.OPTIMAL
        atol = 1e-6 if dtype == torch.float64 else 2e-3
        np.testing.assert_allclose(x_out[i].double().numpy(), xv.value, atol=atol)
        np.testing.assert_allclose(t_out[i].item(), tv.value, atol=atol)


@pytest.mark.parametrize("rows, cols, signs, general_rows", [
    ([0, 1, 2, 3], [0, 1, 2, 3], [-1.0] * 4, [4, 5]),               # bounds first: slices, one sign
    ([1, 2, 3, 4], [2, 0, 2, 3], [-1.0, 1.0, 1.0, -1.0], [0, 5]),   # repeated/shuffled columns, mixed signs
    ([2, 3, 4, 5], [0, 1, 2, 3], [1.0] * 4, [0, 1]),                # general rows first, then the bounds
    ([2, 0, 1], [0, 1, 2], [-1.0] * 3, []),                         # every row a bound, rows shuffled
])
def test_compact_index_sets_give_the_dense_jacobian(rows, cols, signs, general_rows):
    from solvers.interior_point import BoundedJacobian

    n, B = 4, 3
    m = len(rows) + len(general_rows)
    general = torch.randn(B, len(general_rows), n, generator=GEN, dtype=torch.float64)
    sets = BoundedJacobian.index_sets(rows, cols, signs, general_rows, torch.float64, "cpu")
    Jg = BoundedJacobian(general, m, *sets)
    dense = torch.zeros(B, m, n, dtype=torch.float64)
    for r, c, sgn in zip(rows, cols, signs):
        dense[:, r, c] = sgn
    dense[:, general_rows] = general
    assert torch.equal(Jg.dense(), dense)
    x, y, w = _rand(B, n), _rand(B, m), _rand(B, m)
    torch.testing.assert_close(Jg.mv(x), (dense @ x[..., None])[..., 0])
    torch.testing.assert_close(Jg.mtv(y), (dense.mT @ y[..., None])[..., 0])
    bound_only = dense.clone()
    bound_only[:, general_rows] = 0.0
    torch.testing.assert_close(Jg.bound_diagonal(w), (bound_only.mT @ (w[..., None] * bound_only)).diagonal(dim1=-2, dim2=-1))


_LAYOUTS = [
    ([0, 1, 2, 3], [0, 1, 2, 3], [-1.0] * 4, [4, 5]),               # bounds first: slices, one sign
    ([1, 2, 3, 4], [2, 0, 2, 3], [-1.0, 1.0, 1.0, -1.0], [0, 5]),   # repeated/shuffled columns, mixed signs
    ([2, 3, 4, 5], [0, 1, 2, 3], [1.0] * 4, [0, 1]),                # general rows first, then the bounds
    ([2, 0, 1], [0, 1, 2], [-1.0] * 3, []),                         # every row a bound, rows shuffled
    ([0, 1, 2, 3], [0, 1, 2, 3], [-1.0] * 4, []),                   # every entry bounded below, in order
    ([0, 1, 2, 3], [0, 1, 2, 3], [1.0] * 4, []),                    # ... and above
    ([0, 1, 2], [3, 1, 2], [-1.0] * 3, [3]),                        # bounds first, not every entry
]


@pytest.mark.parametrize("p", [0, 1, 2])
@pytest.mark.parametrize("rows, cols, signs, general_rows", _LAYOUTS)
def test_the_structured_newton_step_solves_the_newton_equations(rows, cols, signs, general_rows, p):
    # The step (dz, [ds, dlam], dnu) satisfies, with the dense Jacobian:
    #   H dz + Jg' dlam + Jh' dnu = -rd,  lam ds + s dlam = -rc,  Jg dz + ds = -rp,  Jh dz = -re
    # whatever order the bound and general rows come in (each layout writes the step's
    # halves its own way).
    from solvers.interior_point import BoundedJacobian, DiagonalMatrix, DiagonalNewton

    n, B = 4, 5
    m = len(rows) + len(general_rows)
    general = torch.randn(B, len(general_rows), n, generator=GEN, dtype=torch.float64)
    Jg = BoundedJacobian(general, m, *BoundedJacobian.index_sets(rows, cols, signs, general_rows,
                                                                 torch.float64, "cpu"))
    Jh = torch.randn(B, p, n, generator=GEN, dtype=torch.float64)
    H = DiagonalMatrix(_rand(B, n) + 0.5)
    lam, s = _rand(B, m) + 0.1, _rand(B, m) + 0.1
    rd, rc, rp, re = (torch.randn(B, k, generator=GEN, dtype=torch.float64) for k in (n, m, m, p))
    newton = DiagonalNewton(H, Jg, Jh, lam, s)
    assert newton.usable and not newton.failed.any()
    dz, dv, dnu = newton.step(rd, rc, rp, re)
    assert dv.shape == (B, 2 * m) and dnu.shape == (B, p)
    ds, dlam = dv[:, :m], dv[:, m:]
    dense = Jg.dense()
    mv = lambda M, x: (M @ x[..., None])[..., 0]  # noqa: E731
    torch.testing.assert_close(H.d * dz + mv(dense.mT, dlam) + mv(Jh.mT, dnu), -rd, atol=1e-10, rtol=0)
    torch.testing.assert_close(lam * ds + s * dlam, -rc, atol=1e-10, rtol=0)
    torch.testing.assert_close(mv(dense, dz) + ds, -rp, atol=1e-10, rtol=0)
    torch.testing.assert_close(mv(Jh, dz), -re, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_one_row_newton_system_is_factored_by_its_square_root(dtype):
    # One equality (a simplex, a budget) leaves a (B, 1, 1) system: its factor is the
    # square root of S + E plus a shift of 1e-13 (float32: 1e-7) of |S| (1 where S is
    # 0), or of 1e-8 |S| where that is not positive; failed (factor 1) where neither
    # is, NaN included, as LAPACK's Cholesky says. (numpy in the same precision, the
    # shifts added as the docstring of _regularized_cholesky says: S + (E + shift),
    # then the difference to the larger shift.)
    import solvers.interior_point as ipm

    S = torch.tensor([0.7, 2.0, 0.0, 0.0, -1e-14, -1.0, float("nan"), 1e-300, -1.0], dtype=dtype).view(-1, 1, 1)
    E = torch.tensor([0.3, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 1.0 - 1e-10], dtype=dtype).view(-1, 1)
    real = np.float64 if dtype == torch.float64 else np.float32
    small = real(1e-13 if dtype == torch.float64 else 1e-7)
    s, e = S.view(-1).numpy(), E.view(-1).numpy()
    scale = np.where(np.abs(s) > 0, np.abs(s), real(1.0))
    with np.errstate(invalid="ignore"):
        first = s + (e + small * scale)
        second = first + (real(1e-8) - small) * scale
        expected_bad = ~((first > 0) | (second > 0))
        expected = np.where(expected_bad, 1.0, np.sqrt(np.where(first > 0, first, second)))
    L, bad = ipm._regularized_cholesky(S.clone(), E)
    assert L.shape == (9, 1, 1) and L.dtype == dtype
    assert bad.tolist() == expected_bad.tolist() == [False] * 4 + [True, True, True, False, False]
    if dtype == torch.float64:  # (the last row: S + E = -1e-10, factored with the larger shift)
        assert first[-1] < 0 < second[-1]
    np.testing.assert_allclose(L.view(-1).numpy(), expected, rtol=1e-6 if dtype == torch.float32 else 1e-15)
    # and as the general path, LAPACK's, gives them (on the rows it factors)
    L2, info = torch.linalg.cholesky_ex(torch.from_numpy(first).view(-1, 1, 1))
    ok = (info == 0) & ~bad
    torch.testing.assert_close(L[ok], L2[ok])


@pytest.mark.parametrize("B", [1, 5])
def test_products_with_one_row_shared_by_the_batch(B):
    # A simplex's Jacobian comes as one row expanded over the batch; its products take a
    # shortcut (a broadcast, a dot product per instance), which must agree with the
    # dense products, and a batched (B, 1, n) row that is not shared must not take it
    import solvers.interior_point as ipm

    n = 7
    row = torch.randn(1, 1, n, generator=GEN, dtype=torch.float64)
    x, y, r = (torch.randn(B, k, generator=GEN, dtype=torch.float64) for k in (n, 1, 1))
    batched = torch.randn(B, 1, n, generator=GEN, dtype=torch.float64)
    for A in (row.expand(B, 1, n), batched):
        assert ipm._one_shared_row(A) == (A is not batched or B == 1)
        torch.testing.assert_close(ipm._mv(A, x), torch.einsum("bkn,bn->bk", A, x))
        torch.testing.assert_close(ipm._mtv(A, y), torch.einsum("bkn,bk->bn", A, y))
        torch.testing.assert_close(ipm._mv_sub(r, A, x), r - torch.einsum("bkn,bn->bk", A, x))
