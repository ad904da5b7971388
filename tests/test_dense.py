"""The equilibrated dense factor (solvers.dense) against torch.linalg.solve."""
import subprocess
import sys

import torch

from solvers.dense import EquilibratedQR


def test_solves_of_a_badly_scaled_system_match_a_direct_solve():
    g = torch.Generator().manual_seed(0)
    n = 12
    core = torch.randn(3, n, n, dtype=torch.float64, generator=g) + 4 * torch.eye(n, dtype=torch.float64)
    rows = 10.0 ** torch.linspace(-8, 8, n, dtype=torch.float64)
    cols = 10.0 ** torch.linspace(6, -6, n, dtype=torch.float64)
    J = rows[:, None] * core * cols[None, :]
    b = torch.randn(3, n, dtype=torch.float64, generator=g)
    factor = EquilibratedQR(J)
    assert not bool(factor.singular.any())
    x, xt = factor.solve(b), factor.solve_transposed(b)
    torch.testing.assert_close(x, torch.linalg.solve(J, b), rtol=1e-9, atol=0)
    torch.testing.assert_close(xt, torch.linalg.solve(J.mT, b), rtol=1e-9, atol=0)


def test_singular_means_the_matrix_not_its_units():
    # diag(1e3, 1e-4) in float32 is as regular as the identity; a row copied is not
    units = EquilibratedQR(torch.diag(torch.tensor([1e3, 1e-4])).unsqueeze(0))
    assert not bool(units.singular.any())
    copied = torch.tensor([[[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 5.0]]], dtype=torch.float64)
    assert bool(EquilibratedQR(copied).singular.all())


def test_a_batch_of_large_systems_finishes_with_two_threads():
    # batched LU hung in MKL's row swaps at this size after torch.set_num_threads(2)
    code = ("import torch; torch.set_num_threads(2)\n"
            "from solvers.dense import EquilibratedQR\n"
            "J = torch.randn(2, 180, 180, dtype=torch.float64, generator=torch.Generator().manual_seed(0))\n"
            "b = torch.ones(2, 180, dtype=torch.float64)\n"
            "x = EquilibratedQR(J).solve(b)\n"
            "print(float((J @ x.unsqueeze(-1)).squeeze(-1).sub(b).abs().max()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 1e-9
