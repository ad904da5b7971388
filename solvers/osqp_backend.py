"""Forward solver for LPs and QPs with OSQP (ADMM, sparse, CPU).

Solves, per batch instance,

    minimize z'Qz/2 + c'z  subject to  G z <= h,  A z = b

by handing OSQP the data in its form ``min x'Px/2 + q'x s.t. l <= K x <= u`` with
``P = (Q + Q')/2`` (upper triangle), ``K = [G; A]``, ``l = [-inf; b]``, ``u = [h; b]``.

The trade-off against :func:`solvers.interior_point.solve_qp`: OSQP factors a *sparse*
KKT matrix, so a large problem with sparse data (banded constraints, n in the
thousands) costs a fraction of a dense batched factorization; but instances are solved
one after the other in a Python loop on the CPU, so small dense problems in large
batches (and anything on a GPU) are the interior point's ground.

Structure is reused across calls through a :class:`OSQPCache`: the sparsity pattern
(the union of the structural nonzeros over the batch) is built once, one OSQP solver
per batch position is set up once, and later calls only update the numbers (matrices
only when they changed, which avoids a refactorization when only c, h, b move) and
warm-start each instance from that position's previous solution.

The result is an :class:`~solvers.interior_point.InteriorPointResult` whose ``s`` and
``lam`` are strictly positive and carry OSQP's active set exactly (``eps**2`` stands in
for the zeros), so the implicit backward (:func:`solvers.interior_point.kkt_adjoint`)
differentiates the active set OSQP found.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .interior_point import (
    INFEASIBLE,
    MAX_ITER,
    NUMERICAL_ERROR,
    OPTIMAL,
    UNBOUNDED,
    InteriorPointResult,
    problem_scales,
)

__all__ = ["solve_qp_osqp", "OSQPCache", "DEFAULT_SETTINGS", "status_from_osqp"]

#: OSQP settings used unless overridden. High accuracy: the layer's outputs and the
#: active set the backward differentiates both come from here. ``adaptive_rho_interval``
#: is fixed because OSQP's default (0) derives it from the measured setup time, which
#: makes iteration counts, and so results to within eps, vary from run to run.
DEFAULT_SETTINGS = dict(
    eps_abs=1e-9,
    eps_rel=1e-9,
    max_iter=20000,
    polishing=True,
    polish_refine_iter=10,
    warm_starting=True,
    adaptive_rho_interval=25,
    verbose=False,
)


#: OSQP status (``osqp.SolverStatus`` member name) -> the interior point's status code
_STATUS = {
    "OSQP_SOLVED": OPTIMAL,
    "OSQP_SOLVED_INACCURATE": MAX_ITER,
    "OSQP_PRIMAL_INFEASIBLE": INFEASIBLE,
    "OSQP_PRIMAL_INFEASIBLE_INACCURATE": INFEASIBLE,
    "OSQP_DUAL_INFEASIBLE": UNBOUNDED,
    "OSQP_DUAL_INFEASIBLE_INACCURATE": UNBOUNDED,
    "OSQP_MAX_ITER_REACHED": MAX_ITER,
    "OSQP_TIME_LIMIT_REACHED": MAX_ITER,
}


def status_from_osqp(status_val: int) -> int:
    """Map OSQP's ``info.status_val`` to the interior point's status codes.

    'solved inaccurate' only occurs when OSQP stopped at its iteration (or time) limit
    and the last iterate passed a 10x looser test. It maps to MAX_ITER, not
    NUMERICAL_ERROR: nothing broke, the iteration budget ran out, and the layer then
    shows the nearly converged last iterate instead of NaN, as it does for an interior
    point that reached ``max_iter``. The 'inaccurate' infeasibility statuses keep their
    meaning (the certificate passed the looser test): INFEASIBLE / UNBOUNDED.
    'non convex' (Q not PSD), 'interrupted' and 'unsolved' are NUMERICAL_ERROR.
    """
    import osqp

    try:
        name = osqp.SolverStatus(int(status_val)).name
    except ValueError:
        return NUMERICAL_ERROR
    return _STATUS.get(name, NUMERICAL_ERROR)


@dataclass
class _Pattern:
    """A CSC sparsity pattern: entry k sits at (rows[k], cols[k]); ``mask`` is the dense
    boolean pattern used to check that new data fits."""

    mask: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    indptr: np.ndarray

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> "_Pattern":
        # nonzero of the transpose lists entries column by column, rows ascending:
        # exactly CSC order
        cols, rows = np.nonzero(mask.T)
        indptr = np.zeros(mask.shape[1] + 1, dtype=np.int64)
        np.cumsum(np.bincount(cols, minlength=mask.shape[1]), out=indptr[1:])
        return cls(mask, rows.astype(np.int64), cols.astype(np.int64), indptr)

    def covers(self, mask: np.ndarray) -> bool:
        return mask.shape == self.mask.shape and not bool((mask & ~self.mask).any())

    def matrix(self, data: np.ndarray):
        import scipy.sparse as sp

        # csc_matrix (not csc_array): osqp checks isspmatrix_csc and converts otherwise
        return sp.csc_matrix((data, self.rows, self.indptr), shape=self.mask.shape)


@dataclass
class OSQPCache:
    """OSQP state kept between calls of :func:`solve_qp_osqp` (not picklable: the
    solvers are C objects; a layer should drop it when pickled).

    ``solvers[i]`` serves batch position i; ``last_P[i]``, ``last_K[i]`` are the matrix
    values it was last given (an update with equal values is skipped, saving OSQP a
    refactorization); ``start[i]`` is its last optimal (x, y), the next warm start, or
    None after a failure."""

    shapes: Tuple[int, int, int]
    settings: Dict[str, object]
    P: _Pattern
    K: Optional[_Pattern]
    solvers: List[object] = field(default_factory=list)
    last_P: List[Optional[np.ndarray]] = field(default_factory=list)
    last_K: List[Optional[np.ndarray]] = field(default_factory=list)
    start: List[Optional[Tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)
    #: number of solver set-ups (factorizations from scratch) so far, for inspection
    setups: int = 0


def _shared(t: torch.Tensor) -> bool:
    """True when the batch dimension is a broadcast (stride 0) or of size 1."""
    return t.shape[0] == 1 or t.stride(0) == 0


def _numpy64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _batched_values(M: torch.Tensor, pattern: _Pattern, symmetrize: bool) -> np.ndarray:
    """The pattern's entries of every instance: (B or 1, nnz) float64."""
    base = M[:1] if _shared(M) else M
    base = base.detach().to(device="cpu", dtype=torch.float64)
    if symmetrize:
        base = 0.5 * (base + base.transpose(-1, -2))
    rows = torch.from_numpy(pattern.rows)
    cols = torch.from_numpy(pattern.cols)
    return base[:, rows, cols].numpy()


