"""Smooth layers whose solutions span many decades: does every instance solve?

    python benchmarks/spread.py                     # both families
    python benchmarks/spread.py --family softmax --scales 1 5 10 20 40 --batches 5
    python benchmarks/spread.py --dtype float32     # at the layer's default float32 tol
    python benchmarks/spread.py --family softmax --without-bound   # as users write it

Two families at ``tol=1e-11`` in float64 (the layer's default tolerance in float32),
one seed per batch of 64; for each row the statuses over all batches, the largest
iteration count per batch and the largest error of the optimal instances against a
closed form. Not a timing: no peer is run.

* ``softmax``: ``maximize theta'z + sum(entropy(z)) s.t. sum(z) == 1, z >= 0`` with
  ``theta = scale * randn`` (n in {10, 100}); the error is against ``torch.softmax``.
  Logits spread over 15-50 are common in practice (attention, classifiers); the entries
  of z* then span up to ~20 decades, and the curvature 1/z as much.
* ``exp``: ``minimize sum(exp(y)) - theta'y s.t. sum(y) == 0, -60 <= y <= 60`` with
  theta log-uniform over ``decades`` decades around 1 (n = 20). At the solution
  ``theta - exp(y)`` is the same for every entry strictly inside the box (the
  equality's multiplier); the error is its spread relative to max(theta).
"""
from __future__ import annotations

import argparse
import collections
import math
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common as C  # noqa: E402


def softmax_layer(dl, n, tol, bound=True):
    z = dl.Variable(n, name="z")
    theta = dl.Parameter(n, name="theta")
    constraints = [dl.sum(z) == 1] + ([z >= 0] if bound else [])
    prob = dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))), constraints)
    return prob.to_torch(tol=tol)


def exp_layer(dl, n, tol):
    y = dl.Variable(n, name="y")
    theta = dl.Parameter(n, name="theta")
    prob = dl.Problem(dl.Minimize(dl.sum(dl.exp(y)) - theta @ y), [dl.sum(y) == 0, y >= -60, y <= 60])
    return prob.to_torch(tol=tol)


def softmax_case(scale, n, batch, gen, dtype):
    theta = scale * torch.randn(batch, n, dtype=dtype, generator=gen)
    return theta, lambda out: (out - torch.softmax(theta, -1)).abs().amax(-1)


def exp_case(decades, n, batch, gen, dtype):
    theta = 10.0 ** ((torch.rand(batch, n, dtype=dtype, generator=gen) - 0.5) * decades)

    def error(out):
        # entries at a bound (|y| = 60) have that bound's multiplier as well: left out
        inside = out.abs() < 60 - 1e-6
        multiplier = theta - out.exp()
        spread = (multiplier.masked_fill(~inside, -math.inf).amax(-1)
                  - multiplier.masked_fill(~inside, math.inf).amin(-1))
        return spread / theta.amax(-1)
    return theta, error


def run(layer, make_case, setting, n, args):
    statuses, iterations, err = collections.Counter(), [], 0.0
    for seed in range(args.batches):
        theta, error = make_case(setting, n, args.batch_size, torch.Generator().manual_seed(seed), args.dtype)
        with torch.no_grad():
            out = layer(theta)
        statuses.update(layer.info.status)
        iterations.append(int(layer.info.iterations.max()))
        ok = torch.tensor([s == "optimal" for s in layer.info.status])
        if ok.any():
            err = max(err, float(error(out)[ok].max()))
    status_str = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
    return f"| {n} | {setting:g} | {status_str} | {', '.join(map(str, iterations))} | {err:.1e} |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["softmax", "exp", "all"], default="all")
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 3, 5, 10, 20],
                        help="softmax: logit scales")
    parser.add_argument("--decades", type=float, nargs="+", default=[2, 8, 16, 24],
                        help="exp: decades spanned by theta")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--without-bound", action="store_true",
                        help="softmax: leave out z >= 0, which the entropy's domain implies")
    parser.add_argument("--tol", type=float, default=None,
                        help="default: 1e-11 in float64, the layer's own in float32")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    if args.tol is None and args.dtype == torch.float64:
        args.tol = 1e-11
    dl = C.import_declarative()
    warnings.simplefilter("ignore")  # the statuses are the result; the layer warns about each failure
    tol = "the layer's default" if args.tol is None else f"{args.tol:g}"
    print(f"batch {args.batch_size}, tol {tol}, {str(args.dtype)[6:]}, seeds 0..{args.batches - 1}")
    if args.family in ("softmax", "all"):
        print("\n### softmax (error against torch.softmax)" + (", without z >= 0" if args.without_bound else "") + "\n")
        print("| n | logit scale | statuses | max iterations per batch | max error (optimal) |")
        print("|---|---|---|---|---|")
        for n in (10, 100):
            layer = softmax_layer(dl, n, args.tol, bound=not args.without_bound)
            for scale in args.scales:
                print(run(layer, softmax_case, scale, n, args))
    if args.family in ("exp", "all"):
        print("\n### exp (error: spread of theta - exp(y), relative to max theta)\n")
        print("| n | decades of theta | statuses | max iterations per batch | max error (optimal) |")
        print("|---|---|---|---|---|")
        layer = exp_layer(dl, 20, args.tol)
        for decades in args.decades:
            print(run(layer, exp_case, decades, 20, args))


if __name__ == "__main__":
    main()
