"""Dense square systems solved whole, for what no structured kernel serves: a general
layer's Jacobian (Newton steps and the implicit backward, :mod:`solvers.fixed_point`),
and a transposed KKT system whose reduction failed its check
(:func:`solvers.interior_point.kkt_adjoint`).

The rows and columns are equilibrated first (Ruiz: each scaled by the square root of its
largest entry, in powers of two so that the scaling is exact, until every row and column
has its largest near 1), so that the factorization and the test for a pivot at rounding
level judge the matrix, not the units of its equations and unknowns. The factorization is
Householder QR: batched LU with partial pivoting (``torch.linalg.lu_factor_ex``,
``solve_ex``) hung in MKL's row swaps (DLASWP: "Parameter 6 was incorrect") at size
>= ~160 and batch >= 2 after ``torch.set_num_threads(2)``, with torch 2.13's CPU build.
"""
from __future__ import annotations

import torch

__all__ = ["EquilibratedQR"]

# each sweep halves every row's and column's log-distance from 1: 12 bring a range of
# 1e40 within a factor of 1.1
_SWEEPS = 12


class EquilibratedQR:
    """Householder QR of ``R J C`` for J (B, n, n), R and C diagonal (Ruiz
    equilibration); J = R^-1 (R J C) C^-1 gives the solves. ``singular`` (B,): a
    diagonal entry of the triangular factor at rounding level, or not finite."""

    def __init__(self, jac: torch.Tensor):
        scaled = jac
        self.r, self.c = torch.ones_like(jac[:, 0]), torch.ones_like(jac[:, 0])
        for _ in range(_SWEEPS):
            size = scaled.abs()
            r, c = _power_of_two_root(size.amax(-1)), _power_of_two_root(size.amax(-2))
            scaled = scaled / r.unsqueeze(-1) / c.unsqueeze(-2)
            self.r, self.c = self.r / r, self.c / c
        self.q, self.upper = torch.linalg.qr(scaled)
        pivots = self.upper.diagonal(dim1=-2, dim2=-1).abs()
        n = jac.shape[-1]
        threshold = 10 * n * torch.finfo(jac.dtype).eps * pivots.amax(dim=-1)
        self.exactly_singular = (pivots == 0).any(-1) | ~torch.isfinite(pivots).all(-1)
        self.singular = (pivots.amin(dim=-1) <= threshold) | self.exactly_singular

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """J^-1 b = C (R J C)^-1 R b for b (B, n)."""
        half = (self.q.mT @ (self.r * b).unsqueeze(-1))
        return self.c * torch.linalg.solve_triangular(self.upper, half, upper=True).squeeze(-1)

    def solve_transposed(self, b: torch.Tensor) -> torch.Tensor:
        """J'^-1 b = R (R J C)'^-1 C b for b (B, n)."""
        half = torch.linalg.solve_triangular(self.upper.mT, (self.c * b).unsqueeze(-1), upper=False)
        return self.r * (self.q @ half).squeeze(-1)


def _power_of_two_root(x: torch.Tensor) -> torch.Tensor:
    """The power of two nearest sqrt(x) for x >= 0 (1 where x is 0 or not finite: a zero
    row or column keeps its scale, and the pivot test sees it)."""
    root = torch.exp2(torch.round(torch.log2(x) * 0.5))
    return torch.where((x > 0) & (root < float("inf")), root, 1.0)