def _mask(M: torch.Tensor, symmetrize: bool) -> np.ndarray:
    base = M[:1] if _shared(M) else M
    base = base.detach()
    nz = base != 0
    if symmetrize:
        nz = nz | nz.transpose(-1, -2)
    return nz.any(0).cpu().numpy()


def _eps_stages(eps_start: Optional[float], target: Tuple[float, float]) -> List[Tuple[float, float]]:
    """(eps_abs, eps_rel) per stage: decades from eps_start down to the target."""
    if eps_start is None or eps_start <= max(target):
        return [target]
    stages, e = [], float(eps_start)
    while e > max(target) * (1 + 1e-9):
        stages.append((max(e, target[0]), max(e, target[1])))
        e /= 10.0
    stages.append(target)
    return stages


class _Verifier:
    """Is a polished point optimal to the *target* tolerances? OSQP accepts a polished
    point when it improves on the ADMM iterate, which at a loose tolerance is not yet
    enough: a wrong active-set guess can still leave a multiplier of the wrong sign.
    Residuals as OSQP defines them (absolute plus relative to the terms' sizes)."""

    def __init__(self, cache: "OSQPCache", Px, Kx, q, h, b, target):
        self.cache, self.Px, self.Kx, self.q, self.h, self.b = cache, Px, Kx, q, h, b
        self.eps_abs, self.eps_rel = target
        self.m = cache.shapes[1]

    def __call__(self, x, y) -> bool:
        if x is None or not np.isfinite(x).all():
            return False
        P = self.cache.P.matrix(self.Px)
        Px = P @ x + P.T @ x - P.diagonal() * x  # P holds the upper triangle
        grad = Px + self.q
        size_dual = max(np.abs(Px).max(initial=0.0), np.abs(self.q).max(initial=0.0))
        prim = 0.0
        size_prim = 0.0
        if self.Kx is not None:
            if not np.isfinite(y).all():
                return False
            K = self.cache.K.matrix(self.Kx)
            Kz = K @ x
            Ky = K.T @ y
            grad = grad + Ky
            size_dual = max(size_dual, np.abs(Ky).max(initial=0.0))
            m = self.m
            prim = max(np.clip(Kz[:m] - self.h, 0.0, None).max(initial=0.0),
                       np.abs(Kz[m:] - self.b).max(initial=0.0))
            size_prim = np.abs(Kz).max(initial=0.0)
            # a multiplier of an inequality row must not be negative (its lower bound
            # is -inf, so it can never be the active side)
            if y[:m].min(initial=0.0) < -(self.eps_abs + self.eps_rel * size_dual):
                return False
        dual = np.abs(grad).max(initial=0.0)
        return bool(prim <= self.eps_abs + self.eps_rel * size_prim
                    and dual <= self.eps_abs + self.eps_rel * size_dual)


