"""Batched matrix-free Krylov solvers for ``A x = b``.

``A`` is only available through a closure ``matvec: (B, n) -> (B, n)`` that applies
every instance's own operator to every instance's own vector (for implicit layers: a
vector-Jacobian product ``v -> (dF/dy)' v``). All instances iterate together with
batched tensor operations; an instance that has converged stops changing, an
instance that fails (breakdown, singular or indefinite operator, iteration limit) is
reported through ``converged`` and never affects another instance.

Both solvers stop an instance when ``||b - A x||_2 <= max(tol * ||b||_2, atol)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["KrylovResult", "gmres", "cg"]


@dataclass
class KrylovResult:
    """Outcome of a batched Krylov solve.

    Attributes
    ----------
    solution : torch.Tensor
        ``(B, n)``.
    converged : torch.Tensor
        ``(B,)`` bool: the true residual met the tolerance.
    residual : torch.Tensor
        ``(B,)``: ``||b - A x|| / ||b||`` (0 where ``b = 0``).
    iterations : torch.Tensor
        ``(B,)`` int64: operator applications spent on each instance.
    """

    solution: torch.Tensor
    converged: torch.Tensor
    residual: torch.Tensor
    iterations: torch.Tensor


def _check(b: torch.Tensor, x0: Optional[torch.Tensor]) -> None:
    if not isinstance(b, torch.Tensor) or b.dim() != 2 or not b.is_floating_point():
        raise ValueError("b must be a floating-point tensor of shape (B, n)")
    if x0 is not None and x0.shape != b.shape:
        raise ValueError(f"x0 has shape {tuple(x0.shape)}, expected {tuple(b.shape)} like b")


def _checked_matvec(matvec, shape):
    def apply(v):
        out = matvec(v)
        if not isinstance(out, torch.Tensor) or out.shape != shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"matvec returned {got}, expected shape {tuple(shape)}")
        return out
    return apply


def _finish(matvec, b, x, target, b_norm, iterations) -> KrylovResult:
    r_norm = torch.linalg.vector_norm(b - matvec(x), dim=1)
    converged = torch.isfinite(x).all(dim=1) & (r_norm <= target)
    relative = torch.where(b_norm > 0, r_norm / b_norm.clamp_min(torch.finfo(b.dtype).tiny), r_norm)
    return KrylovResult(solution=x, converged=converged, residual=relative, iterations=iterations)


def gmres(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *,
          x0: Optional[torch.Tensor] = None, tol: float = 1e-8, atol: float = 0.0,
          restart: int = 30, max_iter: Optional[int] = None) -> KrylovResult:
    """Restarted GMRES(``restart``) for general (nonsymmetric) ``A``, batched.

    Arnoldi with classical Gram-Schmidt applied twice (numerically as good as modified
    Gram-Schmidt, but one batched product per pass instead of a loop), Givens rotations
    for the per-instance residual estimate, and a masked triangular solve so that each
    instance uses exactly the Krylov columns it built before it converged.

    Parameters
    ----------
    matvec : callable
        ``(B, n) -> (B, n)``.
    b : torch.Tensor
        ``(B, n)``.
    x0 : torch.Tensor, optional
        ``(B, n)`` start (default zeros).
    tol, atol : float
        Relative and absolute tolerance on the residual norm.
    restart : int
        Krylov dimension per cycle (capped at ``n``).
    max_iter : int, optional
        Total operator applications (default ``max(2 n, 100)`` capped at 1000).
    """
    _check(b, x0)
    batch, n = b.shape
    matvec = _checked_matvec(matvec, b.shape)
    restart = max(1, min(restart, n))
    if max_iter is None:
        max_iter = min(max(2 * n, 100), 1000)
    dtype, device = b.dtype, b.device
    tiny = torch.finfo(dtype).tiny
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    b_norm = torch.linalg.vector_norm(b, dim=1)
    target = torch.clamp(tol * b_norm, min=atol)
    iterations = torch.zeros(batch, dtype=torch.long, device=device)
    eye = torch.eye(restart, dtype=dtype, device=device)
    total = 0
    while total < max_iter:
        r = b - matvec(x)
        beta = torch.linalg.vector_norm(r, dim=1)
        active = beta > target            # NaN compares False: a broken instance stops
        if not bool(active.any()):
            break
        basis = b.new_zeros(batch, restart + 1, n)
        hessenberg = b.new_zeros(batch, restart + 1, restart)
        basis[:, 0] = r / beta.clamp_min(tiny)[:, None]
        g = b.new_zeros(batch, restart + 1)
        g[:, 0] = beta
        # Product of the Givens rotations so far, (B, m + 1, m + 1): applying it to a new
        # Hessenberg column is one batched product instead of j sequential rotations.
        rotations = torch.eye(restart + 1, dtype=dtype, device=device).expand(batch, -1, -1).clone()
        columns = torch.zeros(batch, dtype=torch.long, device=device)
        used = 0
        for j in range(restart):
            w = matvec(basis[:, j])
            v_j = basis[:, : j + 1]
            h = torch.einsum("bkn,bn->bk", v_j, w)
            w = w - torch.einsum("bk,bkn->bn", h, v_j)
            correction = torch.einsum("bkn,bn->bk", v_j, w)
            w = w - torch.einsum("bk,bkn->bn", correction, v_j)
            h = h + correction
            h_next = torch.linalg.vector_norm(w, dim=1)
            # Lucky breakdown (h_next = 0) leaves a zero basis vector; the rotation below
            # then reports a zero residual estimate for that instance.
            basis[:, j + 1] = torch.where((h_next > tiny)[:, None], w / h_next.clamp_min(tiny)[:, None],
                                          torch.zeros_like(w))
            column = torch.cat([h, h_next[:, None], b.new_zeros(batch, restart - j - 1)], dim=1)
            column = torch.einsum("bij,bj->bi", rotations, column)
            a, c = column[:, j], column[:, j + 1]
            radius = torch.hypot(a, c)
            nonzero = radius > tiny
            cos_j = torch.where(nonzero, a / radius.clamp_min(tiny), torch.ones_like(a))
            sin_j = torch.where(nonzero, c / radius.clamp_min(tiny), torch.zeros_like(a))
            row_j, row_next = rotations[:, j].clone(), rotations[:, j + 1].clone()
            rotations[:, j] = cos_j[:, None] * row_j + sin_j[:, None] * row_next
            rotations[:, j + 1] = -sin_j[:, None] * row_j + cos_j[:, None] * row_next
            column[:, j] = radius
            column[:, j + 1] = 0
            hessenberg[:, :, j] = column
            g_j = g[:, j].clone()
            g[:, j + 1] = -sin_j * g_j
            g[:, j] = cos_j * g_j
            columns = torch.where(active, torch.full_like(columns, j + 1), columns)
            iterations = iterations + active.long()
            active = active & (g[:, j + 1].abs() > target)
            total += 1
            used = j + 1
            if total >= max_iter or not bool(active.any()):
                break
        # Instance-wise least squares: columns beyond what an instance built are masked
        # to the identity with a zero right-hand side, so they contribute nothing.
        keep = torch.arange(used, device=device)[None, :] < columns[:, None]             # (B, used)
        square = keep[:, :, None] & keep[:, None, :]
        upper_tri = torch.where(square, hessenberg[:, :used, :used], eye[:used, :used])
        rhs = torch.where(keep, g[:, :used], torch.zeros_like(g[:, :used]))
        coefficients = torch.linalg.solve_triangular(upper_tri, rhs[:, :, None], upper=True)[:, :, 0]
        x = x + torch.einsum("bk,bkn->bn", coefficients, basis[:, :used])
    return _finish(matvec, b, x, target, b_norm, iterations)


def cg(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *,
       x0: Optional[torch.Tensor] = None, tol: float = 1e-8, atol: float = 0.0,
       max_iter: Optional[int] = None) -> KrylovResult:
    """Conjugate gradients for symmetric positive definite ``A``, batched.

    An instance whose operator shows non-positive curvature ``p' A p <= 0`` (not
    positive definite) stops there and is reported as not converged.

    Parameters
    ----------
    matvec : callable
        ``(B, n) -> (B, n)``, symmetric positive definite per instance.
    b : torch.Tensor
        ``(B, n)``.
    x0 : torch.Tensor, optional
        ``(B, n)`` start (default zeros).
    tol, atol : float
        Relative and absolute tolerance on the residual norm.
    max_iter : int, optional
        Maximum iterations (default ``max(2 n, 100)`` capped at 1000).
    """
    _check(b, x0)
    batch, n = b.shape
    matvec = _checked_matvec(matvec, b.shape)
    if max_iter is None:
        max_iter = min(max(2 * n, 100), 1000)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    b_norm = torch.linalg.vector_norm(b, dim=1)
    target = torch.clamp(tol * b_norm, min=atol)
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = (r * r).sum(dim=1)
    active = rs.sqrt() > target
    iterations = torch.zeros(batch, dtype=torch.long, device=b.device)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        ap = matvec(p)
        curvature = (p * ap).sum(dim=1)
        active = active & (curvature > 0)
        alpha = torch.where(active, rs / torch.where(active, curvature, torch.ones_like(curvature)),
                            torch.zeros_like(rs))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rs_new = (r * r).sum(dim=1)
        iterations = iterations + active.long()
        beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(rs))
        p = torch.where(active[:, None], r + beta[:, None] * p, p)
        rs = torch.where(active, rs_new, rs)
        active = active & (rs.sqrt() > target)
    return _finish(matvec, b, x, target, b_norm, iterations)
