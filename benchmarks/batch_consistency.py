"""An instance alone against the same instance in batches: how far apart, not timings.

    python benchmarks/batch_consistency.py              # writes the 'batch_consistency' section of RESULTS.md
    python benchmarks/batch_consistency.py --no-write

The solver and the generated code choose some products and factorizations by the size
of the whole batch (one matrix product for a matrix the batch shares, the row or the
column form of a batched product, a stacked or a blocked Newton system), and those
round differently. For each family, the first instance is solved alone and as the first
of batches of 2, 7, 64 and 300 (the same instances, float64 and float32), forward and
backward of sum(x*): the table gives the largest difference of its outputs relative to
max(1, |x|) and of its gradients relative to max(1, max |grad|), 0 where bitwise equal.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common as C  # noqa: E402

BATCHES = (2, 7, 64, 300)
DTYPES = (torch.float64, torch.float32)


def _relative(x, ref, per_entry):
    scale = ref.abs().clamp(min=1) if per_entry else ref.abs().max().clamp(min=1)
    return float(((x - ref).abs() / scale).max())


def first_instance(layer, args, B):
    """Outputs and gradients of the first instance when the first B are solved together."""
    leaves = [a[:B].clone().requires_grad_() for a in args]
    out = layer(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    assert layer.info.ok[:1].all(), f"first instance not solved: {layer.info.status[0]}"
    grads = torch.autograd.grad(outs[0].sum(), leaves)
    return [o[:1].detach() for o in outs], [g[:1] for g in grads]


def distances(layer, args):
    """{dtype: [(output distance, gradient distance) per batch size]}."""
    result = {}
    for dtype in DTYPES:
        data = [a.to(dtype) for a in args]
        outs, grads = first_instance(layer, data, 1)
        row = []
        for B in BATCHES:
            o, g = first_instance(layer, data, B)
            row.append((max(_relative(x, r, True) for x, r in zip(o, outs)),
                        max(_relative(x, r, False) for x, r in zip(g, grads))))
        result[dtype] = row
    return result


def families(N, seed):
    dl = C.import_declarative()
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    for n, m, p in [(10, 10, 2), (20, 20, 5), (50, 50, 10)]:
        d = C.make_qp(N, n, m, p, seed=seed)
        yield f"QP ({n}, {m}, {p})", C.qp_problem(n, m, p).to_torch(warn=False), [d[k] for k in
                                                                              ("Q", "q", "G", "h", "A", "b")]
    n, m = 20, 30
    x, c, G, h = dl.Variable(n), dl.Parameter(n), dl.Parameter((m, n)), dl.Parameter(m)
    yield (f"LP ({n}, {m}) and a box", dl.Problem(dl.Minimize(c @ x), [G @ x <= h, x >= -1, x <= 1]).to_torch(warn=False),
           [randn(N, n), randn(N, m, n), torch.rand(N, m, generator=g, dtype=torch.float64) + 0.1])
    for n in (10, 100):
        k = n // 2
        z, theta, weight = dl.Variable(n), dl.Parameter(n), dl.Parameter(n)
        G, h = dl.Parameter((k, n)), dl.Parameter(k)
        G_t = randn(N, k, n)
        yield (f"weighted entropy, G a parameter ({k}, {n})",
               dl.Problem(dl.Maximize(theta @ z + weight @ dl.entropy(z)),
                          [dl.sum(z) == 1, z >= 0, G @ z <= h]).to_torch(warn=False),
               [3 * randn(N, n), torch.rand(N, n, generator=g, dtype=torch.float64) + 0.5, G_t, G_t.sum(-1) / n + 0.1])
        G_c = randn(k, n).numpy()
        yield (f"entropy, G a constant ({k}, {n})",
               dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))),
                          [dl.sum(z) == 1, z >= 0, G_c @ z <= G_c.sum(-1) / n + 0.1]).to_torch(warn=False),
               [3 * randn(N, n)])
        yield (f"softmax, n = {n}", dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))),
                                               [dl.sum(z) == 1, z >= 0]).to_torch(warn=False), [3 * randn(N, n)])


def _cell(pairs):
    worst_out = max(o for o, _ in pairs)
    worst_grad = max(g for _, g in pairs)
    equal = sum(o == 0 and g == 0 for o, g in pairs)
    return f"{worst_out:.1e} / {worst_grad:.1e} ({equal} of {len(pairs)} bitwise)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", dest="write", action="store_false")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    rows = []
    for name, layer, data in families(max(BATCHES), args.seed):
        result = distances(layer, data)
        rows.append([name] + [_cell(result[dtype]) for dtype in DTYPES])
        print(" | ".join(rows[-1]), flush=True)
    body = [C.section_header("An instance alone and in batches (benchmarks/batch_consistency.py)",
                             ["benchmarks/batch_consistency.py"] + list(argv or sys.argv[1:])),
            f"The first instance solved alone and first in batches of {', '.join(map(str, BATCHES))} (seed "
            f"{args.seed}), the layer's default tol; forward and backward of sum(x*). Each cell: the largest "
            "difference of the outputs, relative to max(1, |x|), / of the gradients, relative to "
            "max(1, max |grad|), over the batch sizes; and in how many of them both were bitwise equal.\n",
            C.md_table(["family", "float64", "float32"], rows)]
    C.publish("\n".join(body), "batch_consistency", args.write)


if __name__ == "__main__":
    main()