def _solve_in_stages(solver, stages, check):
    """Solve at a loose tolerance first and tighten by decades until a polished point
    passes ``check`` at the target tolerance, or the target tolerance itself is reached.

    ADMM converges linearly and slowly to tight tolerances (LPs especially), while
    polishing (one solve of the equality QP of the guessed active set) is exact once the
    active set is right, which it usually is long before. Every stage continues from
    the previous stage's iterate. Returns OSQP's last result and the total iterations."""
    import osqp

    total = 0
    res = None
    for k, (e_abs, e_rel) in enumerate(stages):
        if k or (solver.settings.eps_abs, solver.settings.eps_rel) != (e_abs, e_rel):
            solver.update_settings(eps_abs=e_abs, eps_rel=e_rel)
        res = solver.solve(raise_error=False)
        total += int(res.info.iter)
        solved = res.info.status_val == osqp.SolverStatus.OSQP_SOLVED
        if not solved:
            break  # infeasible, unbounded or out of iterations: tightening cannot help
        polished_ok = res.info.status_polish == 1 and check(res.x, res.y)
        if k == len(stages) - 1:
            if res.info.status_polish == 1 and not polished_ok:
                # OSQP took a polished point that fails the target test (a multiplier
                # of the wrong sign): keep ADMM's own converged iterate instead
                solver.update_settings(polishing=False)
                res = solver.solve(raise_error=False)
                total += int(res.info.iter)
                solver.update_settings(polishing=True)
            break
        if polished_ok:
            break
    # the solver starts the next call at the loosest tolerance again
    return res, total


