"""The torch CPU operations whose cost shapes the solver's numbers, timed in fresh processes.

    python benchmarks/linalg_ops.py              # 6 processes per thread count
    python benchmarks/linalg_ops.py --processes 10

Each row is one process (one thread count): the median of 50 calls of

* ``cholesky_ex`` of (512, 20, 20): batched LAPACK, one instance after the other;
* ``bmm`` (512, 20, 20) x (512, 20, 20): batched products, which use the threads;
* ``solve_triangular`` of (512, 20, 20) by 20 right-hand sides: the half-solves
  L^-1 G' of ``QPFactor``, whose time with two threads depends on the process;
* the same factor's half-solves of G' (20 columns), A' (5) and c (1) as three calls,
  against one call on the 26 columns side by side, in place (what ``QPFactor`` does);
* ``vector_norm(x, inf, dim=-1)`` against ``amax(abs(x), -1)`` for x (1024, 100): the
  same number, one of them 10x slower;
* ``argmin(-1)`` against ``min(-1).indices`` of (512, 20) (the pivot rule's), and
  ``torch.where`` with a random mask against a product, on (512, 20);
* one small elementwise op on (32, 10) (a chain of 50, per op) under ``torch.no_grad``
  and under ``torch.inference_mode``, which also skips autograd's version counters and
  view tracking: what the solver's hundreds of small ops each cost.

RESULTS.md ("Where the time goes") quotes these.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

_CHILD = r"""
import json, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
def median_us(fn, repeats=50):
    for _ in range(5):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(ts)
d = torch.float64
X = torch.randn(512, 20, 20, dtype=d)
Q = X @ X.mT / 20 + 0.1 * torch.eye(20, dtype=d)
L = torch.linalg.cholesky(Q)
Gt = torch.randn(512, 20, 20, dtype=d).mT
At, c = torch.randn(512, 5, 20, dtype=d).mT, torch.randn(512, 20, dtype=d)
half = torch.empty(512, 26, 20, dtype=d).mT
def three_half_solves():
    torch.linalg.solve_triangular(L, Gt, upper=False)
    torch.linalg.solve_triangular(L, At, upper=False)
    torch.linalg.solve_triangular(L, c.unsqueeze(-1), upper=False)
def one_half_solve():
    torch.cat([Gt.mT, At.mT, c.unsqueeze(-2)], -2, out=half.mT)
    torch.linalg.solve_triangular(L, half, upper=False, out=half)
rows, other = torch.randn(512, 20, dtype=d), torch.randn(512, 20, dtype=d)
mask = torch.rand(512, 20) > 0.5
x = torch.randn(1024, 100, dtype=d)
small, factor = torch.randn(32, 10, dtype=d), torch.rand(32, 10, dtype=d)
def op_chain(mode):
    def run():
        with mode():
            y = small
            for _ in range(25):
                y = (y * factor) + small
    return lambda: run()
print(json.dumps({
    "cholesky_ex": median_us(lambda: torch.linalg.cholesky_ex(Q)),
    "bmm": median_us(lambda: torch.bmm(Q, X)),
    "solve_triangular": median_us(lambda: torch.linalg.solve_triangular(L, Gt, upper=False)),
    "three_half_solves": median_us(three_half_solves),
    "one_half_solve": median_us(one_half_solve),
    "vector_norm_inf": median_us(lambda: torch.linalg.vector_norm(x, float("inf"), dim=-1)),
    "amax_abs": median_us(lambda: torch.amax(torch.abs(x), -1)),
    "argmin_rows": median_us(lambda: rows.argmin(-1, keepdim=True)),
    "min_rows": median_us(lambda: rows.min(-1, keepdim=True).indices),
    "where_rows": median_us(lambda: torch.where(mask, rows, other)),
    "mul_rows": median_us(lambda: rows * other),
    "small_op_no_grad": median_us(op_chain(torch.no_grad)) / 50,
    "small_op_inference": median_us(op_chain(torch.inference_mode)) / 50,
}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=6, help="fresh processes per thread count")
    ap.add_argument("--threads", default="1,2", help="torch thread counts to compare")
    args = ap.parse_args(argv)
    keys = ("cholesky_ex", "bmm", "solve_triangular", "three_half_solves", "one_half_solve", "vector_norm_inf",
            "amax_abs", "argmin_rows", "min_rows", "where_rows", "mul_rows", "small_op_no_grad", "small_op_inference")
    print("| threads | " + " | ".join(f"{k} (us)" for k in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for k in range(args.processes):
        for threads in args.threads.split(","):
            out = subprocess.run([sys.executable, "-c", _CHILD, threads], capture_output=True, text=True,
                                 check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {threads} | " + " | ".join(f"{row[key]:.0f}" if row[key] >= 10 else f"{row[key]:.2f}" for key in keys) + " |", flush=True)
            time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
