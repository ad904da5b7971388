import pytest
import torch


def random_qp(batch, n, m, p, seed=0, dtype=torch.float64):
    """The benchmark family: Q = LL'/n + 0.1 I, Gaussian q, G, A; h = G x0 + s0 (s0 > 0)
    and b = A x0, so every instance is strictly feasible. Shapes carry a leading batch."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    Q = L @ L.transpose(-1, -2) / n + 0.1 * torch.eye(n, dtype=torch.float64)
    q = torch.randn(batch, n, generator=g, dtype=torch.float64)
    G = torch.randn(batch, m, n, generator=g, dtype=torch.float64)
    A = torch.randn(batch, p, n, generator=g, dtype=torch.float64)
    x0 = torch.randn(batch, n, generator=g, dtype=torch.float64)
    s0 = torch.rand(batch, m, generator=g, dtype=torch.float64) + 0.1
    h = (G @ x0.unsqueeze(-1)).squeeze(-1) + s0
    b = (A @ x0.unsqueeze(-1)).squeeze(-1)
    return tuple(t.to(dtype) for t in (Q, q, G, h, A, b))


@pytest.fixture
def qp_data():
    return random_qp


@pytest.fixture
def kept_batches(monkeypatch):
    """The instances (indices into the batch) the interior-point loop goes on with each
    time it drops finished ones, recorded as it asks its oracle for them."""
    import dataclasses

    import solvers.interior_point as ipm

    kept, loop = [], ipm.primal_dual

    def spy(oracle, *args, **kwargs):
        select = oracle.select

        def recorded(rows):
            kept.append(rows.clone())
            return select(rows)
        return loop(dataclasses.replace(oracle, select=recorded), *args, **kwargs)
    monkeypatch.setattr(ipm, "primal_dual", spy)
    return kept