def solve_qp_osqp(Q, c, G, h, A, b, *, eps_abs: Optional[float] = None, eps_rel: Optional[float] = None,
                  max_iter: Optional[int] = None, eps_start: Optional[float] = 1e-3,
                  polish: bool = True, warm_start: bool = True,
                  settings: Optional[dict] = None, cache: Optional[OSQPCache] = None,
                  skip: Optional[torch.Tensor] = None) -> Tuple[InteriorPointResult, OSQPCache]:
    """Batched convex QP/LP ``min z'Qz/2 + c'z s.t. G z <= h, A z = b`` with OSQP.

    Q (B, n, n) positive semidefinite (only its symmetric part is used), c (B, n),
    G (B, m, n), h (B, m), A (B, p, n), b (B, p); broadcast (stride-0) batch dimensions
    are recognized and their data converted once. float32/float64, any device: OSQP runs
    on the CPU in float64 and the results come back in the input's dtype and device.

    eps_abs, eps_rel, max_iter: OSQP's target tolerances and ADMM iteration limit per
    stage (defaults in :data:`DEFAULT_SETTINGS`: 1e-9, 1e-9, 20000); eps_start: the
    first stage's tolerance (default 1e-3; None: start at the target). Each instance is
    solved at eps_start, 10x tighter, ... down to the target, each stage continuing from
    the last, and stops at the first stage whose polished point passes the target
    tolerances (see :func:`_solve_in_stages`); polish: OSQP's active-set polishing (on by
    default: it makes the solution exact to rounding on the active set);
    warm_start: start each instance from the previous call's solution at the same batch
    position; settings: further OSQP settings; cache: the :class:`OSQPCache` a previous
    call returned (reused when the shapes match and the new data fit its sparsity
    pattern, rebuilt otherwise); skip (B,) bool: instances not to solve (reported as
    NUMERICAL_ERROR).

    Returns ``(result, cache)``: z (B, n); s = h - G z and lam (B, m) with OSQP's active
    set made exact (``s`` is ``eps**2`` on active rows, ``lam`` is ``eps**2`` off them,
    both strictly positive, eps of the input dtype); nu (B, p); status (B,) with the
    interior point's codes (see :func:`status_from_osqp`); iterations (B,) ADMM
    iterations; primal_residual = max(|(G z - h)_+|_inf, |A z - b|_inf), dual_residual =
    |Q z + c + G'lam + A'nu|_inf and complementarity = max |lam_i s_i| before the active
    set is made exact, all (B,); ``qp_factor`` is None.

    Every constraint row is first divided by its largest entry, and an objective far from
    unit scale by its largest coefficient, as :func:`solvers.interior_point.solve_qp`
    does: OSQP's tolerances are absolute in the problem's units, and without this an LP
    with its objective times 1e-6 and a row times 1e6 came back optimal 0.65 off, and a
    feasible problem with a row times 1e-6 infeasible. z, s, lam and nu are in the
    caller's units, the residuals those of the scaled problem (as the interior point's).
    """
    B, n = c.shape[0], c.shape[-1]
    m, p = G.shape[-2], A.shape[-2]
    for name, t, shape in (("Q", Q, (n, n)), ("G", G, (m, n)), ("h", h, (m,)), ("A", A, (p, n)), ("b", b, (p,))):
        if tuple(t.shape[1:]) != shape or t.shape[0] not in (1, B):
            expected = f"({B}, {', '.join(map(str, shape))})".replace(", )", ")")
            raise ValueError(f"solve_qp_osqp: {name} has shape {tuple(t.shape)}, expected {expected}")
    r_G, G_s, r_A, A_s, sigma = problem_scales(Q, c, G, A)
    Q_s, c_s = (Q, c) if sigma is None else (Q / sigma[:, None, None], c / sigma[:, None])
    result, cache = _solve_osqp_rows_scaled(
        Q_s, c_s, G_s, h * r_G, A_s, b * r_A, eps_abs=eps_abs, eps_rel=eps_rel, max_iter=max_iter,
        eps_start=eps_start, polish=polish, warm_start=warm_start, settings=settings, cache=cache, skip=skip)
    k = 1.0 if sigma is None else sigma[:, None]
    # (scaled rows r G have slacks r s and multipliers lam / r; an objective divided by
    # sigma divides the multipliers by it. The active set's floors, eps**2 on s or lam,
    # are the scaled problem's: the backward, which solves on that problem too, reads
    # them there)
    result = dataclasses.replace(result, s=result.s / r_G, lam=result.lam * r_G * k, nu=result.nu * r_A * k)
    return result, cache


