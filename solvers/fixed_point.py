"""Batched forward solvers for fixed points ``y = T(y)`` and roots ``F(y) = 0``.

All solvers are pure functions on batched tensors: the state ``y`` has shape
``(B, *shape)`` and the map (``T`` or ``F``) must act on every batch instance
independently (no batch norm, no mixing across the batch). Internally the state is
flattened to ``(B, n)``. Every instance is tracked separately: an instance that has
converged is frozen while the others keep iterating, an instance that blows up is
frozen at its best iterate and reported, and one failed instance never changes the
result of another.

The solvers return a :class:`SolverResult` with a per-instance status code (see
:data:`STATUS_NAMES`), the number of map evaluations (fixed points) or Newton steps
(roots), and the residual of the returned point.

Residuals
---------
fixed points  ``||T(y) - y||_2 / (1 + ||y||_2)`` (relative, so ``tol`` does not depend
              on the scale of ``y``)
roots         ``||F(y)||_inf`` (absolute)
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from .dense import EquilibratedQR

__all__ = [
    "STATUS_NAMES",
    "CONVERGED",
    "MAX_ITER",
    "DIVERGED",
    "SINGULAR_JACOBIAN",
    "SolverResult",
    "fixed_point_iteration",
    "anderson",
    "broyden",
    "newton_solve",
    "vjp_jacobian",
    "lipschitz_estimate",
    "default_tolerance",
    "FIXED_POINT_SOLVERS",
]

CONVERGED = 0
MAX_ITER = 1
DIVERGED = 2
SINGULAR_JACOBIAN = 3
#: Names of the status codes, indexed by code.
STATUS_NAMES = ("converged", "max_iter", "diverged", "singular_jacobian")

_ACTIVE = -1  # internal code of an instance that is still iterating


@dataclass
class SolverResult:
    """Outcome of a batched solve.

    Attributes
    ----------
    solution : torch.Tensor
        ``(B, *shape)``: the converged point, or the best iterate (lowest residual) of an
        instance that did not converge.
    status : torch.Tensor
        ``(B,)`` int64 codes into :data:`STATUS_NAMES`.
    iterations : torch.Tensor
        ``(B,)`` int64: map evaluations (fixed-point solvers) or Newton steps.
    residual : torch.Tensor
        ``(B,)``: residual of ``solution`` (see the module docstring).
    """

    solution: torch.Tensor
    status: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor

    @property
    def converged(self) -> torch.Tensor:
        """``(B,)`` bool."""
        return self.status == CONVERGED

    def status_names(self) -> List[str]:
        """Per-instance status as strings."""
        return [STATUS_NAMES[code] for code in self.status.tolist()]


def default_tolerance(dtype: torch.dtype) -> float:
    """``sqrt(eps)`` of ``dtype``: about 1.5e-8 in float64 and 3.5e-4 in float32."""
    return math.sqrt(torch.finfo(dtype).eps)


class _Tracker:
    """Per-instance bookkeeping shared by all solvers.

    Keeps the best iterate of each instance, freezes instances that converged or failed
    and records when that happened, all with batched ``torch.where``.
    """

    def __init__(self, y0: torch.Tensor, tol: float, max_iter: int):
        batch = y0.shape[0]
        self.tol = tol
        self.best = y0.clone()
        self.best_residual = y0.new_full((batch,), math.inf)
        self.code = torch.full((batch,), _ACTIVE, dtype=torch.long, device=y0.device)
        self.iterations = torch.full((batch,), max_iter, dtype=torch.long, device=y0.device)

    @property
    def active(self) -> torch.Tensor:
        return self.code == _ACTIVE

    def any_active(self) -> bool:
        # One host synchronisation per iteration: the price of stopping early.
        return bool(self.active.any())

    def update(self, iteration: int, y: torch.Tensor, residual: torch.Tensor) -> None:
        """Record that ``y`` (B, n) has ``residual`` (B,) after ``iteration`` steps."""
        active = self.active
        finite = torch.isfinite(residual) & torch.isfinite(y).all(dim=1)
        self.fail(active & ~finite, DIVERGED, iteration)
        improved = active & finite & (residual < self.best_residual)
        self.best = torch.where(improved[:, None], y, self.best)
        self.best_residual = torch.where(improved, residual, self.best_residual)
        done = improved & (residual <= self.tol)
        self.code = torch.where(done, torch.full_like(self.code, CONVERGED), self.code)
        self.iterations = torch.where(done, torch.full_like(self.iterations, iteration), self.iterations)

    def fail(self, mask: torch.Tensor, code: int, iteration: int) -> None:
        mask = mask & self.active
        self.code = torch.where(mask, torch.full_like(self.code, code), self.code)
        self.iterations = torch.where(mask, torch.full_like(self.iterations, iteration), self.iterations)

    def freeze(self, y_next: torch.Tensor) -> torch.Tensor:
        """Keep stopped instances at their best iterate so they stay finite."""
        return torch.where(self.active[:, None], y_next, self.best)

    def result(self, shape: torch.Size) -> SolverResult:
        code = torch.where(self.active, torch.full_like(self.code, MAX_ITER), self.code)
        return SolverResult(
            solution=self.best.reshape(shape),
            status=code,
            iterations=self.iterations,
            residual=self.best_residual,
        )


def _flat_map(func: Callable[[torch.Tensor], torch.Tensor], shape: torch.Size, name: str):
    """Wrap ``func`` on ``(B, *shape)`` as a map on ``(B, n)`` with a shape check."""

    def flat(y: torch.Tensor) -> torch.Tensor:
        out = func(y.reshape(shape))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{name} must return a tensor, got {type(out).__name__}")
        if out.shape != shape:
            raise ValueError(f"{name} returned shape {tuple(out.shape)} for a state of shape {tuple(shape)}; "
                             "it must return a tensor of the same shape as its input")
        return out.reshape(shape[0], -1)

    return flat


def _fixed_point_residual(ty: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(ty - y, dim=1) / (1 + torch.linalg.vector_norm(y, dim=1))


def _check_common(y0: torch.Tensor, max_iter: int) -> None:
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"y0 must be a tensor, got {type(y0).__name__}")
    if y0.dim() < 1:
        raise ValueError("y0 must have a leading batch dimension, shape (B, *shape)")
    if not y0.is_floating_point():
        raise TypeError(f"y0 must be a floating-point tensor, got {y0.dtype}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")


def fixed_point_iteration(func: Callable[[torch.Tensor], torch.Tensor], y0: torch.Tensor, *,
                          tol: Optional[float] = None, max_iter: int = 100,
                          damping: float = 1.0) -> SolverResult:
    """Plain (optionally damped) iteration ``y <- (1 - damping) y + damping T(y)``.

    Parameters
    ----------
    func : callable
        ``T``: ``(B, *shape) -> (B, *shape)``, instance-separable.
    y0 : torch.Tensor
        ``(B, *shape)`` starting point.
    tol : float, optional
        Relative residual at which an instance stops (default :func:`default_tolerance`).
    max_iter : int
        Maximum number of evaluations of ``T``.
    damping : float
        Step in ``(0, 1]``; 1 is the undamped iteration.
    """
    _check_common(y0, max_iter)
    if not 0 < damping <= 1:
        raise ValueError(f"damping must lie in (0, 1], got {damping}")
    tol = default_tolerance(y0.dtype) if tol is None else tol
    shape = y0.shape
    T = _flat_map(func, shape, "T")
    y = y0.reshape(shape[0], -1)
    tracker = _Tracker(y, tol, max_iter)
    for k in range(1, max_iter + 1):
        ty = T(y)
        tracker.update(k, y, _fixed_point_residual(ty, y))
        if k == max_iter or not tracker.any_active():
            break
        y = tracker.freeze((1 - damping) * y + damping * ty)
    return tracker.result(shape)


def anderson(func: Callable[[torch.Tensor], torch.Tensor], y0: torch.Tensor, *,
             tol: Optional[float] = None, max_iter: int = 100, memory: int = 5,
             regularization: Optional[float] = None, damping: float = 1.0) -> SolverResult:
    """Anderson acceleration (type II, Walker & Ni 2011) of the iteration ``y <- T(y)``.

    Each step solves, for every instance at once, the small constrained least-squares
    problem ``min ||G' alpha||, sum(alpha) = 1`` over the last ``m <= memory`` residuals
    ``G = T(Y) - Y`` (``(B, m, n)``) through its ``(m + 1) x (m + 1)`` KKT system, and
    moves to ``damping * T(Y)' alpha + (1 - damping) * Y' alpha``.

    Parameters
    ----------
    func, y0, tol, max_iter, damping
        As in :func:`fixed_point_iteration`.
    memory : int
        Number of past iterates kept (``m``).
    regularization : float, optional
        Tikhonov term relative to the mean diagonal of ``G G'`` (default 1e-10 in
        float64, 1e-5 in lower precision); keeps the KKT system solvable when
        residuals become collinear or vanish.
    """
    _check_common(y0, max_iter)
    if memory < 1:
        raise ValueError(f"memory must be >= 1, got {memory}")
    if not 0 < damping <= 1:
        raise ValueError(f"damping must lie in (0, 1], got {damping}")
    tol = default_tolerance(y0.dtype) if tol is None else tol
    if regularization is None:
        regularization = 1e-10 if y0.dtype == torch.float64 else 1e-5
    shape = y0.shape
    T = _flat_map(func, shape, "T")
    batch = shape[0]
    y = y0.reshape(batch, -1)
    n = y.shape[1]
    history_y = y.new_zeros(batch, memory, n)
    history_t = y.new_zeros(batch, memory, n)
    tracker = _Tracker(y, tol, max_iter)
    for k in range(1, max_iter + 1):
        ty = T(y)
        tracker.update(k, y, _fixed_point_residual(ty, y))
        if k == max_iter or not tracker.any_active():
            break
        slot = (k - 1) % memory
        history_y[:, slot] = y
        history_t[:, slot] = ty
        m = min(k, memory)
        residuals = history_t[:, :m] - history_y[:, :m]                    # (B, m, n)
        gram = residuals @ residuals.transpose(1, 2)                        # (B, m, m)
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(y.dtype).tiny)
        gram = gram + (regularization * scale)[:, None, None] * torch.eye(m, dtype=y.dtype, device=y.device)
        # KKT system of min alpha' gram alpha s.t. 1' alpha = 1.
        kkt = y.new_zeros(batch, m + 1, m + 1)
        kkt[:, 0, 1:] = 1
        kkt[:, 1:, 0] = 1
        kkt[:, 1:, 1:] = gram
        rhs = y.new_zeros(batch, m + 1)
        rhs[:, 0] = 1
        # solve_ex: a singular system in one instance must not raise for the whole batch.
        sol, _ = torch.linalg.solve_ex(kkt, rhs)
        alpha = sol[:, 1:]                                                   # (B, m)
        mixed_t = torch.einsum("bm,bmn->bn", alpha, history_t[:, :m])
        if damping < 1:
            mixed_y = torch.einsum("bm,bmn->bn", alpha, history_y[:, :m])
            y_next = damping * mixed_t + (1 - damping) * mixed_y
        else:
            y_next = mixed_t
        # A NaN alpha (degenerate instance) falls back to a plain step for that instance.
        y_next = torch.where(torch.isfinite(y_next).all(dim=1, keepdim=True), y_next, ty)
        y = tracker.freeze(y_next)
    return tracker.result(shape)


def broyden(func: Callable[[torch.Tensor], torch.Tensor], y0: torch.Tensor, *,
            tol: Optional[float] = None, max_iter: int = 100, memory: int = 30) -> SolverResult:
    """Limited-memory "good" Broyden method on ``g(y) = T(y) - y = 0``.

    The inverse Jacobian of ``g`` starts at ``-I`` (exact when ``T`` does not depend on
    ``y``) and receives one rank-one update per step, ``H <- H + (dy - H dg) dy' H /
    (dy' H dg)``, stored as ``(B, memory, n)`` factors in a ring buffer (the oldest
    update is overwritten when it is full), as in deep equilibrium models.

    Parameters
    ----------
    func, y0, tol, max_iter
        As in :func:`fixed_point_iteration`.
    memory : int
        Number of rank-one updates kept.
    """
    _check_common(y0, max_iter)
    if memory < 1:
        raise ValueError(f"memory must be >= 1, got {memory}")
    tol = default_tolerance(y0.dtype) if tol is None else tol
    shape = y0.shape
    T = _flat_map(func, shape, "T")
    batch = shape[0]
    y = y0.reshape(batch, -1)
    n = y.shape[1]
    us = y.new_zeros(batch, memory, n)
    vts = y.new_zeros(batch, memory, n)
    tiny = torch.finfo(y.dtype).tiny

    def inverse_times(x):      # H x with H = -I + sum_i u_i v_i'
        return -x + torch.einsum("bmn,bm->bn", us, torch.einsum("bmn,bn->bm", vts, x))

    def times_inverse(x):      # x' H
        return -x + torch.einsum("bmn,bm->bn", vts, torch.einsum("bmn,bn->bm", us, x))

    tracker = _Tracker(y, tol, max_iter)
    g = T(y) - y
    tracker.update(1, y, torch.linalg.vector_norm(g, dim=1) / (1 + torch.linalg.vector_norm(y, dim=1)))
    for k in range(2, max_iter + 1):
        if not tracker.any_active():
            break
        step = -inverse_times(g)
        # A non-finite step (degenerate update) restarts that instance with a plain step.
        step = torch.where(torch.isfinite(step).all(dim=1, keepdim=True), step, g)
        y_next = tracker.freeze(y + step)
        g_next = T(y_next) - y_next
        tracker.update(k, y_next, torch.linalg.vector_norm(g_next, dim=1)
                       / (1 + torch.linalg.vector_norm(y_next, dim=1)))
        dy = y_next - y
        dg = g_next - g
        vt = times_inverse(dy)
        denominator = (vt * dg).sum(dim=1)
        ok = (denominator.abs() > tiny) & torch.isfinite(denominator) & tracker.active
        u = (dy - inverse_times(dg)) / torch.where(ok, denominator, torch.ones_like(denominator))[:, None]
        slot = (k - 2) % memory
        us[:, slot] = torch.where(ok[:, None], u, torch.zeros_like(u))
        vts[:, slot] = torch.where(ok[:, None], vt, torch.zeros_like(vt))
        # Restarting from the best iterate keeps diverged instances finite.
        y = torch.where(torch.isfinite(g_next).all(dim=1, keepdim=True), y_next, tracker.best)
        g = torch.where(torch.isfinite(g_next).all(dim=1, keepdim=True), g_next, torch.zeros_like(g_next))
    return tracker.result(shape)


#: Read-only name -> function table used by ``FixedPointLayer(solver=...)``.
FIXED_POINT_SOLVERS = {
    "iteration": fixed_point_iteration,
    "anderson": anderson,
    "broyden": broyden,
}


def vjp_jacobian(outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Dense per-instance Jacobian from vector-Jacobian products of a recorded graph.

    Parameters
    ----------
    outputs : torch.Tensor
        ``(B, *out_shape)`` computed from ``inputs`` with autograd recording, each
        instance depending on its own instance of ``inputs`` only.
    inputs : torch.Tensor
        ``(B, *in_shape)`` requiring grad.

    Returns
    -------
    torch.Tensor
        ``(B, m, n)`` with ``m = prod(out_shape)``, ``n = prod(in_shape)``; row ``i`` is
        the gradient of output ``i``. The graph is retained.
    """
    batch = outputs.shape[0]
    m = outputs.shape[1:].numel()  # (not outputs[0]: a batch may be empty)
    basis = torch.eye(m, dtype=outputs.dtype, device=outputs.device)
    seeds = basis[:, None, :].expand(m, batch, m).reshape((m,) + tuple(outputs.shape))
    try:
        with warnings.catch_warnings():
            # vmap over the backward warns when an op has no batching rule; it then
            # falls back to a loop that is still correct.
            warnings.filterwarnings("ignore", message=".*[Bb]atching rule.*")
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            (rows,) = torch.autograd.grad(outputs, inputs, seeds, retain_graph=True,
                                          is_grads_batched=True, allow_unused=True)
    except RuntimeError:
        # Some custom autograd functions cannot be vmapped: one VJP per output entry.
        rows_list = []
        for i in range(m):
            (row,) = torch.autograd.grad(outputs, inputs, seeds[i], retain_graph=True, allow_unused=True)
            rows_list.append(torch.zeros_like(inputs) if row is None else row)
        rows = torch.stack(rows_list)
    if rows is None:
        return outputs.new_zeros(batch, m, inputs.shape[1:].numel())
    return rows.reshape(m, batch, inputs.shape[1:].numel()).transpose(0, 1)


