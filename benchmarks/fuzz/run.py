"""Fuzz declarative's NLP interior point against CVXPY + Clarabel.

usage: python benchmarks/fuzz/run.py SEED_START SEED_END [--out FILE]
Writes one JSON line per instance (and dtype) to fuzz_results_START_END.jsonl in the working
directory and prints a summary; `python benchmarks/fuzz/classify.py fuzz_results_*.jsonl` groups the
instances that are not right into families.
"""
import json
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
import torch
import cvxpy as cp

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

from gen import gen_problem, dl_problem, cp_problem, data_of, describe  # noqa: E402
import solvers.interior_point as ipm  # noqa: E402

# record the NLP loop's stopping-test scales (1 + |grad f(start)|, 1 + |g(start)|) of the first call
CAPTURE = {}
_primal_dual = ipm.primal_dual


def _capturing_primal_dual(*args, **kwargs):
    if "scale_dual" not in CAPTURE and kwargs.get("scale_dual") is not None:
        CAPTURE["scale_dual"] = kwargs["scale_dual"].detach().double().cpu().numpy().copy()
        CAPTURE["scale_primal"] = kwargs["scale_primal"].detach().double().cpu().numpy().copy()
    return _primal_dual(*args, **kwargs)


ipm.primal_dual = _capturing_primal_dual

TIGHT = dict(tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, tol_ktratio=1e-8, max_iter=500)
LOOSER = dict(tol_gap_abs=1e-8, tol_gap_rel=1e-8, tol_feas=1e-8, tol_ktratio=1e-6, max_iter=500)


def clarabel(P, i):
    prob, x = cp_problem(P, i)
    status = "error"
    for opts in (TIGHT, LOOSER):
        try:
            prob.solve(solver=cp.CLARABEL, **opts)
            status = prob.status
        except Exception as e:  # noqa: BLE001
            status = "error:" + type(e).__name__
        if status in ("optimal", "infeasible", "unbounded"):
            break
    xv = None if x.value is None else x.value.copy()
    return prob, x, status, (prob.value if status == "optimal" else None), xv


def evaluate(prob, x, xo):
    """objective and largest constraint violation of point xo in the cvxpy problem."""
    if xo is None or not np.all(np.isfinite(xo)):
        return float("nan"), float("nan")
    x.value = xo
    try:
        f = float(prob.objective.value)
    except Exception:  # noqa: BLE001
        f = float("nan")
    viol = 0.0
    for c in prob.constraints:
        try:
            v = c.violation()
            v = float(np.max(v)) if np.size(v) else 0.0
            scale = 1.0 + max(float(np.max(np.abs(a.value))) for a in c.args)
            v = v / scale  # relative to the row's size
        except Exception:  # noqa: BLE001
            v = float("nan")
        viol = max(viol, v) if np.isfinite(v) else float("inf")
    return f, viol


def run_layer(layer, names, data, dtype, B):
    args = {k: torch.tensor(data[k], dtype=dtype) for k in names}
    t = time.time()
    CAPTURE.clear()
    out = layer(**args)
    dt = time.time() - t
    info = layer.info
    X = out.double().numpy()
    if X.ndim == 1:  # no parameters: one unbatched instance
        X = np.broadcast_to(X, (B, X.shape[0]))
        info = type("I", (), {k: (getattr(info, k) * B if k == "status" else getattr(info, k).expand(B))
                              for k in ("status", "iterations", "primal_residual", "dual_residual",
                                        "complementarity")})
    return (X, list(info.status), info.iterations.tolist(), info.primal_residual.tolist(),
            info.dual_residual.tolist(), info.complementarity.tolist(), dt)