def _solve_osqp_rows_scaled(Q, c, G, h, A, b, *, eps_abs, eps_rel, max_iter, eps_start, polish, warm_start,
                            settings, cache, skip):
    """:func:`solve_qp_osqp` of the problem whose rows and objective it has scaled (its
    options as there)."""
    try:
        import osqp
    except ImportError as err:  # pragma: no cover - osqp is an optional dependency
        raise ImportError("solve_qp_osqp needs the 'osqp' package (pip install osqp)") from err

    dtype, device = c.dtype, c.device
    B, n = c.shape[0], c.shape[-1]
    m, p = G.shape[-2], A.shape[-2]
    Q, G, h, A, b = (t.expand((B,) + tuple(t.shape[1:])) for t in (Q, G, h, A, b))

    opts = dict(DEFAULT_SETTINGS)
    opts.update(settings or {})
    for key, value in (("eps_abs", eps_abs), ("eps_rel", eps_rel), ("max_iter", max_iter)):
        if value is not None:
            opts[key] = value
    opts["polishing"] = bool(polish)
    # OSQP's own warm start stays on: the tolerance stages continue from each other
    # through it. ``warm_start=False`` instead starts every call explicitly at zero.
    opts["warm_starting"] = True

    # ---- sparsity patterns: the union over the batch, reused when the data fit ------
    if not m + p:
        K_t = None
    elif _shared(G) and _shared(A):  # keep a shared batch a stride-0 view, not B copies
        K_t = torch.cat([G[:1], A[:1]], -2).expand(B, m + p, n)
    else:
        K_t = torch.cat([G, A], -2)
    p_mask = np.triu(_mask(Q, symmetrize=True))
    np.fill_diagonal(p_mask, True)  # OSQP's KKT matrix has the diagonal anyway
    k_mask = _mask(K_t, symmetrize=False) if K_t is not None else None
    reuse = (
        cache is not None
        and cache.shapes == (n, m, p)
        and cache.settings == opts
        and cache.P.covers(p_mask)
        and (k_mask is None) == (cache.K is None)
        and (k_mask is None or cache.K.covers(k_mask))
    )
    if not reuse:
        cache = OSQPCache(
            shapes=(n, m, p), settings=dict(opts), P=_Pattern.from_mask(p_mask),
            K=_Pattern.from_mask(k_mask) if k_mask is not None else None,
        )

    # ---- the numbers, converted once for the whole batch -----------------------------
    P_vals = _batched_values(Q, cache.P, symmetrize=True)  # (B or 1, nnzP)
    K_vals = _batched_values(K_t, cache.K, symmetrize=False) if K_t is not None else None
    q_all = _numpy64(c)
    h_all, b_all = _numpy64(h), _numpy64(b)
    lower = np.concatenate([np.full((B, m), -np.inf), b_all], 1)
    upper = np.concatenate([h_all, b_all], 1)
    skip_np = skip.detach().cpu().numpy() if skip is not None else np.zeros(B, dtype=bool)

    z = np.zeros((B, n))
    y = np.zeros((B, m + p))
    status = np.full(B, NUMERICAL_ERROR, dtype=np.int64)
    iterations = np.zeros(B, dtype=np.int64)
    while len(cache.solvers) < B:
        cache.solvers.append(None)
        cache.last_P.append(None)
        cache.last_K.append(None)
        cache.start.append(None)

    target = (float(opts["eps_abs"]), float(opts["eps_rel"]))
    # without polishing a loose stage could not end early: go straight to the target
    stages = _eps_stages(eps_start if polish else None, target)
    for i in range(B):
        if skip_np[i] or not (np.isfinite(q_all[i]).all() and np.isfinite(upper[i]).all()
                              and np.isfinite(lower[i, m:]).all()):
            continue
        Px = P_vals[i if P_vals.shape[0] > 1 else 0]
        Kx = K_vals[i if K_vals.shape[0] > 1 else 0] if K_vals is not None else None
        if not (np.isfinite(Px).all() and (Kx is None or np.isfinite(Kx).all())):
            continue
        solver = cache.solvers[i]
        try:
            if solver is None:
                solver = osqp.OSQP()
                first = dict(opts, eps_abs=stages[0][0], eps_rel=stages[0][1])
                if Kx is None:
                    solver.setup(cache.P.matrix(Px), q_all[i], None, None, None, **first)
                else:
                    solver.setup(cache.P.matrix(Px), q_all[i], cache.K.matrix(Kx), lower[i], upper[i], **first)
                cache.setups += 1
                cache.solvers[i] = solver
                cache.last_P[i], cache.last_K[i] = Px.copy(), None if Kx is None else Kx.copy()
            else:
                update = {"q": q_all[i]}
                if Kx is not None:
                    update.update(l=lower[i], u=upper[i])
                # matrix updates refactor the KKT matrix: skip them when nothing changed
                if not np.array_equal(cache.last_P[i], Px):
                    update["Px"] = Px
                    cache.last_P[i] = Px.copy()
                if Kx is not None and not np.array_equal(cache.last_K[i], Kx):
                    update["Ax"] = Kx
                    cache.last_K[i] = Kx.copy()
                solver.update(**update)
                # explicit starts: OSQP's own warm start reuses its internal iterate,
                # which is in the old scaling after a matrix update and may have
                # diverged on an infeasible instance
                start = cache.start[i] if warm_start else None
                if start is None:
                    start = (np.zeros(n), np.zeros(m + p))
                if m + p:
                    solver.warm_start(x=start[0], y=start[1])
                else:
                    solver.warm_start(x=start[0])
            check = _Verifier(cache, Px, Kx, q_all[i], h_all[i], b_all[i], target)
            res, its = _solve_in_stages(solver, stages, check)
        except (osqp.OSQPException, ValueError):  # setup/update failures
            # (e.g. a non-convex P detected while factoring); the instance is reported
            # failed and its solver is rebuilt next time
            cache.solvers[i] = None
            cache.start[i] = None
            continue
        code = status_from_osqp(res.info.status_val)
        iterations[i] = its
        finite = res.x is not None and np.isfinite(res.x).all() and (not m + p or np.isfinite(res.y).all())
        if code in (OPTIMAL, MAX_ITER) and not finite:
            code = NUMERICAL_ERROR
        status[i] = code
        if code in (OPTIMAL, MAX_ITER):
            z[i] = res.x
            if m + p:
                y[i] = res.y
        cache.start[i] = (z[i].copy(), y[i].copy()) if code == OPTIMAL else None

    # ---- back to torch, with the active set made exact -------------------------------
    z_t = torch.from_numpy(z)
    y_t = torch.from_numpy(y)
    G64 = G.detach().to(device="cpu", dtype=torch.float64)
    A64 = A.detach().to(device="cpu", dtype=torch.float64)
    Q64 = Q.detach().to(device="cpu", dtype=torch.float64)
    h64, b64, c64 = (torch.from_numpy(v) for v in (h_all, b_all, q_all))
    slack = h64 - (G64 @ z_t.unsqueeze(-1)).squeeze(-1) if m else h64
    y_ineq, nu = y_t[:, :m], y_t[:, m:]
    zero = torch.finfo(dtype).eps ** 2
    # OSQP's duals of the rows [G; A]: nonnegative on the rows where only the upper
    # bound h can be active. A row is active where its dual exceeds its slack (after
    # polishing one of the two is zero to rounding), the rule the backward also uses.
    active = y_ineq > slack
    s = torch.where(active, torch.full_like(slack, zero), slack.clamp(min=zero))
    lam = torch.where(active, y_ineq.clamp(min=zero), torch.full_like(y_ineq, zero))

    rd = (Q64 @ z_t.unsqueeze(-1)).squeeze(-1) + c64
    if m:
        rd = rd + (G64.transpose(-1, -2) @ lam.unsqueeze(-1)).squeeze(-1)
    if p:
        rd = rd + (A64.transpose(-1, -2) @ nu.unsqueeze(-1)).squeeze(-1)
    r_ineq = (-slack).clamp(min=0.0)
    r_eq = (A64 @ z_t.unsqueeze(-1)).squeeze(-1) - b64 if p else b64.new_zeros(B, 0)

    def inf_norm(x):
        return x.abs().amax(-1) if x.shape[-1] else x.new_zeros(x.shape[0])

    primal = torch.maximum(inf_norm(r_ineq), inf_norm(r_eq))
    dual = inf_norm(rd)
    comp = inf_norm(y_ineq.clamp(min=0.0) * slack.clamp(min=0.0))
    status_t = torch.from_numpy(status)
    failed = (status_t != OPTIMAL) & (status_t != MAX_ITER)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device="cpu")  # this block is host-side
    primal, dual, comp = (torch.where(failed, nan, r) for r in (primal, dual, comp))

    def out(x):
        return x.to(device=device, dtype=dtype)

    result = InteriorPointResult(
        z=out(z_t), s=out(s), lam=out(lam), nu=out(nu),
        status=status_t.to(device), iterations=torch.from_numpy(iterations).to(device),
        primal_residual=out(primal), dual_residual=out(dual), complementarity=out(comp),
        qp_factor=None,
    )
    return result, cache
