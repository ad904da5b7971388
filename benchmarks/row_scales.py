"""QPs whose constraint rows differ in scale: statuses and real violations.

    python benchmarks/row_scales.py
    python benchmarks/row_scales.py --decades 0 6 10 --seeds 5

The benchmark's QP family (strictly feasible by construction: h = G x0 + s0, s0 > 0)
with each constraint row i of G and h multiplied by 10^u_i, u_i uniform in
[-d/2, d/2]: the same feasible set, written in rows of very different units (as when
constraints in metres and in millimetres meet). For each row: the statuses over all
batches, and, over the instances reported optimal, the largest violation of a row in
its own units (max_i (G_i z - h_i) / max|G_i|) and the largest error against
CVXPY/Clarabel on the first few optimal instances of each batch. A solver that holds
rows to a tolerance relative to the largest of them can report 'optimal' with a small
row violated by its own size. Not a timing.
"""
from __future__ import annotations

import argparse
import collections
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common as C  # noqa: E402

SHAPES = ((64, 10, 15, 2), (32, 40, 60, 5))


def scaled_qp(B, n, m, p, decades, seed, dtype):
    d = C.make_qp(B, n, m, p, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    scale = 10.0 ** (decades * (torch.rand(B, m, 1, generator=g, dtype=torch.float64) - 0.5))
    d["G"], d["h"] = d["G"] * scale, d["h"] * scale[..., 0]
    return [d[k].to(dtype) for k in ("Q", "q", "G", "h", "A", "b")]


def run(dl, shape, decades, args):
    B, n, m, p = shape
    layer = C.qp_problem(n, m, p).to_torch(warn=False)
    statuses, worst_row, worst_err = collections.Counter(), 0.0, 0.0
    for seed in range(args.seeds):
        data = scaled_qp(B, n, m, p, decades, seed, args.dtype)
        with torch.no_grad():
            x = layer(*data).double()
        statuses.update(layer.info.status)
        Q, q, G, h, A, b = (t.double() for t in data)
        optimal = [i for i, s in enumerate(layer.info.status) if s == "optimal"]
        if not optimal:
            continue
        rows = ((G @ x.unsqueeze(-1)).squeeze(-1) - h) / G.abs().amax(-1)
        worst_row = max(worst_row, float(rows[optimal].max()))
        for i in optimal[:args.references]:
            ref = C.qp_reference({k: t[i:i + 1] for k, t in zip(("Q", "q", "G", "h", "A", "b"), (Q, q, G, h, A, b))})
            worst_err = max(worst_err, float(np.abs(x[i].numpy() - ref["x"][0]).max()))
    status_str = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
    return f"| {shape} | {decades:g} | {status_str} | {worst_row:.1e} | {worst_err:.1e} |"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decades", type=float, nargs="+", default=[0, 3, 6, 10])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--references", type=int, default=3, help="CVXPY solves per batch")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = ap.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    dl = C.import_declarative()
    warnings.simplefilter("ignore")
    print(f"{args.seeds} batches per row, {str(args.dtype)[6:]}, the layer's default tol\n")
    print("| B, n, m, p | decades of row scales | statuses | max row violation (optimal) | max error vs CVXPY |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        for decades in args.decades:
            print(run(dl, shape, decades, args), flush=True)


if __name__ == "__main__":
    main()
