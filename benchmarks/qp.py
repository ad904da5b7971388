"""Batched dense QP benchmark: declarative vs qpth vs cvxpylayers.

    python benchmarks/qp.py                 # full table + floor + scaling plot
    python benchmarks/qp.py --quick         # smaller budgets, no B=512 / n=500
    python benchmarks/qp.py --shapes 32,10,10,2 128,50,50,10 --no-scaling
    python benchmarks/qp.py --device cuda --dtype float32   # GPU rows: ours and qpth

Problem family (float64, every instance strictly feasible):

    minimize 1/2 x'Qx + q'x  s.t.  Gx <= h,  Ax == b
    Q = L L'/n + 0.1 I;  q, G, A Gaussian;  h = G x0 + s0 (s0 > 0);  b = A x0

For every shape (B, n, m, p) and tool we report the median wall time of the
forward pass (under ``torch.no_grad``) and of forward+backward of a random
linear functional sum(w * x*) w.r.t. *all* parameters (Q, q, G, h, A, b),
after one warm-up call, plus the max abs error of x* against a CVXPY/Clarabel
reference (tight tolerance, then polished on the active set). The tools of a shape are
timed in interleaved rounds (:func:`common.bench_interleaved`), so that the machine's
slow spells do not fall on one tool alone.

``--device cuda`` / ``--dtype float32`` run the same family (generated in float64 on
the CPU, then moved and cast) on a GPU or in single precision, ours against qpth by
default (cvxpylayers solves on the CPU), with a synchronization after every timed call;
the results go to their own RESULTS.md section and plot.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common as C  # noqa: E402

SHAPES = [(1, 10, 10, 2), (32, 10, 10, 2), (512, 20, 20, 5), (128, 50, 50, 10),
          (32, 100, 100, 20), (8, 200, 100, 20), (4, 500, 250, 50)]
QUICK_SHAPES = [(1, 10, 10, 2), (32, 10, 10, 2), (128, 50, 50, 10), (8, 200, 100, 20)]
TOOLS = ("ours", "qpth", "cvxpylayers")
PARAM_ORDER = ("Q", "q", "G", "h", "A", "b")

# Settings of the peers (chosen for their best accuracy; see README.md).
QPTH_KW = dict(eps=1e-12, maxIter=50, notImprovedLim=3, verbose=-1)
CVXPYLAYERS_SOLVER_ARGS = {
    # interior point, predictable time; ~1e-5 error on the SOC form (default). diffcp's
    # backward in its default mode="lsqr" was up to 0.46 off on this family from n = 20 on
    # (dense: 1e-6 to 1e-5 up to n = 200, against finite differences; see README.md)
    "Clarabel": dict(solve_method="Clarabel", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10,
                     mode="dense"),
    # ADMM: ~1e-9 error up to n = 200, but a single n = 500 forward takes > 160 s
    "SCS": dict(solve_method="SCS", eps_abs=1e-10, eps_rel=1e-10, max_iters=100_000, mode="dense"),
}
CVXPYLAYERS_ARGS = dict(CVXPYLAYERS_SOLVER_ARGS["Clarabel"])


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------
def make_ours(n, m, p, tol=1e-9, max_iter=100):
    def build():
        return C.qp_problem(n, m, p).to_torch(tol=tol, max_iter=max_iter)
    return build


def make_qpth(n, m, p):
    def build():
        from qpth.qp import QPFunction

        def layer(Q, q, G, h, A, b):
            return QPFunction(**QPTH_KW)(Q, q, G, h, A, b)
        return layer
    return build


def make_cvxpylayers(n, m, p):
    """DPP formulation: 0.5 * sum_squares(F' x) + q'x with F = chol(Q) a
    parameter.  chol(Q) is computed inside the timed call with torch, so the
    gradient is w.r.t. Q like the other tools."""
    def build():
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer

        F = cp.Parameter((n, n))
        q, G, h = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
        A, b = cp.Parameter((p, n)), cp.Parameter(p)
        x = cp.Variable(n)
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(F.T @ x) + q @ x), [G @ x <= h, A @ x == b])
        assert prob.is_dpp()
        lay = CvxpyLayer(prob, parameters=[F, q, G, h, A, b], variables=[x])

        def layer(Qt, qt, Gt, ht, At, bt):
            Ft = torch.linalg.cholesky(Qt)
            return lay(Ft, qt, Gt, ht, At, bt, solver_args=C.cvxpylayers_args(CVXPYLAYERS_ARGS))[0]
        return layer
    return build


BUILDERS = {"ours": make_ours, "qpth": make_qpth, "cvxpylayers": make_cvxpylayers}


ours_post_forward = C.solver_info


# --------------------------------------------------------------------------
# One shape
# --------------------------------------------------------------------------
def run_shape(shape, tools, budget, args, with_ref=True, seed=0):
    B, n, m, p = shape
    d = C.make_qp(B, n, m, p, seed=seed)
    params = [d[k].to(args.device, args.dtype) for k in PARAM_ORDER]
    ref = None
    if with_ref:
        ref = C.qp_reference(d)
        xref = ref["x"]
    else:
        xref = np.zeros((B, n))
    builders, post = {}, {"ours": ours_post_forward}
    for tool in tools:
        kw = dict(tol=args.tol, max_iter=args.max_iter) if tool == "ours" else {}
        builders[tool] = BUILDERS[tool](n, m, p, **kw)
    # every tool timed in the same interleaved rounds (slow peers: fewer repeats, bounded
    # by the per-cell budget)
    cells = C.run_cells(builders, params, xref, d["w"].to(args.device, args.dtype), budget,
                        max_repeats=args.max_repeats, post_forward=post, timeout_hint=args.cold_limit,
                        sync=args.sync)
    if not with_ref:
        for c in cells.values():
            c.err = None
    floor = None
    o = cells.get("ours")
    if args.floor and o is not None and o.ok and "iters_max" in o.extra:
        try:
            kt, desc = C.time_kernel(B, n, m, p, device=args.device, dtype=args.dtype, sync=args.sync)
            rounds = o.extra.get("rounds_max", 0)
            ka, desc_a = C.time_active_set_kernel(B, m, device=args.device, dtype=args.dtype, sync=args.sync)
            # the pivots that guess small blocks' active sets: one step per pivot of the
            # batch's busiest instance
            pivots = o.extra.get("pivots_max", 0)
            kp, desc_p = (C.time_pivot_kernel(B, m, device=args.device, dtype=args.dtype, sync=args.sync)
                          if pivots else (None, None))
            pivot_time = kp.median * pivots if pivots else 0.0
            # the linear algebra a call does once before any iteration (QPFactor)
            ks, desc_s = C.time_setup_kernel(B, n, m, p, device=args.device, dtype=args.dtype, sync=args.sync)
            floor = dict(kernel=kt.median, iters=o.extra["iters_max"], rounds=rounds, round_kernel=ka.median,
                         pivot_kernel=kp.median if pivots else None, setup_kernel=ks.median,
                         floor=kt.median * o.extra["iters_max"] + ka.median * rounds + pivot_time,
                         floor_mean=kt.median * o.extra["iters_max"] + ka.median * o.extra.get("rounds_mean", 0.0)
                         + pivot_time,
                         desc=f"{desc}`, `{desc_a}" + (f"`, `{desc_p}" if pivots else "") + f"`, `{desc_s}")
        except Exception as e:  # noqa: BLE001
            floor = dict(error=C.short_reason(e))
    fd = directional_derivatives(d) if with_ref and args.dtype == torch.float64 else None
    return dict(shape=shape, ref=ref, cells=cells, floor=floor, fd=fd)


FD_INSTANCES = 4
FD_STEP = 1e-5


def directional_derivatives(d, instances=FD_INSTANCES, step=FD_STEP, seed=1):
    """Central finite differences of the reference along one random direction per
    parameter: the gradients' check against code that is none of the tools'.

    For each parameter P (of the first ``instances`` instances) and a random direction V
    (symmetric for Q, so that Q + tV stays a valid Q), returns (V, D) with
    D = (w'x_ref(P + tV) - w'x_ref(P - tV)) / 2t; a tool's gradient g passes when
    <g, V> = D.  Each reference point is a Clarabel solve polished on its active set
    (exact to ~1e-12), so D carries ~1e-12 / t = 1e-7 of noise, far below the gaps it
    is meant to show.  A constraint that is weakly active (slack and dual both below
    ~t) can switch at the step, and then D is no derivative at all: such an instance
    shows up in every tool's column alike.
    """
    g = torch.Generator().manual_seed(seed)
    sub = {k: v[:instances].clone() for k, v in d.items()}
    w = sub["w"].numpy()
    out = {}
    for k in PARAM_ORDER:
        if sub[k].numel() == 0:
            continue
        V = torch.randn(sub[k].shape, generator=g, dtype=sub[k].dtype)
        if k == "Q":
            V = (V + V.transpose(-1, -2)) / 2
        values = []
        for sign in (1.0, -1.0):
            moved = dict(sub, **{k: sub[k] + sign * step * V})
            values.append(float((w * C.qp_reference(moved)["x"]).sum()))
        out[k] = (V, (values[0] - values[1]) / (2 * step))
    return out


def ratio(peer, ours, which):
    if not (peer.ok and ours.ok):
        return None
    a = peer.fwd if which == "fwd" else peer.fwdbwd
    b = ours.fwd if which == "fwd" else ours.fwdbwd
    if which == "fb" and (peer.fb_status != "ok" or ours.fb_status != "ok"):
        return None
    if a is None or b is None:
        return None
    return a.median / b.median


def results_table(results, tools):
    hdr = ["B, n, m, p"]
    for t in tools:
        hdr += [f"{t} fwd", f"{t} fwd+bwd", f"{t} err"]
    for t in tools:
        if t != "ours" and "ours" in tools:
            hdr += [f"{t}/ours fwd", f"{t}/ours fwd+bwd"]
    rows = []
    for r in results:
        row = [", ".join(map(str, r["shape"]))]
        cells = r["cells"]
        for t in tools:
            c = cells[t]
            row += [c.time_str("fwd"), c.time_str("fb"), c.err_str()]
        for t in tools:
            if t != "ours" and "ours" in tools:
                row += [C.fmt_ratio(ratio(cells[t], cells["ours"], "fwd")),
                        C.fmt_ratio(ratio(cells[t], cells["ours"], "fb"))]
        rows.append(row)
    return C.md_table(hdr, rows)


def floor_table(results):
    hdr = ["B, n, m, p", "pivots (max / mean)", "active-set rounds (max / mean)", "iterations (max / median)",
           "pivot kernel", "round kernel", "iteration kernel", "floor", "ours fwd", "ours fwd / floor",
           "ours fwd / floor by mean rounds", "setup kernel", "ours fwd / (floor + setup)"]
    rows = []
    kernels = []  # every kernel a row timed, in order of first use
    for r in results:
        o = r["cells"].get("ours")
        f = r["floor"]
        shape = ", ".join(map(str, r["shape"]))
        if o is None or not o.ok:
            rows.append([shape, "-", "-", "-", "-", "-", "-", "-", o.status if o else "-", "-", "-", "-", "-"])
            continue
        its = f"{o.extra.get('iters_max', '-')} / {o.extra.get('iters_median', '-')}"
        rounds = f"{o.extra.get('rounds_max', 0)} / {o.extra.get('rounds_mean', 0.0):.1f}"
        pivots = (f"{o.extra['pivots_max']} / {o.extra['pivots_mean']:.1f}" if "pivots_max" in o.extra else "-")
        if not f or "error" in (f or {}):
            rows.append([shape, pivots, rounds, its, (f or {}).get("error", "-"), "-", "-", "-", str(o.fwd), "-", "-",
                         "-", "-"])
            continue
        kernels += [k for k in f["desc"].split("`, `") if k not in kernels]
        rows.append([shape, pivots, rounds, its,
                     C.fmt_time(f["pivot_kernel"]) if f["pivot_kernel"] is not None else "-",
                     C.fmt_time(f["round_kernel"]), C.fmt_time(f["kernel"]),
                     C.fmt_time(f["floor"]), str(o.fwd), C.fmt_ratio(o.fwd.median / f["floor"]),
                     C.fmt_ratio(o.fwd.median / f["floor_mean"]) if f["floor_mean"] > 0 else "-",
                     C.fmt_time(f["setup_kernel"]), C.fmt_ratio(o.fwd.median / (f["floor"] + f["setup_kernel"]))])
    return C.md_table(hdr, rows), "`, `".join(kernels) if kernels else None


def target_check(results, err_target=1e-7):
    lines = []
    for r in results:
        cells = r["cells"]
        o = cells.get("ours")
        if o is None:
            continue
        shape = ", ".join(map(str, r["shape"]))
        if not o.ok or o.fb_status != "ok":
            lines.append(f"- {shape}: ours did not run ({o.status if not o.ok else o.fb_status})")
            continue
        msgs = []
        if o.err is not None and not (o.err <= err_target):
            msgs.append(f"error {C.fmt_err(o.err)} > {err_target:g}")
        for peer, tgt in (("qpth", 3.0), ("cvxpylayers", 30.0)):
            if peer in cells:
                rr = ratio(cells[peer], o, "fb")
                if rr is not None and rr < tgt:
                    msgs.append(f"{peer}/ours fwd+bwd = {rr:.2f}x < {tgt:g}x")
        if o.extra.get("n_not_solved"):
            msgs.append(f"{o.extra['n_not_solved']} instances not solved ({o.extra.get('status_example')})")
        lines.append(f"- {shape}: " + ("MISSES target: " + "; ".join(msgs) if msgs else "meets targets"))
    return "\n".join(lines)


def notes_block(results):
    lines = []
    for r in results:
        shape = ", ".join(map(str, r["shape"]))
        ref = r["ref"]
        if ref:
            lines.append(f"- {shape}: reference {ref['polished']}/{ref['B']} instances polished, "
                         f"max polish correction {C.fmt_err(ref['polish_delta'])}, "
                         f"{ref['seconds']:.1f} s")
        for t, c in r["cells"].items():
            if c.ok and c.fwd is not None:
                lines.append(f"  - {t}: repeats fwd {c.fwd.repeats}, fwd+bwd "
                             f"{c.fwdbwd.repeats if c.fwdbwd else '-'}"
                             + (f", {c.extra['grad_note']}" if c.extra.get("grad_note") else "")
                             + (", forward timed cold only" if c.extra.get("fwd_cold_only") else ""))
            elif not c.ok:
                lines.append(f"  - {t}: {c.status}")
    return "\n".join(lines)


def fd_check_block(results, tools):
    """Each tool's directional derivatives against the reference's finite differences."""
    rows = []
    for r in results:
        if not r.get("fd"):
            continue
        row = [", ".join(map(str, r["shape"]))]
        for t in tools:
            c = r["cells"].get(t)
            grads = c.extra.get("grads") if c is not None else None
            if not grads or any(x is None for x in grads):
                row.append("-")
                continue
            worst = 0.0
            for k, (V, D) in r["fd"].items():
                gk = grads[PARAM_ORDER.index(k)][:V.shape[0]].to("cpu", torch.float64)
                worst = max(worst, abs(float((gk * V).sum()) - D) / max(abs(D), 1.0))
            row.append(f"{worst:.1e}")
        rows.append(row)
    if not rows:
        return ""
    return C.md_table(["B, n, m, p"] + list(tools), rows)


def grad_check_block(results):
    lines = []
    for r in results:
        o = r["cells"].get("ours")
        if o is None:
            continue
        for t in ("qpth", "cvxpylayers"):
            c = r["cells"].get(t)
            if c is None:
                continue
            g = C.grad_discrepancy(c, o)
            if g is not None:
                lines.append(f"- {', '.join(map(str, r['shape']))}: max |grad_{t} - grad_ours| / max(|grad_ours|, 1) = {g:.1e}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Scaling
# --------------------------------------------------------------------------
def scaling(args, tools):
    sweeps = {
        "B": [(B, 20, 20, 5) for B in ((1, 8, 64, 256) if args.quick else (1, 8, 32, 128, 512))],
        "n": [(32, n, n, max(1, n // 5)) for n in ((10, 50, 100) if args.quick else (10, 25, 50, 100, 200))],
    }
    data = {}
    for key, shapes in sweeps.items():
        for shp in shapes:
            print(f"  scaling {key}: {shp}", flush=True)
            r = run_shape(shp, tools, args.scaling_budget, args, with_ref=False, seed=1)
            data[(key, shp)] = {t: (c.fwdbwd.median if c.ok and c.fb_status == "ok" and c.fwdbwd else None)
                                for t, c in r["cells"].items()}
    return sweeps, data


def plot_scaling(sweeps, data, tools, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the scaling plot")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, xlabel in ((axes[0], "B", "batch size B  (n=m=20, p=5)"),
                            (axes[1], "n", "variables n  (B=32, m=n, p=n/5)")):
        for t in tools:
            xs, ys = [], []
            for shp in sweeps[key]:
                v = data[(key, shp)].get(t)
                if v is not None:
                    xs.append(shp[0] if key == "B" else shp[1])
                    ys.append(v)
            if xs:
                ax.loglog(xs, ys, "o-", label=t)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("forward+backward time [s]")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"QP scaling, float64, {C.cpu_model()}, torch {torch.__version__}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling_table(sweeps, data, tools):
    rows = []
    for key in ("B", "n"):
        for shp in sweeps[key]:
            row = [key, ", ".join(map(str, shp))]
            for t in tools:
                v = data[(key, shp)].get(t)
                row.append(C.fmt_time(v) if v is not None else "failed/missing")
            rows.append(row)
    txt = C.md_table(["sweep", "B, n, m, p"] + [f"{t} fwd+bwd" for t in tools], rows)
    # log-log slope in B for each tool
    slopes = []
    for t in tools:
        pts = [(shp[0], data[("B", shp)].get(t)) for shp in sweeps["B"]]
        pts = [(x, y) for x, y in pts if y is not None and x >= 8]
        if len(pts) >= 2:
            xs, ys = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            slopes.append(f"{t}: {np.polyfit(xs, ys, 1)[0]:.2f}")
    if slopes:
        txt += "\n\nLog-log slope of time vs B (B >= 8; 1.0 = linear): " + ", ".join(slopes)
    return txt


# --------------------------------------------------------------------------
def parse_shape(s):
    parts = tuple(int(v) for v in s.replace("(", "").replace(")", "").split(","))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError("shape must be B,n,m,p")
    return parts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller budgets and shapes")
    ap.add_argument("--shapes", nargs="+", type=parse_shape, help="shapes B,n,m,p")
    ap.add_argument("--tools", nargs="+", default=None, choices=TOOLS,
                    help="default: all three on the CPU, ours and qpth on a GPU")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed repeats per cell")
    ap.add_argument("--max-repeats", type=int, default=100)
    ap.add_argument("--cold-limit", type=float, default=60.0,
                    help="a forward slower than this (s) is reported from its single call")
    ap.add_argument("--cvxpylayers-solver", choices=sorted(CVXPYLAYERS_SOLVER_ARGS), default="Clarabel",
                    help="diffcp solve_method for cvxpylayers (see README.md)")
    ap.add_argument("--tol", type=float, default=None,
                    help="ours: default 1e-9 in float64, the layer's own in float32")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--no-floor", dest="floor", action="store_false")
    ap.add_argument("--no-scaling", dest="scaling", action="store_false")
    ap.add_argument("--scaling-budget", type=float, default=None)
    ap.add_argument("--plot", default=None, help="default: benchmarks/scaling.png (CPU, float64), "
                                                  "else scaling-<device>-<dtype>.png; -retained before .png "
                                                  "with --retain-memory")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: leave torch's default)")
    ap.add_argument("--no-write", dest="write", action="store_false",
                    help="don't touch RESULTS.md nor the default plot (an explicit --plot is written)")
    ap.add_argument("--retain-memory", action="store_true",
                    help="call dl.retain_cpu_memory() first (process-wide: every tool runs with it); "
                         "recorded in its own RESULTS.md section")
    args = ap.parse_args(argv)
    variant = "" if (args.device, args.dtype) == ("cpu", "float64") else f"-{args.device.replace(':', '')}-{args.dtype}"
    args.dtype = getattr(torch, args.dtype)
    args.sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    if args.tol is None and args.dtype == torch.float64:
        args.tol = 1e-9
    if args.plot is None and args.write:  # (a retained-memory run keeps its own plot, as its own section)
        args.plot = str(C.BENCH_DIR / f"scaling{variant}{'-retained' if args.retain_memory else ''}.png")
    if args.tools is None:
        # cvxpylayers solves on the CPU: on a GPU the comparison is with qpth
        args.tools = list(TOOLS) if args.device == "cpu" else ["ours", "qpth"]
    if args.retain_memory and not C.import_declarative().retain_cpu_memory():
        ap.error("--retain-memory needs glibc (dl.retain_cpu_memory() returned False)")
    if args.budget is None:
        args.budget = 0.5 if args.quick else 2.0
    if args.scaling_budget is None:
        args.scaling_budget = 0.2 if args.quick else 0.5
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    CVXPYLAYERS_ARGS.clear()
    CVXPYLAYERS_ARGS.update(CVXPYLAYERS_SOLVER_ARGS[args.cvxpylayers_solver])
    tools = args.tools
    t_start = C.start_run(args.threads)
    results = []
    for shp in shapes:
        print(f"shape B,n,m,p = {shp}", flush=True)
        t0 = time.perf_counter()
        r = run_shape(shp, tools, args.budget, args)
        for t, c in r["cells"].items():
            print(f"  {t:12s} fwd {c.time_str('fwd'):>12s}  fwd+bwd {c.time_str('fb'):>12s}  "
                  f"err {c.err_str()}", flush=True)
        print(f"  ({time.perf_counter() - t0:.1f} s for the shape)", flush=True)
        results.append(r)

    table = results_table(results, tools)
    title = "Batched QP (benchmarks/qp.py)"
    if args.retain_memory:
        title = "Batched QP, freed memory retained (benchmarks/qp.py --retain-memory)"
    if variant:
        where = torch.cuda.get_device_name(args.device) if args.sync else args.device
        title = f"Batched QP on {where}, {str(args.dtype)[6:]} (benchmarks/qp.py --device --dtype)"
    body = [C.section_header(title, ["benchmarks/qp.py"] + (argv if argv is not None else sys.argv[1:])),
            "Times: median wall time after one warm-up, the tools timed in interleaved rounds; `fwd` under `torch.no_grad()`, "
            "`fwd+bwd` = forward + backward of sum(w * x*) w.r.t. Q, q, G, h, A, b. "
            "`err` = max |x - x_ref| over the batch; reference = CVXPY + Clarabel "
            "(tol 1e-12, polished on the active set). Ratios > 1 mean ours is faster.\n",
            f"Settings: ours `to_torch(tol={'default' if args.tol is None else f'{args.tol:g}'}, max_iter={args.max_iter})`; "
            f"qpth `QPFunction({', '.join(f'{k}={v}' for k, v in QPTH_KW.items())})`; "
            f"cvxpylayers `CvxpyLayer` (diffcp) with solver_args `{CVXPYLAYERS_ARGS}`, "
            "objective 0.5*sum_squares(chol(Q)' x) + q'x.\n",
            table, ""]
    if "ours" in tools and args.floor:
        ft, desc = floor_table(results)
        body += ["### Linear-algebra floor", "",
                 f"Kernels: `{desc}` timed on random data of the same size: one round of the "
                 "active-set iteration (one factorization and solve), one interior-point "
                 "iteration (one factorization, two solves) and, where small blocks guess their "
                 "active set by pivots, one pivot (a rank-one update of the (B, m, m + 1) tableau, or "
                 "from 2^15 entries on of its rows (B, m, m)). "
                 "Floor = pivot kernel x max pivots + round kernel x max active-set rounds + "
                 "iteration kernel x max iterations over the batch. Rounds "
                 "after the first few re-solve only the instances still wrong (on their own rows "
                 "once they are fewer than half, when the blocks are large), so at large B that "
                 "floor overstates the linear algebra done; the column after it counts rounds by "
                 "their mean over the instances instead. The floor leaves out the linear algebra "
                 "a call does once before any iteration (the setup kernel: the Cholesky "
                 "factorization of Q, one triangular solve for G', A' and c, and W); the last "
                 "column adds it.", "", ft, ""]
    if "ours" in tools:
        err_target = 1e-7 if args.dtype == torch.float64 else 1e-3
        body += [f"### Targets (fwd+bwd >= 3x qpth, >= 30x cvxpylayers, err <= {err_target:g})", "",
                 target_check(results, err_target), ""]
        gc = grad_check_block(results)
        if gc:
            body += ["### Gradient agreement", "", gc, ""]
        fc = fd_check_block(results, tools)
        if fc:
            body += ["### Gradients against finite differences of the reference", "",
                     f"For each parameter P, one random direction V over the first {FD_INSTANCES} "
                     "instances (symmetric for Q): max over the six parameters of "
                     "|<grad_P, V> - D| / max(|D|, 1), D the central difference of sum(w * x_ref) "
                     f"with step {FD_STEP:g} along V, x_ref the polished Clarabel reference.", "",
                     fc, ""]
    body += ["### Notes per shape", "", notes_block(results), ""]

    if args.scaling:
        print("scaling sweeps ...", flush=True)
        sweeps, data = scaling(args, tools)
        st = scaling_table(sweeps, data, tools)
        png = plot_scaling(sweeps, data, tools, args.plot) if args.plot else None
        body += ["### Scaling (forward+backward)", "", st, ""]
        if png:
            rel = Path(png).resolve()
            try:
                rel = rel.relative_to(C.BENCH_DIR)
            except ValueError:
                pass
            body += [f"![scaling]({rel})", ""]
        elif args.plot:
            body += ["(plot skipped: matplotlib not installed)", ""]
    body.append(f"Total benchmark wall time: {time.perf_counter() - t_start:.0f} s; 1-min load average at the end: {C._loadavg()} (other busy processes invalidate the timings, see README)")
    md = "\n".join(body)
    C.publish(md, ("qp-retained" if args.retain_memory else "qp") + variant, args.write)


if __name__ == "__main__":
    main()
