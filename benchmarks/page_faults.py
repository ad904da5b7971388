"""Page faults per QP layer call, with and without ``dl.retain_cpu_memory()``.

    python benchmarks/page_faults.py                      # the mid-size QP shapes
    python benchmarks/page_faults.py 128,50,50,10 --rounds 3

Each (shape, setting) runs in a fresh interpreter, alternating, ``--rounds`` times: one
forward+backward of the benchmark QP layer (benchmarks/qp.py's family) is warmed up, then
20 calls are timed and their minor page faults counted (``getrusage``). Prints the median
time and faults per call of each round. Linux only (glibc for the retained rows).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent

_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {bench!r})
import torch
import common as C
dl = C.import_declarative()
applied = dl.retain_cpu_memory() if sys.argv[2] == "retained" else None
torch.set_default_dtype(torch.float64)
layer, call = C.qp_layer_call(*(int(v) for v in sys.argv[1].split(",")))
for _ in range(3):
    call()
times = []
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
print(json.dumps(dict(ms=sorted(times)[10] * 1e3, faults=faults, applied=applied)))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="*", default=["512,20,20,5", "128,50,50,10", "32,100,100,20",
                                                   "8,200,100,20", "4,500,250,50"])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    code = _CHILD.format(bench=str(BENCH_DIR))
    print("| B, n, m, p | setting | median ms per call (each round) | page faults per call (each round) |")
    print("|---|---|---|---|")
    for shape in args.shapes:
        rows = {"default": [], "retained": []}
        for _ in range(args.rounds):
            for setting in rows:
                out = subprocess.run([sys.executable, "-c", code, shape, setting],
                                     capture_output=True, text=True, check=True)
                rows[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for setting, runs in rows.items():
            if setting == "retained" and runs[0]["applied"] is False:
                print(f"| {shape} | retained | (no glibc mallopt here) | |")
                continue
            ms = " / ".join(f"{r['ms']:.1f}" for r in runs)
            faults = " / ".join(f"{r['faults']:.0f}" for r in runs)
            print(f"| {shape} | {setting} | {ms} | {faults} |", flush=True)


if __name__ == "__main__":
    main()
