"""A normalized-cuts eigenvector layer, as in Zhang et al., "Implicitly Defined Layers".

For a graph with symmetric affinities ``W`` (``(B, n, n)``), degrees ``D = diag(W 1)``
and Laplacian ``L = D - W``, the relaxed normalized cut is the eigenvector ``v`` of the
second smallest generalized eigenvalue ``lambda`` of ``L v = lambda D v``. The layer
defines ``y = (v, lambda)`` (``(B, n + 1)``) implicitly by

    F(W, y) = [ (L - lambda D) v ;  v'v - 1 ] = 0,

uses ``torch.linalg.eigh`` as its forward solver and gets its backward pass from the
implicit function theorem applied to ``F`` by autograd, with no derivation by hand.

The script
1. checks the layer's gradient against central finite differences and against
   differentiating ``torch.linalg.eigh`` directly;
2. learns per-feature affinity scales end to end so that the cut separates two
   clusters that a plain Gaussian affinity splits the wrong way.

Run ``python examples/eigenvector_layer.py`` (a few seconds).
"""
from __future__ import annotations

import argparse
from typing import List, Optional

import torch

from declarative.implicit_layers import ImplicitLayer


def symmetrize(W: torch.Tensor) -> torch.Tensor:
    """``(B, n, n)`` -> its symmetric part, so perturbed inputs stay valid affinities."""
    return (W + W.transpose(-1, -2)) / 2


def ncut_residual(W: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``F(W, y)`` for ``W`` ``(B, n, n)`` and ``y = (v, lambda)`` ``(B, n + 1)``; returns ``(B, n + 1)``."""
    W = symmetrize(W)
    n = W.shape[-1]
    v, eigenvalue = y[:, :n], y[:, n:]
    degree = W.sum(dim=-1)
    laplacian_v = degree * v - (W @ v.unsqueeze(-1)).squeeze(-1)
    return torch.cat([laplacian_v - eigenvalue * degree * v, (v * v).sum(dim=1, keepdim=True) - 1], dim=1)


def ncut_eigh(W: torch.Tensor) -> torch.Tensor:
    """Forward solver: ``(v, lambda)`` ``(B, n + 1)`` from ``eigh`` of ``D^-1/2 L D^-1/2``.

    Differentiable by torch autograd as well (used below as the reference), since every
    step is. The sign of ``v`` is fixed by making its largest-magnitude entry positive.
    """
    W = symmetrize(W)
    n = W.shape[-1]
    inv_sqrt_degree = W.sum(dim=-1).rsqrt()
    normalized = torch.eye(n, dtype=W.dtype, device=W.device) - inv_sqrt_degree[:, :, None] * W * inv_sqrt_degree[:, None, :]
    eigenvalues, eigenvectors = torch.linalg.eigh(normalized)
    v = inv_sqrt_degree * eigenvectors[:, :, 1]
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    largest = v.abs().argmax(dim=1, keepdim=True)
    v = v * torch.sign(v.gather(1, largest))
    return torch.cat([v, eigenvalues[:, 1:2]], dim=1)


def ncut_layer(**options) -> ImplicitLayer:
    """The normalized-cuts layer: ``W`` ``(B, n, n)`` -> ``(v, lambda)`` ``(B, n + 1)``."""
    return ImplicitLayer(ncut_residual, ncut_eigh, **options)


def gaussian_affinity(points: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """``points`` ``(B, n, d)``, ``log_scales`` ``(d,)`` -> ``(B, n, n)`` affinities."""
    difference = points[:, :, None, :] - points[:, None, :, :]
    return torch.exp(-(difference.square() * log_scales.exp()).sum(dim=-1))


def two_clusters(batch: int, n: int, generator: torch.Generator, dtype=torch.float64):
    """Two clusters 2 apart along feature 0, each stretched (std 3) along feature 1."""
    labels = (torch.arange(n) < n // 2).to(dtype) * 2 - 1                   # (n,) +-1
    points = torch.randn(batch, n, 2, generator=generator, dtype=dtype) * torch.tensor([0.3, 3.0], dtype=dtype)
    points[:, :, 0] += labels
    return points, labels.expand(batch, n)


def cut_agreement(v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of nodes the sign of ``v`` assigns to their cluster (best of both signs)."""
    agree = (torch.sign(v) == torch.sign(labels)).to(v.dtype).mean(dim=1)
    return torch.maximum(agree, 1 - agree)


def check_gradients(generator: torch.Generator) -> None:
    points, _ = two_clusters(2, 6, generator)
    # Scales 0.135 keep the graphs connected: nearly disconnected graphs have nearly
    # repeated eigenvalues, where the eigenvector (and finite differences) are ill-conditioned.
    W = gaussian_affinity(points, torch.full((2,), -2.0, dtype=points.dtype)).requires_grad_(True)
    layer = ncut_layer()
    weights = torch.randn(2, 7, generator=generator, dtype=W.dtype)

    (grad_layer,) = torch.autograd.grad((layer(W) * weights).sum(), W)
    (grad_eigh,) = torch.autograd.grad((ncut_eigh(W) * weights).sum(), W)
    direction = torch.randn(W.shape, generator=generator, dtype=W.dtype)
    step = 1e-5
    with torch.no_grad():
        finite_difference = ((ncut_eigh(W + step * direction) * weights).sum()
                             - (ncut_eigh(W - step * direction) * weights).sum()) / (2 * step)
    print("gradient check on a batch of 2 graphs with 6 nodes (float64)")
    print(f"  implicit layer vs autograd through eigh: max |difference| = "
          f"{(grad_layer - grad_eigh).abs().max().item():.2e}")
    print(f"  directional derivative: layer {(grad_layer * direction).sum().item():+.10f}, "
          f"finite differences {finite_difference.item():+.10f}")
    print(f"  torch.autograd.gradcheck: {torch.autograd.gradcheck(layer, (W.detach().requires_grad_(),))}")


def learn_affinity(steps: int, generator: torch.Generator) -> List[float]:
    points, labels = two_clusters(8, 24, generator)
    target = labels / torch.linalg.vector_norm(labels, dim=1, keepdim=True)
    # Start from equal scales of 0.1 on both features: a connected graph whose cut follows
    # the stretched feature 1, the wrong way.
    log_scales = torch.full((2,), -2.3, dtype=points.dtype, requires_grad=True)
    optimizer = torch.optim.Adam([log_scales], lr=0.1)
    layer = ncut_layer()
    n = points.shape[1]
    history = []
    for step in range(steps + 1):
        v = layer(gaussian_affinity(points, log_scales))[:, :n]
        # The cut is good when v is parallel to the +-1 labels; the loss ignores v's sign.
        loss = 1 - ((v * target).sum(dim=1) ** 2).mean()
        history.append(loss.item())
        if step % max(steps // 5, 1) == 0 or step == steps:
            print(f"  step {step:3d}: loss {loss.item():.4f}, cut agreement "
                  f"{cut_agreement(v.detach(), labels).mean().item():.3f}, "
                  f"scales {log_scales.exp().detach().numpy().round(3).tolist()}")
        if step == steps:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return history


def main(argv: Optional[List[str]] = None) -> List[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(args.seed)
    check_gradients(generator)
    print("learning per-feature affinity scales through the layer (8 graphs x 24 nodes)")
    return learn_affinity(args.steps, generator)


if __name__ == "__main__":
    main()
