"""Batched entropy-regularised problems (softmax as optimisation):
declarative vs cvxpylayers (exponential-cone formulation with ``cp.entr``).

    python benchmarks/entropy.py            # B in {32, 1024}, n in {10, 100}
    python benchmarks/entropy.py --quick    # B = 32 only
    python benchmarks/entropy.py --sizes 32,10 1024,100 --variants plain

Variants (float64):

    plain:    maximize theta'z + sum(entr(z))         s.t. sum(z) == 1, z >= 0
    weighted: maximize theta'z + sum(wt .* entr(z))   s.t. sum(z) == 1, z >= 0, G z <= h

(``wt`` in [0.5, 1.5], G is (n/2 x n) Gaussian, h = G (1/n) + s0, s0 > 0.)
The plain variant's exact solution is softmax(theta), used as reference; the
weighted one's reference is CVXPY/Clarabel polished by Newton on the KKT
system.  Gradients are taken w.r.t. every parameter (theta; theta, wt, G, h).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


import common as C  # noqa: E402

SIZES = [(32, 10), (32, 100), (1024, 10), (1024, 100)]
QUICK_SIZES = [(32, 10), (32, 100)]
VARIANTS = ("plain", "weighted")
TOOLS = ("ours", "cvxpylayers")

# diffcp's Clarabel path is the most accurate cvxpylayers option for exp cones
# here (SCS stalls around 1e-5 at n = 100); see README.md.
# diffcp's backward in its default mode ("lsqr"): on exponential cones mode="dense" was
# 1.3-3.5x slower from n = 100 on, and further from ours (max relative gradient gap 0.04-73
# against 0.05-0.57) in the weighted rows
CVXPYLAYERS_ARGS = dict(solve_method="Clarabel", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)


def _param(dl, shape, name, **kw):
    try:
        return dl.Parameter(shape, name=name, **kw)
    except TypeError:
        return dl.Parameter(shape, name=name)


def make_ours(n, weighted, tol=1e-11, max_iter=100):
    def build():
        dl = C.import_declarative()
        z = dl.Variable(n, name="z")
        theta = dl.Parameter(n, name="theta")
        cons = [dl.sum(z) == 1, z >= 0]
        if not weighted:
            obj = theta @ z + dl.sum(dl.entropy(z))
        else:
            k = max(1, n // 2)
            wt = _param(dl, n, "wt", nonneg=True)
            G = dl.Parameter((k, n), name="G")
            h = dl.Parameter(k, name="h")
            ent = dl.entropy(z)
            errors = []
            obj = None
            for form in (lambda: wt @ ent, lambda: dl.sum(wt * ent),
                         lambda: dl.sum(dl.multiply(wt, ent))):
                try:
                    obj = theta @ z + form()
                    break
                except Exception as e:  # noqa: BLE001
                    errors.append(C.short_reason(e))
            if obj is None:
                raise RuntimeError("weighted entropy not expressible: " + " / ".join(errors))
            cons.append(G @ z <= h)
        prob = dl.Problem(dl.Maximize(obj), cons)
        return prob.to_torch(tol=tol, max_iter=max_iter)
    return build


def make_cvxpylayers(n, weighted):
    def build():
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer

        z = cp.Variable(n)
        theta = cp.Parameter(n)
        cons = [cp.sum(z) == 1, z >= 0]
        if not weighted:
            prob = cp.Problem(cp.Maximize(theta @ z + cp.sum(cp.entr(z))), cons)
            pars = [theta]
        else:
            k = max(1, n // 2)
            wt, G, h = cp.Parameter(n, nonneg=True), cp.Parameter((k, n)), cp.Parameter(k)
            prob = cp.Problem(cp.Maximize(theta @ z + wt @ cp.entr(z)), cons + [G @ z <= h])
            pars = [theta, wt, G, h]
        assert prob.is_dpp()
        lay = CvxpyLayer(prob, parameters=pars, variables=[z])

        def layer(*ps):
            return lay(*ps, solver_args=C.cvxpylayers_args(CVXPYLAYERS_ARGS))[0]
        return layer
    return build


def params_of(d, weighted):
    return [d["theta"], d["wt"], d["G"], d["h"]] if weighted else [d["theta"]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", nargs="+", help="B,n pairs")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--budget", type=float, default=None)
    ap.add_argument("--max-repeats", type=int, default=100)
    ap.add_argument("--cold-limit", type=float, default=60.0)
    # 1e-11: the KKT residual bounds the solution error only up to the conditioning,
    # which entries near 0 (entropy's 1/z curvature) make ~100x; at 1e-9 the weighted
    # family's error is 2-6e-7, at 1e-11 below 1e-7 (one or two more iterations)
    ap.add_argument("--tol", type=float, default=1e-11)
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--no-floor", dest="floor", action="store_false")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: leave torch's default)")
    ap.add_argument("--no-write", dest="write", action="store_false")
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = 0.5 if args.quick else 1.5
    sizes = ([tuple(int(v) for v in s.split(",")) for s in args.sizes] if args.sizes
             else (QUICK_SIZES if args.quick else SIZES))
    t_start = C.start_run(args.threads)

    rows, notes, floors = [], [], []
    kdesc = "solvers.interior_point.diagonal_kkt_kernel"
    for variant in args.variants:
        weighted = variant == "weighted"
        for B, n in sizes:
            print(f"{variant}: B={B}, n={n}", flush=True)
            d = C.make_entropy(B, n, weighted, seed=0)
            ref = C.entropy_reference(d)
            params = params_of(d, weighted)
            builders = {tool: (make_ours(n, weighted, args.tol, args.max_iter) if tool == "ours"
                               else make_cvxpylayers(n, weighted)) for tool in args.tools}
            t0 = time.perf_counter()
            cells = C.run_cells(builders, params, ref["x"], d["w"], args.budget,
                                max_repeats=args.max_repeats, post_forward={"ours": _post},
                                timeout_hint=args.cold_limit)
            for tool, c in cells.items():
                print(f"  {tool:12s} fwd {c.time_str('fwd'):>12s}  fwd+bwd {c.time_str('fb'):>12s}  "
                      f"err {c.err_str()}", flush=True)
            print(f"  ({time.perf_counter() - t0:.1f} s for the cell)", flush=True)
            row = [variant, str(B), str(n)]
            for t in args.tools:
                c = cells[t]
                row += [c.time_str("fwd"), c.time_str("fb"), c.err_str()]
            if "ours" in cells and "cvxpylayers" in cells:
                o, p = cells["ours"], cells["cvxpylayers"]
                rf = (p.fwd.median / o.fwd.median) if (o.ok and p.ok and o.fwd and p.fwd) else None
                rb = (p.fwdbwd.median / o.fwdbwd.median) if (o.ok and p.ok and o.fwdbwd and p.fwdbwd
                                                           and o.fb_status == "ok" and p.fb_status == "ok") else None
                row += [C.fmt_ratio(rf), C.fmt_ratio(rb)]
                g = C.grad_discrepancy(p, o)
                row.append(C.fmt_err(g) if g is not None else "-")
            it = "-"
            o = cells.get("ours")
            if o is not None and o.ok and "iters_max" in o.extra:
                it = f"{o.extra['iters_max']} / {o.extra['iters_median']:g}"
                if args.floor:
                    k = n // 2 if weighted else 0
                    try:
                        kt, kdesc = C.time_structured_nlp_kernel(B, n, k, 1)
                        fl = kt.median * o.extra["iters_max"]
                        floors.append([variant, str(B), str(n), it, C.fmt_time(kt.median),
                                       C.fmt_time(fl), str(o.fwd), C.fmt_ratio(o.fwd.median / fl)])
                    except Exception as e:  # noqa: BLE001
                        floors.append([variant, str(B), str(n), it, C.short_reason(e), "-", "-", "-"])
            row.append(it)
            rows.append(row)
            extra = f", active inequalities/instance {ref['active_per_instance']:.1f}" if "active_per_instance" in ref else ""
            if ref.get("inaccurate"):
                extra += f", {ref['inaccurate']} Clarabel solves 'optimal_inaccurate' (kept; polished as the others, allowed to move up to 1e-3)"
            notes.append(f"- {variant} B={B} n={n}: reference {ref.get('note', 'Clarabel + Newton polish')}; "
                         f"polish/ Clarabel delta {C.fmt_err(ref['polish_delta'])}, "
                         f"{ref['polished']}/{ref['B']} polished{extra}")
            for t, c in cells.items():
                if not c.ok:
                    notes.append(f"  - {t}: {c.status}")
                else:
                    bits = [f"repeats fwd {c.fwd.repeats if c.fwd else '-'}, "
                            f"fwd+bwd {c.fwdbwd.repeats if c.fwdbwd else '-'}"]
                    if c.extra.get("fwd_cold_only"):
                        bits.append("forward > cold limit: single call reported")
                    if c.extra.get("grad_note"):
                        bits.append(c.extra["grad_note"])
                    notes.append(f"  - {t}: " + "; ".join(bits))
                if c.ok and c.extra.get("n_not_solved"):
                    notes.append(f"  - {t}: {c.extra['n_not_solved']} instances not solved ({c.extra.get('status_example')})")

    hdr = ["variant", "B", "n"]
    for t in args.tools:
        hdr += [f"{t} fwd", f"{t} fwd+bwd", f"{t} err"]
    if "ours" in args.tools and "cvxpylayers" in args.tools:
        hdr += ["cvxpylayers/ours fwd", "cvxpylayers/ours fwd+bwd", "grad diff"]
    hdr.append("ours iters (max / median)")
    body = [C.section_header("Entropy-regularised problems (benchmarks/entropy.py)",
                             ["benchmarks/entropy.py"] + (argv if argv is not None else sys.argv[1:])),
            "Times: median after one warm-up, the tools timed in interleaved rounds; `fwd` under `torch.no_grad()`, `fwd+bwd` w.r.t. all "
            "parameters of sum(w * z*). `err` = max |z - z_ref|. `grad diff` = max |g_cvxpylayers - g_ours| "
            "/ max(|g_ours|, 1). Ratios > 1 mean ours is faster.\n",
            f"Settings: ours `to_torch(tol={args.tol:g}, max_iter={args.max_iter})`; cvxpylayers "
            f"(diffcp, exponential cones via `cp.entr`) solver_args `{CVXPYLAYERS_ARGS}`.\n",
            C.md_table(hdr, rows), ""]
    if floors:
        body += ["### Linear-algebra floor", "",
                 f"Kernel `{kdesc}`: the structured Newton step the compiler chose for this family "
                 "(diagonal Hessian; z >= 0 as n bound rows; the k = n/2 rows of G and the equality "
                 "in a (k + 1) system), one factorization and solve.", "",
                 C.md_table(["variant", "B", "n", "iters (max / median)", "kernel", "floor", "ours fwd",
                             "ours fwd / floor"], floors), ""]
    body += ["### Notes", "", "\n".join(notes), "",
             f"Total benchmark wall time: {time.perf_counter() - t_start:.0f} s; 1-min load average "
             f"at the end: {C._loadavg()}"]
    md = "\n".join(body)
    C.publish(md, "entropy", args.write)


_post = C.solver_info


if __name__ == "__main__":
    main()
