"""QPs with many rows per free dimension: pivots after the iteration would crawl, against
the interior point.

    python benchmarks/pivots_after_crawl.py
    python benchmarks/pivots_after_crawl.py --shapes 32,20,80,1 16,5,300,0 --seconds 2

On such QPs (solutions at vertices) the active-set iteration from the constraints the
minimizer under the equalities violates would crawl: its first solve says so
(``solvers.interior_point._crawls``). The batch then goes on with a guess by pivots
(``_pivots_after_crawl``: batches of 16 or more, at least 3 rows per free dimension, up to
400 rows) or, with that rule off, to the interior point. For each shape (random QPs of the
``qp_families.py`` kind, one seed) this times ``solve_qp`` both ways, alternating in one
process (median of each, the lower of two passes), and reports what the rule did: the
pivots of the slowest instance, the active-set solves and the interior-point iterations.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import qp_families as QF  # noqa: E402

SHAPES = ("32,20,80,1", "32,30,120,1", "16,50,200,5", "16,100,400,10", "64,10,400,2", "16,5,300,0",
          "32,40,70,5", "16,200,500,10", "8,100,400,10")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="B,n,m,p")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing budget per shape, setting and pass")
    args = ap.parse_args(argv)
    C.import_declarative()
    import solvers.interior_point as ipm

    rule = ipm._pivots_after_crawl
    print("| B, n, m, p | rows per free dimension | interior point after the crawl | pivots after it | "
          "ratio | pivots (max) | active-set solves (max) | iterations (max) |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        B, n, m, p = (int(v) for v in shape.split(","))
        data = QF._random_qp(B, n, m, p, 0)
        best = {}
        for _ in range(2):
            for on in (False, True):
                ipm._pivots_after_crawl = rule if on else (lambda *shape: False)
                try:
                    result = ipm.solve_qp(*data)
                    t = C.bench(lambda: ipm.solve_qp(*data), args.seconds, max_repeats=30, min_repeats=3,
                                warmup=False).median
                finally:
                    ipm._pivots_after_crawl = rule
                best[on] = min(best.get(on, t), t)
                if on:
                    pivots = "-" if result.active_set_pivots is None else int(result.active_set_pivots.max())
                    solves, its = int(result.active_set_rounds.max()), int(result.iterations.max())
                    optimal = int((result.status == ipm.OPTIMAL).sum())
        print(f"| {B}, {n}, {m}, {p} | {m / max(n - p, 1):.1f} | {C.fmt_time(best[False])} | "
              f"{C.fmt_time(best[True])} | {best[True] / best[False]:.2f}x | {pivots} | {solves} | {its} |"
              + ("" if optimal == B else f" ({optimal} of {B} optimal)"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