def newton_solve(func: Callable[[torch.Tensor], torch.Tensor], y0: torch.Tensor, *,
                 tol: Optional[float] = None, max_iter: int = 50, line_search: bool = True,
                 max_backtracks: int = 20) -> SolverResult:
    """Batched Newton method for ``F(y) = 0`` with autograd Jacobians.

    Each step forms the dense per-instance Jacobian ``(B, n, n)`` from ``n`` vectorized
    vector-Jacobian products, solves ``J dy = -F`` by batched LU and, with
    ``line_search``, halves the step per instance until ``||F||^2`` decreases
    (Armijo condition). Instances with a singular Jacobian stop with status
    ``singular_jacobian``.

    Parameters
    ----------
    func : callable
        ``F``: ``(B, *shape) -> (B, *shape')`` with ``prod(shape') == prod(shape)``,
        instance-separable and differentiable by torch autograd.
    y0 : torch.Tensor
        ``(B, *shape)`` starting point.
    tol : float, optional
        Stop an instance when ``||F(y)||_inf <= tol`` (default :func:`default_tolerance`).
    max_iter : int
        Maximum number of Newton steps.
    line_search : bool
        Backtracking on ``||F||^2``; without it full steps are taken.
    max_backtracks : int
        Maximum halvings per step.
    """
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"y0 must be a tensor, got {type(y0).__name__}")
    if y0.dim() < 1 or not y0.is_floating_point():
        raise ValueError("y0 must be a floating-point tensor of shape (B, *shape)")
    if not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative int, got {max_iter!r}")
    tol = default_tolerance(y0.dtype) if tol is None else tol
    shape = y0.shape
    batch = shape[0]
    n = shape[1:].numel()  # (not y0[0]: a batch may be empty)

    def residual(y_flat):
        out = func(y_flat.reshape(shape))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the residual must return a tensor, got {type(out).__name__}")
        if out.dim() < 1 or out.shape[0] != batch or out.shape[1:].numel() != n:
            raise ValueError(f"the residual returned shape {tuple(out.shape)} for y of shape {tuple(shape)}; "
                             f"it must return {n} entries per instance, shape ({batch}, ...)")
        return out.reshape(batch, n)

    y = y0.detach().reshape(batch, n).clone()
    tracker = _Tracker(y, tol, max_iter)
    for k in range(max_iter + 1):
        with torch.enable_grad():
            y_req = y.detach().requires_grad_(True)
            f = residual(y_req)
            f_value = f.detach()
            tracker.update(k, y, f_value.abs().amax(dim=1))
            if k == max_iter or not tracker.any_active():
                break
            jac = vjp_jacobian(f, y_req)
        del f, y_req
        factor = EquilibratedQR(jac)
        step = factor.solve(-f_value)
        singular = factor.singular | ~torch.isfinite(step).all(dim=1)
        tracker.fail(singular, SINGULAR_JACOBIAN, k)
        step = torch.where(singular[:, None], torch.zeros_like(step), step)
        if line_search:
            merit = (f_value ** 2).sum(dim=1)
            t = torch.ones(batch, dtype=y.dtype, device=y.device)
            pending = tracker.active.clone()
            y_next = y.clone()
            for _ in range(max_backtracks + 1):
                trial = y + t[:, None] * step
                with torch.no_grad():
                    trial_merit = (residual(trial) ** 2).sum(dim=1)
                accept = pending & torch.isfinite(trial_merit) & (trial_merit <= (1 - 1e-4 * t) * merit)
                y_next = torch.where(accept[:, None], trial, y_next)
                pending = pending & ~accept
                if not bool(pending.any()):
                    break
                t = torch.where(pending, t / 2, t)
            # No acceptable step: take the smallest trial step anyway; the tracker
            # keeps the best iterate and max_iter bounds the work.
            y_next = torch.where(pending[:, None], y + t[:, None] * step, y_next)
        else:
            y_next = y + step
        y = tracker.freeze(y_next)
    return tracker.result(shape)


