"""Softmax as optimization on logits of growing spread: does every instance solve?

    python benchmarks/softmax_spread.py
    python benchmarks/softmax_spread.py --scales 1 5 10 20 40 --batches 5

The layer is ``maximize theta'z + sum(entropy(z)) s.t. sum(z) == 1, z >= 0`` at
``tol=1e-11``; theta is ``scale * randn`` (B = 64, n in {10, 100}, one seed per batch).
Logits spread over 15-50 are common in practice (attention, classifiers); the entries of
z* then span up to ~20 decades, which is hard for an interior point: the barrier-like
curvature 1/z spans as much. For every (n, scale) the table gives the statuses over all
batches, the largest iteration count per batch and the largest error of the optimal
instances against ``torch.softmax``. Not a timing: no peer is run.
"""
from __future__ import annotations

import argparse
import collections
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common as C  # noqa: E402


def softmax_layer(dl, n, tol):
    z = dl.Variable(n, name="z")
    theta = dl.Parameter(n, name="theta")
    prob = dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))), [dl.sum(z) == 1, z >= 0])
    return prob.to_torch(tol=tol)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 3, 5, 10, 20])
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tol", type=float, default=1e-11)
    args = parser.parse_args(argv)
    dl = C.import_declarative()
    warnings.simplefilter("ignore")  # the statuses are the result; the layer warns about each failure
    print(f"batch {args.batch_size}, tol {args.tol:g}, float64, seeds 0..{args.batches - 1}\n")
    print("| n | logit scale | statuses | max iterations per batch | max error (optimal) |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        layer = softmax_layer(dl, n, args.tol)
        for scale in args.scales:
            statuses, iterations, err = collections.Counter(), [], 0.0
            for seed in range(args.batches):
                gen = torch.Generator().manual_seed(seed)
                theta = scale * torch.randn(args.batch_size, n, dtype=torch.float64, generator=gen)
                with torch.no_grad():
                    z = layer(theta)
                statuses.update(layer.info.status)
                iterations.append(int(layer.info.iterations.max()))
                ok = torch.tensor([s == "optimal" for s in layer.info.status])
                if ok.any():
                    err = max(err, float((z[ok] - torch.softmax(theta[ok], -1)).abs().max()))
            status_str = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
            print(f"| {n} | {scale:g} | {status_str} | {', '.join(map(str, iterations))} | {err:.1e} |")


if __name__ == "__main__":
    main()
