"""Peak memory of forward+backward vs the iteration count.

    python benchmarks/memory.py                       # B=64, n=100, m=100, p=20
    python benchmarks/memory.py --shape 32,50,50,10 --iters 10 50 100

The layer is differentiated implicitly (KKT conditions at the solution), so
its backward must not store one graph node per solver iteration: peak memory
of forward+backward must not grow with ``max_iter``.  To make the solver use
*all* its iterations we ask for an unreachable tolerance (``tol=1e-300``) and
report the iterations it actually used.

Two measurements per ``max_iter``, each in a fresh subprocess:

* peak RSS increase of the process during one forward+backward (Linux
  ``VmHWM`` reset through ``/proc/self/clear_refs`` just before the call;
  glibc's mmap threshold is pinned to 64 KiB so freed tensors leave RSS);
* RSS held between the forward and the backward (the autograd graph plus
  whatever the layer keeps for its backward), relative to the same baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

MiB = 1024.0 ** 2


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def child(shape, max_iter, tol):
    import torch  # noqa: F401  (imported before the baseline is read)

    import declarative as dl  # noqa: F401

    from qp import make_ours, PARAM_ORDER

    B, n, m, p = shape
    out = dict(max_iter=max_iter, shape=shape)
    layer = make_ours(n, m, p, tol=tol, max_iter=max_iter)()
    d = C.make_qp(B, n, m, p, seed=0)
    # warm-up on a single instance: loads kernels/libraries without touching the
    # high-water mark budget of the measured call much
    small = [d[k][:1].clone().requires_grad_(True) for k in PARAM_ORDER]
    (layer(*small) * d["w"][:1]).sum().backward()
    leaves = [d[k].clone().requires_grad_(True) for k in PARAM_ORDER]

    w = d["w"]
    # (b) peak RSS during one forward+backward
    can_reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        can_reset = False
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    x = layer(*leaves)
    held = _status_kb("VmRSS")  # memory held between forward and backward
    (x * w).sum().backward()
    dt = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    it = C.layer_iterations(layer)
    st = C.layer_status(layer)
    out.update(rss_held_kb=held, rss_base_kb=base, rss_peak_kb=peak, hwm_reset=can_reset,
               seconds=dt, iters_max=int(it.max()) if it is not None else None,
               iters_min=int(it.min()) if it is not None else None,
               status=sorted(set(map(str, st))) if st else None)
    print("RESULT " + json.dumps(out))


def run_child(shape, max_iter, tol):
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "0"
    cmd = [sys.executable, __file__, "--child", "--shape", ",".join(map(str, shape)),
           "--iters", str(max_iter), "--tol", repr(tol)]
    pr = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(C.REPO_ROOT))
    for line in pr.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (pr.stderr or pr.stdout).strip().splitlines()
    return dict(max_iter=max_iter, error=tail[-1][:120] if tail else f"exit code {pr.returncode}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="64,100,100,20")
    ap.add_argument("--iters", nargs="+", type=int, default=[10, 50])
    ap.add_argument("--tol", type=float, default=1e-300)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", dest="write", action="store_false")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.child:
        child(shape, args.iters[0], args.tol)
        return

    B, n, m, p = shape
    data_mb = 8 * B * (n * n + n + m * n + m + p * n + p) / MiB
    print(C.machine_info_md(), flush=True)
    rows, results = [], []
    for k in args.iters:
        print(f"max_iter={k} ...", flush=True)
        r = run_child(shape, k, args.tol)
        results.append(r)
        if "error" in r:
            rows.append([str(k), r["error"], "-", "-", "-", "-"])
            continue
        peak_mb = (r["rss_peak_kb"] - r["rss_base_kb"]) / 1024.0
        rows.append([str(k), f"{r['iters_min']}-{r['iters_max']}" if r["iters_max"] is not None else "?",
                     f"{peak_mb:.1f} MiB" + ("" if r["hwm_reset"] else " (HWM not reset)"),
                     f"{(r['rss_held_kb'] - r['rss_base_kb']) / 1024.0:.1f} MiB", C.fmt_time(r["seconds"]),
                     ", ".join(r["status"] or [])])
    verdict = ""
    ok = [r for r in results if "error" not in r]
    if len(ok) >= 2:
        a, b = ok[0], ok[-1]
        pa = (a["rss_peak_kb"] - a["rss_base_kb"]) / 1024.0
        pb = (b["rss_peak_kb"] - b["rss_base_kb"]) / 1024.0
        ha = (a["rss_held_kb"] - a["rss_base_kb"]) / 1024.0
        hb = (b["rss_held_kb"] - b["rss_base_kb"]) / 1024.0
        loop_all = all(r["iters_max"] == r["max_iter"] for r in ok)
        every = all(r["iters_min"] == r["max_iter"] for r in ok)
        verdict = (f"Peak RSS increase max_iter={b['max_iter']} vs {a['max_iter']}: {pb:.1f} vs {pa:.1f} MiB "
                   f"(ratio {pb / max(pa, 1e-9):.2f}); held between forward and backward {hb:.1f} vs "
                   f"{ha:.1f} MiB. "
                   + ("Every instance used all max_iter iterations." if every else
                      ("The batched loop ran all max_iter iterations (some instances stopped earlier, "
                       "see the iterations column)." if loop_all else
                       "NOTE: the solver stopped before max_iter, see the iterations column.")))
    md = "\n".join([
        C.section_header("Memory vs iteration count (benchmarks/memory.py)",
                         ["benchmarks/memory.py"] + (argv if argv is not None else sys.argv[1:])),
        f"QP family, B, n, m, p = {shape} (problem data {data_mb:.1f} MiB), float64, "
        f"`to_torch(tol={args.tol:g}, max_iter=k)` so that every iteration is used; "
        "forward+backward of sum(w * x*) w.r.t. all parameters, one fresh process per row.", "",
        C.md_table(["max_iter", "iterations used (min-max)", "peak RSS increase (fwd+bwd)",
                    "held fwd->bwd", "time fwd+bwd", "status"], rows), "",
        verdict])
    C.publish(md, "memory", args.write)


if __name__ == "__main__":
    main()