def lipschitz_estimate(func: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, *,
                       iterations: int = 10, seed: int = 0) -> torch.Tensor:
    """Per-instance estimate of ``||dT/dy||_2`` at ``y``: the local Lipschitz constant.

    Power iteration on ``J J'``: ``J' v`` is a vector-Jacobian product and ``J w`` the
    derivative of that product in ``v`` (double backward), so only reverse mode is
    used. The estimate approaches the spectral norm from below. If ``T`` cannot be
    differentiated twice, the power iteration runs on ``J'`` alone and estimates the
    spectral radius instead (also a lower bound of the norm).

    Parameters
    ----------
    func : callable
        ``T``: ``(B, *shape) -> (B, *shape)``.
    y : torch.Tensor
        ``(B, *shape)``.
    iterations : int
        Power iterations.
    seed : int
        Seed of the start vectors (a private generator; the global RNG is untouched).

    Returns
    -------
    torch.Tensor
        ``(B,)``; NaN for instances with a non-finite ``y``.
    """
    batch = y.shape[0]
    finite = torch.isfinite(y.reshape(batch, -1)).all(dim=1)
    y_safe = torch.where(finite.reshape((batch,) + (1,) * (y.dim() - 1)), y, torch.zeros_like(y)).detach()
    generator = torch.Generator(device=y.device).manual_seed(seed)
    v = torch.randn(y_safe.shape, generator=generator, dtype=y.dtype, device=y.device)
    v = v / _instance_norm(v)
    estimate = y.new_zeros(batch)
    with torch.enable_grad():
        y_req = y_safe.requires_grad_(True)
        out = func(y_req)
        if out.shape != y.shape:
            raise ValueError(f"T returned shape {tuple(out.shape)} for a state of shape {tuple(y.shape)}")
        seed_vec = torch.zeros_like(out, requires_grad=True)
        if not out.requires_grad:
            return torch.where(finite, y.new_zeros(batch), torch.full_like(estimate, math.nan))
        try:
            (jt_seed,) = torch.autograd.grad(out, y_req, seed_vec, create_graph=True, allow_unused=True)
            twice = jt_seed is not None and jt_seed.requires_grad
        except RuntimeError:
            twice = False
        for _ in range(max(iterations, 1)):
            (jt_v,) = torch.autograd.grad(out, y_req, v, retain_graph=True, allow_unused=True)
            if jt_v is None:  # T does not depend on y
                return torch.where(finite, y.new_zeros(batch), torch.full_like(estimate, math.nan))
            norm_jt_v = _instance_norm(jt_v)
            estimate = norm_jt_v.reshape(batch)
            if twice:
                # J (J' v) as the derivative of <J' s, J' v> in s. (A T whose backward is
                # once_differentiable, as fused kernels' are, shows a J' s that requires
                # grad but cannot be differentiated: it raises here, not above.)
                try:
                    (j_jt_v,) = torch.autograd.grad(jt_seed, seed_vec, jt_v, retain_graph=True)
                except RuntimeError:
                    twice = False
            if twice:
                v = j_jt_v / _instance_norm(j_jt_v).clamp_min(torch.finfo(y.dtype).tiny)
            else:
                v = jt_v / norm_jt_v.clamp_min(torch.finfo(y.dtype).tiny)
    return torch.where(finite, estimate.detach(), torch.full_like(estimate, math.nan))


def _instance_norm(x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, ..., 1)`` Euclidean norm of every instance."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).reshape((x.shape[0],) + (1,) * (x.dim() - 1))
