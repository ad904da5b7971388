"""NLP layers' statuses where the answer is known, and their iteration counts.

    python benchmarks/nlp_statuses.py            # both tables, float64 and float32
    python benchmarks/nlp_statuses.py --dtype float64

Prints only (not a timing, nothing written to RESULTS.md).

* Statuses: small batches whose right status is known by hand: unbounded objectives
  whose gradient vanishes far out (-log of an entry, of a scalar, of an affine
  expression, beside rows that do not bind), affine constraints that admit no point,
  rows bounded far away (never binding, or binding at the solution), a feasible
  problem started far outside a nonlinear row, and equalities that fix what a singular
  Hessian leaves free. Each row: the statuses over the batch against the right one,
  and for optimal instances with a closed form, the largest error.
* Iterations: 36 batches of 64 instances (softmax and weighted entropy at n = 10 and
  100 with logits of growing spread, exp, sqrt, softplus and log objectives with rows;
  seed 0): statuses and total iterations, the numbers a change to the NLP loop should
  leave alone or lower.
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


def status_cases(dl, dtype):
    """(name, layer, args, right status per instance, closed form or None)."""
    t = lambda rows: torch.tensor(rows, dtype=dtype)  # noqa: E731
    x3, th = dl.Variable(3, name="x"), dl.Parameter(3, name="theta")
    log_obj = dl.Minimize(th @ x3 - dl.sum(dl.log(x3)))
    theta = t([[1.0, 0.0, 0.5], [1.0, 2.0, 0.5]])
    inv = [None, 1.0 / theta[1]]
    x2, a = dl.Variable(2, name="x"), dl.Parameter(2, name="a")
    y = dl.Variable((), name="y")
    c = dl.Parameter((), name="c")
    h1 = dl.Parameter(1, name="h")
    A, b = dl.Parameter((2, 2), name="A"), dl.Parameter(2, name="b")
    A_t = t([[[1.0, 2.0], [1.0, 2.1]], [[2.0, -1.0], [0.5, 3.0]]])
    b_t = t([[1.0, 1.0], [-1.0, 0.3]])
    far_h = t([[1e3], [1e9], [1e11], [1e14]])
    cases = [
        ("-log(x), an entry of theta 0", dl.Problem(log_obj), [theta], ["unbounded", "optimal"], inv),
        ("the same, beside sum(x) >= 0.1", dl.Problem(log_obj, [dl.sum(x3) >= 0.1]), [theta],
         ["unbounded", "optimal"], inv),
        ("the same, beside x >= 0.01", dl.Problem(log_obj, [x3 >= 0.01]), [theta], ["unbounded", "optimal"], inv),
        ("-log(a'x + 1)", dl.Problem(dl.Minimize(-dl.log(a @ x2 + 1))), [t([[1.0, 2.0], [1.0, 0.0]])],
         ["unbounded", "unbounded"], None),
        ("-log(y + c), y a scalar", dl.Problem(dl.Minimize(-dl.log(y + c))), [t([0.0, 1.0])],
         ["unbounded", "unbounded"], None),
        ("exp objective, x <= 0, sum(x) >= c", dl.Problem(dl.Minimize(dl.sum(dl.exp(x3)) + th @ x3),
                                                          [dl.sum(x3) >= dl.sum(h1), x3 <= 0]),
         [t([[0.1, 0.2, 0.3]] * 2), t([[1.0], [-1.0]])], ["infeasible", "optimal"], None),
        ("entropy, sum(x) == c", dl.Problem(dl.Maximize(th @ x3 + dl.sum(dl.entropy(x3))), [dl.sum(x3) == dl.sum(h1)]),
         [t([[0.1, 0.2, 0.3]] * 2), t([[-1.0], [1.0]])], ["infeasible", "optimal"],
         [None, torch.softmax(t([[0.1, 0.2, 0.3]])[0].double(), -1).to(dtype)]),
        ("sum(x) <= h binding, h = 1e3 .. 1e14", dl.Problem(dl.Minimize(-dl.sum(x3) + dl.sum(dl.exp(-x3))),
                                                            [dl.sum(x3) <= dl.sum(h1)]),
         [far_h], ["optimal"] * 4, None),
        ("abs(x - 1) s.t. exp(c - 100 x) <= 100", dl.Problem(dl.Minimize(dl.abs(y - 1)), [dl.exp(c - 100 * y) <= 100]),
         [t([5.0, 20.0, 60.0, 110.0])], ["optimal"] * 4, [torch.ones((), dtype=dtype)] * 4),
        ("softplus(x0 - x1) s.t. A x = b", dl.Problem(dl.Minimize(dl.softplus(x2[0] - x2[1])), [A @ x2 == b]),
         [A_t, b_t], ["optimal"] * 2, list(torch.linalg.solve(A_t, b_t))),
    ]
    return cases


def weighted_far_row(dl, dtype, far):
    """Weighted entropy with 5 rows G z <= h, the first bounded by ``far``; the right
    solution is that of the problem without that row."""
    n, k, B = 10, 5, 32
    g = torch.Generator().manual_seed(2)
    G = torch.randn(B, k, n, generator=g, dtype=torch.float64)
    theta = 3 * torch.randn(B, n, generator=g, dtype=torch.float64)
    w = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.5
    h = G.sum(-1) / n + 0.1

    def layer(rows):
        z, th, wt = dl.Variable(n, name="z"), dl.Parameter(n, name="theta"), dl.Parameter(n, name="w")
        Gp, hp = dl.Parameter((rows, n), name="G"), dl.Parameter(rows, name="h")
        return dl.Problem(dl.Maximize(th @ z + wt @ dl.entropy(z)), [dl.sum(z) == 1, z >= 0, Gp @ z <= hp]).to_torch(
            warn=False)

    h_far = h.clone()
    h_far[:, 0] = far
    with_row, without = layer(k), layer(k - 1)
    out = with_row(*(x.to(dtype) for x in (theta, w, G, h_far)))
    ref = without(*(x.to(dtype) for x in (theta, w, G[:, 1:], h[:, 1:])))
    return with_row.info, without.info, out, ref


def iteration_batches(dl, dtype):
    g = torch.Generator().manual_seed(0)
    for n in (10, 100):
        x, th = dl.Variable(n), dl.Parameter(n)
        softmax = dl.Problem(dl.Minimize(-th @ x - dl.sum(dl.entropy(x))), [dl.sum(x) == 1])
        for scale in (1, 3, 20):
            theta = scale * torch.randn(64, n, generator=g, dtype=dtype)
            yield f"softmax n={n} logits {scale} x randn", softmax, [theta]
        Gp, hp = dl.Parameter((5, n)), dl.Parameter(5)
        weighted = dl.Problem(dl.Minimize(-th @ x - dl.sum(dl.entropy(x))), [dl.sum(x) == 1, Gp @ x <= hp])
        for scale in (1, 10):
            G = torch.rand(64, 5, n, generator=g, dtype=dtype)
            yield (f"entropy with 5 rows n={n} logits {scale} x randn", weighted,
                   [scale * torch.randn(64, n, generator=g, dtype=dtype), G, G.mean(-1) + 0.05])
        yield (f"exp, x >= -1, sum(x) <= 2, n={n}", dl.Problem(dl.Minimize(dl.sum(dl.exp(x)) - th @ x),
                                                              [x >= -1, dl.sum(x) <= 2]),
               [3 * torch.randn(64, n, generator=g, dtype=dtype)])
        yield (f"sum_squares(x - theta) - sum(sqrt(x)), x <= 5, n={n}", dl.Problem(
            dl.Minimize(dl.sum_squares(x - th) - dl.sum(dl.sqrt(x))), [x <= 5]),
            [3 * torch.randn(64, n, generator=g, dtype=dtype)])
        yield (f"softplus - theta'x + sum_squares(x) / 100, n={n}", dl.Problem(
            dl.Minimize(dl.sum(dl.softplus(x)) - th @ x + 0.01 * dl.sum_squares(x))),
            [torch.rand(64, n, generator=g, dtype=dtype)])
        yield (f"theta'x - sum(log(x)), sum(x) <= n, n={n}", dl.Problem(
            dl.Minimize(th @ x - dl.sum(dl.log(x))), [dl.sum(x) <= n]),
            [torch.rand(64, n, generator=g, dtype=dtype) + 0.1])


def counts(statuses):
    return ", ".join(f"{k} {v}" for k, v in sorted(collections.Counter(statuses).items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float64", "float32"], nargs="+", default=["float64", "float32"])
    args = parser.parse_args(argv)
    dl = C.import_declarative()
    warnings.simplefilter("ignore")
    dtypes = [getattr(torch, d) for d in args.dtype]

    print("## Statuses where the answer is known\n")
    print("| case | dtype | right | got | wrong statuses | largest error (closed form) |")
    print("|---|---|---|---|---|---|")
    for dtype in dtypes:
        for name, problem, inputs, right, closed in status_cases(dl, dtype):
            layer = problem.to_torch(warn=False)
            with torch.no_grad():
                out = layer(*inputs)
            got = layer.info.status
            wrong = sum(1 for s, r in zip(got, right) if s != r)
            error = max((float((out[i] - closed[i]).abs().max()) for i in range(len(got))
                         if closed is not None and closed[i] is not None and got[i] == "optimal"), default=None)
            print(f"| {name} | {str(dtype)[6:]} | {counts(right)} | {counts(got)} | {wrong} | "
                  f"{'-' if error is None else f'{error:.1e}'} |")
        for far in (1e10, 1e15, 1e20):
            info, ref_info, out, ref = weighted_far_row(dl, dtype, far)
            ok = torch.tensor(info.ok.tolist()) & torch.tensor(ref_info.ok.tolist())
            error = float((out[ok] - ref[ok]).abs().max()) if bool(ok.any()) else float("nan")
            print(f"| weighted entropy, a row bounded by {far:g} (32 instances; iterations "
                  f"{int(info.iterations.sum())}, without the row {int(ref_info.iterations.sum())}) | "
                  f"{str(dtype)[6:]} | optimal 32 | {counts(info.status)} | {32 - int(info.ok.sum())} | "
                  f"{error:.1e} (against the problem without the row) |")

    print("\n## Iterations (64 instances per batch, seed 0)\n")
    print("| batch | dtype | statuses | iterations (total) | iterations (max) |")
    print("|---|---|---|---|---|")
    for dtype in dtypes:
        total = 0
        for name, problem, inputs in iteration_batches(dl, dtype):
            layer = problem.to_torch(warn=False)
            with torch.no_grad():
                layer(*inputs)
            its = layer.info.iterations
            total += int(its.sum())
            print(f"| {name} | {str(dtype)[6:]} | {counts(layer.info.status)} | {int(its.sum())} | {int(its.max())} |")
        print(f"| all | {str(dtype)[6:]} | | {total} | |")


if __name__ == "__main__":
    main()