def main():
    a, b = int(sys.argv[1]), int(sys.argv[2])
    out_path = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--out" else \
        f"fuzz_results_{a}_{b}.jsonl"  # (in the working directory)
    fh = open(out_path, "w")
    t0 = time.time()
    counts = {}
    for seed in range(a, b):
        P = gen_problem(seed)
        rec0 = dict(seed=seed, desc=describe(P), n=P.n, tags=[c.tag for c in P.comps], far=P.far)
        try:
            tc = time.time()
            prob, names = dl_problem(P)
            layer = prob.to_torch(warn=False)
            pclass = prob.problem_class
            tc = time.time() - tc
        except Exception as e:  # noqa: BLE001
            rec = dict(rec0, verdict="compile_exception", error=repr(e)[:300])
            fh.write(json.dumps(rec) + "\n")
            counts["compile_exception"] = counts.get("compile_exception", 0) + 1
            print(seed, "compile exception", repr(e)[:200], flush=True)
            continue
        data = data_of(P)
        refs = [clarabel(P, i) for i in range(P.B)]
        dtypes = [torch.float64] + ([torch.float32] if P.float32 else [])
        for dtype in dtypes:
            try:
                X, st, its, pr, dr, co, dt = run_layer(layer, names, data, dtype, P.B)
            except Exception as e:  # noqa: BLE001
                rec = dict(rec0, verdict="run_exception", dtype=str(dtype), error=repr(e)[:300],
                           tb=traceback.format_exc()[-800:])
                fh.write(json.dumps(rec) + "\n")
                counts["run_exception"] = counts.get("run_exception", 0) + 1
                print(seed, "run exception", repr(e)[:200], flush=True)
                continue
            rtol = 1e-6 if dtype == torch.float64 else 1e-3
            for i in range(P.B):
                cprob, cx, cst, cval, xr = refs[i]
                rec = dict(rec0, inst=i, dtype=str(dtype).split(".")[-1], pclass=pclass, ours=st[i],
                           iters=its[i], pres=pr[i], dres=dr[i], comp=co[i], clarabel=cst, t_solve=dt)
                if "scale_dual" in CAPTURE and CAPTURE["scale_dual"].shape[0] == P.B:
                    rec["scale_dual"] = float(CAPTURE["scale_dual"][i])
                    rec["scale_primal"] = float(CAPTURE["scale_primal"][i])
                if cst == "optimal":
                    fo, vo = evaluate(cprob, cx, X[i])
                    fc, vc = evaluate(cprob, cx, xr)
                    xdiff = float(np.linalg.norm(X[i] - xr) / (1 + np.linalg.norm(xr)))
                    rec.update(f_ours=fo, f_ref=fc, viol_ours=vo, viol_ref=vc, xdiff=xdiff)
                    if st[i] == "optimal":
                        gap = (fo - fc) / (1 + abs(fc))
                        rec["gap"] = gap
                        if not np.isfinite(fo) or not np.isfinite(vo):
                            v = "WRONG_nonfinite"
                        elif vc > 1e-7 and vo <= vc:
                            v = "xdiff_ref_violates"  # Clarabel's point is the infeasible one
                        elif gap > rtol or vo > max(rtol * 10, 10 * vc):
                            v = "WRONG_worse"  # worse objective or infeasible
                        elif xdiff > rtol:
                            v = "xdiff_only"  # objectives agree: non-unique or reference inaccurate
                        else:
                            v = "ok"
                    elif st[i] in ("infeasible", "unbounded"):
                        v = "WRONG_certificate"
                    else:
                        v = "fail_" + st[i]
                elif cst in ("infeasible", "unbounded"):
                    if st[i] == cst:
                        v = "ok_" + cst
                    elif st[i] == "optimal":
                        fo, vo = evaluate(cprob, cx, X[i])
                        rec.update(f_ours=fo, viol_ours=vo)
                        v = f"WRONG_optimal_but_ref_{cst}"
                    elif st[i] in ("infeasible", "unbounded"):
                        v = f"other_cert_ref_{cst}"
                    else:
                        v = f"fail_{st[i]}_ref_{cst}"
                else:
                    v = f"ref_{cst}_ours_{st[i]}"
                rec["verdict"] = v
                counts[v] = counts.get(v, 0) + 1
                fh.write(json.dumps(rec) + "\n")
                if v not in ("ok", "ok_infeasible", "ok_unbounded"):
                    print(f"seed {seed} inst {i} {rec['dtype']}: {v} ours={st[i]} it={its[i]} ref={cst} "
                          f"xdiff={rec.get('xdiff', float('nan')):.2e} gap={rec.get('gap', float('nan')):.2e} "
                          f"| {P.n} {rec0['tags']}", flush=True)
        fh.flush()
    fh.close()
    print(f"done {a}..{b} in {time.time() - t0:.0f}s; verdicts: {json.dumps(counts, sort_keys=True)}")


if __name__ == "__main__":
    main()
