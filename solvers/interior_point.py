"""Batched primal-dual interior-point method in pure torch.

Solves, for B independent instances at once,

    minimize f(z)  subject to  g(z) + s = 0,  s >= 0,  h(z) = 0

with Mehrotra's predictor-corrector. Every Newton system is reduced to

    [ H + Jg' diag(lam/s) Jg   Jh' ] [dz ]   [r1]
    [ Jh                        0  ] [dnu] = [r2]

and solved with a Cholesky factorization of the (n, n) block and of the (p, p) Schur
complement (:class:`ReducedKKT`), never an LU of the full KKT matrix. The same loop
serves every problem class:

* LP/QP (``solve_qp``): H, Jg, Jh are constant; the full step to the boundary is taken.
  A QP with positive definite Q first tries the primal-dual active-set iteration and
  runs the loop in constraint space (:func:`_constraint_space_solve`).
* smooth NLP (``solve_nlp``): exact Hessian of the Lagrangian from the compiler,
  inertia correction (H + delta I until the Cholesky succeeds) and a backtracking line
  search on the KKT residual that also rejects points outside the functions' domain.

Instances converge independently: a finished instance stops changing (its updates are
masked) and the loop ends when all have finished; the only host synchronization per
iteration is that check. Statuses are per instance (:data:`STATUS_NAMES`).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from .buffers import scratch
from .dense import EquilibratedQR

OPTIMAL, INFEASIBLE, MAX_ITER, NUMERICAL_ERROR, UNBOUNDED = range(5)
STATUS_NAMES = ("optimal", "infeasible", "max_iter", "numerical_error", "unbounded")

#: default tolerances by dtype: about 1e-8 in float64 and 1e-5 in float32
DEFAULT_TOL = {torch.float64: 1e-8, torch.float32: 1e-5}

_DIVERGENCE = 1e12  # z beyond this, relative to the data, signals unboundedness
# an NLP instance that meets the tolerances with |z| grown by more than this factor (of
# 1 + |z| before) over its last two steps is not taken as solved, where its last Newton
# direction is not known (_held_back_runaways)
_RUNAWAY = 1.25
_DUAL_DIVERGENCE = 1e8  # duals beyond this (with violated constraints): infeasibility
# an infeasibility certificate excludes z this far out (relative to the iterate): true
# certificates reached 1e11 in float64, and 750-3000 in float32, where the ray carries
# the rounding of float32 products (|G'lam + A'nu| ~ 1e-4 of |lam|)
_FARKAS_RADIUS = {torch.float64: 1e6, torch.float32: 1e2}
_STALL = 1e-12  # a step shorter than this makes no progress
_STEP_CAP = 100.0  # the centered fallback step's longest, relative to 1 + |z|
# complementarity this far below the tolerance, the other residuals above it: collapsed
# (primal_dual's stop_collapsed)
_COLLAPSED_MU = 1e-6
_COLLAPSED_RD = 100.0
_POLISH_ROUNDS = 4  # active-set corrections when polishing a QP solution
# a QP instance tries its active set when complementarity falls below _CROSSOVER
# (relative to the data), and after a failure again each time it has fallen by
# _CROSSOVER_RETRY: a success ends the solve exactly
_CROSSOVER = 1e-3
_CROSSOVER_RETRY = 1e-3
# A QP solved in constraint space first tries the primal-dual active-set iteration
# (Hintermueller, Ito and Kunisch 2002): the equality QP of a guessed active set (at
# first the constraints the minimizer under the equalities alone violates), with the
# violated constraints added and those of negative multiplier dropped, this many rounds
# at most. On random well-posed QPs it ends in 4-10 rounds (the last instances of a
# batch of 512 in 14-17), each one factorization like an interior-point iteration but
# with a fraction of its small ops. An instance back at an active set it had switches
# only its worst constraint (the iteration is deterministic in the set: it cycles
# otherwise). The instances it leaves (infeasible ones, degenerate ones) go on with the
# interior point; the iteration gives up after _ACTIVE_SET_PATIENCE rounds without
# progress (problems with many active constraints, where it wanders), or 4 on small
# blocks: there a round costs a few small ops, and handing even one instance over
# costs a whole interior-point solve of such ops (a lone instance's corrections went 3,
# 4, 3, 2, 1: solved at the sixth round). benchmarks/qp_families.py measures what it
# gains and costs
ACTIVE_SET_ROUNDS = 20
_ACTIVE_SET_PATIENCE = 2
_ACTIVE_SET_PATIENCE_SMALL = 4
# A batch wins from the iteration only if all its instances end in fewer rounds than
# the interior point's iterations. On random families with m > 1.5 (n - p) it crawls
# (corrections shrink by 10-25 % a round, not 30-50 %): forward+backward took
# 1.02-2x the time of the interior point alone, and after the first solve 65-85 % of
# the first active sets' constraints needed correcting. At m = 1.5 (n - p) the two
# broke even (0.88-1.19x); below, the iteration paid (1.1-1.5x), and on the box and
# hyperplane projection (m = 2 (n - p)) too, with 11 % corrected. A batch of at least
# _JUDGED_BATCH instances (a lone one's statistics are noisy, and its rounds cost less
# than iterations) with more than _CRAWL_ROWS (n - p) rows and more than _CRAWL_WRONG
# of its first constraints corrected goes to the interior point after that solve; so
# does one where most first active sets hold more than n - p constraints (their
# matrices are singular: it wandered on all such families)
_CRAWL_ROWS = 1.5
_CRAWL_WRONG = 0.5
# an active set's matrix is factored on its own rows (QPFactor.solve_active_set) from
# this many constraints on, in batches of at least _COMPACT_WORK / m^3 instances: a
# Cholesky factorization costs ~k^3, and the active sets of the benchmark family hold
# 55-70 % of the rows; below, gathering the rows costs more than it saves (on the CPU,
# ~1.35x the time of a round at (64, 24), 1.1x at (32, 48), 0.7-0.8x at (32, 100) and
# (4, 250); the whole layer at (16, 60, 64, 10) 1.0-1.15x)
_COMPACT_ROWS = 48
_COMPACT_WORK = 1 << 23
# small blocks find their active set by single pivots before the active-set iteration
# (_pivoted_active_set): up to _PIVOT_ROWS constraints, or _PIVOT_ROWS_BATCHED in batches
# of at least _PIVOT_BATCH, where a pivot's ~25 small ops on (B, m) and rank-one update
# of (B, m, m) cost less than the rounds they save. Layer forward+backward with pivots
# over without, on the benchmark family: 0.84-0.94x at m = 10 (1.04x at B = 8); with the
# rows-only tableau (_row_pivots) from _ROW_PIVOTS_FROM entries on, 0.79x at (512, 20),
# 0.82x at m = 30 and 40 (B = 32, 128), 0.93-0.97x at m = 50 and 64, 0.95x at (16, 30),
# 1.0x at (16, 50) and (32, 80), and 1.08x at (32, 100); for single instances they cost
# more than they save from m = 20 on (1.04x at m = 20, 1.23x at m = 30)
_PIVOT_ROWS = 10
_PIVOT_ROWS_BATCHED = 64
_PIVOT_BATCH = 16
_ROW_PIVOTS_FROM = 1 << 15
# larger blocks are guessed by pivots only where the iteration would crawl from its rough
# guess, with this many rows per free dimension or more, up to this many rows
# (_pivots_after_crawl)
_PIVOT_ROWS_PER_FREE = 3
_PIVOT_ROWS_AFTER_CRAWL = 400
_JUDGED_BATCH = 8
# fraction-to-boundary: a step goes 1 - e of the way to the boundary, e the iterate's
# distance to a solution (_boundary_fraction), but at least 0.99 and at most 0.9999 of
# it. A fixed 0.99 leaves the multipliers of inactive constraints (and the residuals they
# feed) shrinking only 100-fold per iteration once everything else has converged;
# uncapped, steps to within rounding of the boundary made some instances stall. The
# constraint-space QP loop keeps 0.99 (its crossover ends the solve)
_TO_BOUNDARY_MIN = 0.99
_TO_BOUNDARY_MAX = 0.9999
# halvings of the Mehrotra step before an instance tries the plain centered Newton step
# instead (primal_dual): a corrector rejected at full and half length is a poor one
# (softmax layers of 5-10 x randn logits took 21-96 iterations, not 17-38, when the
# corrector was halved down to 1/1024 first)
_CORRECTOR_HALVINGS = 1


def default_tol(dtype: torch.dtype) -> float:
    return DEFAULT_TOL.get(dtype, 1e-5)


@dataclass
class InteriorPointResult:
    """Solution and per-instance report. Shapes: z (B, n), s and lam (B, m), nu (B, p);
    status, iterations (B,) int64; residuals (B,)."""

    z: torch.Tensor
    s: torch.Tensor
    lam: torch.Tensor
    nu: torch.Tensor
    status: torch.Tensor
    iterations: torch.Tensor
    primal_residual: torch.Tensor
    dual_residual: torch.Tensor
    complementarity: torch.Tensor
    #: the constant factorization of a QP solved in constraint space (the backward reuses it)
    qp_factor: Optional["QPFactor"] = None
    #: (B,) bool: the solution is the exact solution of an active set (see ``_polish``)
    polished: Optional[torch.Tensor] = None
    #: for polished instances, their active set (B, m) and its factor (B, k, k) on the
    #: rows ``active_order[:, :k]`` (B, m), or on all rows in order where active_order is
    #: None (see :meth:`QPFactor.solve_active_set`)
    active_set: Optional[torch.Tensor] = None
    active_factor: Optional[torch.Tensor] = None
    active_order: Optional[torch.Tensor] = None
    #: (B,) int64: the rounds (equality-QP solves) of the active-set iteration that runs
    #: before the interior point (:func:`_constraint_space_solve`); None where none ran
    active_set_rounds: Optional[torch.Tensor] = None
    #: (B,) int64: the pivots that guessed the iteration's first active set
    #: (:func:`_pivoted_active_set`); None where none ran
    active_set_pivots: Optional[torch.Tensor] = None
    #: the NLP loop's last constraint Jacobian where some rows are simple bounds (its
    #: index sets say which, the same for any instances); None otherwise
    simple_bounds: Optional["BoundedJacobian"] = None


# ------------------------------------------------------------------------------------
# the linear-algebra kernel
# ------------------------------------------------------------------------------------

def _mT(x):
    return x.transpose(-1, -2)


# torch.cholesky_solve copies the factor into LAPACK's layout (fresh pages above ~2^16
# entries); two triangular solves read it as it is: a layer's forward at (512, 20, 20, 5),
# whose active-set round solves with a (512, 20, 20) factor, took 0.94x the time
_CHOLESKY_SOLVE_ENTRIES = 1 << 16


def _chol_solve(b, L):
    """Solve (L L') x = b for a batch (b: (B, k, r), L: (B, k, k)). Up to k = 32 and
    _CHOLESKY_SOLVE_ENTRIES, torch.cholesky_solve is as fast and one call instead of three;
    beyond, two triangular solves are up to 1.5x faster on the CPU. Tiny systems with few
    right-hand sides in a large batch (K22^-1 K21 of one to three equalities) go by
    :func:`_substitution_solve`."""
    k = L.shape[-1]
    if k == 1:  # one equality (a simplex, a budget): a division, 4x faster at B = 1024
        return b / L.square()
    if k * b.shape[-1] <= 64 and b.shape[0] * b.shape[-1] >= 4096:
        return _substitution_solve(b, L)
    if k <= 32 and L.numel() < _CHOLESKY_SOLVE_ENTRIES:
        return torch.cholesky_solve(b, L)
    y = torch.linalg.solve_triangular(L, b, upper=False)
    return torch.linalg.solve_triangular(L.transpose(-1, -2), y, upper=True)


def _substitution_solve(b, L):
    """(L L')^-1 b by column-oriented forward and back substitution, vectorized over the
    batch and the right-hand sides: 4k small ops, each a pass over (B, r). LAPACK's
    batched solve works instance by instance, so this wins where k and r are small and B
    large: 0.12-0.54x its time for k = 2, 3 and r = 10 at B = 1024-4096, 0.39x at
    (512, k = 2, r = 20); from k r ~ 64 on, 1-7.5x (QPFactor at (256, 20, 30, 8), whose
    K22^-1 K21 is k = 8 by r = 30, took 0.8x the time with cholesky_solve instead)."""
    k = L.shape[-1]
    x = b.clone()
    d = L.diagonal(dim1=-2, dim2=-1).reciprocal().unsqueeze(-1)
    for j in range(k):  # L y = b
        xj = x[:, j:j + 1].mul_(d[:, j:j + 1])
        if j + 1 < k:
            x[:, j + 1:].addcmul_(L[:, j + 1:, j:j + 1], xj, value=-1.0)
    Lt = L.transpose(-1, -2)
    for j in reversed(range(k)):  # L' x = y
        xj = x[:, j:j + 1].mul_(d[:, j:j + 1])
        if j:
            x[:, :j].addcmul_(Lt[:, :j, j:j + 1], xj, value=-1.0)
    return x


def _one_shared_row(A):
    """A (B, 1, n) that is one row expanded over the batch: a simplex's or a budget's
    Jacobian, which the compiler gives as a constant. Its products are then a broadcast
    product (A' y) and a dot product per instance (A x): the batched product reads the
    row B times, and A' y took 105 against 11 us at (1024, 1, 100). (Not one matrix
    product for the batch, though faster still: its rounding would depend on the batch
    size, and an instance must come out the same alone as in any batch.)"""
    return A.shape[-2] == 1 and (A.shape[0] == 1 or A.stride(0) == 0)


def _mv(A, x):
    """Batched matrix-vector product A (B, k, n) x (B, n). Above ~8000 entries it is
    taken as the row vector x' times A' ((1, n) x (n, k) per instance): on the CPU that
    batched product is 2-3x faster than A x with one column and about 2x faster than a
    multiply-and-sum. Below, the column product is the cheapest call. ``torch.bmm``
    rather than ``@``: matmul's shape dispatch costs ~2 us per call, which on small
    problems is as much as the product."""
    if _one_shared_row(A):
        return torch.linalg.vecdot(x, A[0, 0]).unsqueeze(-1)
    if A.numel() <= _ROW_PRODUCT_LIMIT:
        return torch.bmm(A, x.unsqueeze(-1)).squeeze(-1)
    return torch.bmm(x.unsqueeze(-2), A.transpose(-1, -2)).squeeze(-2)


def _mv_sub(r, A, x):
    """r - A x (B, k) for A (B, k, n), x (B, n): one call, in :func:`_mv`'s layouts."""
    if _one_shared_row(A):
        return r - _mv(A, x)
    if A.numel() <= _ROW_PRODUCT_LIMIT:
        return torch.baddbmm(r.unsqueeze(-1), A, x.unsqueeze(-1), alpha=-1.0).squeeze(-1)
    return torch.baddbmm(r.unsqueeze(-2), x.unsqueeze(-2), A.transpose(-1, -2), alpha=-1.0).squeeze(-2)


def _mtv(A, y):
    """Batched transposed product A' y for A (B, k, n), y (B, k)."""
    if _one_shared_row(A):
        return y * A[0]  # (each entry one product: exact)
    return torch.bmm(y.unsqueeze(-2), A).squeeze(-2)


_ROW_PRODUCT_LIMIT = 1 << 13
# (B, k) temporaries from this many entries (512 KB in float64) are worth avoiding:
# the allocator hands them out as fresh pages
_LARGE_TEMPORARY = 1 << 16
# (B, m, m) blocks up to this many entries are cheaper to re-solve whole than to subset
# (_whole_batch)
_SMALL_BLOCKS = 1 << 14
# general-row Jacobians (B, k, n) up to this many entries are stacked with Jh every
# iteration (DiagonalNewton)
_SMALL_STACK = 1 << 16


def _regularization(dtype) -> float:
    return 1e-13 if dtype == torch.float64 else 1e-7


def _second_regularization(dtype) -> float:
    """The larger shift a factorization tries where the first fails: 1e-8 in float64,
    1e-5 in float32 (a flat 1e-8 is below float32's first shift, and float32 QPs with an
    equality row written twice then failed where the retry should have helped)."""
    return max(1e-8, 100 * _regularization(dtype))


class ReducedKKT:
    """Cholesky factorization of the reduced Newton system (see the module docstring).

    H (B, n, n), Jg (B, m, n), Jh (B, p, n), sigma (B, m) = lam / s; the optional
    ``schur_diagonal`` (B, p) >= 0 makes the (2, 2) block ``-diag(schur_diagonal)``
    instead of 0. A small static
    regularization keeps the factorization defined for LPs and redundant equalities; one
    step of iterative refinement against the unregularized matrix removes its effect on
    the solution. Instances whose matrix is not positive definite get ``delta I`` added
    with ``delta`` growing per instance (inertia correction); those that still fail are
    reported in ``failed``.
    """

    def __init__(self, H, Jg, Jh, sigma, schur_diagonal=None, relative_shift=False):
        B, n = H.shape[0], H.shape[-1]
        self.Jg, self.Jh, self.schur_diagonal = Jg, Jh, schur_diagonal
        M = H + _mT(Jg) @ (sigma.unsqueeze(-1) * Jg) if Jg.shape[-2] else H.expand(B, n, n)
        self.M = M
        eye = torch.eye(n, dtype=H.dtype, device=H.device)
        # Scale the regularization by H, not by M: lam/s grows without bound near the
        # solution, and a delta that grew with it would spoil the step directions.
        diag_scale = H.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp(min=1.0).expand(B)  # (B,)
        delta = _regularization(H.dtype) * diag_scale
        shift = delta[:, None, None] * eye
        if relative_shift:
            # an entry whose diagonal is positive shifted by the regularization times
            # that diagonal where this is less than the flat shift: the flat shift
            # outweighed a small curvature (1 / x^2 of a log far out: the direction
            # shrank to 1e13 / x, and -log(a'x + 1) crept to an 'optimal' 5e7 instead
            # of diverging). Never more than the flat shift: M's diagonal carries
            # lam / s of active rows, ~1e15, and a shift grown with it spoiled the steps
            # (a quartic with norm1 rows ended numerical_error)
            d = M.diagonal(dim1=-2, dim2=-1)
            shift = torch.diag_embed(torch.where(d > 0, torch.minimum(_regularization(H.dtype) * d, delta[:, None]),
                                                 delta[:, None]))
        L, info = torch.linalg.cholesky_ex(M + shift)
        bad = info > 0
        # Inertia correction (nonconvex NLP) and rank-deficient LPs: grow delta only for
        # the instances that need it; batched, a few rounds at most.
        step = torch.full_like(delta, 1e-8) * diag_scale
        for _ in range(12):
            if not bool(bad.any()):
                break
            delta = torch.where(bad, torch.maximum(step, delta * 100.0), delta)
            step = torch.where(bad, step * 100.0, step)
            L_new, info_new = torch.linalg.cholesky_ex(M + delta[:, None, None] * eye)
            L = torch.where(bad[:, None, None], L_new, L)
            bad = bad & (info_new > 0)
        self.failed = bad
        self.delta = delta
        self.L = torch.where(bad[:, None, None], eye.expand_as(L), L)
        self.p = Jh.shape[-2]
        if self.p:
            Y = _chol_solve(_mT(Jh), self.L)  # (B, n, p)
            E = schur_diagonal if schur_diagonal is not None else H.new_zeros(B, self.p)
            self.Ls, bad_s = _regularized_cholesky(Jh @ Y, E)
            self.failed = self.failed | bad_s

    def _solve_once(self, r1, r2):
        y = _chol_solve(r1.unsqueeze(-1), self.L)
        if not self.p:
            return y.squeeze(-1), r2
        dnu = _chol_solve((self.Jh @ y).squeeze(-1).unsqueeze(-1) - r2.unsqueeze(-1), self.Ls)
        dz = _chol_solve(r1.unsqueeze(-1) - _mT(self.Jh) @ dnu, self.L)
        return dz.squeeze(-1), dnu.squeeze(-1)

    def solve(self, r1, r2, refine: int = 1):
        """Solve for (dz (B, n), dnu (B, p)) given r1 (B, n), r2 (B, p)."""
        dz, dnu = self._solve_once(r1, r2)
        for _ in range(refine):
            res1 = r1 - _mv(self.M, dz)
            res2 = r2
            if self.p:
                res1 = res1 - _mtv(self.Jh, dnu)
                res2 = r2 - _mv(self.Jh, dz)
                if self.schur_diagonal is not None:
                    res2 = res2 + self.schur_diagonal * dnu
            ez, enu = self._solve_once(res1, res2)
            dz = dz + ez
            dnu = dnu + enu if self.p else dnu
        return dz, dnu


def diagonal_kkt_kernel(H: "DiagonalMatrix", Jg: "BoundedJacobian", Jh, lam, s, rd, rc, rp, re, workspace=None):
    """One factorization and solve of the structured Newton system (diagonal Hessian,
    bound rows; :class:`DiagonalNewton`): the per-iteration linear algebra of NLPs the
    compiler found that structure in (used by benchmarks as a floor). ``workspace``: as
    the solver keeps one across iterations, a dict kept across calls."""
    return DiagonalNewton(H, Jg, Jh, lam, s, workspace).step(rd, rc, rp, re)


def constraint_space_kernel(W, D, rhs):
    """The per-iteration linear algebra of a QP solved in constraint space: one
    Cholesky factorization of W + diag(D) (B, m, m) and the predictor's and corrector's
    triangular solves for rhs (B, m). Benchmarks time it to show the solver's floor."""
    M = W.clone()
    M.diagonal(dim1=-2, dim2=-1).add_(D)
    L, _ = torch.linalg.cholesky_ex(M)
    first = _chol_solve(rhs.unsqueeze(-1), L)
    return _chol_solve(first, L).squeeze(-1)


def setup_kernel(Q, c, G, A):
    """The once-per-call linear algebra of a QP solved in constraint space (what
    :class:`QPFactor` computes): the Cholesky factorization of Q (B, n, n), the half-solve
    L^-1 [G' A' -c] (one triangular solve), and W = G Q^-1 G' less the equalities' part,
    with the (p, p) factorization that takes. Benchmarks time it to show the solver's floor."""
    m, p = G.shape[-2], A.shape[-2]
    L, _ = torch.linalg.cholesky_ex(Q)
    half = torch.linalg.solve_triangular(L, _mT(torch.cat([G, A, c.unsqueeze(-2)], -2)), upper=False)
    G_half, A_half = half[..., :m], half[..., m:m + p]
    W = torch.bmm(_mT(G_half), G_half)
    if p:
        K_A = torch.bmm(_mT(half[..., :m + p]), A_half)  # [K12; K22] in one product
        K12, K22 = K_A[:, :m], K_A[:, m:]
        L22, _ = torch.linalg.cholesky_ex(K22)
        W.baddbmm_(K12, _chol_solve(_mT(K12), L22), alpha=-1.0)
    return W


def active_set_kernel(W, active, rhs):
    """The linear algebra of one round of the active-set iteration of a QP solved in
    constraint space: the Cholesky factorization of W (B, m, m) restricted to the
    constraints ``active`` (B, m) and one solve for rhs (B, m). Benchmarks time it to
    show the solver's floor."""
    M = _active_set_matrix(W, active.to(W.dtype), 1.0)
    L, _ = torch.linalg.cholesky_ex(M)
    return _chol_solve(rhs.unsqueeze(-1), L).squeeze(-1)


def _active_set_matrix(W, a, unit_shift, in_place=False):
    """W (B, m, m) with the rows and columns where ``a`` (B, m) is 0 replaced by the
    identity's, plus ``unit_shift - 1`` on the diagonal: two passes over (B, m, m).
    Exactly symmetric when W is (``a`` is 0 or 1). ``in_place``: W is a scratch copy, and
    becomes the result."""
    M = (W.mul_(a.unsqueeze(-1)) if in_place else torch.mul(W, a.unsqueeze(-1))).mul_(a.unsqueeze(-2))
    M.diagonal(dim1=-2, dim2=-1).add_(unit_shift).sub_(a)
    return M


def _active_set_solve(r, a, L, order):
    """y (B, m), zero off the active set ``a`` (B, m), with the active set's matrix times
    y = a * r (B, m), for its Cholesky factor L (B, k, k) on the rows ``order[:, :k]``,
    or on all rows in order (``order`` None; :meth:`QPFactor.solve_active_set`)."""
    if order is None:
        return _chol_solve((a * r).unsqueeze(-1), L).squeeze(-1)
    rows = order[:, :L.shape[-1]]
    y = _chol_solve((a * r).gather(-1, rows).unsqueeze(-1), L).squeeze(-1)
    return torch.zeros_like(r).scatter_(-1, rows, y)


def _pad_factor(L, k):
    """A factor L (B, j, j) of an active set's matrix on j rows as one on k >= j: the
    rows added are inactive ones, the identity's."""
    j = L.shape[-1]
    if j == k:
        return L
    out = L.new_zeros(L.shape[0], k, k)
    out[:, :j, :j] = L
    out.diagonal(dim1=-2, dim2=-1)[:, j:] = 1.0
    return out


class ReducedNewton:
    """Newton steps through the n-space reduction (:class:`ReducedKKT`): any problem."""

    #: rounds of refinement against the unreduced equations (see :func:`primal_dual`)
    refinement_rounds = 2

    def __init__(self, H, Jg, Jh, lam, s, nlp=False):
        """``nlp`` (the NLP loop's steps): add gamma Jh' Jh to H (and gamma Jh' times
        the equalities' row to the first: the same solution), as the backward's
        :func:`_saddle_solve` does (:func:`_row_weights`). The reduction eliminates dz
        through H + Jg' Sigma Jg, singular where H is and no inequality covers the
        direction, though the equalities fix it: min softplus(x_0 - x_1) s.t. A x = b
        (A invertible) ended numerical_error, its Schur complement built on the
        regularization's 1e13. And shift the factored matrix relative to its own
        diagonal (``relative_shift`` of :class:`ReducedKKT`)."""
        self.Jg, self.Jh, self.lam, self.s = Jg, Jh, lam, s
        self.gamma = None
        if nlp and Jh.shape[-2]:
            self.gamma = _row_weights(H, Jh)
            H = torch.baddbmm(H, _mT(Jh), self.gamma.unsqueeze(-1) * Jh)
        self.kkt = ReducedKKT(H, Jg, Jh, lam / s, relative_shift=nlp)
        self.failed = self.kkt.failed

    def step(self, rd, rc, rp, re, out=None):
        """Solve the Newton equations
        H dz + Jg'dlam + Jh'dnu = -rd,  lam ds + s dlam = -rc,  Jg dz + ds = -rp,  Jh dz = -re
        for (dz, dv, dnu), dv = [ds, dlam] (B, 2m) side by side as the loop keeps s and lam
        (written into ``out`` when given)."""
        Jg, lam, s = self.Jg, self.lam, self.s
        m = Jg.shape[-2]
        r1 = -rd - _mtv(Jg, (lam * rp - rc) / s) if m else -rd
        if self.gamma is not None:
            r1 = r1 - _mtv(self.Jh, self.gamma * re)
        dz, dnu = self.kkt.solve(r1, -re, refine=0)
        ds = -rp - _mv(Jg, dz) if m else -rp
        dlam = (-rc - lam * ds) / s
        return dz, torch.cat([ds, dlam], -1, out=out), dnu


# ------------------------------------------------------------------------------------
# structured Newton systems: diagonal Hessian, bound rows (NLPs, compiler-detected)
# ------------------------------------------------------------------------------------

class DiagonalMatrix:
    """A batch of diagonal (n, n) matrices, stored as their diagonals d (B, n)."""

    def __init__(self, d):
        self.d = d

    def mv(self, x):
        return self.d * x

    def dense(self):
        return torch.diag_embed(self.d)

    def abs_sums(self):
        """(row sums, column sums) of |this matrix|, each (B, n)."""
        d = self.d.abs()
        return d, d

    def select(self, idx):
        """The instances ``idx`` of the batch."""
        return DiagonalMatrix(self.d[idx])


def _index_set(idx, device):
    """Rows or columns for ``x[:, idx]``: a slice where they are a contiguous increasing
    run (indexing is then a view, not a gather, and a scatter is one slice assignment),
    else an int64 tensor on ``device``. Read on the host, once per layer."""
    t = torch.as_tensor(idx, dtype=torch.int64, device="cpu").reshape(-1)
    k = t.numel()
    if k == 0:
        return slice(0, 0)
    first = int(t[0])
    if torch.equal(t, torch.arange(first, first + k, device="cpu")):
        return slice(first, first + k)
    return t.to(device)


def _index_tensor(idx, device):
    return torch.arange(idx.start, idx.stop, device=device) if isinstance(idx, slice) else idx


def _add_at(x, idx, v):
    """x (B, n) plus v (B, len(idx)) on the columns ``idx`` (see :func:`_index_set`), as
    a new tensor; repeated columns accumulate."""
    if isinstance(idx, slice):
        if idx.start == 0 and idx.stop == x.shape[-1]:
            return x + v
        out = x.clone()
        out[:, idx] += v
        return out
    return x.index_add(1, idx, v)


class BoundedJacobian:
    """The Jacobian of g (B, m, n) when some rows are simple bounds: row ``bound_rows[i]``
    is ``bound_signs[i]`` times the unit vector of entry ``bound_cols[i]``; the rows
    ``general_rows`` have the dense Jacobian ``general`` (B, k, n). The index sets are
    int64 tensors or slices, the signs a tensor of z's dtype or one float shared by
    every bound (:meth:`index_sets` builds that compact form)."""

    def __init__(self, general, m, bound_rows, bound_cols, bound_signs, general_rows):
        self.general, self.m = general, m
        self.bound_rows, self.bound_cols, self.bound_signs = bound_rows, bound_cols, bound_signs
        self.general_rows = general_rows
        self.k = general.shape[-2]
        self.shape = general.shape[:-2] + (m, general.shape[-1])
        # how steps on the bound rows (b) and the general rows (R) make a (B, m) tensor:
        # "b" every row a bound, in order; "bR" / "Rb" two contiguous runs, joined by one
        # concatenation; None: scattered
        self.order = None
        if isinstance(bound_rows, slice) and isinstance(general_rows, slice):
            if self.k == 0 and bound_rows == slice(0, m):
                self.order = "b"
            elif bound_rows.start == 0 and bound_rows.stop == general_rows.start and general_rows.stop == m:
                self.order = "bR"
            elif general_rows.start == 0 and general_rows.stop == bound_rows.start and bound_rows.stop == m:
                self.order = "Rb"
        n = general.shape[-1]
        self.every_column = isinstance(bound_cols, slice) and bound_cols == slice(0, n)
        nb = m - self.k
        self._run_sizes = {"bR": [nb, self.k], "Rb": [self.k, nb]}.get(self.order)

    # The parts below are views taken in one call (split_with_sizes), or the tensor itself
    # where a part is all of it: each view taken by indexing costs a dispatch and Python's
    # index parsing, more than a small product, and the steps take several per iteration.
    def row_parts(self, x):
        """(x[:, bound_rows], x[:, general_rows]) for x (B, m); None for the general rows'
        part where there are none."""
        if self.order == "b":
            return x, None
        if self.order == "bR":
            return tuple(x.split_with_sizes(self._run_sizes, -1))
        if self.order == "Rb":
            general, bounds = x.split_with_sizes(self._run_sizes, -1)
            return bounds, general
        return x[:, self.bound_rows], (x[:, self.general_rows] if self.k else None)

    def step_parts(self, dv):
        """(ds_b, ds_R, dlam_b, dlam_R) as views of dv = [ds, dlam] (B, 2m) where the rows
        are runs (ds_R and dlam_R None without general rows), else None."""
        if self.order == "b":
            ds, dlam = dv.split_with_sizes([self.m, self.m], -1)
            return ds, None, dlam, None
        if self._run_sizes is None:
            return None
        parts = dv.split_with_sizes(self._run_sizes * 2, -1)
        return parts if self.order == "bR" else (parts[1], parts[0], parts[3], parts[2])

    def bounded_entries(self, z):
        """z[:, bound_cols] for z (B, n)."""
        return z if self.every_column else z[:, self.bound_cols]

    def move_slacks_(self, z, s, c):
        """Add c (B, m), zero off the bound rows, to the slacks s (B, m) and move z's
        bounded entries with them (each bound row's g by -c), in place; every other
        bound row of a column moved keeps its g + s. (Rows of one column that c moves
        agree: the moves of a column are averaged.)"""
        c = self.row_parts(c)[0]
        # each bent row's move of its entry of z
        entry_move = c if isinstance(self.bound_signs, float) and self.bound_signs == -1.0 else c * -self.bound_signs
        if isinstance(self.bound_cols, slice):  # (one bound row per column)
            (z if self.every_column else z[:, self.bound_cols]).add_(entry_move)
            shift = c
        else:
            cols, n = self.bound_cols, z.shape[-1]
            moved = z.new_zeros(z.shape[0], n).index_add_(1, cols, (c != 0).to(z.dtype))
            move = z.new_zeros(z.shape[0], n).index_add_(1, cols, entry_move).div_(moved.clamp_(min=1.0))
            # every bound row of a moved column: s by -sign times its column's move. The
            # other side of a box loses it (0 <= x <= 1e-20 took slacks below 0, NaN,
            # where rows and slacks disagreed): a column moves at most so far that every
            # slack keeps half its value on the line
            shift = move[:, cols] * (-self.bound_signs)
            room = torch.where(shift < 0, 0.5 * self.row_parts(s)[0] / -shift, math.inf)
            move.mul_(torch.ones_like(move).scatter_reduce_(1, cols.expand(z.shape[0], -1), room, "amin"))
            z.add_(move)
            shift = move[:, cols] * (-self.bound_signs)
        if isinstance(self.bound_rows, slice):
            s[:, self.bound_rows].add_(shift)
        else:
            s.index_add_(1, self.bound_rows, shift)

    def join_rows(self, bounds, general, like):
        """The (B, m) tensor with ``bounds`` on the bound rows and ``general`` on the
        general rows (``like`` gives dtype and device)."""
        if self.order == "b":
            return bounds
        if self.order == "bR":
            return torch.cat([bounds, general], -1)
        if self.order == "Rb":
            return torch.cat([general, bounds], -1)
        out = like.new_empty(like.shape[0], self.m)
        out[:, self.bound_rows] = bounds
        if self.k:
            out[:, self.general_rows] = general
        return out

    @staticmethod
    def index_sets(bound_rows, bound_cols, bound_signs, general_rows, dtype, device):
        """(bound_rows, bound_cols, bound_signs, general_rows) in the compact form: slices
        for contiguous runs, one float for a shared sign."""
        signs = torch.as_tensor(bound_signs, dtype=torch.float64, device="cpu").reshape(-1)
        if signs.numel() and bool((signs == signs[0]).all()):
            sign = float(signs[0])
        else:
            sign = signs.to(dtype=dtype, device=device)
        return (_index_set(bound_rows, device), _index_set(bound_cols, device), sign,
                _index_set(general_rows, device))

    def mv(self, x):
        """Jg x: (B, n) -> (B, m)."""
        bounds = self.bound_signs * self.bounded_entries(x)
        return self.join_rows(bounds, _mv(self.general, x) if self.k else None, x)

    def mtv(self, y):
        """Jg' y: (B, m) -> (B, n)."""
        if self.k:
            out = _mtv(self.general, y[:, self.general_rows])
        else:
            out = y.new_zeros(y.shape[0], self.shape[-1])
        return _add_at(out, self.bound_cols, self.bound_signs * y[:, self.bound_rows])

    def bound_diagonal(self, weights):
        """diag(Jg_b' diag(weights_b) Jg_b) (B, n) for weights (B, m): the bound rows'
        share of Jg' diag(weights) Jg, which is diagonal."""
        share = self.row_parts(weights)[0]
        if self.every_column:
            return share
        return _add_at(weights.new_zeros(weights.shape[0], self.shape[-1]), self.bound_cols, share)

    def abs_sums(self):
        """(row sums (B, m), column sums (B, n)) of |Jg|: a bound row's is 1."""
        G_rows, G_cols = _abs_sums(self.general) if self.k else (None, None)
        ones = self.general.new_ones(self.general.shape[0], self.m)
        rows = self.join_rows(self.row_parts(ones)[0], G_rows, ones)
        cols = self.bound_diagonal(ones)
        return rows, (cols if G_cols is None else cols + G_cols)

    def select(self, idx):
        """The instances ``idx`` of the batch."""
        return BoundedJacobian(_select(self.general, idx), self.m, self.bound_rows, self.bound_cols,
                               self.bound_signs, self.general_rows)

    def general_rows_scaled(self, r):
        """This Jacobian with its general rows times ``r`` (B, k)."""
        return BoundedJacobian(self.general * r.unsqueeze(-1), self.m, self.bound_rows, self.bound_cols,
                               self.bound_signs, self.general_rows)

    def dense(self):
        B, n = self.general.shape[0], self.shape[-1]
        device = self.general.device
        out = self.general.new_zeros(B, self.m, n)
        out[:, _index_tensor(self.bound_rows, device), _index_tensor(self.bound_cols, device)] = self.bound_signs
        out[:, self.general_rows] = self.general
        return out


def _apply(M, x):
    """M x for a dense batch (B, r, n) or a structured matrix."""
    return _mv(M, x) if isinstance(M, torch.Tensor) else M.mv(x)


def _apply_t(M, y):
    """M' y for a dense batch (B, r, n) or a :class:`BoundedJacobian`."""
    return _mtv(M, y) if isinstance(M, torch.Tensor) else M.mtv(y)


def _dense(M):
    return M if isinstance(M, torch.Tensor) else M.dense()


def _abs_sums(M):
    """(row sums (B, r), column sums (B, n)) of |M| for a dense batch (B, r, n) or a
    structured matrix. A batch that is one matrix expanded (stride 0) is summed once."""
    if not isinstance(M, torch.Tensor):
        return M.abs_sums()
    B = M.shape[0]
    if B > 1 and M.stride(0) == 0:
        rows, cols = _abs_sums(M[:1])
        return rows.expand(B, -1), cols.expand(B, -1)
    size = M.abs()  # (vector_norm(M, 1) along either axis took 6-11x as long, 300-550 us
    return size.sum(-1), size.sum(-2)  # at (32, 50, 100), where these three take 48 us)


def _abs_matrix(M):
    """|M| entrywise for a dense batch or a :class:`DiagonalMatrix`."""
    return DiagonalMatrix(M.d.abs()) if isinstance(M, DiagonalMatrix) else M.abs()


def _select(M, idx):
    """The instances ``idx`` (an int64 tensor) of a batch (B, ...) or a structured
    matrix; a batch of one, or one expanded, serves any selection."""
    if not isinstance(M, torch.Tensor):
        return M.select(idx)
    if M.shape[0] == 1 or M.stride(0) == 0:
        return M[:1].expand(idx.shape[0], *M.shape[1:])
    return M[idx]


def _regularized_cholesky(S, E, workspace=None):
    """Cholesky of S + diag(E) for S (B, r, r) PSD and E (B, r) >= 0 (zero on equality
    rows; None where every row is one); S is overwritten. A small static shift keeps
    redundant equalities factorizable, and a larger one is tried where that fails. The shift scales with S
    alone: E = s/lam reaches 1e15 on inactive rows, and a shift that grew with it would
    spoil the others. It is relative to S however small S is (1 where S's diagonal is
    zero): S = K H^-1 K' is 1e-8 for an objective times 1e8, and a shift of 1e-13 at
    least put the backward's solution (which this factor serves unrefined) 2e-5 off.
    Returns L (the identity where the factorization failed) and the (B,) failed mask;
    with a ``workspace`` (see :func:`_scratch`) L lives there."""
    r = S.shape[-1]
    if r == 1:
        return _regularized_root(S, E)
    diagonal = S.diagonal(dim1=-2, dim2=-1)
    scale = diagonal.abs().amax(-1) if r else S.new_ones(S.shape[0])
    scale = torch.where(scale > 0, scale, 1.0)
    shift = (_regularization(S.dtype) * scale)[:, None]
    diagonal.add_(shift if E is None else E + shift)
    # S is symmetric: its transpose is in LAPACK's column-major layout, so the factor
    # starts from a plain copy of it rather than a transposing one
    S = S.transpose(-1, -2)
    if workspace is None:
        L, info = torch.linalg.cholesky_ex(S)
    else:
        out = (_scratch(workspace, "L", S.shape, S.dtype, S.device).transpose(-1, -2),
               _scratch(workspace, "info", S.shape[:1], torch.int32, S.device))
        L, info = torch.linalg.cholesky_ex(S, out=out)
    bad = info > 0
    if bool(bad.any()):
        diagonal.add_(((_second_regularization(S.dtype) - _regularization(S.dtype)) * scale)[:, None])
        L2, info2 = torch.linalg.cholesky_ex(S)
        bad = bad & (info2 > 0)
        eye = torch.eye(r, dtype=S.dtype, device=S.device)
        L = torch.where(bad[:, None, None], eye, torch.where((info > 0)[:, None, None], L2, L))
    return L, bad


def _regularized_root(S, E):
    """:func:`_regularized_cholesky` of a (B, 1, 1) system (one equality: a simplex, a
    budget), whose factor is a square root: both shifts are tried in the same pass and
    chosen per instance, with no LAPACK call (on the CPU an OpenMP region for its copy)
    and no host sync. The general path's shifts and failure test; the root is correctly
    rounded, where MKL's 1x1 Cholesky is 1 ulp off in ~1 % of cases."""
    s = S.reshape(-1)
    scale = s.abs()
    scale = torch.where(scale > 0, scale, 1.0)
    shift = _regularization(S.dtype) * scale
    first = s + (shift if E is None else E.reshape(-1) + shift)
    second = first + (_second_regularization(S.dtype) - _regularization(S.dtype)) * scale
    # the first shift where it gives a positive pivot, else the second (>= first), and
    # failed where neither does, NaN included (False in both tests, as in LAPACK's)
    square = torch.where(first > 0, first, second)
    ok = square > 0
    return torch.where(ok, square, 1.0).sqrt_().view(-1, 1, 1), ~ok


class DiagonalNewton:
    """Newton steps for a diagonal Hessian and a :class:`BoundedJacobian`, in the space of
    the general inequality rows and the equalities.

    With D = diag(H) + (lam/s on the bound rows' entries), K = [Jg_general; Jh] and
    E = diag(s/lam on the general rows, 0 on the equalities), the reduced system
    ``[[D + Jg_R' Sigma_R Jg_R, Jh'], [Jh, 0]]`` becomes ``(K D^-1 K' + E) w = ...`` of size
    k + p: no (n, n) matrix is formed. Needs D > 0 (:attr:`usable`); callers fall back to
    :class:`ReducedNewton` otherwise (nonconvex or flat directions without bounds).
    """

    # the (k + p) system is well conditioned: refinement changed neither iterates nor
    # iteration counts on the entropy family and cost a third of the time
    refinement_rounds = 0

    def __init__(self, H: DiagonalMatrix, Jg: BoundedJacobian, Jh, lam, s, workspace=None, retired=None):
        """``workspace``: a dict the caller keeps across iterations, for the one (B, k, n)
        scratch tensor (fresh, it would be fresh pages at every iteration: page faults
        cost more than the product it feeds)."""
        self.Jg = Jg
        # both steps of an iteration read these
        self.lam_b, self.lam_R = Jg.row_parts(lam)
        self.s_b, self.s_R = Jg.row_parts(s)
        self.sigma = lam / s
        D = H.d + Jg.bound_diagonal(self.sigma)
        self.D_inv = torch.reciprocal(D)
        # (D_inv < inf, not isfinite: NaN fails both, -inf is ruled out by D > 0, and
        # isfinite is three passes at (1024, 100))
        safe = (D > 0) & (self.D_inv < math.inf)
        self.usable = bool((safe if retired is None else safe | retired).all())
        self.unsafe = None if self.usable else ~safe.all(-1)  # (B,): the instances it cannot serve
        self.k, self.p = Jg.k, Jh.shape[-2]
        self.G, self.Jh = Jg.general, Jh
        # S = K D^-1 K' with K = [G; Jh] stacked when small: one product per use instead
        # of two and a join. Large, stacking would copy the (B, k, n) G (the largest
        # tensor here) every iteration, so S is built by blocks with one scaled copy
        d = self.D_inv.unsqueeze(-2)
        self.K = None
        if self.k and self.p and self.G.numel() <= _SMALL_STACK and self.G.shape[0] == Jh.shape[0]:
            self.K = torch.cat([self.G, Jh], -2)
            S = torch.bmm(self.K * d, _mT(self.K))
            E = torch.cat([self.s_R / self.lam_R, s.new_zeros(s.shape[0], self.p)], -1)
        elif self.k:
            # every large tensor in a workspace buffer: fresh ones would be fresh pages at
            # every iteration, which at (1024, 50, 100) cost more than the products
            B, k, p = s.shape[0], self.k, self.p
            like = dict(dtype=self.G.dtype, device=self.G.device)
            GD = torch.mul(self.G, d, out=_scratch(workspace, "GD", self.G.shape, **like))
            if p:
                # S_GG into a contiguous buffer first: a product written straight into a
                # block of S was 2x slower than the product and the block copy together
                S = _scratch(workspace, "S", (B, k + p, k + p), **like)
                S[:, :k, :k] = torch.matmul(GD, _mT(self.G), out=_scratch(workspace, "S_GG", (B, k, k), **like))
                S_gh = GD @ _mT(Jh)
                S[:, :k, k:] = S_gh
                S[:, k:, :k] = _mT(S_gh)
                S[:, k:, k:] = (Jh * d) @ _mT(Jh)
            else:
                S = torch.matmul(GD, _mT(self.G), out=_scratch(workspace, "S", (B, k, k), **like))
            E = torch.cat([self.s_R / self.lam_R, s.new_zeros(s.shape[0], self.p)], -1)
        elif _one_shared_row(Jh):  # (a simplex: S = sum_j a_j^2 / D_j, a dot product per instance)
            a = Jh[0, 0]
            S, E = torch.linalg.vecdot(self.D_inv, a * a).view(-1, 1, 1), None
        else:
            S, E = (Jh * d) @ _mT(Jh), None
        self.L, self.failed = _regularized_cholesky(S, E, workspace)

    def K_mv(self, x):
        """K x = [G x; Jh x] (B, k + p) for x (B, n)."""
        if self.K is not None:
            return _mv(self.K, x)
        if not self.k:
            return _mv(self.Jh, x)
        Gx = _mv(self.G, x)
        return torch.cat([Gx, _mv(self.Jh, x)], -1) if self.p else Gx

    def K_mtv(self, w):
        """K' w = G' w_R + Jh' w_nu (B, n) for w (B, k + p)."""
        if self.K is not None:
            return _mtv(self.K, w)
        if not self.k:
            return _mtv(self.Jh, w)
        out = _mtv(self.G, w[:, :self.k])
        return out + _mtv(self.Jh, w[:, self.k:]) if self.p else out

    def step(self, rd, rc, rp, re, out=None):
        """The same Newton equations as :meth:`ReducedNewton.step`, the same (dz, dv, dnu).

        Only the bound rows are folded into the right-hand side; the general rows keep
        dlam as an unknown (w = [dlam_R; dnu]). Folding them too would put
        rc/s ~ 1e12 on active rows into the right-hand side and cancel it again in dz.
        ds and dlam are written into their halves of dv where the rows are contiguous
        runs: a join would copy both again."""
        Jg = self.Jg
        signs = Jg.bound_signs
        rc_b, rc_R = Jg.row_parts(rc)
        rp_b, rp_R = Jg.row_parts(rp)
        r1 = self._folded(rd, rc_b, rp_b)
        rhs = self.K_mv(self.D_inv * r1)
        if self.k:
            rhs = rhs + torch.cat([rp_R - rc_R / self.lam_R, re], -1)
        else:
            rhs = rhs + re
        w = _chol_solve(rhs.unsqueeze(-1), self.L).squeeze(-1)
        dz = self.D_inv * (r1 - self.K_mtv(w))
        dnu = w[:, self.k:] if self.k else w

        m = Jg.m
        dv = rd.new_empty(rd.shape[0], 2 * m) if out is None else out
        parts = Jg.step_parts(dv)
        ds_b, ds_R, dlam_b, dlam_R = (None,) * 4 if parts is None else parts
        dz_b = Jg.bounded_entries(dz)
        if isinstance(signs, float) and signs == -1.0:  # z >= bound: ds_b = -(rp_b - dz_b)
            ds_b = torch.sub(dz_b, rp_b, out=ds_b)
        else:
            ds_b = torch.add(rp_b, signs * dz_b, out=ds_b).neg_()
        dlam_b = torch.addcmul(rc_b, self.lam_b, ds_b, out=dlam_b).div_(self.s_b).neg_()
        w_R = w[:, :self.k] if self.k else None
        if self.k:
            # general rows: ds from complementarity, accurate relative to s where s is tiny
            ds_R = torch.addcmul(rc_R, self.s_R, w_R, out=ds_R).div_(self.lam_R).neg_()
            if parts is not None:
                dlam_R.copy_(w_R)
        if parts is None:
            ds, dlam = dv.split_with_sizes([m, m], -1)
            ds[:, Jg.bound_rows], dlam[:, Jg.bound_rows] = ds_b, dlam_b
            if self.k:
                ds[:, Jg.general_rows], dlam[:, Jg.general_rows] = ds_R, w_R
        return dz, dv, dnu

    def _folded(self, rd, rc_b, rp_b):
        """r1 = -rd - Jg_b' fold, fold = (lam_b rp_b - rc_b) / s_b: the bound rows folded
        into the stationarity row. Every column bounded once with one sign (z >= 0, a
        box's one side) takes four ops instead of six, with the same rounding: negation
        is exact, so -(rd + fold) = (-fold) - rd and -(rd - fold) = fold - rd."""
        Jg = self.Jg
        signs, cols = Jg.bound_signs, Jg.bound_cols
        if Jg.every_column and isinstance(signs, float) and abs(signs) == 1.0:
            lam_rp = self.lam_b * rp_b
            fold = torch.sub(lam_rp, rc_b) if signs == -1.0 else torch.sub(rc_b, lam_rp)
            return fold.div_(self.s_b).sub_(rd)
        fold = (self.lam_b * rp_b - rc_b) / self.s_b
        return _add_at(rd, cols, signs * fold).neg_()


def _scratch(workspace, name, shape, dtype, device):
    """A contiguous tensor from ``workspace`` (made there on first use, or again when the
    shape changes), or a fresh one without a workspace. Contents are undefined."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    buf = workspace.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
        buf = workspace[name] = torch.empty(shape, dtype=dtype, device=device)
    return buf


class _ResidualRows(NamedTuple):
    """The primal and complementarity residuals of a point, side by side in one (B, 2m + p)
    buffer: ``whole`` = [rp, h, comp], ``primal`` = [rp, h], with rp = g + s and comp = s lam
    - target. Kept across iterations with its views: joined afresh at every use, they were a
    1.6 MB copy at (1024, 100), and the allocator hands such temporaries out as fresh
    pages."""
    whole: torch.Tensor
    primal: torch.Tensor
    rp: torch.Tensor
    h: torch.Tensor
    comp: torch.Tensor


def _residual_rows(workspace, name, B, m, p, like):
    """The :class:`_ResidualRows` kept in ``workspace`` under ``name``, made on first use
    (the caller clears the workspace when the batch changes)."""
    rows = workspace.get(name)
    if rows is None:
        whole = like.new_empty(B, 2 * m + p)
        rp, h, comp = whole.split_with_sizes([m, p, m], -1)
        rows = workspace[name] = _ResidualRows(whole, whole[:, :m + p], rp, h, comp)
    return rows


def _newton_system(H, Jg, Jh, lam, s, workspace=None, retired=None, nlp=False):
    """The Newton solver for this iteration: structured when the problem is and its
    diagonal is safely positive on the instances not ``retired`` (B, 1) (those take no
    step: a failed partner must not change the others' solver), else the n-space
    reduction."""
    if isinstance(H, DiagonalMatrix):
        newton = DiagonalNewton(H, Jg, Jh, lam, s, workspace, retired)
        if newton.usable:
            return newton
    return ReducedNewton(_dense(H), _dense(Jg), Jh, lam, s, nlp)


def _diagonal_kkt_adjoint(H: DiagonalMatrix, Jg: BoundedJacobian, Jh, s, lam, w_z, w_lam, w_nu):
    """:func:`kkt_adjoint` for a diagonal Hessian and bound rows, in the space of the
    general rows and equalities; None where it serves no instance (diag(H) plus the
    bounds' lam/s not safely positive anywhere). Instances it cannot serve are reported
    failed, for :func:`kkt_adjoint` to solve again.

    Bound rows are eliminated through y_b = lam_b u_lam_b = (lam_b/s_b)(+-u_c - w_lam_b);
    on an active bound lam_b/s_b is huge and that formula would cancel, so there y_b is
    read from the stationarity row of its entry c instead, where every term is moderate.
    The general rows stay explicit as in :func:`kkt_adjoint` (y = lam * u_lam).
    """
    # the transposed system has the forward's matrix: the same elimination and factor.
    # Its E = s / lam on the general rows overflowed on an inactive row of a float32
    # problem (s = 1e10, lam = 4e-30: inf, a failed factorization and NaN gradients);
    # lam floored at s / sqrt(the dtype's largest number) keeps E finite, and such a row
    # adds nothing either way (its u_lam is read from its constraint row, not from lam)
    lam = torch.maximum(lam, s * torch.finfo(s.dtype).max ** -0.5)
    newton = DiagonalNewton(H, Jg, Jh, lam, s)
    unusable = newton.unsafe
    if unusable is not None and bool(unusable.all()):
        return None
    sigma, D_inv, k = newton.sigma, newton.D_inv, newton.k
    b_rows, b_cols, signs, rows = Jg.bound_rows, Jg.bound_cols, Jg.bound_signs, Jg.general_rows
    r1 = _add_at(w_z, b_cols, signs * sigma[:, b_rows] * w_lam[:, b_rows])
    rhs = newton.K_mv(D_inv * r1) - (torch.cat([w_lam[:, rows], w_nu], -1) if k else w_nu)
    w = _chol_solve(rhs.unsqueeze(-1), newton.L).squeeze(-1)
    Kw = newton.K_mtv(w)
    # one round of refinement against S = K D^-1 K' + E without the factor's static shift,
    # which left 1e-13 of the largest part of the answer in every part: a 28 % error in
    # a u_z of 1e-13 beside u_nu ~ 1 (an objective times 1e10), below any test that
    # passes a u_z that is 0 but for that shift
    Sw = newton.K_mv(D_inv * Kw)
    if k:
        Sw = Sw + torch.cat([newton.s_R / newton.lam_R, w_nu.new_zeros(w_nu.shape)], -1) * w
    w = w + _chol_solve((rhs - Sw).unsqueeze(-1), newton.L).squeeze(-1)
    Kw = newton.K_mtv(w)
    u_z = D_inv * (r1 - Kw)
    y_R, u_nu = w[:, :k], w[:, k:]
    u_lam = torch.empty_like(lam)
    if k:
        # general rows: y/lam where active, the constraint row where inactive (lam ~ 0)
        active_R = sigma[:, rows] > 1.0
        u_lam[:, rows] = torch.where(active_R, y_R / lam[:, rows],
                                     (_mv(Jg.general, u_z) - w_lam[:, rows]) / s[:, rows])
    # bound rows: inactive ones from their constraint row; active ones from stationarity
    u_c = u_z[:, b_cols]
    inactive_b = sigma[:, b_rows] <= 1.0
    y_inactive = torch.where(inactive_b, sigma[:, b_rows] * (signs * u_c - w_lam[:, b_rows]), 0.0)
    total = w_z - H.d * u_z - Kw  # = sum over bound rows q on each entry of sign_q y_q
    others = _add_at(torch.zeros_like(u_z), b_cols, signs * y_inactive)
    y_active = signs * (total - others)[:, b_cols]
    u_lam[:, b_rows] = torch.where(inactive_b, (signs * u_c - w_lam[:, b_rows]) / s[:, b_rows],
                                   y_active / lam[:, b_rows])
    failed = newton.failed if unusable is None else newton.failed | unusable
    return u_z, u_lam, u_nu, failed


class QPFactor:
    """What stays constant over a QP solve with positive definite Q, factored once.

    The Newton matrix in constraint space is ``[[Q, G', A'], [G, -D, 0], [A, 0, 0]]`` with
    ``D = s/lam`` the only part that changes. Eliminating dz and then dnu leaves
    ``(W + D) dlam = ...`` with the constant ``W = G P G'``, ``P = Q^-1 - Q^-1 A'(A Q^-1 A')^-1 A Q^-1``:
    per iteration one Cholesky factorization of an (m, m) matrix. Shapes: Q (B, n, n),
    c (B, n), G (B, m, n), A (B, p, n).

    With ``Q = L L'`` the blocks come from the half-solves ``L^-1 G'`` and ``L^-1 A'``
    (``G Q^-1 G' = (L^-1 G')'(L^-1 G')``); products ``Q^-1 (r - G'y - A'nu)`` are taken as
    matrix-vector products and one triangular solve (:meth:`from_half`) instead of storing
    the (n, m) matrix ``Q^-1 G'``.

    ``usable`` (B,) says which instances have a safely positive definite Q (and a
    factorable A Q^-1 A'); the factor may serve a batch only when all have.
    """

    def __init__(self, Q, c, G, A, pool=None):
        self.Q, self.G, self.A = Q, G, A
        self.n, self.p = Q.shape[-1], A.shape[-2]
        B, n, m = Q.shape[0], self.n, G.shape[-2]

        def block(*shape):  # a block this factor keeps, from the pool (solvers.buffers) if any
            buf = scratch(pool, shape, Q.dtype, Q.device)
            if pool is not None:
                pool.hold(self, buf)
            return buf

        # factored into a block of the factor's own, in LAPACK's column-major layout: on
        # the CPU cholesky_ex copies the lower triangle of Q there first (a copy of ours
        # before it was one pass too many)
        self.L_Q, info = torch.linalg.cholesky_ex(
            Q, out=(block(B, n, n).mT, torch.empty(B, dtype=torch.int32, device=Q.device)))
        diag = self.L_Q.diagonal(dim1=-2, dim2=-1)
        # Q must be safely positive definite for Q^-1 to be usable: the squared ratio of
        # the factor's smallest and largest diagonal entries above 1e-10 (float32: 1e-5)
        floor = 1e-5 if Q.dtype == torch.float64 else 10 ** -2.5
        # the factor serves only a batch that is usable throughout: otherwise the caller
        # solves it with the general loop, and the blocks below are not built
        self.usable = (info == 0) & (diag.amin(-1) > floor * diag.amax(-1))
        if not bool(self.usable.all()):
            return
        # L^-1 [G' A' -c]: the half-solves L^-1 G' (B, n, m), L^-1 A' (B, n, p) and qc_half
        # below in one triangular solve, in place in a block whose rows are the right-hand
        # sides (column-major, like a LAPACK result). A triangular solve costs per instance
        # and call (LAPACK's batched solve loops over the batch): three calls took 1.2-2x
        # the time of one, 0.70-0.76 against 0.43-0.47 ms at (512, 20, 20, 5)
        # (benchmarks/linalg_ops.py)
        half = torch.cat([G, A, c.neg().unsqueeze(-2)], -2, out=block(B, m + self.p + 1, n)).mT
        self._set_half(torch.linalg.solve_triangular(self.L_Q, half, upper=False, out=half))
        gram = scratch(pool, (B, m, m), Q.dtype, Q.device)
        W = torch.bmm(_mT(self.G_half), self.G_half, out=gram)  # G Q^-1 G'
        # the images G qc, A qc of the unconstrained minimizer (see _set_half) in one product
        GA_qc = _mtv(self.GA_half, self.qc_half)
        self.G_qc, self.A_qc = GA_qc[:, :m], GA_qc[:, m:]
        if self.p:
            # [G; A] Q^-1 A' in one product: K12 = G Q^-1 A' (B, m, p) over K22 = A Q^-1 A'
            K_A = torch.bmm(_mT(self.GA_half), self.A_half)
            self.K12, self.K22 = K12, K22 = K_A[:, :m], K_A[:, m:]
            # regularized relative to its largest diagonal entry (a Gram matrix's: >= 0)
            K22_reg = K22.clone()
            diagonal = K22_reg.diagonal(dim1=-2, dim2=-1)
            diagonal.add_(diagonal.amax(-1, keepdim=True).clamp_(min=1.0), alpha=_regularization(Q.dtype))
            self.L22, info22 = torch.linalg.cholesky_ex(K22_reg)
            self.usable = self.usable & (info22 == 0)
            self.T = _chol_solve(_mT(K12), self.L22)  # K22^-1 K21 (B, p, m)
            W.baddbmm_(K12, self.T, alpha=-1.0)  # (in place: one (B, m, m) temporary fewer)
        # exactly symmetric, so that either triangle (or the transpose) may be copied
        self.W = torch.add(W, _mT(W), out=block(B, m, m)).mul_(0.5)
        if pool is not None:
            pool.give_back(gram)
        # static regularization of W + D, scaled by W alone: D = s/lam reaches 1e15 on
        # inactive rows, and a delta that grew with it would spoil the active ones. At
        # least 8 ulps of the diagonal: below that it vanishes in rounding (float32), and
        # an active set with a constraint written twice (after row scaling, the same
        # row) has a singular matrix
        reg = max(_regularization(Q.dtype), 8 * torch.finfo(Q.dtype).eps)
        self.delta = reg * self.W.diagonal(dim1=-2, dim2=-1).amax(-1).clamp(min=1.0)  # (W is PSD)
        self.unit_delta = (self.delta + 1.0)[:, None]  # an active set's matrix: W, or 1, plus delta

    def _set_half(self, half):
        """The half-solves from their block L^-1 [G' A' -c] (B, n, m + p + 1), as views:
        L^-1 G', L^-1 A' and the two side by side (``GA_half``: one product serves both),
        and qc_half: the unconstrained minimizer qc = -Q^-1 c = L^-T qc_half, the start of
        every solve, kept as its half-solve, which gives its images (G qc = (L^-1 G')'
        qc_half) and any z = L^-T (qc_half - ...) with one triangular solve each."""
        m = half.shape[-1] - self.p - 1
        self.half = half
        self.G_half, self.A_half, self.GA_half = half[..., :m], half[..., m:-1], half[..., :-1]
        self.qc_half = half[..., -1]

    def half_solve(self, r):
        """L^-1 r for r (B, n), Q = L L': the half of Q^-1 r = L^-T (L^-1 r) that G Q^-1 r =
        (L^-1 G')'(L^-1 r) needs (:meth:`from_half`)."""
        return torch.linalg.solve_triangular(self.L_Q, r.unsqueeze(-1), upper=False).squeeze(-1)

    def from_half(self, r_half, y=None, nu=None):
        """Q^-1 (r - G'y - A'nu) (B, n) for r_half = L^-1 r (:meth:`half_solve`; None: r = 0),
        y (B, m), nu (B, p): one triangular solve."""
        if self.p and nu is not None:  # (one product for G'y + A'nu)
            x, M = (nu, self.A_half) if y is None else (torch.cat([y, nu], -1), self.GA_half)
        else:
            x, M = y, self.G_half
        if x is not None:
            r_half = _mv(M, x).neg_() if r_half is None else _mv_sub(r_half, M, x)
        return torch.linalg.solve_triangular(_mT(self.L_Q), r_half.unsqueeze(-1), upper=True).squeeze(-1)

    #: the blocks that live in constraint space (no n-sized dimension)
    CONSTRAINT_SPACE = ("W", "delta", "unit_delta", "G_qc", "A_qc", "K12", "K22", "L22", "T")
    #: what :meth:`solve_active_set` reads
    ACTIVE_SET = ("W", "unit_delta")

    def select(self, rows, blocks=CONSTRAINT_SPACE):
        """The instances ``rows`` (an index tensor) of the tensors named in ``blocks``
        (None: all of them); the others are left out (None). The constraint-space blocks
        serve :meth:`solve_active_set` and :meth:`equality_multipliers`; the n-space
        ones, whose copies cost about as much as using them, only the interior point."""
        sub = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor) and name not in self._HALF_VIEWS:
                keep = blocks is None or name in blocks
                setattr(sub, name, value.index_select(0, rows) if keep else None)
        if blocks is None:  # (its views follow the block's copy)
            sub._set_half(sub.half)
        else:
            for name in self._HALF_VIEWS:
                setattr(sub, name, None)
        return sub

    _HALF_VIEWS = ("G_half", "A_half", "GA_half", "qc_half")

    def active_set_rhs(self, h, b):
        """``G z0 - h`` (B, m) at the minimizer z0 under the equalities alone: the
        right-hand side of every active set's system (:meth:`solve_active_set`)."""
        g0 = self.G_qc - h
        return g0 - _mtv(self.T, self.A_qc - b) if self.p else g0

    def solve_active_set(self, g0, a, info=None, size=None):
        """The equality-constrained QP where the constraints ``a`` (B, m; 1.0 or 0.0, in
        the dtype of W) hold with equality and the others are dropped (``Q z + c + G_a'
        lam_a + A' nu = 0``, ``G_a z = h_a``, ``A z = b``), in constraint space, for ``g0``
        (B, 1, m) of :meth:`active_set_rhs` as a row. ``info``: an int32 (B,) buffer.

        The active set's matrix is W on the active rows and columns and the identity's
        elsewhere (decoupled: lam is exactly zero there). ``size`` (an int, at least the
        largest set in the batch) factors it on ``size`` rows per instance, the active
        ones first (``order`` (B, m) lists them) and inactive ones as padding; None, on
        all m rows in order (``order`` None).

        Returns lam (B, m) (zero off the active set), the constraint values ``G z - h =
        g0 - W lam`` (B, m), a (B,) mask of failed factorizations, the Cholesky factor
        of the active set's matrix (the backward pass reuses it, :func:`_active_set_solve`)
        and ``order``. The multipliers of the equalities follow from lam
        (:meth:`equality_multipliers`), and z is ``from_half(qc_half, lam, nu)``,
        stationary by construction."""
        info = a.new_empty(a.shape[0], dtype=torch.int32) if info is None else info
        if size is None:
            order, W, a_rows, g0_rows = None, self.W, a, g0
        else:
            order = torch.sort(a, dim=-1, descending=True, stable=True).indices
            rows = order[:, :size]
            m = a.shape[-1]
            W = self.W.flatten(1).gather(1, (rows.unsqueeze(-1) * m + rows.unsqueeze(-2)).flatten(1))
            W = W.view(rows.shape + rows.shape[-1:])
            a_rows, g0_rows = a.gather(-1, rows), g0.gather(-1, rows.unsqueeze(-2))
        # factored in place: M is exactly symmetric, so its transpose, LAPACK's
        # column-major layout, is M itself (and a gathered W is a copy: built in place)
        M = _active_set_matrix(W, a_rows, self.unit_delta, in_place=order is not None).transpose(-1, -2)
        L, info = torch.linalg.cholesky_ex(M, out=(M, info))
        lam = _chol_solve((a_rows.unsqueeze(-2) * g0_rows).transpose(-1, -2), L).transpose(-1, -2)
        if order is not None:
            lam = torch.zeros_like(g0).scatter_(-1, rows.unsqueeze(-2), lam)
        # W is symmetric, so W lam is the row lam'W, the faster batched product (see _mv)
        return lam.squeeze(-2), torch.baddbmm(g0, lam, self.W, alpha=-1.0).squeeze(-2), info > 0, L, order

    def correction(self, r_d, r_active, r_eq, a, L, order):
        """One step of iterative refinement of an active set's solution: (dz, dlam, dnu)
        with ``Q dz + G'dlam + A'dnu = -r_d``, ``G_a dz = -r_active`` on the active set
        ``a`` (B, m; 1.0 or 0.0, dlam zero elsewhere) and ``A dz = -r_eq``: the equality
        QP of :meth:`solve_active_set` for the data (c, h, b) = (r_d, -r_active, -r_eq),
        with that set's factor L on the rows ``order``."""
        qc_half = self.half_solve(r_d.neg())  # -Q^-1 r_d = L^-T qc_half
        GA_qc = _mtv(self.GA_half, qc_half)
        m = r_active.shape[-1]
        g0 = GA_qc[:, :m] + r_active
        if self.p:
            e0 = GA_qc[:, m:] + r_eq
            g0 = g0 - _mtv(self.T, e0)
        dlam = _active_set_solve(g0, a, L, order)
        dnu = (_chol_solve((e0 - _mtv(self.K12, dlam)).unsqueeze(-1), self.L22).squeeze(-1) if self.p
               else r_eq.new_zeros(r_eq.shape))
        return self.from_half(qc_half, dlam, dnu), dlam, dnu

    def equality_multipliers(self, lam, b):
        """nu (B, p) for the inequality multipliers lam (B, m), and the residual ``A z - b``
        (B, p) the solve leaves."""
        if not self.p:
            return b.new_zeros(b.shape), b.new_zeros(b.shape)
        r = self.A_qc - b - _mtv(self.K12, lam)
        nu = _chol_solve(r.unsqueeze(-1), self.L22).squeeze(-1)
        return nu, r - _mv(self.K22, nu)


# ------------------------------------------------------------------------------------
# the primal-dual loop
# ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Oracle:
    """What the loop needs of a problem, at batched points z (B, n), lam (B, m), nu (B, p).

    ``derivatives(z, lam, nu) -> (grad_L (B, n), g (B, m), h (B, p), Jg (B, m, n),
    Jh (B, p, n), H (B, n, n))`` and ``residuals(z, lam, nu) -> (grad_L, g, h)``.
    """

    derivatives: Callable
    residuals: Callable
    linear: bool  # constant Jacobians and Hessian: no line search needed
    #: ``select(rows) -> (derivatives, residuals)`` of the instances ``rows`` (indices
    #: into the batch this oracle was made for) alone; None: the batch stays whole
    select: Optional[Callable] = None


def _classify(status, active, checks):
    """Give each active instance the code of the first check it meets, and retire it.
    ``checks`` is a sequence of ((B,) bool mask, status code)."""
    if len(checks) == 1:
        ((mask, c),) = checks
        hit = active & mask
        return torch.where(hit, c, status), active & ~hit
    mask, c = checks[-1]
    code = torch.where(mask, c, -1)  # (int64, as status)
    for mask, c in reversed(checks[:-1]):
        code = torch.where(mask, c, code)
    hit = active & (code >= 0)
    return torch.where(hit, code, status), active & ~hit


def _predictor_corrector(direction, v, mu, fraction, complementarity=None):
    """Mehrotra: an affine-scaling predictor, then the centered corrector.

    ``v = [s, lam]`` (B, 2m) > 0; ``direction(rc)`` returns ``(dv, *rest)`` with
    ``dv = [ds, dlam]``, the Newton step whose complementarity row is
    ``lam ds + s dlam = -rc``; ``complementarity``: ``s * lam`` if the caller has it.
    Returns the corrector step, the step length (``fraction``, a number or (B,), of the
    way to the boundary; at most 1) and the centering target sigma * mu (B,).
    """
    m = v.shape[-1] // 2
    halves = [m, m]  # (views split in one call, not two indexings)
    sl = torch.mul(*v.split_with_sizes(halves, -1)) if complementarity is None else complementarity
    step = direction(sl)
    if not m:
        return step, torch.ones_like(mu), torch.zeros_like(mu)
    dv = step[0]
    trial = torch.addcmul(v, _step_to_boundary(v, dv, 1.0)[:, None], dv)
    mu_aff = torch.linalg.vecdot(*trial.split_with_sizes(halves, -1)) / m
    centering = (mu_aff / mu.clamp(min=torch.finfo(v.dtype).tiny)).clamp(0.0, 1.0) ** 3
    target = centering * mu
    step = direction(torch.addcmul(sl, *dv.split_with_sizes(halves, -1)).sub_(target[:, None]))
    return step, _step_to_boundary(v, step[0], fraction), target


# The slacks of bounds at 0 below _BEND_BELOW times the tolerance over the number of
# simple bounds step along a curve where a step decreases them (:class:`_Bend`)
_BEND_BELOW = 1e-2


class _Bend:
    """Simple-bound rows whose slacks, where a step decreases them, step along a curve.

    Entropy drives an entry of softmax(20 x randn) toward 1e-40. Along the line, the log
    in its stationarity row made each step of z toward 0.01 z an overshoot the line
    search halved: z then halved per iteration, its bound's multiplier at ~40 and the
    residual stuck at 0.38, for some 60 iterations. On these rows the slack moves along
    s exp(alpha ds / s) instead, and z's entry with it (so that g + s changes as along
    the line for every bound row of that column): the same direction at alpha = 0, log s
    moving by alpha ds / s as the Newton model of a log-type term has it. The step length
    is still the line's, within the fraction to the boundary, so the curve lies above a
    positive s + alpha ds.

    Which rows (measured in RESULTS.md's section of this change):
    - bounds at 0 (z >= 0, z <= 0), where a log's singularity is: x >= 1e-16 under an
      entropy is an active bound, whose slack the line takes to 0, and the curve, a
      factor e per step, ran every instance out of iterations;
    - slacks already within the tolerance of their bound, where the curve leaves them
      with their multipliers absorbing the stationarity residual (the line went on to
      their exact, tiny value): with larger slacks bent, solutions lost digits;
    - together at most _BEND_BELOW times the tolerance per instance: each moves its entry
      of z by at most its size, and a row through all of them, as sum(z) == 1, adds the
      moves up (a threshold that grew with n left softmax at n = 1000 4e-7 off in sum).
    """

    def __init__(self, Jg, s, rows):
        self.Jg, self.s = Jg, s
        self.rows = rows  # (B, m) bool

    @staticmethod
    def of(Jg, z, g, s, tol):
        """The bent rows at z, constraints g (B, m) and slacks s (B, m), or None where
        none bends (or the rows hold no simple bounds). Two ops and a host
        synchronization where no slack is that small, the usual case."""
        if not isinstance(Jg, BoundedJacobian) or Jg.m == Jg.k:
            return None
        below = _BEND_BELOW * tol / (Jg.m - Jg.k)
        if float(s.amin()) > below:
            return None
        at_zero = Jg.row_parts(g)[0] == Jg.bound_signs * Jg.bounded_entries(z)
        bends = (Jg.row_parts(s)[0] <= below) & at_zero
        if not bool(bends.any()):
            return None
        rows = bends if Jg.order == "b" else Jg.join_rows(bends, bends.new_zeros(bends.shape[0], Jg.k), bends)
        return _Bend(Jg, s, rows)

    def along(self, dv):
        """The curve for direction dv = [ds, dlam] (B, 2m)."""
        ds = dv[:, :self.Jg.m]
        return _Curve(self.Jg, self.s, self.rows & (ds < 0), ds / self.s)


class _Curve(NamedTuple):
    """A step's bent slacks: ``bends`` (B, m) bool, their rates ds / s."""
    Jg: "BoundedJacobian"
    s: torch.Tensor
    bends: torch.Tensor
    rate: torch.Tensor

    def bend_(self, z_t, v_t, a):
        """(z_t, v_t), the point ``a`` (B, 1) along the line, bent in place."""
        s_t = v_t[:, :self.Jg.m]
        # the curve lies above the line (exp is convex), which lies above 0: at least the
        # line where the exponential underflows
        c = torch.where(self.bends, (self.s * torch.exp(a * self.rate) - s_t).clamp_(min=0.0), 0.0)
        self.Jg.move_slacks_(z_t, s_t, c)
        return z_t, v_t


def _stepped(z, v, nu, dz, dv, dnu, alpha, curve=None):
    """The point alpha (B,) along the step from (z, v = [s, lam], nu), bent by ``curve``."""
    a = alpha[:, None]
    z_t, v_t, nu_t = torch.addcmul(z, a, dz), torch.addcmul(v, a, dv), torch.addcmul(nu, a, dnu)
    if curve is not None:
        z_t, v_t = curve.bend_(z_t, v_t, a)
    return z_t, v_t, nu_t


def _boundary_fraction(distance):
    """How far (B,) toward the boundary a step may go from an iterate at ``distance``
    (B,) from a solution: 1 - distance within [0.99, 0.9999]."""
    return torch.rsub(distance, 1.0).clamp_(min=_TO_BOUNDARY_MIN, max=_TO_BOUNDARY_MAX)


def _start_status(B, skip, device):
    status = torch.full((B,), MAX_ITER, dtype=torch.int64, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    if skip is not None:
        status = torch.where(skip, torch.full_like(status, NUMERICAL_ERROR), status)
        active = active & ~skip
    return status, active


def _step_to_boundary(x, dx, fraction):
    """min(1, fraction * the largest alpha with x + alpha dx >= 0), per instance, for
    x (B, k) > 0; ``fraction`` a number or (B,).

    That alpha is 1 / max_i(-dx_i / x_i) (inf where nothing decreases), so the answer is
    fraction / max(fraction, max_i(-dx_i / x_i)): four ops in all, two of them on (B, k)
    (a masked ratio with a where took twice as many). With k = 0 nothing bounds the
    step: 1."""
    if not x.shape[-1]:
        return x.new_ones(x.shape[:1])
    minus = -fraction  # (once: a tensor's negation is an op)
    largest = (dx / x).amin(-1).clamp_(max=minus)
    if isinstance(fraction, torch.Tensor):
        return minus / largest
    # number / tensor goes through Tensor.__rdiv__, a Python wrapper around these two
    return torch.reciprocal(largest).mul_(minus)


def _inf_norm(x):
    """max |x_i| over the last dim of x (B, k); NaN where x has one.

    Taken as ``amax(abs(x))``: the same number as ``vector_norm(x, inf)``, whose CPU
    reduction over short rows costs about 10x more (~200 vs ~20 us at (1024, 100);
    ``benchmarks/linalg_ops.py``)."""
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:1])
    return torch.amax(torch.abs(x), -1)


def primal_dual(
    oracle: Oracle,
    z: torch.Tensor,
    s: torch.Tensor,
    lam: torch.Tensor,
    nu: torch.Tensor,
    *,
    scale_dual: torch.Tensor,
    scale_primal: torch.Tensor,
    tol: float,
    max_iter: int,
    skip: Optional[torch.Tensor] = None,
    stop_collapsed: bool = False,
    data_scale: Optional[torch.Tensor] = None,
    budget: Optional[torch.Tensor] = None,
) -> InteriorPointResult:
    """Mehrotra predictor-corrector from the starting point (z, s > 0, lam > 0, nu).

    ``budget`` (B,) int64: each instance's own iteration limit, at most ``max_iter``
    (None: ``max_iter`` for every one), so that no instance's limit hangs on the others'.
    ``scale_dual``, ``scale_primal`` (B,) make the stopping test relative to the data:
    an instance is optimal when ``|grad_L|_inf <= tol * scale_dual``, ``|g + s|_inf`` and
    ``|h|_inf <= tol * scale_primal`` and ``s'lam / m <= tol * scale_dual``.
    ``skip`` (B,) bool marks instances not to solve (e.g. NaN inputs).

    With ``oracle.select``, a large batch goes on with its unfinished instances alone once
    they are few: the rest of the iterations then costs what they need (a batch waits for
    its slowest instance, which can take several times the others' iterations).

    ``data_scale`` (B,): the scale of the constraints' data in the caller's rows, for the
    divergence limit, where ``scale_primal`` is that of rows the caller scaled (default:
    ``scale_primal``).

    ``stop_collapsed``: end an instance that shows want of precision as
    ``numerical_error`` at once, for callers that solve such instances again in float64.
    With a linear oracle (LPs, QPs), that is complementarity collapsed _COLLAPSED_MU
    below the tolerance while the other residuals miss it: float32 LPs stalled so, their
    Newton systems spread over lam/s ~ 1e-10..1e10 and stationarity a few times the
    tolerance, for the rest of max_iter. An NLP's complementarity collapses so on its way
    to many solutions (softmax: the multipliers of z >= 0 vanish long before the
    stationarity residual does, and float32 softmax of logits 3 x randn would have
    stopped there 62 times in 64); its sign is a slack below the dtype's smallest normal
    number (1.2e-38 in float32), where the iterate has left its range, with the
    stationarity residual still _COLLAPSED_RD times the tolerance: softmax of logits
    20 x randn crawled on toward entries of 1e-52, then ended ``numerical_error`` or ran
    out of iterations. (Multipliers of inactive constraints legitimately get that small;
    so do slacks of active ones as the iterate converges: weighted entropy with 5 rows at
    logits 10 x randn, which float32 solves, was stopped without the stationarity test;
    and at tiny / eps, 1e-31, instances with entries of z* near 1e-28 stopped too.)
    """
    B, m = z.shape[0], s.shape[-1]
    status, active = _start_status(B, skip, z.device)
    iterations = torch.zeros(B, dtype=torch.int64, device=z.device)
    mu_div = max(m, 1)
    rd_n = rp_n = mu = z.new_zeros(B)
    tol_d, tol_p = tol * scale_dual, tol * scale_primal
    limit_dual = _DUAL_DIVERGENCE * scale_dual
    limit_z = _DIVERGENCE * torch.maximum(scale_dual, scale_primal if data_scale is None else data_scale)
    # (stop_collapsed: an NLP's slacks below this have left the dtype's normal range)
    bottom = torch.finfo(z.dtype).tiny
    workspace = {}  # scratch tensors reused by every iteration's Newton system
    evaluated = None  # the derivatives at (z, lam, nu), when the line search has them
    # s and lam side by side: one tensor to step, to test against the boundary, and to
    # receive the Newton steps' halves, where two would be joined every time
    v = torch.cat([s, lam], -1)
    s, lam = v.split_with_sizes([m, m], -1)  # (one call for both views)
    p = nu.shape[-1]
    # the residuals at the iterate, and at the line search's trial points
    here = _residual_rows(workspace, "here", B, m, p, z)
    there = _residual_rows(workspace, "there", B, m, p, z)
    # once the batch has dropped its finished instances: the original indices of those it
    # goes on with, and the whole batch's results
    rows = whole = None
    # |z| at the two previous iterates, and how many instances were active after the last
    z_n_before = z_n_earlier = _inf_norm(z)
    n_before = B
    dz = None  # the last Newton direction (before its step length)

    it = 0
    while True:
        if evaluated is None:
            rd, g, h, Jg, Jh, H = oracle.derivatives(z, lam, nu)
            torch.add(g, s, out=here.rp)
            if p:
                here.h.copy_(h)
        else:  # the line search's first trial, residuals and all
            (rd, g, h, Jg, Jh, H), evaluated = evaluated, None
            here, there = there, here
        rp = here.rp
        rd_n, rp_n = _inf_norm(rd), _inf_norm(here.primal)
        mu = torch.linalg.vecdot(s, lam) / mu_div
        # NaN or inf in any of them shows in their sum
        # (all three >= 0, so finite means below inf; isfinite is four ops)
        finite = (rd_n + rp_n + mu) < math.inf
        converged = (torch.maximum(rd_n, mu) <= tol_d) & (rp_n <= tol_p)  # (maximum keeps a NaN)
        dual_size = lam.amax(-1) if m else z.new_zeros(B)  # (lam > 0: no abs, no join with nu)
        if p:
            dual_size = torch.maximum(dual_size, _inf_norm(nu))
        # duals far beyond the data while the constraints stay violated: no feasible point
        diverged = (dual_size > limit_dual) & (rp_n > tol_p)
        z_n = _inf_norm(z)
        unbounded = z_n > limit_z
        # (an NLP's diverging duals are no certificate: min |x - 1| s.t. exp(c - 100 x)
        # <= 100, feasible for every c, started far outside the row at c = 60 and 120 and
        # was called infeasible. They end it as numerical_error; where its constraints
        # are affine, an LP then tells whether it is infeasible: solve_nlp)
        checks = ((~finite, NUMERICAL_ERROR), (converged, OPTIMAL),
                  (diverged, INFEASIBLE if oracle.linear else NUMERICAL_ERROR), (unbounded, UNBOUNDED))
        if budget is not None:  # (each instance's own limit, below max_iter)
            checks += ((iterations >= budget, MAX_ITER),)
        if stop_collapsed:
            if oracle.linear:
                collapsed = (mu < tol_d * _COLLAPSED_MU) & ((rd_n > tol_d) | (rp_n > tol_p))
            else:
                collapsed = ((s.amin(-1) < bottom) & (rd_n > _COLLAPSED_RD * tol_d)) if m else torch.zeros_like(active)
            checks += ((collapsed, NUMERICAL_ERROR),)
        status, active = _classify(status, active, checks)
        # a host synchronization (the iteration has a few: this, the Newton system's
        # usable test, the line search's, the stall test)
        n_active = int(active.sum())
        if n_active < n_before and not oracle.linear:
            status, active, n_active = _held_back_runaways(status, active, converged, z_n, z_n_before, z_n_earlier,
                                                           dz, limit_z)
        z_n_earlier, z_n_before, n_before = z_n_before, z_n, n_active
        if it == max_iter or not n_active:
            break
        if oracle.select is not None and n_active <= _DROP_FRACTION * B and _worth_dropping(B, Jg, Jh):
            keep = active.nonzero().squeeze(1)
            whole = _with_rows(whole, rows, InteriorPointResult(z, s, lam, nu, status, iterations, rp_n, rd_n, mu))
            rows = keep if rows is None else rows[keep]
            B, z, v, nu = n_active, z[keep], v[keep], nu[keep]
            s, lam = v.split_with_sizes([m, m], -1)
            status, active, iterations = status[keep], active[keep], iterations[keep]
            budget = None if budget is None else budget[keep]
            tol_d, tol_p, limit_dual, limit_z = tol_d[keep], tol_p[keep], limit_dual[keep], limit_z[keep]
            z_n_before, z_n_earlier, dz = z_n_before[keep], z_n_earlier[keep], None
            derivatives, residuals = oracle.select(rows)
            oracle = dataclasses.replace(oracle, derivatives=derivatives, residuals=residuals)
            workspace.clear()
            here = _residual_rows(workspace, "here", B, m, p, z)
            there = _residual_rows(workspace, "there", B, m, p, z)
            evaluated = None
            continue  # (the kept instances' derivatives, and this iteration's tests again)

        inactive = ~active
        retired = inactive.unsqueeze(-1)
        newton = _newton_system(H, Jg, Jh, lam, s, workspace, retired, nlp=not oracle.linear)
        refine = newton.refinement_rounds
        # the predictor's step, the corrector's, and the centered step a lost line search
        # takes: two buffers in turn (each step is dead when the next but one is taken),
        # kept across iterations rather than fresh pages every time at large sizes
        buffers = itertools.cycle([_scratch(workspace, name, v.shape, v.dtype, v.device) for name in ("dv0", "dv1")])

        def direction(rc):
            # Late iterations have lam/s spanning ~1e-15..1e15, so a reduced solve can
            # lose digits; refining against the unreduced Newton equations (whose
            # residuals involve only moderate numbers) restores them.
            dz, dv, dnu = newton.step(rd, rc, rp, h, out=next(buffers))
            for _ in range(refine):
                ds, dlam = dv[:, :m], dv[:, m:]
                e_d = rd + _apply(H, dz) + (_apply_t(Jg, dlam) if m else 0) + (_mtv(Jh, dnu) if p else 0)
                e_c = rc + lam * ds + s * dlam
                e_p = rp + (_apply(Jg, dz) if m else 0) + ds
                e_e = h + _mv(Jh, dz) if p else h
                cz, cv, cnu = newton.step(e_d, e_c, e_p, e_e)
                dz, dv, dnu = dz + cz, dv + cv, dnu + cnu
            return dv, dz, dnu

        # how close to the boundary a step may go depends on how close the iterate is to
        # a solution, all residuals counted: on complementarity alone, mu could collapse
        # while stationarity was still far off, and the steps then stalled at the boundary
        fraction = _boundary_fraction(torch.maximum(mu, torch.maximum(rd_n, rp_n)))
        bend = None if oracle.linear or not m else _Bend.of(Jg, z, g, s, tol)
        (dv, dz, dnu), alpha, target = _predictor_corrector(direction, v, mu, fraction)
        # a retired instance takes no step, but a zero step along a NaN direction (its
        # Newton system may be singular now) is NaN: its directions are zeroed
        dv, dz, dnu = dv.masked_fill_(retired, 0.0), dz.masked_fill_(retired, 0.0), dnu.masked_fill_(retired, 0.0)
        trial = curve = None
        if not oracle.linear:
            # retired instances stay where they are: the trial point is then exactly the
            # next iterate for every instance that steps
            alpha = alpha.masked_fill(inactive, 0.0)
            curve = None if bend is None else bend.along(dv)
            alpha, trial, lost = _line_search(oracle, z, v, nu, rd, here, there, dz, dv, dnu, alpha, target,
                                              active & ~newton.failed, halvings=_CORRECTOR_HALVINGS, curve=curve)
            if lost is not None:
                # Mehrotra's second-order term can make the corrector an ascent direction
                # of the merit far from the solution (softmax of logits spread over ~15
                # stalled at its second iteration). The centered Newton step without it
                # descends, as any Newton step on the residual does: those instances
                # search along it instead (an instance that finds no step there either
                # keeps alpha = 0 and stops below)
                (dv_n, dz_n, dnu_n) = direction(torch.addcmul(-target[:, None], s, lam))
                # at most _STEP_CAP times the iterate's size: where nothing curves (a
                # Hessian zero at the start, as x**4 at 0, with no bound to add lam / s)
                # the step is the gradient over the static shift, 1e13 times too long, and
                # 40 halvings never came down to a useful one
                alpha_n = torch.minimum(_step_to_boundary(v, dv_n, fraction),
                                        _STEP_CAP * (1.0 + z_n) / _inf_norm(dz_n).clamp(min=torch.finfo(z.dtype).tiny))
                alpha_n, _, _ = _line_search(oracle, z, v, nu, rd, here, there, dz_n, dv_n, dnu_n,
                                             alpha_n.masked_fill(~lost, 0.0), target, lost,
                                             curve=None if bend is None else bend.along(dv_n))
                alpha = torch.where(lost, alpha_n, alpha)
                take = lost[:, None]
                dz, dv, dnu = torch.where(take, dz_n, dz), torch.where(take, dv_n, dv), torch.where(take, dnu_n, dnu)
                curve = None if bend is None else bend.along(dv)

        # a failed factorization, or rounding that leaves a direction hitting the boundary
        # at once: stop those instances rather than spin. A short step along a long
        # direction still moves z (exp of data over 24 decades took steps of 1e-13 along
        # directions of 1e14, which is progress)
        # (tested only where some active instance may be one: rarely)
        slow = alpha < _STALL
        if bool(((newton.failed | slow) & active).any()):
            stalled = slow & (alpha * _inf_norm(dz) <= _STALL * (1.0 + z_n))
            status, active = _classify(status, active, ((newton.failed | stalled, NUMERICAL_ERROR),))
            inactive = ~active
        step = alpha.masked_fill(inactive, 0.0)
        iterations.add_(active)
        if trial is not None and torch.equal(step, alpha):
            # every instance took the step the line search evaluated last: its point and
            # derivatives are the next iteration's
            (z, v, nu), evaluated = trial
        else:
            z, v, nu = _stepped(z, v, nu, dz, dv, dnu, step, curve)
        s, lam = v.split_with_sizes([m, m], -1)
        it += 1

    bounds = Jg if isinstance(Jg, BoundedJacobian) and Jg.m > Jg.k else None
    result = _with_rows(whole, rows, InteriorPointResult(z, s, lam, nu, status, iterations, rp_n, rd_n, mu))
    return dataclasses.replace(result, simple_bounds=bounds)


def _held_back_runaways(status, active, converged, z_n, z_n_before, z_n_earlier, dz, limit_z):
    """Instances that met the tolerances at this iterate, an NLP's, whose last Newton
    direction ``dz`` (B, n) was longer than half of 1 + |z| before it (where ``dz`` is
    None, not known: with |z| grown beyond _RUNAWAY times 1 + |z| over the last two
    steps), go on as unsolved; those beyond ``limit_z`` end ``unbounded``, however they
    got there.

    A gradient that vanishes only at infinity passes a relative stopping test far out:
    minimize -log(x) ended ``optimal`` at x = 5.8e7, the gradient -1.7e-8, with nothing
    to say the problem is unbounded. There, as for any objective growing slower than
    linearly, each Newton direction about doubles the iterate; going on, it passes the
    divergence limit. The direction, not the step: the line search cut some steps (to
    1.5, 1.25 or 1.125 times |z|; with x_0 + x_2 <= 100 in the problem, to 3e-8 of the
    direction, where the iterate stalled and met the tolerance), and a test of the step
    let those through, once at x = 2.2e12, beyond the limit. A true solution far out is
    reached by directions that shrink: one that a long step lands on takes one more
    iteration, whose direction is short. (Only iterations that retire an instance test
    this: a few per call. An instance retired before has not moved since; one the stall
    test retired last iteration may meet the tolerances now, and keeps its status.)
    Returns the new (status, active, number active)."""
    if dz is None:  # (the batch has just dropped its finished instances)
        far = z_n > torch.minimum((1.0 + z_n_earlier).mul_(_RUNAWAY), limit_z)
    else:  # (a step that grew |z| so had a direction at least that long)
        far = (_inf_norm(dz) > (1.0 + z_n_before).mul_(0.5)) | (z_n > limit_z)
    runaway = converged & far & (status == OPTIMAL)
    if not bool(runaway.any()):
        return status, active, int(active.sum())
    beyond = runaway & (z_n > limit_z)
    status = torch.where(runaway, torch.where(beyond, UNBOUNDED, MAX_ITER), status)
    active = active | (runaway & ~beyond)
    return status, active, int(active.sum())


# a batch goes on without its finished instances once the unfinished are at most this
# fraction of it, if it has at least this many instances, or at least this many entries
# in its constraints' Jacobians, whose products and the factorization they feed cost per
# instance: the dense blocks of the structured step, or the whole Jacobian where the
# step is the n-space reduction (the general loop: an (n, n) system and its refinement
# per instance, worth dropping from far smaller sizes). Below, the loop's small ops cost
# per call, not per instance, and a smaller batch saves less than the drop costs.
# Measured (dropping against not): softmax at 32 x 10 12 % slower; weighted entropy with
# 10 dense rows at 32 x 20 6 % slower, with 25 at 32 x 50 1 % faster, with 50 at
# 32 x 100 4-5 % faster; LPs at 32 x 20 with 80 rows 22 % faster, at 8 x 20 with 80
# rows 10 %, at 32 x 5 with 20 rows no different
_DROP_FRACTION = 0.5
_DROP_MIN_BATCH = 64
_DROP_MIN_ENTRIES = 1 << 16
_DROP_MIN_DENSE_ENTRIES = 1 << 12
_LOOP_FIELDS = ("z", "s", "lam", "nu", "status", "iterations", "primal_residual", "dual_residual",
                "complementarity")


def _worth_dropping(B, Jg, Jh):
    """Whether a batch of B instances with these constraint Jacobians saves more by
    dropping its finished instances than the drop costs (the limits above)."""
    if B >= _DROP_MIN_BATCH:
        return True
    structured = isinstance(Jg, BoundedJacobian)
    dense = Jg.general if structured else Jg
    entries = B * (dense.shape[-2] * dense.shape[-1] + Jh.shape[-2] * Jh.shape[-1])
    return entries >= (_DROP_MIN_ENTRIES if structured else _DROP_MIN_DENSE_ENTRIES)


def _with_rows(whole, rows, part):
    """``whole`` (a result of the whole batch) with the instances ``rows`` taken from
    ``part``; ``part`` itself where ``whole`` is None (it is the whole batch)."""
    if whole is None:
        return part
    return dataclasses.replace(whole, **{name: getattr(whole, name).index_copy(0, rows, getattr(part, name))
                                         for name in _LOOP_FIELDS})


def _squared_norm(x):
    """|x|^2 over the last dim. Large, as a 2-norm reduction, which makes no (B, k)
    product: at (1024, 201) that temporary is 1.6 MB of fresh pages per call, which cost
    ~10x the reduction itself in the entropy layers' line search. Small, as a dot
    product, the cheaper call on short rows."""
    if x.numel() >= _LARGE_TEMPORARY:
        return torch.linalg.vector_norm(x, dim=-1).square()
    return torch.linalg.vecdot(x, x)


# the line search also takes a step that cuts the primal and complementarity residuals
# tenfold while the stationarity residual grows at most this much (squared, relative to
# the whole merit): a two-measure (filter-like) acceptance
_FILTER_DUAL_GROWTH = 100.0


def _line_search(oracle, z, v, nu, rd, here, there, dz, dv, dnu, alpha, target, active, halvings=40, curve=None):
    """Backtrack until the KKT residual decreases (Armijo) at a point where every
    function is finite (inside the domain of log, entropy, sqrt ...), per instance.

    A step that cuts the primal and complementarity residuals tenfold is also taken when
    the stationarity residual grows by a bounded factor: Newton on log-type terms far
    from a tiny solution entry overshoots stationarity while making the other residuals
    collapse, and requiring the sum to fall halved nearly every step (entropy layers
    took 21-41 iterations instead of 13-20).

    The merit is measured in two parts: stationarity |rd|^2, and the rest |rp|^2 + |h|^2
    + |s lam - target|^2, the whole of a :class:`_ResidualRows`: ``here`` holds the
    iterate's (its primal rows filled), ``there`` receives each trial point's.

    v = [s, lam] and dv = [ds, dlam] (B, 2m); ``curve``: the step's bent slacks
    (:class:`_Curve`), if any. Returns alpha; when every instance
    accepted the first trial (the usual case), ``((z, v, nu), derivatives)`` at that
    point, whose residuals ``there`` then holds (the first trial is evaluated with
    ``oracle.derivatives`` rather than the residuals alone, so that the next iteration
    need not evaluate the same point again), else None; and None when every instance
    of ``active`` accepted a step within ``halvings`` halvings, else the (B,) mask of
    those that did not (their alpha is then zero)."""
    m = here.rp.shape[-1]
    minus_target = -target[:, None]
    torch.addcmul(minus_target, *v.split_with_sizes([m, m], -1), out=here.comp)
    dual0, theta0 = _squared_norm(rd), _squared_norm(here.whole)
    phi0 = dual0 + theta0
    pending = active.clone()
    for trial in range(halvings + 1):
        z_t, v_t, nu_t = _stepped(z, v, nu, dz, dv, dnu, alpha, curve)
        s_t, lam_t = v_t.split_with_sizes([m, m], -1)
        if trial == 0:
            evaluated = oracle.derivatives(z_t, lam_t, nu_t)
            rd_t, g_t, h_t = evaluated[:3]
        else:
            rd_t, g_t, h_t = oracle.residuals(z_t, lam_t, nu_t)
        torch.add(g_t, s_t, out=there.rp)
        if h_t.shape[-1]:
            there.h.copy_(h_t)
        torch.addcmul(minus_target, s_t, lam_t, out=there.comp)
        dual_t, theta = _squared_norm(rd_t), _squared_norm(there.whole)
        phi = dual_t + theta
        ok = (phi < math.inf) & ((phi <= torch.rsub(1e-4 * alpha, 1.0) * phi0)
                                 | ((theta <= 0.1 * theta0) & (dual_t <= _FILTER_DUAL_GROWTH * phi0)))
        pending = pending & ~ok
        if not bool(pending.any()):
            return alpha, (((z_t, v_t, nu_t), evaluated) if trial == 0 else None), None
        alpha = torch.where(pending, alpha * 0.5, alpha)
    return alpha.masked_fill(pending, 0.0), None, pending


# ------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------

def solve_qp(Q, c, G, hv, A, b, *, tol=None, max_iter=100, skip=None,
             active_set_rounds=ACTIVE_SET_ROUNDS, pool=None) -> InteriorPointResult:
    """Batched convex QP/LP: minimize z'Qz/2 + c'z s.t. Gz <= hv, Az = b.

    Q (B, n, n) PSD, c (B, n), G (B, m, n), hv (B, m), A (B, p, n), b (B, p).
    With Q positive definite (the common case in layers) the solve runs in constraint
    space, with at most ``active_set_rounds`` rounds of the active-set iteration first
    (:func:`_constraint_space_solve`; 0: the interior point alone); otherwise (LPs,
    singular Q) it runs the general loop with the n-space reduction.

    Every constraint row is first divided by its largest entry (rows of G and hv, of A
    and b), so that the tolerance means the same for each: with the rows as given, a
    row a million times smaller than the others could be violated by its own size and
    still pass a test relative to the data. Likewise an objective far from unit scale
    (:func:`_objective_scale`) is divided by its largest coefficient: the minimizer is
    the same, and the tolerances' scales (1 + |c|) mean what they say. The result is in
    the caller's units; ``qp_factor.row_scale`` and ``qp_factor.objective_scale`` hold
    the factors for :func:`qp_adjoint`. ``pool``: a :class:`solvers.buffers.BufferPool`
    for the factor's large blocks (a layer keeps one across calls), or None.
    """
    tol = default_tol(Q.dtype) if tol is None else tol
    if pool is not None and Q.shape[0] * max(Q.shape[-1], G.shape[-2]) ** 2 < _LARGE_TEMPORARY:
        pool = None  # small blocks: fresh ones cost less than the pool's bookkeeping (~10 us each)
    (r_G, G_s), (r_A, A_s) = _row_scaled(G, pool), _row_scaled(A, pool)
    sigma = _objective_scale(Q, c)
    Q_s, c_s = (Q, c) if sigma is None else (Q / sigma[:, None, None], c / sigma[:, None])
    data = (Q_s, c_s, G_s, hv * r_G, A_s, b * r_A)
    result = _solve_qp_rows_scaled(*data, tol, max_iter, skip, active_set_rounds, pool)
    result = _held_to_own_scale(result, data, tol, max_iter, active_set_rounds)
    result = _in_caller_units(result, r_G, r_A, sigma, Q, G, A)
    if pool is not None:  # (nothing refers to the scaled copies now: the factor holds G and A)
        pool.give_back(G_s, A_s)
    return result


def _row_scaled(M, pool=None):
    """``(r, diag(r) M)`` for M (B, k, n), r (B, k) 1 / the largest |entry| of each row (1
    for a zero row); the copy in a block of ``pool`` (:class:`solvers.buffers.BufferPool`),
    if given, which first holds |M|."""
    scaled = scratch(pool, M.shape, M.dtype, M.device)
    if not M.shape[-2]:
        return M.new_ones(M.shape[:-1]), scaled
    largest = torch.abs(M, out=scaled).amax(-1)
    r = torch.where(largest > 0, largest, 1.0).reciprocal_()
    return r, torch.mul(M, r.unsqueeze(-1), out=scaled)


def _objective_scale(Q, c):
    """The largest coefficient of each instance's objective (B,) (Q is PSD: its largest
    entry is on the diagonal), or None where every instance's lies within
    _OBJECTIVE_RANGE of 1 (the common case: then nothing is copied). An objective of
    scale 1e-6 failed every instance of a random batch (numerical_error), one of scale
    1e6 left errors of 3e-5."""
    # (an instance with NaN or inf data, skipped by the solve, must not decide for the others)
    largest = torch.cat([Q.diagonal(dim1=-2, dim2=-1), c.abs()], -1).amax(-1).nan_to_num_(nan=1.0, posinf=1.0)
    low, high = torch.stack(torch.aminmax(largest)).tolist()
    if 1.0 / _OBJECTIVE_RANGE <= low and high <= _OBJECTIVE_RANGE:
        return None
    return torch.where(largest > 0, largest, 1.0)


_OBJECTIVE_RANGE = 1e3


def _in_caller_units(result: InteriorPointResult, r_G, r_A, sigma, Q, G, A) -> InteriorPointResult:
    """Row-scaled rows G_s = diag(r_G) G have slacks s_s = r_G s and multipliers
    lam_s = lam / r_G (G_s'lam_s = G'lam), and likewise nu_s = nu / r_A; an objective
    divided by sigma divides the multipliers by it. The factor, kept for the backward,
    holds the caller's Q, G and A with the scales rather than scaled copies of them
    (:func:`qp_adjoint`; its other blocks are the scaled problem's)."""
    if result.qp_factor is not None:
        result.qp_factor.Q, result.qp_factor.G, result.qp_factor.A = Q, G, A
        result.qp_factor.row_scale = (r_G, r_A)
        result.qp_factor.objective_scale = sigma
    lam, nu = result.lam * r_G, result.nu * r_A
    if sigma is not None:
        lam, nu = lam * sigma[:, None], nu * sigma[:, None]
    return dataclasses.replace(result, s=result.s / r_G, lam=lam, nu=nu)


def _solve_qp_rows_scaled(Q, c, G, hv, A, b, tol, max_iter, skip, active_set_rounds, pool=None, primal_scale=None):
    if G.shape[-2]:
        factor = QPFactor(Q, c, G, A, pool)
        if bool(factor.usable.all()):
            return _constraint_space_qp(factor, Q, c, G, hv, A, b, tol, max_iter, skip, active_set_rounds, pool,
                                        primal_scale)
    return _general_qp(Q, c, G, hv, A, b, tol, max_iter, skip, primal_scale)


def _own_scale(z, G, hv, A, b):
    """The primal scale of the point z (B, n) itself, 1 + the largest |G z| or |b|, and
    its violation of the constraints, the largest G z - hv (if positive) or |A z - b|
    (rows scaled to a largest entry of 1)."""
    Gz = _mv(G, z)
    scale = 1.0 + torch.maximum(_inf_norm(Gz), _inf_norm(b))
    violation = torch.maximum((Gz - hv).amax(-1).clamp(min=0.0), _inf_norm(_mv(A, z) - b))
    return scale, violation


def _held_to_own_scale(result, data, tol, max_iter, active_set_rounds):
    """Optimal instances whose tolerance a far constraint loosened, solved again
    without it (``data`` the row-scaled (Q, c, G, hv, A, b)).

    The primal tolerance is relative to the data, 1 + the largest |hv| or |b|: one bound
    meant as no limit (sum(x) <= 1e10) made it 1e10 times the tolerance for every row,
    and an instance whose other rows its point violated by 5 came back optimal (1e6 was
    enough in float32). A point is therefore also held to its own scale (see
    :func:`_own_scale`: a far row's bound is not among its constraints' values); one that
    misses it, with verify's margin, is solved again with that scale and takes the new
    result where it is optimal and meets it, or infeasible; elsewhere it ends
    ``numerical_error`` (LPs with a row bounded by 1e20 came back optimal with their
    other rows 1.6 off). Iterations of both solves are counted."""
    Q, c, G, hv, A, b = data
    # (a point's violation is at most its primal residual |G z - hv + s| with s >= 0, and
    # its own scale at least 1: the usual exact solution, 1e-15 off, is done in two ops)
    if not G.shape[-2] or not bool((result.primal_residual > 10 * tol).any()):
        return result
    scale, violation = _own_scale(result.z, G, hv, A, b)
    loose = (result.status == OPTIMAL) & (violation > 10 * tol * scale)
    if not bool(loose.any()):
        return result
    rows = loose.nonzero().squeeze(-1)
    part_data = [t.index_select(0, rows) for t in data]
    part = _solve_qp_rows_scaled(*part_data, tol, max_iter, None, active_set_rounds, None, scale.index_select(0, rows))
    part_scale, part_violation = _own_scale(part.z, *part_data[2:])
    good = ((part.status == OPTIMAL) & (part_violation <= 10 * tol * part_scale)) | (part.status == INFEASIBLE)
    part = dataclasses.replace(part, iterations=part.iterations + result.iterations.index_select(0, rows))
    take = torch.zeros_like(loose).index_copy(0, rows, good)
    result = dataclasses.replace(result, status=torch.where(loose & ~take, NUMERICAL_ERROR, result.status))
    return _per_instance(take, _embed(part, rows, loose.shape[0], result.qp_factor), result)


def _qp_residuals(Q, c, G, hv, A, b, primal_scale=None):
    """The residual function of the QP's KKT conditions and their scales:
    ``(residuals(z, lam, nu) -> (Qz + c + G'lam + A'nu, Gz - hv, Az - b), scale_dual,
    scale_primal)``; ``scale_primal`` is ``primal_scale`` (B,) where given (see
    :func:`_held_to_own_scale`), else 1 + the largest |hv| or |b|."""
    m, p = G.shape[-2], A.shape[-2]

    def residuals(z, lam, nu):
        rd = _mv(Q, z) + c
        if m:
            rd = rd + _mtv(G, lam)
        if p:
            rd = rd + _mtv(A, nu)
        return rd, _mv(G, z) - hv, _mv(A, z) - b

    if primal_scale is None:
        primal_scale = 1.0 + torch.maximum(_inf_norm(hv), _inf_norm(b))
    return residuals, 1.0 + _inf_norm(c), primal_scale


def _constraint_space_qp(factor, Q, c, G, hv, A, b, tol, max_iter, skip, active_set_rounds, pool=None,
                         primal_scale=None):
    residuals, scale_dual, scale_primal = _qp_residuals(Q, c, G, hv, A, b, primal_scale)
    result, whole = _constraint_space_solve(factor, hv, b, scale_dual=scale_dual, scale_primal=scale_primal,
                                            tol=tol, max_iter=max_iter, skip=skip,
                                            active_set_rounds=active_set_rounds, pool=pool)
    if not whole:  # (a batch its active sets solve whole is polished throughout)
        result = _polish(result, factor, hv, b, scale_dual, scale_primal, tol, skip)
    result = _verify(result, residuals, scale_dual, scale_primal, tol)
    settled = result.status == OPTIMAL
    if result.polished is not None and not whole:
        settled = settled & result.polished
    if bool((settled if skip is None else settled | skip).all()):
        return result  # the common case: every instance an exact, verified active-set solution
    result = _refine(result, factor, residuals, hv, b, scale_dual, scale_primal, tol, skip)
    result = _certify_infeasible(result, G, hv, A, b, skip)
    return _general_for_failures(result, Q, c, G, hv, A, b, tol, max_iter, skip, primal_scale)


def _far_bound(dtype) -> float:
    """The bound beyond which a row scaled to a largest entry of 1 is first left out of a
    general-loop solve (:func:`_general_qp`): 1 / sqrt(eps) of the dtype, 6.7e7 in
    float64 and 2896 in float32."""
    return torch.finfo(dtype).eps ** -0.5


def _general_qp(Q, c, G, hv, A, b, tol, max_iter, skip, primal_scale=None):
    """Any convex QP or LP (Q PSD, possibly singular), by the general loop with the
    n-space reduction, and the polish of :func:`_polish_kkt`.

    Rows whose bound is far beyond their entries (``x <= 1e20`` meant as no limit) are
    first left out, and held to afterwards. With them in, the loop's slacks and
    complementarity started at the far bound's size and had to come down from there,
    and its residuals carried the bound's rounding (1e20 times eps is 1e4): 59-64 of 64
    LPs with one row bounded by 1e15 to 1e25 ended ``numerical_error``. A problem
    without some of its rows is a relaxation: its solution solves the whole problem
    where it meets the rows left out (their multipliers 0), and where it has no
    feasible point, neither has the whole problem. Other instances (one that violates
    a far row, or unbounded without it) are solved again with every row. (A bound of
    inf is not far: an instance with one fails, and the layer sets it aside as bad
    input.)"""
    far = hv > _far_bound(hv.dtype)
    if not bool(far.any()):
        return _general_loop_qp(Q, c, G, hv, A, b, tol, max_iter, skip, primal_scale)
    far = far & (hv < math.inf)
    # a zero row bounded by 1 holds everywhere, with a slack of 1 the loop keeps easily
    relaxed = _general_loop_qp(Q, c, G.masked_fill(far.unsqueeze(-1), 0.0), hv.masked_fill(far, 1.0), A, b,
                               tol, max_iter, skip, primal_scale)
    # a far row must hold clearly (by sqrt(eps) of its bound), not within the
    # tolerance: one the relaxed point reaches binds, and its multiplier is not 0
    # (x <= 1e8 met by x = 1e8 + 0.3, within 1e-9 relative, came back optimal, with
    # that row's gradients on another row)
    slack = hv - _mv(G, relaxed.z)
    held = (~far | (slack > _far_bound(hv.dtype) ** -1 * hv)).all(-1)
    relaxed = dataclasses.replace(relaxed, s=torch.where(far, slack, relaxed.s), lam=relaxed.lam.masked_fill(far, 0.0))
    done = ((relaxed.status == OPTIMAL) & held) | (relaxed.status == INFEASIBLE)
    if skip is not None:
        done = done | skip
    if bool(done.all()):
        return relaxed
    rows = (~done).nonzero().squeeze(-1)
    part = _general_loop_qp(*(t.index_select(0, rows) for t in (Q, c, G, hv, A, b)), tol, max_iter, None,
                            None if primal_scale is None else primal_scale.index_select(0, rows))
    part = dataclasses.replace(part, iterations=part.iterations + relaxed.iterations.index_select(0, rows))
    return _per_instance(~done, _embed(part, rows, done.shape[0], None), relaxed)


def _general_loop_qp(Q, c, G, hv, A, b, tol, max_iter, skip, primal_scale=None):
    """:func:`_general_qp` with every row in the loop."""
    B, m, p = Q.shape[0], G.shape[-2], A.shape[-2]
    original_skip = skip
    residuals, scale_dual, scale_primal = _qp_residuals(Q, c, G, hv, A, b, primal_scale)

    def oracle_of(Q, c, G, hv, A, b):
        residuals = _qp_residuals(Q, c, G, hv, A, b)[0]

        def derivatives(z, lam, nu):
            rd, g, h = residuals(z, lam, nu)
            return rd, g, h, G, A, Q
        return derivatives, residuals

    def select(rows):  # (the loop drops finished instances of a large batch)
        return oracle_of(*(_rows_of(t, rows) for t in (Q, c, G, hv, A, b)))

    derivatives, residuals = oracle_of(Q, c, G, hv, A, b)

    direct = None
    if not m and p:
        # an equality QP is one saddle-point solve, by the polish's kernel, which keeps
        # a singular Q's free directions to the rows that fix them; the loop's reduction
        # regularizes Q there instead, and a variable only the equalities fix (x == B y
        # with y in no objective) took 100 iterations and ended max_iter, 1e-2 off
        direct = _polish_kkt(_unsolved(c, p, skip), Q, c, G, hv, A, b, residuals, scale_dual, scale_primal,
                             tol, skip)
        done = direct.polished if skip is None else direct.polished | skip
        if bool(done.all()):
            return direct
        skip = done  # (the loop takes the others)

    # start: minimize z'Qz/2 + c'z + |Gz - hv|^2/2 s.t. Az = b, then push s, lam inside
    ones = Q.new_ones(B, m)
    kkt = ReducedKKT(Q, G, A, ones)
    r1 = -c + _mtv(G, hv) if m else -c
    z0, _ = kkt.solve(r1, b)
    s0 = (hv - _mv(G, z0)).clamp(min=1.0) if m else ones
    skip = kkt.failed if skip is None else (skip | kkt.failed)
    result = primal_dual(
        Oracle(derivatives, residuals, linear=True, select=select), z0, s0, ones, Q.new_zeros(B, p),
        scale_dual=scale_dual, scale_primal=scale_primal, tol=tol, max_iter=max_iter, skip=skip,
        stop_collapsed=retries_in_float64(c),
    )
    if m:
        result = _polish_kkt(result, Q, c, G, hv, A, b, residuals, scale_dual, scale_primal, tol, skip)
    if direct is not None:
        result = _per_instance(direct.polished, direct, result)
        skip = original_skip
    result = _certify_infeasible(result, G, hv, A, b, skip)
    return _in_float64_for_failures(result, Q, c, G, hv, A, b, tol, max_iter, skip, primal_scale)


def _unsolved(c, p, skip) -> InteriorPointResult:
    """A result of no iterations for an equality QP (B instances, p rows), at z = 0."""
    B = c.shape[0]
    status, _ = _start_status(B, skip, c.device)
    empty, inf = c.new_zeros(B, 0), c.new_full((B,), math.inf)
    return InteriorPointResult(c.new_zeros(c.shape), empty, empty, c.new_zeros(B, p), status,
                               torch.zeros(B, dtype=torch.int64, device=c.device), inf, inf, c.new_zeros(B),
                               polished=torch.zeros(B, dtype=torch.bool, device=c.device))


def retries_in_float64(x) -> bool:
    """Whether instances of x's dtype that fail for want of precision are solved again
    in float64: float32, on any device but MPS (which has no float64)."""
    return x.dtype == torch.float32 and x.device.type != "mps"


def wanting_precision(result, tol_dual, skip):
    """The instances of ``result`` that failed for want of precision, as a mask (B,) and
    their indices: ``numerical_error``, or ``max_iter`` with complementarity within
    ``tol_dual`` (B,) or a number (a ``max_iter`` short of it is the iteration limit at
    work); not those ``skip`` (B,) bool or None marks."""
    stalled = (result.status == MAX_ITER) & (result.complementarity <= tol_dual)
    left = (result.status == NUMERICAL_ERROR) | stalled
    if skip is not None:
        left = left & ~skip
    return left, left.nonzero().squeeze(-1)


def _in_float64_for_failures(result, Q, c, G, hv, A, b, tol, max_iter, skip, primal_scale=None):
    """Float32 instances the general loop could not finish for want of precision get a
    second solve in float64, on their rows alone; where that ends optimal (its point,
    rounded to float32, verified against the float32 data), infeasible or unbounded (of
    the same data: float32 numbers are float64 ones) it replaces theirs, iterations
    counted together. (Float32 LPs never reached ``unbounded`` on their own: min x s.t.
    x <= 1 ended ``numerical_error``.)

    Want of precision: ``numerical_error``, or ``max_iter`` with complementarity
    within the tolerance while the other residuals are not. Of 64 float32 LPs with 50
    variables, 100 rows and a box, 1-3 ended so (complementarity 1e-10 of the tolerance,
    stationarity 5-8 times it); in float64 each solves in 11-13 iterations, and its
    active set, factored in float32, meets the tolerance 30x over. A ``max_iter`` with
    complementarity still above the tolerance is the iteration limit at work, and is
    left to the caller's choice.

    Also solved again: optimal instances the polish left as loose iterates (an LP's
    active set not found at float32's tolerance). Their residuals met the tolerance,
    but 1-6 of 32 random float32 LPs (20 to 50 variables) ended so, up to 0.26 from
    HiGHS' vertex and their objectives up to 1.7e-4 above it; in float64 their polish
    finds the vertex (within 7e-6 of HiGHS'), for a second solve of 3-19 % of the
    instances."""
    if not retries_in_float64(c):
        return result
    left, rows = wanting_precision(result, tol * (1.0 + _inf_norm(c)), skip)
    if result.polished is not None:
        loose = (result.status == OPTIMAL) & ~result.polished
        if skip is not None:
            loose = loose & ~skip
        if bool(loose.any()):
            left = left | loose
            rows = left.nonzero().squeeze(-1)
    if not rows.numel():
        return result
    data = [t.index_select(0, rows) for t in (Q, c, G, hv, A, b)]
    scale = None if primal_scale is None else primal_scale.index_select(0, rows)
    # (at float64's tolerance: its polish then finds the exact solution of the active set,
    # where at float32's it may stop at an iterate as loose as that tolerance allows)
    wide = _general_qp(*(t.double() for t in data), min(tol, default_tol(torch.float64)), max_iter, None,
                       None if scale is None else scale.double())
    part = dataclasses.replace(wide, **{
        f.name: getattr(wide, f.name).to(c.dtype) for f in dataclasses.fields(wide)
        if isinstance(getattr(wide, f.name), torch.Tensor) and getattr(wide, f.name).is_floating_point()})
    residuals, scale_dual, scale_primal = _qp_residuals(*data, scale)
    part = _verify(part, residuals, scale_dual, scale_primal, tol)
    part = dataclasses.replace(part, iterations=part.iterations + result.iterations.index_select(0, rows))
    ok = (part.status == OPTIMAL) | (part.status == INFEASIBLE) | (part.status == UNBOUNDED)
    take = torch.zeros_like(left).index_copy(0, rows, ok)
    return _per_instance(take, _embed(part, rows, left.shape[0], result.qp_factor), result)


def _rows_of(t, rows):
    """The instances ``rows`` of t (B, ...); one expanded over the batch (shared data)
    stays a view."""
    if t.shape[0] > 1 and t.stride(0) == 0:
        return t[:1].expand((rows.numel(),) + t.shape[1:])
    return t.index_select(0, rows)


def _general_for_failures(result, Q, c, G, hv, A, b, tol, max_iter, skip, primal_scale=None):
    """Instances the constraint-space path ended in numerical_error (a Q positive
    definite but near singular: its factor's solves carry the rounding) get a second
    solve by the general loop, on their rows alone; where that ends optimal or
    infeasible it replaces theirs. (The batch takes the constraint-space path only
    when every instance's Q is safely definite, so without this an instance's status
    depended on the others in its batch.)"""
    left = result.status == NUMERICAL_ERROR
    if skip is not None:
        left = left & ~skip
    rows = left.nonzero().squeeze(-1)
    if not rows.numel():
        return result
    part = _general_qp(*(t.index_select(0, rows) for t in (Q, c, G, hv, A, b)), tol, max_iter, None,
                       None if primal_scale is None else primal_scale.index_select(0, rows))
    ok = (part.status == OPTIMAL) | (part.status == INFEASIBLE)
    take = torch.zeros_like(left).index_copy(0, rows, ok)
    # (not polished in the constraint-space sense: the backward factors W + D for them)
    part = dataclasses.replace(part, polished=torch.zeros_like(ok), active_set=None, active_factor=None,
                               active_order=None, active_set_rounds=None, qp_factor=None)
    return _per_instance(take, _embed(part, rows, left.shape[0], result.qp_factor), result)


def _polish_kkt(result, Q, c, G, hv, A, b, residuals, scale_dual, scale_primal, tol, skip):
    """The general loop's :func:`_polish`: the equality QP of the active set each
    iterate suggests (lam > s; where that fails and holds more than n - p constraints,
    :func:`_iterate_guess`), by the saddle-point kernel of the backward pass
    (:func:`_saddle_solve`: the loop has no constraint-space factor, and Q may be
    singular), with up to _POLISH_ROUNDS - 1 corrections (violated constraints added,
    negative multipliers dropped), kept where it is a KKT point within ``tol`` by its
    true residuals.

    Along directions where Q is singular an interior-point iterate converges only as
    its complementarity does: with Q of one to three zero eigenvalues and a box, the
    iterates at the default tol were up to 6e-4 from the solution."""
    todo = result.status != INFEASIBLE
    if skip is not None:
        todo = todo & ~skip
    B, n = c.shape
    m, p = G.shape[-2], A.shape[-2]
    tol_d, tol_p = tol * scale_dual, tol * scale_primal
    no_sigma = c.new_zeros(B, 0)

    def solve(guess):
        # rows: the active ones of G (zero rows elsewhere, where -1 * lam_i = 0) and A
        a = guess.to(c.dtype)
        rows = torch.cat([G * a.unsqueeze(-1), A], -2)
        diag = torch.cat([1.0 - a, c.new_zeros(B, p)], -1)
        z, y, failed = _saddle_solve(Q, G[:, :0], no_sigma, rows, diag, -c, torch.cat([a * hv, b], -1))
        lam, nu = y[:, :m] * a, y[:, m:]
        rd, g, h = residuals(z, lam, nu)
        return z, lam, nu, rd, g, h, ~failed

    for capped in (False, True):
        if capped:
            todo = todo & ~result.polished & ((result.lam > result.s).sum(-1) > n - p)
        if not bool(todo.any()):
            return result
        guess = _iterate_guess(result.s, result.lam, n - p) if capped else result.lam > result.s
        for k in range(_POLISH_ROUNDS):
            z, lam, nu, rd, g, h, factored = solve(guess)
            changes = torch.where(guess, lam < -tol_d[:, None], g > tol_p[:, None]) & todo[:, None]
            if k == _POLISH_ROUNDS - 1 or not bool(changes.any()):
                break
            guess = guess ^ changes
        take = todo & factored & (lam >= -tol_d[:, None]).all(-1)
        s, lam = _exact_point(guess, lam, g)
        rd_n, rp_n = _inf_norm(rd), torch.maximum(_inf_norm(g + s), _inf_norm(h))
        take = take & (rd_n <= tol_d) & (rp_n <= tol_p)
        polished = dataclasses.replace(
            result, z=z, s=s, lam=lam, nu=nu,
            status=torch.full_like(result.status, OPTIMAL), primal_residual=rp_n, dual_residual=rd_n,
            complementarity=torch.zeros_like(rd_n), polished=take)
        result = _per_instance(take, polished, result)
    return result


def _verify(result, residuals, scale_dual, scale_primal, tol):
    """Recompute the true residuals of the final points, which the constraint-space loop
    only tracked as a scale factor and the active-set solutions only checked in
    constraint space.

    The tracking is exact for exact Newton solves; when the solves degrade (duals
    running off to infinity on an infeasible instance) it is not, so a claimed optimum
    whose true residuals miss the tolerance (with a margin for rounding) is demoted
    and left to the infeasibility certificate."""
    rd, g, h = residuals(result.z, result.lam, result.nu)
    rd_n = _inf_norm(rd)
    rp_n = torch.maximum(_inf_norm(g + result.s), _inf_norm(h))
    kept = (result.status != OPTIMAL) | ((rd_n <= 10 * tol * scale_dual) & (rp_n <= 10 * tol * scale_primal))
    status = torch.where(kept, result.status, NUMERICAL_ERROR)
    return dataclasses.replace(result, status=status, primal_residual=rp_n, dual_residual=rd_n)


def _refine(result, f, residuals, hv, b, scale_dual, scale_primal, tol, skip):
    """Instances that :func:`_verify` found short of the tolerance (and optimal ones
    :func:`_polish` could not polish) get the exact solution of their active set (lam
    > s of their iterate, where they have none), one step of iterative refinement
    against their true residuals, and a second verification; those that pass it are
    optimal, the others are left as they were (their iterates feed the infeasibility
    certificate).

    The active set's solve runs in constraint space, through Q^-1: with Q's eigenvalues
    spread over 1e7 or more, or an active set with as many constraints as free
    dimensions and degenerate ones among them, rounding left residuals above the
    tolerance on the right active set (numerical_error, and the polish rejected as
    not a KKT point in constraint space); one step with the same factors removes
    that."""
    failed = result.status == NUMERICAL_ERROR
    if result.polished is not None:  # the iterates _polish could not replace, in float32 say
        failed = failed | ((result.status == OPTIMAL) & ~result.polished)
    if skip is not None:
        failed = failed & ~skip
    if not bool(failed.any()):
        return result
    candidate = result
    fresh = failed if result.polished is None else failed & ~result.polished
    if bool(fresh.any()):
        rows, _, sol = _suggested_solution(result, f, fresh, hv, b, scale_dual, scale_primal, tol)
        # (its check in constraint space is what rounding spoils here: signs suffice)
        take = fresh & torch.zeros_like(fresh).index_copy(0, rows, sol.ok)
        candidate = _take_polished(result, f, take, rows, sol)
    if candidate.polished is None or candidate.active_factor is None:
        return result
    retry = failed & candidate.polished
    active = candidate.active_set
    a = active.to(candidate.z.dtype)
    r_d, g, r_eq = residuals(candidate.z, candidate.lam, candidate.nu)
    dz, dlam, dnu = f.correction(r_d, a * g, r_eq, a, candidate.active_factor, candidate.active_order)
    z = candidate.z + dz
    s, lam = _exact_point(active, candidate.lam + a * dlam, _mv(f.G, z) - hv)
    refined = dataclasses.replace(candidate, z=z, s=s, lam=lam, nu=candidate.nu + dnu,
                                  status=torch.where(retry, OPTIMAL, candidate.status))
    refined = _verify(refined, residuals, scale_dual, scale_primal, tol)
    passed = retry & (refined.status == OPTIMAL)
    if not bool(passed.any()):
        return result
    return _per_instance(passed, refined, result)


def _per_instance(mask, new: InteriorPointResult, old: InteriorPointResult) -> InteriorPointResult:
    """``new`` where ``mask`` (B,), ``old`` elsewhere, field by field (a field None in
    ``old`` and not in ``new`` reads as zeros there)."""
    fields, every = {}, torch.arange(mask.shape[0], device=mask.device)
    for field in dataclasses.fields(InteriorPointResult):
        x, y = getattr(new, field.name), getattr(old, field.name)
        if field.name == "active_order":  # (None: all rows in order)
            fields[field.name] = _put_order(y, mask, every, x)
            continue
        if field.name == "active_factor" and x is not None:  # (of different sizes)
            fields[field.name] = _put_factor(torch.zeros_like(x) if y is None else y, mask, every, x)
            continue
        if isinstance(x, torch.Tensor):
            y = torch.zeros_like(x) if y is None else y
            fields[field.name] = torch.where(mask.reshape(mask.shape + (1,) * (x.dim() - 1)), x, y)
        else:
            fields[field.name] = y if y is not None else x
    return InteriorPointResult(**fields)


def _certify_infeasible(result, G, hv, A, b, skip):
    """Mark unsolved instances INFEASIBLE when their duals are a Farkas certificate:
    lam >= 0 with G'lam + A'nu ~ 0 and hv'lam + b'nu < 0 (then no z has Gz <= hv, Az = b).
    An interior point on an infeasible problem drives (lam, nu) towards such a ray.

    With r = G'lam + A'nu and gap = hv'lam + b'nu, every feasible z has r'z <= gap, so
    none lies within |z|_1 < -gap / |r|_inf: the certificate counts when that radius is
    beyond _FARKAS_RADIUS times the iterate's size. (A residual small only relative to
    the largest entry of G let a stalled solve of a feasible problem whose rows span ten
    decades pass with a radius below 1; true certificates here had 1e11.)"""
    unsolved = result.status != OPTIMAL
    if skip is not None:
        unsolved = unsolved & ~skip
    if not bool(unsolved.any()):
        return result
    lam, nu = result.lam, result.nu
    size = lam.abs().sum(-1) + nu.abs().sum(-1)
    ray = _mtv(G, lam) + (_mtv(A, nu) if nu.shape[-1] else 0)
    gap = (hv * lam).sum(-1) + (b * nu).sum(-1)
    radius = _FARKAS_RADIUS.get(lam.dtype, 1e1) * (1.0 + _inf_norm(result.z))
    certified = unsolved & (gap < -1e-9 * size) & (_inf_norm(ray) * radius <= -gap)
    status = torch.where(certified, torch.full_like(result.status, INFEASIBLE), result.status)
    return dataclasses.replace(result, status=status)


@dataclass
class _Start:
    """The constraint-space start (B, ...): the Newton system with D = I, i.e.
    min z'Qz/2 + c'z + |Gz - hv|^2/2 s.t. Az = b, has the multipliers y of the
    inequalities (those of the equalities follow, :meth:`QPFactor.equality_multipliers`)
    and the slack ``s_ls = hv - G z0``; s and lam are CVXOPT's shift of that slack and of
    its multiplier estimate (-slack) just inside the positive orthant. ``failed``: the
    factorization of W + I failed."""

    y: torch.Tensor
    s_ls: torch.Tensor
    s: torch.Tensor
    lam: torch.Tensor
    failed: torch.Tensor


def _least_squares_start(f: "QPFactor", g0) -> _Start:
    """From ``g0`` of :meth:`QPFactor.active_set_rhs`: y = (W + I)^-1 g0, and G z0 - hv
    is g0 - W y (the same identity as an active set's constraint values)."""
    W1 = f.W.clone()
    W1.diagonal(dim1=-2, dim2=-1).add_(f.unit_delta)
    L1, info = torch.linalg.cholesky_ex(W1, out=(W1, torch.empty_like(f.delta, dtype=torch.int32)))
    y = _chol_solve(g0.unsqueeze(-1), L1).squeeze(-1)
    s_ls = _mv(f.W, y) - g0
    s = s_ls + torch.rsub(s_ls.amin(-1, keepdim=True), 1.0).clamp_(min=0.0)
    lam = -s_ls + (1.0 + s_ls.amax(-1, keepdim=True)).clamp(min=0.0)
    return _Start(y, s_ls, s, lam, info > 0)


def _constraint_space_solve(f: "QPFactor", hv, b, *, scale_dual, scale_primal, tol, max_iter, skip,
                            active_set_rounds, pool=None):
    """A QP with positive definite Q: the active-set iteration first (``active_set_rounds``
    at most), from the constraints the minimizer under the equalities alone violates (on
    small blocks, from a guess by pivots; on larger ones where the iteration would crawl
    from the former, from the pivots' guess next), then the interior point
    (:func:`_constraint_space_ipm`) for the instances it leaves, on those alone when they
    are few (the others' exact solutions are kept). Returns the result and whether the
    active sets solved the whole batch (then every instance is polished)."""
    B, device = hv.shape[0], hv.device
    g0 = f.active_set_rhs(hv, b)
    options = dict(tol=tol, max_iter=max_iter)
    if not active_set_rounds:
        return _interior_point(f, g0, hv, b, scale_dual, scale_primal, skip, **options), False
    # the first guess: on small blocks by pivots (_pivoted_active_set), else the
    # constraints the minimizer under the equalities violates, which took 0-1.5 rounds
    # fewer on random QPs than the interior point's least-squares start (lam > s there)
    # and needs no factorization of its own
    tol_p, tol_d = tol * scale_primal[:, None], tol * scale_dual[:, None]
    if _pivots_first(*g0.shape):
        guess, pivots = _pivoted_active_set(f, g0, tol_p, tol_d, pool)
    else:
        guess, pivots = g0 > tol_p, None
    sol = (None if guess is None  # the pivots gave up on the batch (_pivots_blocked)
           else _active_set_solution(f, hv, b, guess, tol, scale_dual, scale_primal, rounds=active_set_rounds, g0=g0))
    crawled = 0
    if sol is None and pivots is None and _pivots_after_crawl(*g0.shape, f.n - f.p):
        # from the rough guess the iteration would crawl (_crawls: many rows per free
        # dimension, solutions at vertices), and the batch is not too small nor its blocks
        # too large for pivots: the guess by pivots, whose exchange steps reach vertices
        crawled = 1
        guess, pivots = _pivoted_active_set(f, g0, tol_p, tol_d, pool)
        sol = (None if guess is None
               else _active_set_solution(f, hv, b, guess, tol, scale_dual, scale_primal, rounds=active_set_rounds, g0=g0))
    if sol is None:  # that, or it would crawl: the interior point, after the solves if any
        result = _interior_point(f, g0, hv, b, scale_dual, scale_primal, skip, **options)
        solves = torch.full((B,), crawled + (guess is not None), dtype=torch.int64, device=device)
        return dataclasses.replace(result, active_set_rounds=solves, active_set_pivots=pivots), False
    if crawled:
        sol = dataclasses.replace(sol, solves=sol.solves + crawled)
    done = sol.kkt if skip is None else sol.kkt & ~skip
    left = (~done).nonzero().squeeze(-1)  # the host sync: skipped instances stay with the loop
    if not left.numel():  # the common case: every instance is its active set's solution
        zero = torch.zeros_like(scale_dual)
        status = torch.full((B,), OPTIMAL, dtype=torch.int64, device=device)
        return InteriorPointResult(
            f.from_half(f.qc_half, sol.lam, sol.nu), sol.s, sol.lam, sol.nu, status, torch.zeros_like(status),
            sol.rp_n, zero, zero, qp_factor=f, polished=done, active_set=sol.active, active_factor=sol.L,
            active_order=sol.order, active_set_rounds=sol.solves, active_set_pivots=pivots), True
    if _whole_batch(f, left.numel()):
        # the loop on the whole batch with the solved instances retired from the start
        result = _interior_point(f, g0, hv, b, scale_dual, scale_primal, done if skip is None else skip | done,
                                 **options)
    else:
        rows = (g0, hv, b, scale_dual, scale_primal, skip)
        part = _interior_point(f.select(left, None), *(None if t is None else t.index_select(0, left) for t in rows),
                               **options)
        result = _embed(part, left, B, f)
    if left.numel() < B:  # (none solved: nothing to take)
        result = _take_polished(result, f, done, torch.arange(B, device=device), sol)
    return dataclasses.replace(result, active_set_rounds=sol.solves, active_set_pivots=pivots), False


def _interior_point(f, g0, hv, b, scale_dual, scale_primal, skip, *, tol, max_iter):
    """:func:`_constraint_space_ipm` from the least-squares start; instances whose start
    fails to factor are skipped too."""
    start = _least_squares_start(f, g0)
    skip = start.failed if skip is None else (skip | start.failed)
    return _constraint_space_ipm(f, start, hv, b, scale_dual=scale_dual, scale_primal=scale_primal, skip=skip,
                                 tol=tol, max_iter=max_iter)


def _embed(part: InteriorPointResult, rows, B, f) -> InteriorPointResult:
    """The result of the instances ``rows`` as a result of the whole batch of ``f``:
    zeros elsewhere (the caller fills those instances)."""
    def full(x):
        return x if x is None else x.new_zeros((B,) + x.shape[1:]).index_copy_(0, rows, x)
    fields = {k.name: full(getattr(part, k.name)) for k in dataclasses.fields(part) if k.name != "qp_factor"}
    return InteriorPointResult(**fields, qp_factor=f)


def _constraint_space_ipm(f: "QPFactor", start: _Start, hv, b, *, scale_dual, scale_primal, tol, max_iter, skip):
    """Mehrotra's method for a QP with positive definite Q, entirely in constraint space,
    from ``start`` (:func:`_least_squares_start`).

    The Newton matrix ``[[Q, G', A'], [G, -D, 0], [A, 0, 0]]`` (``D = s/lam``) reduces to
    ``(W + D) dlam = ...`` with the constant blocks of :class:`QPFactor`. Because the
    problem is linear, a Newton step of length alpha shrinks the residuals
    ``rd = Qz + c + G'lam + A'nu``, ``rp = Gz - hv + s``, ``re = Az - b`` exactly by
    ``(1 - alpha)``: they are tracked as one scale factor per instance, z is accumulated
    as coefficients of fixed vectors, and an iteration touches only (m, m), (m, p) and
    (p, p) blocks. The n-space is visited twice, at the start and at the end.
    """
    Q, G, A = f.Q, f.G, f.A
    B, m, p = Q.shape[0], G.shape[-2], A.shape[-2]
    dtype, device = Q.dtype, Q.device

    # one factor buffer for every iteration, factored in place: fresh (B, m, m) tensors
    # per iteration cost page faults that showed as much as the factorization itself.
    # W_reg = W + delta I is symmetric, so its contiguous copy into the buffer's
    # column-major (LAPACK) layout is W_reg itself
    W_reg = f.W.clone()
    W_reg.diagonal(dim1=-2, dim2=-1).add_(f.delta[:, None])
    L_store = torch.empty_like(f.W)
    L_buf = L_store.transpose(-1, -2)
    info_buf = torch.empty(B, dtype=torch.int32, device=device)

    def factor_w(D):
        L_store.copy_(W_reg).diagonal(dim1=-2, dim2=-1).add_(D)
        L, info = torch.linalg.cholesky_ex(L_buf, out=(L_buf, info_buf))
        # a failed instance keeps its partial factor: batched LAPACK treats instances
        # independently, so only that instance's (retired) values go bad
        return L, info > 0

    nu, _ = f.equality_multipliers(start.y, b)
    s, lam = start.s, start.lam
    z0 = f.from_half(f.qc_half, start.y, nu)

    # residuals at the start; q1 = -Q^-1 rd = -Q^-1 (c + G'lam + A'nu) - z0
    q1 = f.from_half(f.qc_half, lam, nu) - z0
    rd0_n = _inf_norm(_mv(Q, q1))  # |rd| = |Q q1|
    rp0 = s - start.s_ls
    re0 = _mv(A, z0) - b
    u = _mv(G, q1) + rp0           # G q1 + rp: the constraint-space right-hand side
    v_eq = _mv(A, q1) + re0 if p else re0
    u_schur = u - _mtv(f.T, v_eq) if p else u
    rp0_n = torch.maximum(_inf_norm(rp0), _inf_norm(re0))

    status, active = _start_status(B, skip, device)
    iterations = torch.zeros(B, dtype=torch.int64, device=device)
    shrink = torch.ones(B, dtype=dtype, device=device)  # residual_k = shrink_k * residual_0
    acc_q = torch.zeros(B, dtype=dtype, device=device)
    v = torch.cat([s, lam], -1)  # [s, lam]: one tensor, so steps and bounds are one op each
    v_start = v
    tol_d, tol_p = tol * scale_dual, tol * scale_primal
    # the residuals are shrink * their start: both are within tol once shrink <= this
    shrink_tol = torch.minimum(tol_d / rd0_n, tol_p / rp0_n)
    limit_lam = _DUAL_DIVERGENCE * scale_dual
    stalled = torch.zeros_like(active)
    # crossover: the complementarity at which each instance next tries its active set
    crossover = torch.full((B,), max(_CROSSOVER, tol), dtype=dtype, device=device) * scale_dual
    polished = torch.zeros_like(active)
    all_polished = False
    exact = ActiveSetSolution(s, lam, nu, rp0_n, polished, polished, lam > s, f.W,  # overwritten where polished
                              None, torch.zeros_like(iterations))
    for it in range(max_iter + 1):
        s, lam = v[:, :m], v[:, m:]
        sl = s * lam
        mu = sl.mean(-1)
        converged = (shrink <= shrink_tol) & (mu <= tol_d)
        # NaN anywhere in s or lam shows in mu (mu >= 0, so "not below inf" is NaN or
        # inf); the residuals are scaled copies
        # duals running away: stop here; the Farkas check after the loop decides
        # whether the instance is infeasible
        broken = (mu < math.inf).logical_not_() | stalled
        diverged = lam.amax(-1) > limit_lam
        ending = active & (broken | converged | diverged)
        # every iteration factors the whole batch, so the crossover waits until all
        # unfinished instances are ready and then tries them together
        attempt = active & (mu <= crossover)  # a subset of active: all are ready when the counts agree
        n_active, n_attempt, n_ending = torch.stack([active, attempt, ending]).sum(-1).tolist()  # the host sync
        if n_ending:  # most iterations end no instance and skip the classification's ~10 ops
            status, active = _classify(status, active, (
                (broken, NUMERICAL_ERROR), (converged, OPTIMAL), (diverged, NUMERICAL_ERROR)))
            attempt = attempt & active
            n_active, n_attempt = torch.stack([active, attempt]).sum(-1).tolist()
        if n_active and n_attempt == n_active:
            # The active set is usually settled long before mu reaches tol: an instance
            # whose active-set solution is a KKT point within tol is solved, exactly.
            rows, sub, h_r, b_r, sd_r, sp_r, lam_r, s_r = _select_rows(
                f, attempt, hv, b, scale_dual, scale_primal, lam, s)
            sol = _active_set_solution(sub, h_r, b_r, lam_r > s_r, tol, sd_r, sp_r)
            done = attempt & torch.zeros_like(active).index_copy(0, rows, sol.kkt)
            exact = _scatter(exact, done, rows, sol)
            polished = polished | done
            status = torch.where(done, OPTIMAL, status)
            active = active & ~done
            crossover = torch.where(attempt, crossover * _CROSSOVER_RETRY, crossover)
            n_active, all_polished = torch.stack([active.any(), polished.all()]).tolist()
        if it == max_iter or not n_active:
            break
        D = s / lam
        L, failed = factor_w(D)
        r_base = shrink[:, None] * u_schur

        def direction(rc):
            # (W + D) dlam = shrink (u - T'v) - rc/lam; then the complementarity row gives
            # ds = -(rc + s dlam)/lam, which equals -rp - G dz and stays accurate relative
            # to s on active constraints, where s is tiny
            rc_lam = rc / lam
            dlam = _chol_solve((r_base - rc_lam).unsqueeze(-1), L).squeeze(-1)
            return (torch.cat([torch.addcmul(rc_lam, D, dlam).neg_(), dlam], -1),)

        # a fixed 0.99: the crossover ends the solve, and iterates that went closer to
        # the boundary guessed worse active sets (more corrections, 1.2x the time at
        # (32, 10, 10, 2))
        (dv,), alpha, _ = _predictor_corrector(direction, v, mu, _TO_BOUNDARY_MIN, sl)
        dv = dv.nan_to_num()  # retired instances take a zero step; 0 * nan would not be zero
        # a failed factorization, or rounding that leaves a direction hitting the
        # boundary at once: retire those instances next round rather than spin
        stalled = failed | (alpha < _STALL)
        step = alpha.masked_fill(stalled | ~active, 0.0)
        v = torch.addcmul(v, step[:, None], dv)
        # dz = shrink q1 - Q^-1 (G'dlam + A'dnu) and dnu = K22^-1 (shrink v - K21 dlam) are
        # linear in (shrink, dlam): accumulate those and touch the n-space once at the end
        # (acc_q, shrink and iterations are this loop's own tensors: updated in place)
        acc_q.addcmul_(step, shrink)
        shrink.addcmul_(step, shrink, value=-1.0)
        iterations.add_(step > 0)

    if all_polished:
        # every instance takes its active-set solution: the loop's own iterate is not
        # needed, so its n-space reconstruction below is skipped
        result = InteriorPointResult(None, exact.s, exact.lam, exact.nu, status, iterations, exact.rp_n,
                                     shrink * rd0_n, torch.zeros_like(shrink), qp_factor=f)
        return _take_polished(result, f, polished, torch.arange(B, device=device), exact)
    s, lam = v[:, :m], v[:, m:]
    acc_lam = lam - v_start[:, m:]  # the sum of the steps in lam
    if p:
        acc_nu = _chol_solve(
            (acc_q[:, None] * v_eq - _mtv(f.K12, acc_lam)).unsqueeze(-1), f.L22).squeeze(-1)
        nu = nu + acc_nu
    z = z0 + acc_q[:, None] * q1 + f.from_half(None, acc_lam, acc_nu if p else None)
    result = InteriorPointResult(z, s, lam, nu, status, iterations, shrink * rp0_n, shrink * rd0_n,
                                 (s * lam).sum(-1) / m, qp_factor=f)
    return _take_polished(result, f, polished, torch.arange(B, device=device), exact)


@dataclass
class ActiveSetSolution:
    """The solution of the equality QP of a guessed active set (:func:`_active_set_solution`).

    s, lam (B, m), nu (B, p) with exact zeros kept at eps^2 (see below); z is
    ``f.from_half(f.qc_half, lam, nu)``, stationary by construction. rp_n is the primal
    residual; ``ok`` (B,) a usable solve (factorization succeeded, finite, lam >= -tol);
    ``kkt`` (B,) ``ok`` and primal feasible within the tolerance, i.e. a KKT point.
    """

    s: torch.Tensor
    lam: torch.Tensor
    nu: torch.Tensor
    rp_n: torch.Tensor
    ok: torch.Tensor
    kkt: torch.Tensor
    #: the active set (B, m) and the Cholesky factor of its matrix (B, k, k) on the rows
    #: ``order[:, :k]`` (B, m), or None: on all rows in order (:meth:`QPFactor.solve_active_set`)
    active: torch.Tensor
    L: torch.Tensor
    order: Optional[torch.Tensor]
    #: (B,) int64: the equality-QP solves each instance took (the corrections included)
    solves: torch.Tensor


def _active_set_solution(f, hv, b, active, tol, scale_dual, scale_primal, rounds=None, g0=None):
    """Solve the equality QP where the constraints ``active`` (B, m) hold with equality.

    A guess from an interior-point iterate can be wrong on near-degenerate constraints:
    violated constraints are added and those with negative multipliers dropped, and
    the instances concerned (only those) are solved again: ``rounds`` solves at most
    (default ``_POLISH_ROUNDS``). From a rough guess this is the primal-dual active-set
    method (``ACTIVE_SET_ROUNDS``), and then None where the first solve says it would
    crawl (:func:`_crawls`). ``g0``: :meth:`QPFactor.active_set_rhs`, if the caller
    has it.
    """
    g0 = (f.active_set_rhs(hv, b) if g0 is None else g0).unsqueeze(-2)
    dtype = f.W.dtype
    a = active.to(dtype)
    info = a.new_empty(a.shape[0], dtype=torch.int32)  # every whole-batch round's
    m = active.shape[-1]

    def factored_rows(sets, compacted=False):
        # how many rows each set's matrix is factored on (a host sync). A retry of some
        # instances of a batch factored on its own rows is too, however few they are: the
        # batch's factor would be padded to all m rows (a fresh (B, m, m) tensor)
        if not compacted and (m < _COMPACT_ROWS or sets.shape[0] * m ** 3 < _COMPACT_WORK):
            return None
        return max(int(sets.sum(-1).amax()), 1)

    lam, g, failed, L, order = f.solve_active_set(g0, a, info, factored_rows(active))
    solves = torch.ones_like(failed, dtype=torch.int64)
    tol_p, tol_d = tol * scale_primal[:, None], tol * scale_dual[:, None]
    minus_tol_d = -tol_d
    fewest, stalls = (math.inf, math.inf), 0
    patience = _ACTIVE_SET_PATIENCE_SMALL if f.W.numel() <= _SMALL_BLOCKS else _ACTIVE_SET_PATIENCE
    n_rounds = rounds or _POLISH_ROUNDS
    free = f.n - f.p  # the dimensions the equalities leave
    weights = seen = None  # the sets' fingerprints and those seen, from the first wrong round on
    for k in range(n_rounds - 1):
        # the constraints to switch: active ones with a negative multiplier, inactive
        # ones violated
        changes = torch.where(active, lam < minus_tol_d, g > tol_p)
        per_instance = changes.sum(-1)
        wrong = per_instance > 0
        # the iteration is deterministic in the active set: an instance back at a set it
        # had is in a cycle (of period 4 on a random QP at (32, 10, 10, 2)). Those switch
        # only their worst constraint this round, which leaves the cycle
        # (a set can come back two rounds later at the earliest: compared from k = 2 on)
        if k >= 2:
            fp = torch.mv(a if dtype == torch.float64 else a.double(), weights)
            stuck = (seen == fp[:, None]).any(-1) & wrong  # (NaN, the rounds to come, equals nothing)
            n_changes, n_wrong, n_stuck = torch.stack([per_instance, wrong, stuck]).sum(-1).tolist()
        elif k == 0 and rounds:
            sizes = active.sum(-1)
            n_changes, n_wrong, size, n_crowded = torch.stack(
                [per_instance, wrong, sizes, sizes > free]).sum(-1).tolist()
            if n_wrong and _crawls(n_changes, size, n_crowded, *active.shape, free):
                return None
            n_stuck = 0
        else:
            n_changes, n_wrong, n_stuck = *torch.stack([per_instance, wrong]).sum(-1).tolist(), 0
        if not n_wrong:
            break
        if not k:  # (made here: a first guess that is right, the common case, needs neither)
            weights = _fingerprint_weights(m, active.device)
            seen = torch.full((active.shape[0], n_rounds), math.nan, dtype=torch.float64, device=active.device)
        if k < 2:  # (the fingerprint of a set that is kept is not needed)
            fp = torch.mv(a if dtype == torch.float64 else a.double(), weights)
        seen[:, k] = fp
        if n_stuck:
            score = torch.where(active, lam / minus_tol_d, g / tol_p)
            single = changes & (score >= score.amax(-1, keepdim=True))
            changes = torch.where(stuck[:, None], single, changes)
        # converging, the corrections dwindle round by round (by 30-60 % on random QPs);
        # when for a few rounds neither the wrong instances reach a new low nor the wrong
        # constraints fall a tenth below theirs, the iteration wanders or cycles (too
        # many active constraints for it, or degenerate ones): the caller's interior
        # point takes over
        if n_wrong < fewest[0] or n_changes < 0.9 * fewest[1]:
            fewest, stalls = (min(n_wrong, fewest[0]), min(n_changes, fewest[1])), 0
        else:
            stalls += 1
            if stalls == patience:
                break
        corrected = active ^ changes
        solves.add_(wrong)
        if _whole_batch(f, n_wrong):
            # the right ones solve the same system and get the same solution
            active, a = corrected, corrected.to(dtype)
            lam, g, failed, L, order = f.solve_active_set(g0, a, info, factored_rows(active))
            continue
        rows = wrong.nonzero().squeeze(-1)
        retry = corrected.index_select(0, rows)
        lam_r, g_r, failed_r, L_r, order_r = f.select(rows, f.ACTIVE_SET).solve_active_set(
            g0.index_select(0, rows), retry.to(dtype), size=factored_rows(retry, order is not None))
        if order is not None or order_r is not None:  # (factored on their own rows)
            k = max(L.shape[-1], L_r.shape[-1])
            L, L_r = _pad_factor(L, k), _pad_factor(L_r, k)
            order = _in_order(order, *active.shape, active.device).index_copy(
                0, rows, _in_order(order_r, *retry.shape, retry.device))
        # L is this function's own factor: patched in place, not copied whole
        active, L = active.index_copy(0, rows, retry), L.index_copy_(0, rows, L_r)
        a = active.to(dtype)
        lam, g = lam.index_copy(0, rows, lam_r), g.index_copy(0, rows, g_r)
        failed = failed.index_copy(0, rows, failed_r)
    nu, e = f.equality_multipliers(lam, b)
    rp_n = torch.maximum(g.amax(-1).clamp(min=0.0), _inf_norm(e))  # (the violations' inf-norm)
    # (a NaN or -inf multiplier fails the sign test, a +inf one makes rp_n inf or NaN)
    ok = ~failed & (lam >= minus_tol_d).all(-1) & (rp_n < math.inf)  # (rp_n >= 0 or NaN)
    kkt = ok & (rp_n <= tol_p.squeeze(-1))
    s, lam = _exact_point(active, lam, g)
    return ActiveSetSolution(s, lam, nu, rp_n, ok, kkt, active, L, order, solves)


def _in_order(order, B, m, device):
    """The row order (B, m) of an active-set factor; None (all rows, in order) made
    explicit."""
    return torch.arange(m, device=device).expand(B, m) if order is None else order


def _put_order(old, take, rows, new, whole=False):
    """:func:`_put` for the row orders of active-set factors, None for all rows in order:
    None where both are, else explicit."""
    if whole or (old is None and new is None):
        return new
    m = (new if new is not None else old).shape[-1]
    return _put(_in_order(old, take.shape[0], m, take.device), take, rows,
                _in_order(new, rows.shape[0], m, take.device))


def _exact_point(active, lam, g):
    """(s, lam) of an active set's solution, for its constraint values g = G z - h.

    The point has exact zeros (s on the active set, lam off it). They stay strictly
    positive for the backward, which divides by them, but far below every other scale
    (eps^2), so the implicit derivative is the exact one of the active set rather than
    that of a nearby central-path point."""
    zero = torch.finfo(lam.dtype).eps ** 2
    return torch.where(active, zero, (-g).clamp(min=zero)), torch.where(active, lam.clamp(min=zero), zero)


def _pivots_first(B, m):
    """Whether a batch of B active sets of m constraints is guessed by pivots first."""
    return m <= _PIVOT_ROWS or (m <= _PIVOT_ROWS_BATCHED and B >= _PIVOT_BATCH)


def _pivots_after_crawl(B, m, free):
    """Whether a batch of B active sets of m constraints in ``free`` = n - p dimensions,
    which the iteration would crawl on from its rough guess (:func:`_crawls`), is guessed
    by pivots next rather than handed to the interior point: in batches of _PIVOT_BATCH
    or more, with at least _PIVOT_ROWS_PER_FREE rows per free dimension (a step costs
    ~m^2 per instance and they take ~n - p of them, where an iteration costs ~m^3), up to
    _PIVOT_ROWS_AFTER_CRAWL rows. On random QPs (solve_qp, both ways;
    benchmarks/pivots_after_crawl.py): 0.17-0.78x the time at B = 16-64 with 4-60 rows
    per free dimension and m = 80-400, where pivots without those bounds took 1.07x at
    2.5 rows per free dimension ((16, 30, 75, 0), (16, 200, 500, 10)), 1.31x at 2
    ((32, 40, 70, 5)) and 1.06-1.84x in batches of 2-8, where a step's small ops cost
    more than the interior point's few iterations."""
    return B >= _PIVOT_BATCH and _PIVOT_ROWS_PER_FREE * free <= m <= _PIVOT_ROWS_AFTER_CRAWL


def pivot_kernel(M, k, live):
    """One principal pivot of the tableau M (B, m, m + 1) of a linear complementarity
    problem ``w = M[:, :, :m] z + M[:, :, m]``, in place: row k (B,) of each instance
    exchanges its basic variable with its complement, where ``live`` (B, 1, 1) is 1.0
    (0.0: unchanged). Benchmarks time it as the linear algebra of a pivot."""
    B, m = M.shape[:2]
    kk = k.view(B, 1, 1)
    row = M.gather(1, kk.expand(B, 1, m + 1))
    one = torch.ones_like(live)
    _pivot(M, kk, row, row.gather(2, kk), live, one, -one)


def _pivot(M, kk, row, pivot, live, one, minus_one):
    """:func:`pivot_kernel` for the pivot row (B, 1, m + 1) and element (B, 1, 1) at hand
    (``row`` is overwritten); ``one``, ``minus_one`` (B, 1, 1) hold 1.0 and -1.0.
    Solving row k for the complement and substituting it into the other rows is the
    rank-one update ``M - (c + e_k)(r - e_k)'/p``, c and r the pivot column and row,
    p = M_kk."""
    B, m = M.shape[:2]
    col = M.gather(2, kk.expand(B, m, 1)).scatter_add_(1, kk, one).mul_(live / pivot)
    M.addcmul_(col, row.scatter_add_(2, kk, minus_one), value=-1.0)


def _pivoted_active_set(f, g0, tol_p, tol_d, pool=None):
    """A guess of the active set for :func:`_active_set_solution`, by single principal
    pivots from the empty set (small blocks, :func:`_pivots_first`; larger ones where the
    iteration would crawl from its rough guess, :func:`_pivots_after_crawl`).

    The multipliers of the equality QP solve the linear complementarity problem
    ``w = W lam - g0 >= 0, lam >= 0, w'lam = 0`` (w the slacks, ``-(G z - h)``). Its
    tableau [W + delta I | -g0] (B, m, m + 1), in units of the tolerances (lam / tol_d,
    w / tol_p: a basic variable below -1 is a violation), is pivoted one constraint per
    instance per step, on the basic variable whose violation over the square root of its
    pivot is largest: a negative slack joins the active set, a negative multiplier leaves
    it. On random QPs this took 0.3-0.9 m steps (the batch's slowest instance), where the
    iteration from the constraints ``g0`` violates took 1-19 rounds, each a factorization
    and solve of the whole batch instance by instance; in 14 of 15 batches the guess was
    every instance's active set, and the iteration's first solve checks it (and corrects
    a wrong one from there). A pivot on a constraint nearly dependent on the active ones
    (pivot below sqrt(eps) of its diagonal, or not a number) is never taken.

    Two layouts of the same steps: the whole tableau in one tensor, a step's pivot column
    gathered from it (:func:`_tableau_pivots`: the fewest small ops, for tableaus below
    ``_ROW_PIVOTS_FROM`` entries, where a step costs its ~24 op dispatches), or its rows
    alone with the diagonal and right-hand side apart (:func:`_row_pivots`: the pivot
    column follows from the row by symmetry, and nothing is read with a stride). Where
    single pivots stop at a violated constraint that depends on the active ones, the
    batch starts over with exchange steps (:func:`_exchange_step`); with more than
    _CRAWL_ROWS (n - p) rows, where solutions lie at vertices and that is likely, it
    takes them from the start (on the rows 2 (n - p) and large linear term families of
    qp_families.py, solve_qp 0.83-0.87x the time of starting over).

    At most 2 m + 4 steps (a cycle, which single pivots can fall into, ends there).
    ``tol_p``, ``tol_d`` (B, 1); ``pool``: a :class:`solvers.buffers.BufferPool` for the
    tableau, or None. Returns the guess (B, m), None where the pivots gave up on the batch
    (:func:`_pivots_blocked`), and the pivots each instance took (B,) int64."""
    B, m = g0.shape
    units = tol_d / tol_p
    if m > _CRAWL_ROWS * (f.n - f.p):
        return _row_pivots(f, g0, tol_p, units, pool, exchange=True)
    if B * m * m < _ROW_PIVOTS_FROM:
        return _tableau_pivots(f, g0, tol_p, units)
    return _row_pivots(f, g0, tol_p, units, pool)


def _dependent_pivots(diagonal):
    """The pivots below which a constraint is nearly dependent on the active ones, for
    the tableau's diagonal at the start: sqrt(eps) W_kk (a multiplier leaving has pivot
    1/(W_AA^-1)_kk >= 1/W_kk: the rule holds it back only where W_kk >> 1, and the
    iteration finishes that instance)."""
    return diagonal * math.sqrt(torch.finfo(diagonal.dtype).eps)


def _tableau_pivots(f, g0, tol_p, units):
    """:func:`_pivoted_active_set` on the tableau [W + delta I | -g0] (B, m, m + 1) in one
    tensor, for small ones (:func:`pivot_kernel`)."""
    B, m = g0.shape
    dtype, device = g0.dtype, g0.device
    M = torch.cat([f.W * units.unsqueeze(-1), g0.div(tol_p).neg_().unsqueeze(-1)], -1)
    diagonal = M.diagonal(dim1=-2, dim2=-1)
    diagonal.add_(f.delta[:, None] * units)
    dependent = _dependent_pivots(diagonal).unsqueeze(1)
    flips = torch.zeros(B, 1, m + 1, dtype=dtype, device=device)  # pivots per row
    rhs = M[:, :, m]
    # the step's two flags side by side, so that one sum counts both (no cat per step)
    flags = torch.empty(B, 1, 2, dtype=dtype, device=device)
    live, violated = flags[:, :, :1], flags[:, :, 1:]
    one = torch.ones(B, 1, 1, dtype=dtype, device=device)
    minus_one = -one
    for _ in range(2 * m + 4):
        # the most violated basic variable relative to the square root of its pivot (the
        # pivot that gains the dual objective the most): 10-20 % fewer steps than the
        # most violated one alone on random QPs
        kk = _argmin_rows(diagonal.rsqrt().mul_(rhs)).view(B, 1, 1)
        row = M.gather(1, kk.expand(B, 1, m + 1))
        pivot = row.gather(2, kk)
        torch.lt(row[:, :, m:], -1.0, out=violated)
        torch.mul(violated, pivot > dependent.gather(2, kk), out=live)
        n_live, n_violated = flags.sum((0, 1)).tolist()  # the host sync
        if n_violated > n_live:  # blocked: exchange steps from the start (_row_pivots)
            guess, more = _row_pivots(f, g0, tol_p, units, None, exchange=True)
            return guess, more + flips[:, 0, :m].sum(-1).round_().to(torch.int64)
        if not n_live:
            break
        _pivot(M, kk, row, pivot, live, one, minus_one)
        flips.scatter_add_(2, kk, live)
    counts = flips[:, 0, :m]
    return torch.remainder(counts, 2.0) > 0.5, counts.sum(-1).round_().to(torch.int64)


def _pivot_row(S, k, first_row):
    """A copy of row k (B, 1) of each instance's rows S (B, m, m): (B, m); ``first_row``
    (B, 1) is each instance's offset in S's rows (0, m, 2m, ...)."""
    return S.view(-1, S.shape[-1]).index_select(0, (k + first_row).view(-1))


def row_pivot_kernel(S, k, live, sign):
    """One pivot of :func:`_row_pivots` on the rows S (B, m, m) of a tableau and their
    signs (B, m), in place: its linear algebra, which benchmarks time. ``k`` (B,),
    ``live`` (B, 1) 1.0 or 0.0 as in :func:`pivot_kernel`."""
    B, m = S.shape[:2]
    k = k.view(B, 1)
    row = _pivot_row(S, k, torch.arange(0, B * m, m, device=S.device).unsqueeze(-1))
    s_k = sign.gather(1, k)
    _pivot_rows(S, k, row, live / row.gather(1, k), sign, s_k, torch.full_like(live, -1.0))
    sign.scatter_(1, k, torch.where(live > 0, -s_k, s_k))


def _pivot_rows(S, k, row, step, sign, s_k, minus_one):
    """The rank-one update M - (c + e_k)(r - e_k)'/p of :func:`_pivot` on the rows S
    (B, m, m), in place, for the pivot row r (B, m) (overwritten with r - e_k), ``step``
    = live / p (B, 1) and the signs (``s_k`` the pivot row's): the pivot column c is r s
    s_k. Returns (c + e_k) live / p."""
    col = (row * sign).mul_(s_k * step).scatter_add_(1, k, step)
    row.scatter_add_(1, k, minus_one)
    S.addcmul_(col.unsqueeze(-1), row.unsqueeze(-2), value=-1.0)
    return col


def _argmin_rows(x):
    """The index of the first smallest entry of each row of x (B, m), as (B, 1). From
    _MIN_INDICES entries on by ``min``, whose index comes with the value: CPU argmin
    over short rows took 2.7x its time at (512, 20) (16 against 6 us), 1.4x at (32, 100),
    but half of it at (32, 10)."""
    if x.numel() < _MIN_INDICES:
        return x.argmin(-1, keepdim=True)
    return x.min(-1, keepdim=True).indices


_MIN_INDICES = 1 << 11


def _row_pivots(f, g0, tol_p, units, pool, exchange=False):
    """:func:`_pivoted_active_set` on the rows of the tableau's W block (B, m, m), its
    diagonal and right-hand side kept as (B, m) tensors of their own.

    A principal pivot transform of a symmetric matrix is symmetric up to sign: entry
    (i, k) is (k, i) times s_i s_k, s = -1 on the pivoted rows and 1 elsewhere. So the
    pivot column is the pivot row times those signs, one (B, m) product instead of a
    gather that reads one cache line per entry, and the diagonal and right-hand side the
    rule reads every step lie contiguous. At (512, 20) and (128, 50) this took 0.5-0.6x
    the time of :func:`_tableau_pivots`, whose strided reads and column gather also slow
    the rank-one update itself (~140 against ~40 us at (128, 50)); below ~2^15 entries,
    where a step costs its dispatches, its ~30 small ops cost 1.1-1.3x the tableau's ~24.

    Single pivots stop where a violated constraint depends on the active ones (at a
    vertex: many rows per free dimension, a large linear term). Where any instance does,
    the batch starts over with ``exchange`` steps (:func:`_exchange_step`), which reach
    those active sets too; more than half the batch stopping even so (contradicting
    constraints) gives up on it (:func:`_pivots_blocked`)."""
    B, m = g0.shape
    dtype, device = g0.dtype, g0.device
    S = block = torch.mul(f.W, units.unsqueeze(-1), out=scratch(pool, (B, m, m), dtype, device))
    diagonal = S.diagonal(dim1=-2, dim2=-1).add_(f.delta[:, None] * units).clone()
    rhs = g0.div(tol_p).neg_()
    dependent = _dependent_pivots(diagonal)
    sign = sign_out = torch.ones_like(rhs)
    pivots = pivots_out = torch.zeros_like(units)
    first_row = torch.arange(0, B * m, m, device=device).unsqueeze(-1)
    minus_one = torch.full_like(units, -1.0)
    violated, live = (torch.empty(B, 1, dtype=torch.bool, device=device) for _ in range(2))
    # exchange steps: the constraint on its way in per instance (-1: none), and the value
    # its multiplier has reached (see _exchange_step)
    entering = torch.full((B, 1), -1, dtype=torch.int64, device=device) if exchange else None
    offset = torch.zeros_like(rhs) if exchange else None
    added = None  # (exchange steps: the instances whose entering constraint went in)
    where = None  # the instances still pivoting, once some are set aside (see below)
    blocked_aside, gave_up = 0, False  # (instances set aside blocked)
    for _ in range(2 * m + 4):
        k = _argmin_rows(diagonal.rsqrt().mul_(rhs))  # (B, 1); the rule above
        if exchange:
            k = torch.where(entering >= 0, entering, k)
        row = _pivot_row(S, k, first_row)
        pivot, rhs_k = diagonal.gather(1, k), rhs.gather(1, k)
        torch.lt(rhs_k, -1.0, out=violated)
        independent = pivot > dependent.gather(1, k)
        if exchange:
            k, row, pivot, rhs_k, live, added = _exchange_step(
                S, k, row, pivot, rhs_k, violated, independent, entering, diagonal, rhs, sign, offset, first_row)
        else:
            torch.logical_and(violated, independent, out=live)
        n_live, n_violated = torch.cat([live, violated], -1).sum(0).tolist()  # the host sync
        if n_violated > n_live and not exchange:  # blocked: start over (the pivots so far counted)
            if where is not None:
                pivots_out.index_copy_(0, where, pivots)
            if pool is not None:
                pool.give_back(block)
            guess, more = _row_pivots(f, g0, tol_p, units, pool, exchange=True)
            return guess, more + pivots_out.squeeze(1).round_().to(torch.int64)
        gave_up = _pivots_blocked(blocked_aside + n_violated - n_live, B)
        if not n_live or gave_up:  # done, or only dependent pivots left
            break
        if 4 * n_live <= live.shape[0]:
            blocked_aside += n_violated - n_live
            # an instance that stops never pivots again (its tableau stays as it is), and
            # the batch's last few pivot alone: 0.5-0.9 m steps for the slowest, 0.3-0.6 m
            # for most (of 128 at (128, 50), 10 or fewer pivot from step 30 to 38)
            if where is not None:
                sign_out.index_copy_(0, where, sign), pivots_out.index_copy_(0, where, pivots)
            keep = live.view(-1).nonzero().squeeze(-1)
            where = keep if where is None else where.index_select(0, keep)
            (S, diagonal, rhs, dependent, sign, pivots, k, row, pivot, rhs_k, violated, live, minus_one, entering,
             offset, added) = (None if t is None else t.index_select(0, keep) for t in (
                S, diagonal, rhs, dependent, sign, pivots, k, row, pivot, rhs_k, violated, live, minus_one, entering,
                offset, added))
            first_row = first_row[:n_live]
        s_k = sign.gather(1, k)
        col = _pivot_rows(S, k, row, live / pivot, sign, s_k, minus_one)
        diagonal.addcmul_(col, row, value=-1.0)
        rhs.addcmul_(col, rhs_k, value=-1.0)
        sign.scatter_(1, k, torch.where(live, -s_k, s_k))
        pivots.add_(live)
        if exchange:
            _exchange_done(entering, added, rhs, offset)
    if exchange:  # (stopped at the step cap halfway through an exchange: the one entering is in)
        k = entering.clamp(min=0)
        sign.scatter_(1, k, torch.where(entering >= 0, -1.0, sign.gather(1, k)))
    if where is not None:
        sign_out.index_copy_(0, where, sign), pivots_out.index_copy_(0, where, pivots)
    if pool is not None:
        pool.give_back(block)
    return (None if gave_up else sign_out < 0), pivots_out.squeeze(1).round_().to(torch.int64)


def _exchange_step(S, k, row, pivot, rhs_k, violated, independent, entering, diagonal, rhs, sign, offset,
                   first_row):
    """The step of the dual active-set method (Goldfarb and Idnani) for the constraint k
    (B, 1) the rule chose, in the tableau of :func:`_row_pivots`.

    Its multiplier (the nonbasic variable of column k) grows until its slack reaches
    zero, unless an active multiplier reaches zero first (the ratio test over the active
    rows whose multipliers fall along the column). Then the tableau moves to that point
    (right-hand side plus column times the step, the multiplier's value kept in
    ``offset``), that constraint leaves (the pivot is on its row instead), and k is
    ``entering``: chosen again next step, until it goes in (:func:`_exchange_done`).
    Multipliers so stay nonnegative, and a constraint that depends on the active ones
    gets in by exchanging one of them, which single pivots cannot. Where none falls, k
    contradicts the active constraints: that instance stops.

    Returns the pivot per instance (k, row, pivot, rhs_k: the row's), ``live`` (B, 1)
    and ``added`` (B, 1): k goes in in full."""
    violated |= entering >= 0  # one on its way in goes in
    s_k = sign.gather(1, k)
    col = row * sign * s_k  # the column: how each basic variable moves as k's multiplier grows
    falls = (sign < 0) & (col < 0)  # active rows whose multipliers fall
    ratio = torch.where(falls, rhs.clamp(min=0.0) / col.neg(), math.inf)
    leaving = _argmin_rows(ratio)
    partial_step = ratio.gather(1, leaving)
    full_step = torch.where(independent, rhs_k.neg() / pivot, math.inf)
    partial = violated & (s_k > 0) & (partial_step < full_step)
    added = violated & ~partial & independent
    step = torch.where(partial, partial_step, 0.0)
    rhs.addcmul_(col, step)
    offset.scatter_add_(1, k, step)
    entering.copy_(torch.where(partial, k, entering))
    k = torch.where(partial, leaving, k)
    return k, _pivot_row(S, k, first_row), diagonal.gather(1, k), rhs.gather(1, k), partial | added, added


def _exchange_done(entering, added, rhs, offset):
    """After the pivot of an :func:`_exchange_step`: a constraint that went in has its
    multiplier's value so far added to its row (the pivot computed the rest)."""
    k = entering.clamp(min=0)
    done = added & (entering >= 0)
    value = torch.where(done, offset.gather(1, k), 0.0)
    rhs.scatter_add_(1, k, value)
    offset.scatter_add_(1, k, value.neg())
    entering.masked_fill_(done, -1)


def _pivots_blocked(blocked, B):
    """Whether the exchange steps give up on the batch: more than half its instances
    stopped at a violated constraint that no active one can make room for (constraints
    that contradict each other). The interior point, which certifies infeasibility, takes
    the batch instead."""
    return 2 * blocked > B


_FINGERPRINT_WEIGHTS = {}


def _crawls(corrections, size, crowded, B, m, free):
    """Whether the active-set iteration will crawl, judged after its first solve (see
    _CRAWL_ROWS): ``crowded`` of the B first active sets hold more than ``free`` = n - p
    constraints, ``size`` in all, of which ``corrections`` needed correcting."""
    if 2 * crowded > B:
        return True
    return B >= _JUDGED_BATCH and m > _CRAWL_ROWS * free and corrections > _CRAWL_WRONG * size


def _fingerprint_weights(m, device):
    """Random weights (m,) whose sum over an active set is its fingerprint: two sets
    collide only if their sums agree to rounding in float64."""
    key = (m, device)
    if key not in _FINGERPRINT_WEIGHTS:
        w = torch.rand(m, generator=torch.Generator().manual_seed(0), dtype=torch.float64, device="cpu")
        _FINGERPRINT_WEIGHTS[key] = w.to(device)
    return _FINGERPRINT_WEIGHTS[key]


def _whole_batch(f, count):
    """Whether work on ``count`` instances of the factor ``f`` is cheaper on the whole
    batch: copying blocks out and back costs about as much as using them, so when most
    instances are wanted, and when the blocks are small (the ~20 calls that gather them
    cost more than a small solve)."""
    return 2 * count > f.W.shape[0] or f.W.numel() <= _SMALL_BLOCKS


def _select_rows(f, mask, *tensors):
    """The instances ``mask`` (B,) of the factor and of ``tensors``: ``(rows, f, *tensors)``,
    or the whole batch (``rows`` every index; the caller masks) when :func:`_whole_batch`."""
    rows = mask.nonzero().squeeze(-1)
    if _whole_batch(f, rows.numel()):
        return (torch.arange(mask.shape[0], device=mask.device), f, *tensors)
    return (rows, f.select(rows), *(t.index_select(0, rows) for t in tensors))


def _polish(result, factor, hv, b, scale_dual, scale_primal, tol, skip):
    """Solve the equality QP of the active set the interior point found.

    An interior-point iterate stops at complementarity ~tol, which on a degenerate
    constraint (active with a zero multiplier) leaves the solution ~sqrt(tol) away.
    The active set is usually right long before that: solving the equality-constrained
    QP on it gives the solution to rounding error. The polished point replaces the
    iterate only where it is a KKT point within the tolerance (lam_a >= 0, G z <= h)
    and no worse than the iterate. Instances the loop already polished are left alone;
    those whose suggested set is larger than n - p and fails get a second try with
    the n - p constraints of largest lam / s (:func:`_iterate_guess`).
    """
    todo = ~result.polished if result.polished is not None else torch.ones_like(result.status, dtype=torch.bool)
    if skip is not None:
        todo = todo & ~skip
    free = factor.n - factor.p
    for capped in (False, True):
        if capped:
            todo = todo & ~result.polished & ((result.lam > result.s).sum(-1) > free)
        if not bool(todo.any()):
            return result
        rows, sp_r, sol = _suggested_solution(result, factor, todo, hv, b, scale_dual, scale_primal, tol, capped)
        status_r = result.status.index_select(0, rows)
        better = sol.rp_n <= torch.maximum(result.primal_residual.index_select(0, rows), tol * sp_r)
        solved = (status_r == OPTIMAL) & better & sol.ok
        rescued = ((status_r == NUMERICAL_ERROR) | (status_r == MAX_ITER)) & sol.kkt
        take = todo & torch.zeros_like(todo).index_copy(0, rows, solved | rescued)
        result = _take_polished(result, factor, take, rows, sol)
    return result


def _suggested_solution(result, f, todo, hv, b, scale_dual, scale_primal, tol, capped=False):
    """The active-set solution (:func:`_active_set_solution`) of the set each iterate
    ``todo`` (B,) suggests: lam > s, or with ``capped`` :func:`_iterate_guess`. Returns
    (rows, scale_primal of those rows, the solution), ``rows`` the instances it holds
    (every index where :func:`_select_rows` takes the whole batch)."""
    rows, sub, hv_r, b_r, sd_r, sp_r, lam_r, s_r = _select_rows(
        f, todo, hv, b, scale_dual, scale_primal, result.lam, result.s)
    guess = _iterate_guess(s_r, lam_r, f.n - f.p) if capped else lam_r > s_r
    return rows, sp_r, _active_set_solution(sub, hv_r, b_r, guess, tol, sd_r, sp_r)


def _iterate_guess(s, lam, free):
    """The active set an interior-point iterate suggests, capped: lam > s, but at most
    ``free`` = n - p constraints (those of largest lam / s), as no more can be
    independent where A has full rank (where it has not, more can: the cap is a second
    try). An iterate that stops on mean complementarity can leave an inactive
    constraint at lam > s (slack 1.5e-3 on a projection onto a box and a hyperplane);
    one constraint too many made the active set singular, its corrections wandered,
    and the iterate, 1e-5 from the solution, was returned instead of the exact one."""
    guess = lam > s
    if guess.shape[-1] <= free:
        return guess
    if free <= 0:
        return torch.zeros_like(guess)
    ratio = lam / s
    return guess & (ratio >= ratio.topk(free, -1).values[:, -1:])


def _put(old, take, rows, new, whole=False):
    """``old`` (B, ...) with the instances ``take`` (B,) bool replaced by ``new``, which
    holds the instances ``rows``. ``whole``: every instance is taken and ``new`` holds
    them all (the common case), so ``new`` is the answer and ``old`` may be None."""
    if whole:
        return new
    if rows.numel() != old.shape[0]:  # else rows is every index, in order
        new = old.index_copy(0, rows, new)
    return torch.where(take.reshape(take.shape + (1,) * (old.dim() - 1)), new, old)


def _put_factor(old, take, rows, new, whole=False):
    """:func:`_put` for active-set factors (B, j, j) and (B', k, k): the smaller is padded
    (:func:`_pad_factor`)."""
    if not whole:
        k = max(old.shape[-1], new.shape[-1])
        old, new = _pad_factor(old, k), _pad_factor(new, k)
    return _put(old, take, rows, new, whole)


def _takes_whole(take, rows):
    """Whether ``take`` (B,) is all true and ``rows`` every index: one host sync, which
    saves copying (B, m, m) factors."""
    return rows.numel() == take.shape[0] and bool(take.all())


def _scatter(full: ActiveSetSolution, take, rows, sol: ActiveSetSolution) -> ActiveSetSolution:
    whole = _takes_whole(take, rows)
    put = dict(order=_put_order, L=_put_factor)
    return ActiveSetSolution(*(put.get(k.name, _put)(getattr(full, k.name), take, rows, getattr(sol, k.name), whole)
                               for k in dataclasses.fields(ActiveSetSolution)))


def _take_polished(result, f, take, rows, sol):
    """``result`` with the instances ``take`` (B,) replaced by the active-set solution
    ``sol``, which holds the instances ``rows``; ``f`` is the whole batch's factor."""
    whole = _takes_whole(take, rows)
    polished = result.polished if result.polished is not None else torch.zeros_like(take)
    lam, nu = _put(result.lam, take, rows, sol.lam, whole), _put(result.nu, take, rows, sol.nu, whole)
    active_set, factor, order = result.active_set, result.active_factor, result.active_order
    if active_set is None and not whole:  # (the others' are never read: zeros, rows in order)
        active_set, factor = sol.active.new_zeros(lam.shape), sol.L.new_zeros(lam.shape[:1] + sol.L.shape[1:])
    z_exact = f.from_half(f.qc_half, lam, nu)  # the n-space, once for all instances
    return dataclasses.replace(
        result,
        z=z_exact if whole else torch.where(take[:, None], z_exact, result.z),
        s=_put(result.s, take, rows, sol.s, whole), lam=lam, nu=nu,
        status=torch.where(take, OPTIMAL, result.status),
        primal_residual=_put(result.primal_residual, take, rows, sol.rp_n, whole),
        complementarity=torch.where(take, 0.0, result.complementarity),
        polished=polished | take,
        active_set=_put(active_set, take, rows, sol.active, whole),
        active_factor=_put_factor(factor, take, rows, sol.L, whole),
        active_order=_put_order(order, take, rows, sol.order, whole),
    )


def solve_nlp(derivatives, residuals, z0, m, p, *, tol=None, max_iter=100, skip=None,
              other_starts=(), select=None, stop_collapsed=False, affine_constraints=False,
              scale_far_rows=True) -> InteriorPointResult:
    """Batched smooth NLP from the compiled derivative functions (see :class:`Oracle`).

    z0 (B, n) is the starting point; it should lie in the domain of the functions. An
    instance where it does not (the residuals there are not finite) starts from the
    first of ``other_starts`` ((B, n) each) where they are; one where none does is
    skipped (numerical_error). ``select(rows) -> (derivatives, residuals)`` of some
    instances alone lets the loop drop finished ones (:attr:`Oracle.select`).
    ``stop_collapsed``: see :func:`primal_dual`. ``affine_constraints``: g and h are
    affine in z, so that instances the loop does not finish can be tested for
    infeasibility by an LP (:func:`_infeasible_polyhedron`). ``scale_far_rows``: see
    :func:`_far_row_scale` (False: the rows as they are).
    """
    unscaled = (derivatives, residuals, select)
    tol = default_tol(z0.dtype) if tol is None else tol
    B = z0.shape[0]
    lam0 = z0.new_ones(B, m)
    nu0 = z0.new_zeros(B, p)

    def at(z):
        rd, g, h = residuals(z, z.new_zeros(B, m), nu0)
        # (NaN and inf show in the inf-norm: one reduction each, isfinite is four passes)
        return rd, g, h, torch.maximum(torch.maximum(_inf_norm(rd), _inf_norm(g)), _inf_norm(h)) < math.inf

    rd, g, h, finite = at(z0)
    usable = finite if skip is None else finite | skip  # (a skipped instance needs no start)
    for start in other_starts:
        if bool(usable.all()):
            break
        rd_o, g_o, h_o, finite_o = at(start)
        take = ~usable & finite_o
        z0 = torch.where(take[:, None], start, z0)
        rd, g, h = (torch.where(take[:, None], new, old) for new, old in ((rd_o, rd), (g_o, g), (h_o, h)))
        finite, usable = finite | take, usable | take
    s0 = torch.nan_to_num((-g).clamp(min=1.0), nan=1.0)
    row_scale = _far_row_scale(derivatives, z0, s0, p) if m and scale_far_rows else None
    data_scale = None
    if row_scale is not None:
        # (z out to 1e12 times the rows' own size is no divergence: h = 1e14 ended
        # 'unbounded' on the scaled rows' scale, with its solution at 3.3e13)
        data_scale = 1.0 + torch.maximum(_inf_norm(torch.nan_to_num(g)), _inf_norm(torch.nan_to_num(h)))
        derivatives, residuals = _rows_scaled(derivatives, residuals, row_scale)
        if select is not None:
            select = _rows_scaled_select(select, row_scale)
        g, s0 = g * row_scale, s0 * row_scale
    if m:
        # a centered start: s * lam the same on every row, the geometric mean of s0. With
        # lam = 1 everywhere, a row far from binding at the start (-g = 1e20 for
        # G z <= 1e20) made mu ~ 1e20 / m and the loop spent its iterations bringing it
        # down: 54 instead of 14 on weighted entropy (10 x 5 rows), and one instance in
        # 32 ended numerical_error; the benchmark's weighted entropy (32, 100) took 17
        # where it took 19 (its (1024, 100) batch 6.5 % fewer iterations in all)
        # (a row beyond 1 / sqrt(tiny), 9e18 in float32 and beyond any float64 bound,
        # keeps lam = 1 and stays out of the mean: centered with it, float32 rows
        # bounded by 1e20 ended 15-16 of 16 instances max_iter, where lam = 1 solved 8)
        near = s0 <= torch.finfo(s0.dtype).tiny ** -0.5
        mean = ((s0.log() * near).sum(-1, keepdim=True) / near.sum(-1, keepdim=True).clamp(min=1)).exp_()
        lam0 = torch.where(near, mean / s0, 1.0)
    skip = ~finite if skip is None else (skip | ~finite)
    rd = torch.nan_to_num(rd)
    # an objective far below unit scale (its gradient at the start, the only scale the
    # loop knows) is divided by it, as a QP's objective by its largest coefficient: the
    # stopping test's 1 + |grad| would otherwise be absolute, and a softmax layer whose
    # objective was scaled by 1e-8 came back 'optimal' at its start, 0.86 off
    sigma = _objective_scale_nlp(rd, skip)
    if sigma is not None:
        derivatives, residuals = _scaled_objective(derivatives, residuals, sigma)
        rd = rd / sigma[:, None]
        if select is not None:
            select = _scaled_select(select, sigma)
    scale_dual = 1.0 + _inf_norm(rd)
    scale_primal = 1.0 + torch.maximum(_inf_norm(torch.nan_to_num(g)), _inf_norm(torch.nan_to_num(h)))

    def oracle():
        return Oracle(derivatives, residuals, linear=False, select=select)

    result = primal_dual(
        oracle(), z0, s0, lam0, nu0,
        scale_dual=scale_dual, scale_primal=scale_primal, tol=tol, max_iter=max_iter, skip=skip,
        stop_collapsed=stop_collapsed, data_scale=data_scale,
    )
    result, scale_dual, scale_primal = _held_to_the_solutions_scale(
        result, oracle, residuals, 1.0 + _inf_norm(torch.nan_to_num(h)), scale_dual, scale_primal, tol, max_iter,
        skip, stop_collapsed, data_scale)
    result = _released_bounds(result, derivatives, residuals, scale_dual, scale_primal, tol)
    if sigma is not None:
        result = dataclasses.replace(result, lam=result.lam * sigma[:, None], nu=result.nu * sigma[:, None],
                                     dual_residual=result.dual_residual * sigma)
    if row_scale is not None:
        result = dataclasses.replace(result, lam=result.lam * row_scale, s=result.s / row_scale)
        result = _unscaled_for_failures(result, unscaled, z0, m, p, tol, max_iter, skip, stop_collapsed)
    if affine_constraints and m + p:
        result = _infeasible_polyhedron(result, derivatives, z0, skip, tol, max_iter, stop_collapsed)
    return result


def _released_bounds(result, derivatives, residuals, scale_dual, scale_primal, tol):
    """``result`` with the simple bounds that a solved instance meets within the
    tolerance only by a multiplier standing in for a log's residual released, where the
    point so reached meets the tolerances too.

    The stopping test cannot tell such a bound from an active one: softmax of spread
    logits came back with an entry of 8.5e-14 whose exact value is 5.1e-17, the log's
    excess in its stationarity row carried by the multiplier of z >= 0 (3.7, where the
    exact multiplier is 0), and every derivative through that multiplier wrong: the
    duals of z >= 0, the gradient with respect to a floor z >= l (2.1 where it is 0),
    and log z's. Released, the bound's multiplier is 0 and its column moves by
    log |z| += sign lam / (z H) (H the Hessian's diagonal: exact where the column's term
    is a log, as entropy's is), which puts such an entry on its own value. Rows: bounds
    at 0 (z >= 0, z <= 0; a floor above 0 that the move crossed would be violated)
    whose slack is within the primal tolerance, on columns where such a row's
    multiplier exceeds the dual tolerance on one side only, moving toward the bound (a
    move away would leave it). A diagonal Hessian and simple bounds only (the compiler's
    structured problems); an instance keeps its point unless the new one meets every
    tolerance, so an active bound (lam carrying a real force: a quadratic's column, a
    floor above 0) stays as it was. A few ops and a host synchronization where no bound
    qualifies, the usual case."""
    z, s, lam, nu = result.z, result.s, result.lam, result.nu
    tol_d, tol_p = tol * scale_dual, tol * scale_primal
    if result.simple_bounds is None or z.shape[0] == 0:
        return result
    bound_part = result.simple_bounds.row_parts
    tight = (bound_part(s)[0] <= tol_p[:, None]) & (result.status == OPTIMAL)[:, None]
    held = tight & (bound_part(lam)[0] > tol_d[:, None])
    if not bool(held.any()):  # (active general rows, the usual case, are not bounds)
        return result
    _, g, _, Jg, _, H = derivatives(z, lam, nu)
    if not isinstance(Jg, BoundedJacobian) or not isinstance(H, DiagonalMatrix):
        return result
    B, n = z.shape
    m = s.shape[-1]
    s_b, lam_b = Jg.row_parts(s)[0], Jg.row_parts(lam)[0]
    signs = Jg.bound_signs
    sign_b = signs if isinstance(signs, torch.Tensor) else z.new_full((1,), signs)
    cols = _index_tensor(Jg.bound_cols, z.device)
    # rows by column and side (lower bounds at j, upper at n + j): a column held on one
    # side releases every tight row of that side at 0 (z >= l beside the domain's own
    # z >= 0 splits the force between two rows, each of which may be below the dual
    # tolerance); one held on both sides (a box narrower than the tolerance) none, each
    # side's move undoing the other's
    side = cols + n * (signs > 0) if isinstance(signs, torch.Tensor) else cols
    sides = z.new_zeros(B, 2 * n).index_add_(1, side, held.to(z.dtype)) > 0
    opposed = (sides[:, :n] & sides[:, n:])[:, cols]
    z_b = Jg.bounded_entries(z)
    row_move = sign_b * lam_b / Jg.bounded_entries(z * H.d)  # (each row's share of log |z|'s move)
    release = (tight & sides[:, side] & ~opposed & (Jg.row_parts(g)[0] == sign_b * z_b) & (z_b != 0)
               & (row_move <= 0))
    # the column's move of log |z|: toward its bound (< 0), an entry the move takes below
    # the dtype's normal range (softmax's of logits 100 x randn in float32: 0 there)
    # staying as the loop left it
    move = z.new_zeros(B, n).index_add_(1, cols, torch.where(release, row_move, 0.0))
    moving = (move < 0) & (z.abs() * torch.exp(move) >= torch.finfo(z.dtype).tiny)
    release = release & moving[:, cols]
    if not bool(release.any()):
        return result
    scale = torch.exp(move.masked_fill(~moving, 0.0))
    z_new = z * scale
    # a released row's slack scales with its entry (their difference, its residual, may
    # be larger than the moved entry itself), every other bound row of a moved column
    # keeps its g + s; the released rows' multipliers are 0
    none = torch.zeros(B, Jg.k, dtype=torch.bool, device=z.device)
    s_new_b = torch.where(release, s_b * scale[:, cols], s_b - sign_b * (z_new - z)[:, cols])
    s_new = Jg.join_rows(s_new_b, Jg.row_parts(s)[1], s)
    lam_new = lam.masked_fill(Jg.join_rows(release, none, release), 0.0)
    rd, g_new, h = residuals(z_new, lam_new, nu)
    rd_n, rp_n = _inf_norm(rd), torch.maximum(_inf_norm(g_new + s_new), _inf_norm(h))
    mu = torch.linalg.vecdot(s_new, lam_new) / m
    # a released row still at 0 where its entry moved: a floor of 1e-30 under an entry of
    # 1e-13 reads as 0 in floating point until the entry has moved below it
    at_zero = (Jg.row_parts(g_new)[0] == sign_b * Jg.bounded_entries(z_new)) | ~release
    take = (release.any(-1) & (rd_n <= tol_d) & (rp_n <= tol_p) & (mu <= tol_d)
            & (Jg.row_parts(s_new)[0] > 0).all(-1) & at_zero.all(-1))
    if not bool(take.any()):
        return result
    pick = take[:, None]
    return dataclasses.replace(
        result, z=torch.where(pick, z_new, z), s=torch.where(pick, s_new, s), lam=torch.where(pick, lam_new, lam),
        primal_residual=torch.where(take, rp_n, result.primal_residual),
        dual_residual=torch.where(take, rd_n, result.dual_residual),
        complementarity=torch.where(take, mu, result.complementarity))


def _held_to_the_solutions_scale(result, oracle, residuals, h0_size, scale_dual, scale_primal, tol, max_iter,
                                 skip, stop_collapsed, data_scale, rounds=10):
    """The NLP loop's stopping test is relative to the start's gradient and rows
    (``scale_dual``, ``scale_primal``); a start the domain forces where an exp is huge
    (x = 1 under exp(x / 0.02): 1e23) made it absolute at 1e15, and instances came back
    ``optimal`` 60 % off their solution. An ``optimal`` instance is tested again against
    its solution's own scale: 1 + the largest of |grad f|, |Jg' lam + Jh' nu| and
    |H| |z| there (and 1 + the larger of |g|, |s| and the start's |h| for the rows),
    times :data:`_START_SCALE_TRUST`, where smaller. One that fails goes on from where
    it stopped, held to that scale, for its own iterations left (in rounds, as each
    stop's scale is smaller; one still failing after ``rounds`` or without iterations
    left ends ``max_iter``). Returns (result, scale_dual,
    scale_primal), the scales each instance was last held to; ``oracle()`` makes the
    loop's :class:`Oracle`."""
    m, p = result.lam.shape[-1], result.nu.shape[-1]
    # (scales within the trusted factor of 1, the least a solution's can be, change nothing)
    if not float(torch.maximum(scale_dual, scale_primal).amax()) > _START_SCALE_TRUST:
        return result, scale_dual, scale_primal
    for round_ in range(rounds + 1):
        ok = result.status == OPTIMAL
        if not bool(ok.any()):
            break
        z, s, lam, nu = result.z, result.s, result.lam, result.nu
        grad_f = residuals(z, torch.zeros_like(lam), torch.zeros_like(nu))[0]
        rd, g, h, _, _, H = oracle().derivatives(z, lam, nu)
        # (|H| |z| stands for the terms that cancel in grad f: exp(y) - theta with theta
        # up to 1e8 leaves 1e-4 of rounding at the solution, where grad f is that 1e-4)
        terms = _inf_norm(_apply(_abs_matrix(H), z.abs()))
        dual = 1.0 + torch.maximum(torch.maximum(_inf_norm(grad_f), _inf_norm(grad_f - rd)), terms)
        primal = 1.0 + torch.maximum(torch.maximum(_inf_norm(g), _inf_norm(s)), h0_size)
        dual = torch.minimum(scale_dual, _START_SCALE_TRUST * dual)
        primal = torch.minimum(scale_primal, _START_SCALE_TRUST * primal)
        mu = (s * lam).sum(-1) / max(m, 1)
        rp = torch.maximum(_inf_norm(g + s), _inf_norm(h)) if m or p else torch.zeros_like(mu)
        fails = ok & ~((torch.maximum(_inf_norm(rd), mu) <= tol * dual) & (rp <= tol * primal))
        if not bool(fails.any()):
            break
        if round_ == rounds:  # (not finished at its own scale)
            return dataclasses.replace(result, status=torch.where(fails, MAX_ITER, result.status)), \
                scale_dual, scale_primal
        scale_dual, scale_primal = torch.where(fails, dual, scale_dual), torch.where(fails, primal, scale_primal)
        # each instance the iterations it has left: a batch-mate's must not lend it more
        # (one took 25 of max_iter 24 in a batch and ended max_iter alone)
        budget = (max_iter - result.iterations).clamp(min=0)
        part = primal_dual(oracle(), z, s, lam, nu, scale_dual=scale_dual, scale_primal=scale_primal, tol=tol,
                           max_iter=int(budget[fails].max()), skip=~fails if skip is None else skip | ~fails,
                           stop_collapsed=stop_collapsed, data_scale=data_scale, budget=budget)
        result = _per_instance(fails, dataclasses.replace(part, iterations=part.iterations + result.iterations),
                               result)
    return result, scale_dual, scale_primal


# how far the NLP loop's stopping scale, taken at the start, may exceed the solution's
# own (:func:`_held_to_the_solutions_scale`): a start 3x the solution's scale is usual,
# one 1e8x it (exp at a start the domain forces) made the test absolute
_START_SCALE_TRUST = 100.0


def _unscaled_for_failures(result, unscaled, z0, m, p, tol, max_iter, skip, stop_collapsed):
    """Instances that the solve with far rows scaled (:func:`_far_row_scale`) did not
    finish ``optimal``, solved again with the rows as they are; their result is taken
    where that one is ``optimal``. A far row the solution reaches is one the scaling
    does not suit: its multiplier, ~1 in the caller's units, must grow to the row's
    size in the scaled one, from a start of 1, and the divergence limit shrank with
    the row's scale. min -sum(x) + sum(exp(-x)) s.t. sum(x) <= h ended ``max_iter``
    from h = 1e9 on, and ``unbounded`` at 1e14 (every one ``optimal`` unscaled)."""
    redo = result.status != OPTIMAL
    if skip is not None:
        redo = redo & ~skip
    if not bool(redo.any()):
        return result
    derivatives, residuals, select = unscaled
    rows = redo.nonzero().squeeze(1)
    if select is not None:
        derivatives, residuals = select(rows)
        part_select = (lambda kept: select(rows[kept]))
        start, part_skip = z0[rows], None
    else:  # (the whole batch again: its oracle cannot take some instances alone)
        part_select, start, part_skip, rows = None, z0, ~redo, None
    part = solve_nlp(derivatives, residuals, start, m, p, tol=tol, max_iter=max_iter, skip=part_skip,
                     select=part_select, stop_collapsed=stop_collapsed, scale_far_rows=False)
    if rows is None:
        take = redo & (part.status == OPTIMAL)
        return _per_instance(take, dataclasses.replace(part, iterations=part.iterations + result.iterations), result)
    mine = InteriorPointResult(*(getattr(result, name)[rows] for name in _LOOP_FIELDS))
    part = dataclasses.replace(part, iterations=part.iterations + mine.iterations)
    return _with_rows(result, rows, _per_instance(part.status == OPTIMAL, part, mine))


def _far_row_scale(derivatives, z0, s0, p):
    """(B, m) 1 / s0 on the general rows whose slack at the start is beyond
    :func:`_far_bound` (1 + |z0|), 1 elsewhere; None where there are none.

    Such a row (G z <= 1e15 meant as no limit) puts its bound's rounding into the
    residuals: g + s is 0.125 off at 1e15 in float64, and the line search's merit,
    which sums the squares of every row's residual, stopped falling once the others
    were that small: 2 of 32 weighted-entropy instances ended ``numerical_error``, and
    the rest took 450 iterations where they took 314 without the row. Divided by its
    slack, the row is of unit size (the same constraint; its multiplier is multiplied
    back). Bound rows (``x <= 1e15``) keep theirs: the loop's bound rows share their
    signs across the batch."""
    if not float(s0.amax()) > _far_bound(s0.dtype):  # (the common case, in two calls)
        return None
    far = s0 > _far_bound(s0.dtype) * (1.0 + _inf_norm(z0)).unsqueeze(-1)
    if not bool(far.any()):
        return None
    B, m = s0.shape
    Jg = derivatives(z0, z0.new_zeros(B, m), z0.new_zeros(B, p))[3]
    if isinstance(Jg, BoundedJacobian):
        general = torch.zeros(m, dtype=torch.bool, device=s0.device)
        general[Jg.general_rows] = True
        far = far & general
    far = far & (s0 < math.inf)
    return torch.where(far, torch.reciprocal(s0), 1.0)


def _rows_scaled(derivatives, residuals, r):
    """The oracle of the problem with its inequality rows times ``r`` (B, m) > 0 (1 on
    bound rows), in that problem's multipliers lam_r = lam / r: the same Lagrangian."""

    def scaled_residuals(z, lam, nu):
        rd, g, h = residuals(z, lam * r, nu)
        return rd, g * r, h

    def scaled_derivatives(z, lam, nu):
        rd, g, h, Jg, Jh, H = derivatives(z, lam * r, nu)
        if isinstance(Jg, BoundedJacobian):
            Jg = Jg.general_rows_scaled(r[:, Jg.general_rows])
        else:
            Jg = Jg * r.unsqueeze(-1)
        return rd, g * r, h, Jg, Jh, H

    return scaled_derivatives, scaled_residuals


def _rows_scaled_select(select, r):
    """``select`` (:attr:`Oracle.select`) of the problem with rows scaled by ``r``."""
    return lambda rows: _rows_scaled(*select(rows), r[rows])


def _infeasible_polyhedron(result, derivatives, z0, skip, tol, max_iter, solved_again=False):
    """Mark INFEASIBLE the instances the loop left unfinished (``max_iter``,
    ``numerical_error``) whose affine constraints G z <= hv, A z = b admit no point: an
    LP with no objective on those rows, whose own loop certifies infeasibility (a
    Farkas ray). The NLP's feasible set is that polyhedron's within the atoms' domains,
    so none is feasible either.

    The NLP loop has no such certificate of its own: min sum(exp(x)) s.t. x <= 0,
    sum(x) >= 1 ended ``numerical_error`` after 9 iterations, min -entropy(x) s.t.
    sum(x) == -1 ``max_iter``, their multipliers growing too slowly to tell. G, hv, A
    and b are read off the oracle at z0 (inside every domain): the Jacobians, and
    G z0 - g(z0), A z0 - h(z0).

    ``solved_again``: the caller solves the instances :func:`wanting_precision` names
    again in float64 (whose solve tests them where it does not finish them): they are
    left to it. (A float32 LP on the 281 of 320 float32 softmax instances of logits
    20 x randn that the float64 solve took, before :class:`_Bend`, cost 40-50 % of the
    forward.)"""
    codes = result.status.tolist()  # (one call where every instance is solved)
    if MAX_ITER not in codes and NUMERICAL_ERROR not in codes:
        return result
    unsolved = (result.status == MAX_ITER) | (result.status == NUMERICAL_ERROR)
    if skip is not None:
        unsolved = unsolved & ~skip
    if solved_again:
        unsolved = unsolved & ~wanting_precision(result, tol, skip)[0]
    if not bool(unsolved.any()):
        return result
    rows = unsolved.nonzero().squeeze(1)
    B, n, m, p = z0.shape[0], z0.shape[-1], result.lam.shape[-1], result.nu.shape[-1]
    _, g, h, Jg, Jh, _ = derivatives(z0, z0.new_zeros(B, m), z0.new_zeros(B, p))
    G, A = _dense(Jg).expand(B, m, n)[rows], Jh.expand(B, p, n)[rows]
    z = z0[rows]
    hv, b = _mv(G, z) - g[rows], _mv(A, z) - h[rows]
    k = rows.numel()
    lp = solve_qp(z.new_zeros(k, n, n), z.new_zeros(k, n), G, hv, A, b, tol=tol, max_iter=max_iter)
    infeasible = torch.zeros_like(unsolved).index_copy(0, rows, lp.status == INFEASIBLE)
    return dataclasses.replace(result, status=result.status.masked_fill(infeasible, INFEASIBLE))


def _objective_scale_nlp(grad0, skip):
    """|grad f(z0)|_inf (B,) for the instances where it is below 1 / _OBJECTIVE_RANGE
    (but not zero), 1 for the others; None where there are none. A large gradient needs
    no scaling (1 + |grad| is relative already), and dividing by it is no good guess:
    exp(y) - theta'y with theta over 16 decades, divided by its gradient at the start,
    failed on an instance."""
    size = _inf_norm(grad0)
    if skip is not None:
        size = size.masked_fill(skip, 1.0)
    small = (size < 1.0 / _OBJECTIVE_RANGE) & (size > 0)
    if not bool(small.any()):
        return None
    return torch.where(small, size, 1.0)


def _scaled_select(select, sigma):
    """``select`` (:attr:`Oracle.select`) of the problem with its objective divided by
    ``sigma`` (B,): the kept instances' oracle, scaled by their own sigma."""
    return lambda rows: _scaled_objective(*select(rows), sigma[rows])


def _scaled_objective(derivatives, residuals, sigma):
    """The oracle of the problem with its objective divided by ``sigma`` (B,), in the
    multipliers of that problem (lam_s = lam / sigma, nu_s = nu / sigma): the
    Lagrangian's gradient and Hessian are the caller's at (lam, nu), divided by sigma."""
    inv = (1.0 / sigma)[:, None]

    def scaled_residuals(z, lam, nu):
        rd, g, h = residuals(z, lam * sigma[:, None], nu * sigma[:, None])
        return rd * inv, g, h

    def scaled_derivatives(z, lam, nu):
        rd, g, h, Jg, Jh, H = derivatives(z, lam * sigma[:, None], nu * sigma[:, None])
        H = DiagonalMatrix(H.d * inv) if isinstance(H, DiagonalMatrix) else H * inv.unsqueeze(-1)
        return rd * inv, g, h, Jg, Jh, H

    return scaled_derivatives, scaled_residuals


def kkt_adjoint(H, Jg, Jh, s, lam, w_z, w_lam, w_nu):
    """Solve the transposed KKT system at a solution, for the implicit backward pass.

    With F = [grad_z L; lam * g; h] and g = -s at the solution, ``(dF/d(z, lam, nu))^T u = w``
    reads

        H u_z + Jg' diag(lam) u_lam + Jh' u_nu = w_z
        Jg u_z - diag(s) u_lam                 = w_lam
        Jh u_z                                 = w_nu

    First by a reduction that takes one small Cholesky factorization
    (:func:`_reduced_kkt_adjoint`). A reduction divides by parts of the matrix that may
    be nearly singular where the system is not (a column without curvature, whose
    inactive bound's lam/s ~ 1e-11 is all its diagonal carries): its answer is checked
    against the system itself (:func:`_adjoint_error`), and an instance whose
    backward error exceeds :func:`adjoint_tolerance` is solved again on
    the whole system, equilibrated, by Householder QR
    (:func:`_equilibrated_kkt_adjoint`), which keeps the better answer.

    Shapes: H (B, n, n), Jg (B, m, n), Jh (B, p, n), s, lam, w_lam (B, m), w_z (B, n),
    w_nu (B, p). H and Jg may be a :class:`DiagonalMatrix` and a :class:`BoundedJacobian`.
    Returns (u_z, u_lam, u_nu, failed, error): failed (B,) where no answer could be
    computed, error (B,) the answer's backward error (above the tolerance: an answer
    that may be inaccurate, for the caller to report).
    """
    u_z, u_lam, u_nu, failed = _reduced_kkt_adjoint(H, Jg, Jh, s, lam, w_z, w_lam, w_nu)
    w = (w_z, w_lam, w_nu)
    error = _adjoint_error(H, Jg, Jh, s, lam, (u_z, u_lam, u_nu), w)
    redo = failed | ~(error <= adjoint_tolerance(s.dtype))
    if not bool(redo.any()):
        return u_z, u_lam, u_nu, failed, error
    # those instances alone, so that the others come out as in any batch
    idx = redo.nonzero().squeeze(-1)
    system = (_select(H, idx), _select(Jg, idx), _select(Jh, idx), s[idx], lam[idx])
    w_idx = tuple(x[idx] for x in w)
    *again, again_failed = _equilibrated_kkt_adjoint(*system, *w_idx)
    again_error = _adjoint_error(*system, again, w_idx)
    better = (again_error < error[idx]) | error[idx].isnan()
    take = idx[better]
    u_z, u_lam, u_nu = (u.index_copy(0, take, new[better]) for u, new in zip((u_z, u_lam, u_nu), again))
    failed = failed.index_copy(0, take, again_failed[better])
    error = error.index_copy(0, take, again_error[better])
    return u_z, u_lam, u_nu, failed | error.isnan(), error


def _reduced_kkt_adjoint(H, Jg, Jh, s, lam, w_z, w_lam, w_nu):
    """The transposed KKT system of :func:`kkt_adjoint` by a reduction.

    Eliminating every u_lam through lam/s would be badly conditioned: lam/s is ~1e14 on
    active constraints and ~1e-14 on inactive ones. So only the inactive rows
    (lam/s <= 1) are eliminated, and the active rows stay as nearly-equality constraints
    with y = lam * u_lam:

        [ H + Jg_in' S_in^-1 Lam_in Jg_in   Jg_act'       Jh' ] [u_z  ]   [w_z + ...]
        [ Jg_act                            -s/lam (act)   0  ] [y_act] = [w_lam_act]
        [ Jh                                 0             0  ] [u_nu ]   [w_nu     ]

    which the same Cholesky/Schur kernel solves with every scale bounded by one
    (:func:`_saddle_solve`, which also copes with a singular H); for a diagonal H and
    bound rows, in the space of the general rows and equalities
    (:func:`_diagonal_kkt_adjoint`). Returns (u_z, u_lam, u_nu, failed).
    """
    if isinstance(H, DiagonalMatrix):
        solution = _diagonal_kkt_adjoint(H, Jg, Jh, s, lam, w_z, w_lam, w_nu)
        if solution is None:
            H, Jg = H.dense(), _dense(Jg)
        else:
            return solution
    m = Jg.shape[-2]
    sigma = lam / s
    active = sigma > 1.0
    sigma_in = torch.where(active, torch.zeros_like(sigma), sigma)
    r1 = w_z + _mtv(Jg, sigma_in * w_lam) if m else w_z
    rows = torch.cat([Jg * active.unsqueeze(-1).to(Jg.dtype), Jh], -2)
    diag = torch.cat([torch.where(active, 1.0 / sigma, torch.ones_like(sigma)), w_nu.new_zeros(w_nu.shape)], -1)
    r2 = torch.cat([torch.where(active, w_lam, torch.zeros_like(w_lam)), w_nu], -1)
    u_z, t, failed = _saddle_solve(H, Jg, sigma_in, rows, diag, r1, r2)
    y_act, u_nu = t[..., :m], t[..., m:]
    u_lam_inactive = (_mv(Jg, u_z) - w_lam) / s if m else w_lam
    u_lam = torch.where(active, y_act / lam, u_lam_inactive)
    return u_z, u_lam, u_nu, failed


def _adjoint_error(H, Jg, Jh, s, lam, u, w):
    """The backward error (B,) of u = (u_z, u_lam, u_nu) as a solution of
    :func:`kkt_adjoint`'s system for w = (w_z, w_lam, w_nu), row by row: the largest
    |residual_i| / (sum over the blocks b of |row_i,b|_1 |x_b|_inf + |w_i|), with the
    blocks x = (u_z, y, u_nu), y = lam * u_lam, the unknowns the gradients read (the
    rows of g taken times lam, as the system in y has them). Row by row, as the rows'
    scales differ by orders of magnitude (a curvature of 1e20 beside a flat column);
    block by block, as the blocks' do (an objective times s puts u_z at 1/s of y: one
    norm over all of x let a 28x error in u_z pass), but no block below
    :data:`_BLOCK_FLOOR` of the largest; normwise within a block, since components
    that are 0 but for rounding (an LP's u_z) carry no weight in a gradient. NaN where
    u is."""
    u_z, u_lam, u_nu = u
    w_z, w_lam, w_nu = w
    y = lam * u_lam
    sizes = torch.stack([x.abs().amax(-1) if x.shape[-1] else x.new_zeros(x.shape[0]) for x in (u_z, y, u_nu)], -1)
    # a block below _BLOCK_FLOOR of the largest is judged at that floor: an LP's u_z is 0
    # but for rounding (1e-26 beside y ~ 1), and its rows' rounding read as an error of 1
    floor = sizes.amax(-1, keepdim=True) * _BLOCK_FLOOR
    z_size, y_size, nu_size = torch.maximum(sizes, floor).unsqueeze(-1).unbind(-2)
    (_, H_cols), (Jg_rows, Jg_cols), (Jh_rows, Jh_cols) = _abs_sums(H), _abs_sums(Jg), _abs_sums(Jh)
    residual = torch.cat([_apply(H, u_z) + _apply_t(Jg, y) + _mtv(Jh, u_nu) - w_z,
                          lam * (_apply(Jg, u_z) - w_lam) - s * y,
                          _mv(Jh, u_z) - w_nu], -1).abs_()
    scale = torch.cat([H_cols * z_size + Jg_cols * y_size + Jh_cols * nu_size + w_z.abs(),
                       (lam * Jg_rows * z_size).addcmul_(s, y_size).add_((lam * w_lam).abs_()),
                       (Jh_rows * z_size).add_(w_nu.abs())], -1)
    # (a scale of 0 with a residual of 0: 0, as the clamp makes it)
    return residual.div_(scale.clamp_(min=torch.finfo(scale.dtype).tiny)).amax(-1)


def adjoint_tolerance(dtype) -> float:
    """The backward error above which :func:`kkt_adjoint` solves an instance again:
    1000 eps, 2.2e-13 in float64 (a reduction's answer, refined, read 1e-36 to 1e-13 on
    the test suite's problems but for loose tolerances; a flat column's 1e-3 to 0.27)."""
    return 1e3 * torch.finfo(dtype).eps


# a block's size in :func:`_adjoint_error` is at least this part of the largest block's.
# Rounding in a block that is 0 (about 0.1 eps of the largest: a softmax's u_z under
# sum(z) read 3e-14 against it) stays below adjoint_tolerance; a block smaller than the
# floor is held to adjoint_tolerance times the floor, absolutely, not relatively
_BLOCK_FLOOR = 1e-3


def _equilibrated_kkt_adjoint(H, Jg, Jh, s, lam, w_z, w_lam, w_nu):
    """:func:`kkt_adjoint`'s system solved whole, (n + m + p) square, by QR after
    equilibrating its rows and columns (:class:`solvers.dense.EquilibratedQR`), with two
    rounds of refinement against the unscaled system. No part is eliminated through a
    division, so a column without curvature or a curvature of 1e20 beside it costs
    nothing in accuracy where the system itself is well conditioned once scaled; the
    refinement recovers a part of the answer far smaller than the others (u_z of an
    objective times 1e10, 1e-4 off after the first solve). Dense: for the instances a
    reduction could not serve. Returns (u_z, u_lam, u_nu, failed): failed where a pivot
    is 0 or the answer not finite (a nearly singular system keeps its answer, judged by
    its backward error)."""
    H, Jg = _dense(H), _dense(Jg)
    B, n = w_z.shape
    m, p = lam.shape[-1], Jh.shape[-2]
    K = H.new_zeros(B, n + m + p, n + m + p)
    K[:, :n, :n] = H
    K[:, :n, n:n + m] = _mT(Jg) * lam.unsqueeze(-2)
    K[:, :n, n + m:] = _mT(Jh)
    K[:, n:n + m, :n] = Jg
    K[:, n:n + m, n:n + m] = torch.diag_embed(-s)
    K[:, n + m:, :n] = Jh
    factor = EquilibratedQR(K)
    w = torch.cat([w_z, w_lam, w_nu], -1)
    u = factor.solve(w)
    for _ in range(2):
        u = u + factor.solve(w - _mv(K, u))
    failed = ~torch.isfinite(u).all(-1) | factor.exactly_singular
    return u[:, :n], u[:, n:n + m], u[:, n + m:], failed


def scaled_kkt_adjoint(Q, c, G, A, s, lam, w_z, w_lam, w_nu):
    """:func:`kkt_adjoint` of an LP or QP (``Q``, ``c``, ``G``, ``A`` its data) without a
    constraint-space factor (the general loop's, OSQP's), solved on the problem with its
    rows and objective scaled as the solvers scale them, and mapped back.

    With rows r G, r_A A and the objective over sigma, the multipliers are
    lam_s = lam / (sigma r), nu_s = nu / (sigma r_A) and the slacks r s; the scaled KKT
    residual is the caller's times diag(1/sigma, 1/sigma, r_A), so the transposed solve
    takes w = (w_z, sigma r w_lam, sigma r_A w_nu) and gives u = (u_z / sigma,
    u_lam / sigma, r_A u_nu). Unscaled, which rows it keeps explicit (lam / s > 1) hung on
    the units: a row times 1e6 with an objective times 1e-6 read lam / s ~ 1e-5 while
    active, and its gradient came out 1.0 off (OSQP, float32). Returns
    :func:`kkt_adjoint`'s five (the backward error of the scaled system)."""
    r_G, G_s, r_A, A_s, sigma = problem_scales(Q, c, G, A)
    k = torch.ones_like(c[:, :1]) if sigma is None else sigma[:, None]
    u_z, u_lam, u_nu, failed, error = kkt_adjoint(
        Q / k[..., None], G_s, A_s, s * r_G, lam / (k * r_G), w_z, k * r_G * w_lam, k * r_A * w_nu)
    return u_z / k, u_lam / k, u_nu * r_A, failed, error


def problem_scales(Q, c, G, A):
    """How :func:`solve_qp` scales a problem, for what takes the caller's data and scales it
    the same (OSQP's backend, :func:`scaled_kkt_adjoint`): ``(r_G, G_s, r_A, A_s, sigma)``,
    each row's scale and the scaled rows of G and A (a batch shared as a stride-0 view,
    or of size 1, stays a view) and the objective's scale, None where it is within
    range (see :func:`_objective_scale`)."""
    B = c.shape[0]

    def rows(M):
        if M.shape[0] == 1 or M.stride(0) == 0:
            r, scaled = _row_scaled(M[:1])
            return r.expand(B, -1), scaled.expand(B, -1, -1)
        return _row_scaled(M)

    (r_G, G_s), (r_A, A_s) = rows(G), rows(A)
    return r_G, G_s, r_A, A_s, _objective_scale(Q.expand(B, *Q.shape[1:]), c)


def _row_weights(H, rows):
    """gamma (B, k) for rows (B, k, n): gamma_i |row_i|^2 at H's scale (its largest
    diagonal entry, at least 1), 0 for a zero row; gamma_i row_i' row_i added to H
    fixes the directions H leaves free and the rows do not."""
    row_sq = rows.square().sum(-1)
    h_scale = H.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp(min=1.0)
    return torch.where(row_sq > 0, h_scale[:, None] / row_sq.clamp(min=torch.finfo(row_sq.dtype).tiny), 0.0)


def _saddle_solve(H, Jg, sigma, rows, diag, r1, r2):
    """Solve ``[[H + Jg' diag(sigma) Jg, rows'], [rows, -diag(diag)]] [u; y] = [r1; r2]``
    (diag >= 0) by the Cholesky/Schur kernel (:class:`ReducedKKT`), which eliminates u
    first, through the (1, 1) block: singular where H is (a PSD Q, an LP) though the
    rows fix the directions H leaves free. So each row c_i adds gamma_i c_i' c_i to
    that block, with its equation times gamma_i / (1 + gamma_i diag_i) added to the
    first block row: an exact transformation, with y scaled by 1 / (1 + gamma_i
    diag_i) and gamma_i |c_i|^2 at H's scale (zero rows are left alone). Returns
    (u, y, failed)."""
    gamma = _row_weights(H, rows)
    stretch = 1.0 + gamma * diag  # y = stretch * y~
    weight = gamma / stretch
    H = torch.baddbmm(H, _mT(rows), weight.unsqueeze(-1) * rows)
    kkt = ReducedKKT(H, Jg, rows, sigma, schur_diagonal=diag * stretch)
    u, t = kkt.solve(r1 + _mtv(rows, weight * r2), r2)
    return u, t * stretch, kkt.failed


def qp_adjoint(f: QPFactor, s, lam, w_z, w_lam=None, w_nu=None, active_set=None, active_factor=None,
               active_order=None):
    """:func:`kkt_adjoint` for a QP solved in constraint space, reusing its factorization.

    ``s``, ``lam`` and the cotangents are in the caller's units; the factor is of the
    row-scaled problem (:func:`solve_qp`, ``f.row_scale``; its G and A are the caller's).
    The KKT residuals of the two agree but for the rows of the equalities, scaled by r_A,
    so the adjoints agree but for u_nu = r_A u_nu_s.

    With y = lam * u_lam the transposed system is the forward's Newton matrix
    ``[[Q, G', A'], [G, -D, 0], [A, 0, 0]] [u_z; y; u_nu] = [w_z; w_lam; w_nu]``,
    D = s/lam at the solution: one (m, m) Cholesky factorization on top of the blocks the
    forward pass already built. u_lam is read from y on active constraints and from the
    constraint row on inactive ones (where lam ~ 0 would make y/lam inaccurate).
    ``w_lam``, ``w_nu`` None: zero (no cotangent on the duals, the usual case). The
    failure mask is None when the active set's factor is reused: nothing is factored.
    """
    m, p = lam.shape[-1], f.p
    r_G, r_A = getattr(f, "row_scale", (None, None))
    if r_G is not None:
        s, lam = s * r_G, lam / r_G
        w_lam = None if w_lam is None else w_lam * r_G
        w_nu = None if w_nu is None else w_nu * r_A
    # an objective divided by sigma: the residuals of stationarity and complementarity
    # are 1/sigma of the caller's and the multipliers too, so the cotangents of the
    # multipliers take a factor sigma, and u_z, u_lam come back divided by it
    sigma = getattr(f, "objective_scale", None)
    if sigma is not None:
        sigma = sigma[:, None]
        lam = lam / sigma
        w_lam = None if w_lam is None else w_lam * sigma
        w_nu = None if w_nu is None else w_nu * sigma
    if active_factor is None:
        eye = torch.eye(m, dtype=lam.dtype, device=lam.device)
        L, info = torch.linalg.cholesky_ex(f.W + torch.diag_embed(s / lam + f.delta[:, None]))
        failed = info > 0
        L = torch.where(failed[:, None, None], eye.expand_as(L), L)
        a = None
    else:
        # at a polished solution D = s/lam is eps^2/lam on the active set and s/eps^2
        # off it: (W + D) y = r is the active set's system with y = 0 elsewhere, which
        # the forward pass has factored already
        L, a = active_factor, active_set.to(lam.dtype)
        failed = None
    # G Q^-1 w_z of the row-scaled G, as (L^-1 G')'(L^-1 w_z): the half-solve serves u_z too
    w_half = f.half_solve(w_z)
    GAqw = _mtv(f.GA_half, w_half)
    Gqw = GAqw[:, :m]
    rhs = Gqw if w_lam is None else Gqw - w_lam
    if p:
        Aqw = GAqw[:, m:]
        r_eq = Aqw if w_nu is None else Aqw - w_nu
        rhs = rhs - _mtv(f.T, r_eq)
    # (the active set's factor: y is exactly zero off the active set, see solve_active_set)
    y = (_chol_solve(rhs.unsqueeze(-1), L).squeeze(-1) if a is None
         else _active_set_solve(rhs, a, L, active_order))
    # the inactive rows' G u_z - w_lam, with G u_z = G Q^-1 (w_z - G'y - A'u_nu): rhs - W y,
    # the identity of an active set's constraint values (solve_active_set)
    G_uz = rhs - _mv(f.W, y)
    if p:
        u_nu = _chol_solve((r_eq - _mtv(f.K12, y)).unsqueeze(-1), f.L22).squeeze(-1)
    else:
        u_nu = lam.new_zeros(lam.shape[0], 0)
    u_z = f.from_half(w_half, y, u_nu)  # Q^-1 (w_z - G'y - A'u_nu)
    u_lam = torch.where(lam > s, y / lam, G_uz / s)
    if sigma is not None:
        u_z, u_lam = u_z / sigma, u_lam / sigma
    return u_z, u_lam, u_nu if r_A is None else u_nu * r_A, failed
