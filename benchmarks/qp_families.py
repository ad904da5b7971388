"""The QP path on families other than the benchmark's: active-set iteration first (the
default) against the interior point from the start, side by side.

    python benchmarks/qp_families.py              # all families, writes RESULTS.md
    python benchmarks/qp_families.py --no-write --budget 0.5

A QP with positive definite Q first runs the primal-dual active-set iteration from the
constraints the minimizer under the equalities violates, or on small blocks from a guess
by single pivots (``to_torch(active_set_rounds=20)`` rounds at most); the instances it
leaves go on with the interior point. A batch where its first solve says it would crawl
goes on from a guess by pivots where it has many rows per free dimension (at least 3, up
to 400 rows, 16 instances or more), else to the interior point after that solve. It pays
where it converges in a few rounds and costs where it does not; this script measures both
on families with different active sets. Each row times forward+backward of sum(w * x*)
w.r.t. every parameter for two layers of the same problem, ``active_set_rounds`` default
and 0, alternating in rounds in one process, median per setting. ``max |dx|`` is the
largest difference between the two settings' solutions (both are exact active-set
solutions where they are optimal); the accuracy against CVXPY is the tests' business.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common as C  # noqa: E402

DTYPE = torch.float64


def _random_qp(B, n, m, p, seed, ridge=0.1, linear=1.0, zero_slack=0.0):
    """The benchmark family with knobs: ``ridge`` (Q = LL'/n + ridge I), ``linear``
    (scale of q: larger pushes more constraints active), ``zero_slack`` (the fraction
    of constraints through the feasible point x0 with zero slack: with q = 0 those are
    degenerate, active with zero multipliers)."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=DTYPE)
    L = torch.randn(B, n, n, **kw)
    Q = L @ L.transpose(-1, -2) / n + ridge * torch.eye(n, dtype=DTYPE)
    q = linear * torch.randn(B, n, **kw)
    G, A, x0 = torch.randn(B, m, n, **kw), torch.randn(B, p, n, **kw), torch.randn(B, n, **kw)
    s0 = torch.rand(B, m, **kw) + 0.1
    s0 = torch.where(torch.rand(B, m, **kw) < zero_slack, torch.zeros_like(s0), s0)
    h = (G @ x0.unsqueeze(-1)).squeeze(-1) + s0
    b = (A @ x0.unsqueeze(-1)).squeeze(-1)
    return [Q, q, G, h, A, b]


def _box_projection(B, n, seed):
    """Projection onto a box intersected with the hyperplane sum(x) = 0 (a sparsemax-like
    layer): Q = I, G = [I; -I]."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=DTYPE)
    eye = torch.eye(n, dtype=DTYPE)
    Q = eye.expand(B, n, n).clone()
    G = torch.cat([eye, -eye]).expand(B, 2 * n, n).clone()
    h = torch.cat([torch.rand(B, n, **kw), torch.rand(B, n, **kw)], -1)
    A, b = torch.ones(B, 1, n, dtype=DTYPE), torch.zeros(B, 1, dtype=DTYPE)
    return [Q, -3.0 * torch.randn(B, n, **kw), G, h, A, b]


# name: (B, n, m, p, builder(seed) -> [Q, q, G, h, A, b])
FAMILIES = {
    "benchmark family (32, 10, 10, 2)": (32, 10, 10, 2, lambda s: _random_qp(32, 10, 10, 2, s)),
    "benchmark family (128, 50, 50, 10)": (128, 50, 50, 10, lambda s: _random_qp(128, 50, 50, 10, s)),
    "ill-conditioned Q (ridge 1e-4), (64, 30, 30, 5)": (
        64, 30, 30, 5, lambda s: _random_qp(64, 30, 30, 5, s, ridge=1e-4)),
    "box and hyperplane projection, (64, 50, 100, 1)": (64, 50, 100, 1, lambda s: _box_projection(64, 50, s)),
    "rows 2 (n - p), (64, 12, 20, 2)": (64, 12, 20, 2, lambda s: _random_qp(64, 12, 20, 2, s)),
    "rows 1.5 (n - p), (64, 50, 60, 10)": (64, 50, 60, 10, lambda s: _random_qp(64, 50, 60, 10, s)),
    "many rows, (32, 20, 80, 1)": (32, 20, 80, 1, lambda s: _random_qp(32, 20, 80, 1, s)),
    "large linear term (q x 100), (64, 20, 40, 5)": (64, 20, 40, 5, lambda s: _random_qp(64, 20, 40, 5, s, linear=100.0)),
    "degenerate (half the slacks 0, q = 0), (64, 20, 20, 5)": (
        64, 20, 20, 5, lambda s: _random_qp(64, 20, 20, 5, s, linear=0.0, zero_slack=0.5)),
}


def run_family(name, B, n, m, p, build, args):
    data = build(args.seed)
    prob = C.qp_problem(n, m, p)
    layers = {"active set first": prob.to_torch(tol=args.tol, warn=False),
              "interior point alone": prob.to_torch(tol=args.tol, warn=False, active_set_rounds=0)}
    leaves = [d.clone().requires_grad_() for d in data]
    w = torch.randn(B, n, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    times = {k: [] for k in layers}
    report = {}

    def call(layer):
        for t in leaves:
            t.grad = None
        x = layer(*leaves)
        (w * x).sum().backward()
        return x.detach()

    for k, layer in layers.items():  # warm-up, and what each setting reports
        x = call(layer)
        info = layer.info
        rounds = info.active_set_rounds
        report[k] = dict(x=x, optimal=info.status.count("optimal"), it=int(info.iterations.max()),
                         rounds=int(rounds.max()) if rounds is not None else 0,
                         pivots=int(info.active_set_pivots.max()) if info.active_set_pivots is not None else 0,
                         solved_by_rounds=int((info.iterations == 0).sum()) if rounds is not None else 0)
    for _ in range(args.rounds):
        for k, layer in layers.items():
            t_end = time.perf_counter() + args.budget / args.rounds
            while True:
                t0 = time.perf_counter()
                call(layer)
                times[k].append(time.perf_counter() - t0)
                if time.perf_counter() >= t_end:
                    break
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    first, alone = report["active set first"], report["interior point alone"]
    dx = float((first["x"] - alone["x"]).abs().max())
    row = [name, C.fmt_time(med["active set first"]), C.fmt_time(med["interior point alone"]),
           C.fmt_ratio(med["interior point alone"] / med["active set first"]),
           f"{first['optimal']}/{B}, {alone['optimal']}/{B}",
           f"{first['solved_by_rounds']}/{B}", str(first["pivots"]), str(first["rounds"]),
           f"{first['it']} / {alone['it']}",
           C.fmt_err(dx)]
    print(" | ".join(row), flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per family and setting")
    ap.add_argument("--rounds", type=int, default=4, help="alternations of the two settings")
    ap.add_argument("--tol", type=float, default=1e-9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", dest="write", action="store_false")
    args = ap.parse_args(argv)
    t_start = C.start_run()
    hdr = ["family (B, n, m, p)", "active set first", "interior point alone", "speed-up",
           "optimal (first, alone)", "solved by the active set", "max pivots", "max rounds",
           "max iterations (first / alone)", "max |dx|"]
    rows = [run_family(name, *spec, args) for name, spec in FAMILIES.items()]
    body = [C.section_header("QP families: active set first vs the interior point alone (benchmarks/qp_families.py)",
                             ["benchmarks/qp_families.py"] + (argv if argv is not None else sys.argv[1:])),
            "Forward+backward of sum(w * x*) w.r.t. every parameter, float64, "
            f"`to_torch(tol={args.tol:g})`, median of calls alternating between the two settings "
            f"({args.rounds} rounds, {args.budget:g} s per setting). Speed-up > 1: the active set "
            "first is faster. `solved by the active set`: instances with no interior-point "
            "iteration; `max pivots`: the pivots that guessed the first active set (small "
            "blocks, or many rows per free dimension after a first solve that would crawl; "
            "single pivots, then exchange steps from the start where single pivots got "
            "stuck); `max rounds`: the active-set rounds the batch ran (that first solve "
            "included).\n",
            C.md_table(hdr, rows), "",
            f"Total wall time: {time.perf_counter() - t_start:.0f} s; 1-min load average at the end: {C._loadavg()}"]
    md = "\n".join(body)
    C.publish(md, "qp-families", args.write)


if __name__ == "__main__":
    main()
