"""Where the OSQP backend wins and where it loses, against the default interior point.

Two problems, each solved by our layer with the default solver (the batched dense
interior point) and by OSQP (``solvers.osqp_backend.solve_qp_osqp``):

* **large sparse**: minimize 0.5 ||x - y||^2 s.t. x[i+1] - x[i] <= h[i] (a first-difference
  matrix G, m = n - 1), n = 2000, B = 2, y a random walk so that most constraints are
  active. The interior point factors a dense (m, m) matrix per iteration; OSQP factors a
  sparse KKT matrix with O(n) nonzeros once.
* **small dense batched**: the random QP family of ``benchmarks/qp.py`` (Q, q, G, h, A,
  b all batched parameters), B = 128, n = 20, m = 20, p = 5: one batched factorization
  per iteration for all 128 instances, against 128 OSQP solves in a Python loop.

Columns: forward and forward+backward (backward of sum(w * x) w.r.t. all parameters),
median of repeats; OSQP's ADMM iterations (max over the batch); max |x - x_ref| with
x_ref from CVXPY/Clarabel at tight tolerance.

If ``prob.to_torch(solver="osqp")`` is not available (the layer wiring is separate
from the backend), the OSQP rows time the backend directly on the same QP data:
forward = ``solve_qp_osqp``, backward = ``solvers.interior_point.kkt_adjoint`` at the
returned active set plus the parameter products of c, h, b (the path the layer wiring
uses), and the output says so.

    python benchmarks/osqp.py             # ~2-3 min on a 2-core CPU
    python benchmarks/osqp.py --quick     # n = 1000 for the large problem
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

# This script is called osqp.py: with its folder first on sys.path, ``import osqp``
# inside the backend would import the script itself. Import the real package first,
# then make the folder's helpers importable from the end of the path.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]
import osqp as _osqp_package  # noqa: E402,F401  (the solver package, cached in sys.modules)

sys.path.append(_HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import (  # noqa: E402
    REPO_ROOT,
    _clarabel_solve,
    fmt_err,
    fmt_time,
    machine_info_md,
    make_qp,
    qp_problem,
    md_table,
    qp_reference,
)

import declarative as dl  # noqa: E402
from solvers import interior_point as ipm  # noqa: E402
from solvers.osqp_backend import solve_qp_osqp  # noqa: E402

RESULTS = Path(_HERE) / "RESULTS_osqp.md"


def timed(fn, repeats: int, warmup: bool = True):
    """Median wall time of ``repeats`` calls (after one untimed warm-up call)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------
# problems: the DSL layer, the same data as a standard-form QP, and the reference
# ------------------------------------------------------------------------------------

def large_sparse(n: int, B: int, seed: int = 0):
    D = np.diff(np.eye(n), axis=0)  # (n - 1, n): (D x)[i] = x[i+1] - x[i]
    x = dl.Variable(n, name="x")
    y = dl.Parameter(n, name="y")
    h = dl.Parameter(n - 1, name="h")
    prob = dl.Problem(dl.Minimize(0.5 * dl.sum_squares(x - y)), [D @ x <= h])
    g = torch.Generator().manual_seed(seed)
    y_t = torch.cumsum(0.1 * torch.randn(B, n, generator=g, dtype=torch.float64), -1)
    h_t = torch.full((n - 1,), 0.02, dtype=torch.float64)  # shared across the batch
    inputs = {"y": y_t, "h": h_t}
    # standard form: Q = I, c = -y, G = D, h; no equalities (shared data are expanded)
    G = torch.from_numpy(D).expand(B, n - 1, n)
    qp = (torch.eye(n, dtype=torch.float64).expand(B, n, n), -y_t, G, h_t.expand(B, n - 1),
          torch.zeros(B, 0, n, dtype=torch.float64), torch.zeros(B, 0, dtype=torch.float64))

    notes = []

    def to_params(grad_c, grad_h, grad_b):  # c = -y; h is shared: sum over the batch
        return {"y": -grad_c, "h": grad_h.sum(0)}

    def reference():
        import cvxpy as cp
        import scipy.sparse as sp
        from scipy.sparse.linalg import spsolve

        Ds = sp.csr_matrix(D)
        hv = h_t.numpy()
        out = np.empty((B, n))
        moved = 0.0
        t0 = time.perf_counter()
        for i in range(B):
            xv = cp.Variable(n)
            yv = y_t[i].numpy()
            cons = [Ds @ xv <= hv]
            problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(xv - yv)), cons)
            _clarabel_solve(problem)
            out[i] = xv.value
            # polish as benchmarks/common.py does for the QP family, with sparse
            # matrices: solve the KKT system of the active set read off Clarabel's duals
            lam = np.asarray(cons[0].dual_value)
            active = lam > hv - Ds @ xv.value
            Ga = Ds[active]
            K = sp.bmat([[sp.eye(n), Ga.T], [Ga, None]], format="csc")
            sol = spsolve(K, np.concatenate([yv, hv[active]]))
            xp, lam_a = sol[:n], sol[n:]
            feasible = (Ds[~active] @ xp - hv[~active]).max(initial=-1.0) <= 1e-9
            if lam_a.min(initial=0.0) >= -1e-9 and feasible and np.abs(xp - out[i]).max() < 1e-5:
                moved = max(moved, float(np.abs(xp - out[i]).max()))
                out[i] = xp
        notes.append(f"reference polished on Clarabel's active set (moved by up to {moved:.1e})")
        return out, time.perf_counter() - t0

    return prob, inputs, qp, to_params, reference, notes


def small_dense(B: int, n: int, m: int, p: int, seed: int = 0):
    prob = qp_problem(n, m, p)
    d = make_qp(B, n, m, p, seed=seed)
    inputs = {k: d[k] for k in ("Q", "q", "G", "h", "A", "b")}
    qp = tuple(d[k] for k in ("Q", "q", "G", "h", "A", "b"))

    def to_params(grad_c, grad_h, grad_b):
        return {"q": grad_c, "h": grad_h, "b": grad_b}

    notes = []

    def reference():
        ref = qp_reference(d)
        notes.append(f"reference polished on Clarabel's active set (moved by up to {ref['polish_delta']:.1e})")
        return ref["x"], ref["seconds"]

    return prob, inputs, qp, to_params, reference, notes


# ------------------------------------------------------------------------------------
# the measurements
# ------------------------------------------------------------------------------------

def osqp_direct_backward(qp, res, w):
    """dL/dc, dL/dh, dL/db of L = sum(w * z) through the implicit function theorem at
    OSQP's active set: kkt_adjoint, then -u' dF/dtheta for
    F = [Qz + c + G'lam + A'nu; lam * (Gz - h); Az - b]."""
    Q, _, G, _, A, _ = qp
    B, m, p = w.shape[0], G.shape[-2], A.shape[-2]
    u_z, u_lam, u_nu, failed = ipm.kkt_adjoint(Q, G, A, res.s, res.lam, w, w.new_zeros(B, m), w.new_zeros(B, p))
    return -u_z, res.lam * u_lam, u_nu


def run_problem(name, prob, inputs, qp, to_params, reference, ref_notes, repeats, big):
    torch.manual_seed(0)
    names = [p.name for p in prob.parameters()]
    values = [inputs[k] for k in names]
    B, n = qp[1].shape
    w = torch.randn(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_ref, ref_seconds = reference()
    rows, notes = [], list(ref_notes)

    def err(x):
        return float(np.abs(x.detach().numpy() - x_ref).max())

    def layer_row(label, layer, fresh=None):
        """``fresh``: a factory of new layers, to time calls that start cold."""
        if fresh is not None:
            def call(*args):
                state["layer"] = fresh()
                return state["layer"](*args)

            state = {}
            with torch.no_grad():
                t_fwd = timed(lambda: call(*values), repeats)
            out = call(*values)
            layer = state["layer"]
        else:
            with torch.no_grad():
                t_fwd = timed(lambda: layer(*values), repeats)
            out = layer(*values)
            call = layer
        status = ",".join(sorted(set(layer.info.status)))
        params = [v.clone().requires_grad_() for v in values]

        def fwd_bwd():
            for t in params:
                t.grad = None
            (w * call(*params)).sum().backward()

        t_fb = timed(fwd_bwd, repeats, warmup=not big)
        grads = {k: t.grad.clone() for k, t in zip(names, params)}
        grads["_x"] = out.detach()
        its = int(layer.info.iterations.max())  # of the last call
        rows.append([label, fmt_time(t_fwd), fmt_time(t_fb), str(its), fmt_err(err(out)), status])
        return grads

    ipm_grads = layer_row("layer, solver='ipm' (default)", prob.to_torch())

    wired = True
    try:
        osqp_layer = prob.to_torch(solver="osqp")
    except (TypeError, ValueError) as exc:
        wired = False
        notes.append(f"`prob.to_torch(solver=\"osqp\")` is not available here ({type(exc).__name__}: {exc}); "
                     "the OSQP rows time `solve_qp_osqp` directly on the same QP data.")
    if wired:
        layer_row("layer, solver='osqp', cold (a new layer per call)", None,
                  fresh=lambda: prob.to_torch(solver="osqp"))
        osqp_grads = layer_row("layer, solver='osqp', warm (same inputs again: starts at the solution)", osqp_layer)
        worst = max(float((osqp_grads[k] - ipm_grads[k]).abs().max()) for k in names)
        x_diff = float((osqp_grads["_x"] - ipm_grads["_x"]).abs().max())
        notes.append(f"max |x(osqp layer) - x(ipm layer)|: {x_diff:.1e}")
        notes.append(f"max |grad(osqp layer) - grad(ipm layer)| over all parameters: {worst:.1e}")

    # the backend directly: a cold cache (set-up and factorization every call) ...
    with torch.no_grad():
        t_cold = timed(lambda: solve_qp_osqp(*qp), repeats)
        res, cache = solve_qp_osqp(*qp)

        def cold_fwd_bwd():
            r, _ = solve_qp_osqp(*qp)
            osqp_direct_backward(qp, r, w)

        t_cold_fb = timed(cold_fwd_bwd, repeats, warmup=not big)
    status = ",".join(sorted({ipm.STATUS_NAMES[k] for k in res.status.tolist()}))
    rows.append(["solve_qp_osqp direct, cold cache" + ("" if wired else " (fwd + kkt_adjoint bwd)"),
                 fmt_time(t_cold), fmt_time(t_cold_fb), str(int(res.iterations.max())), fmt_err(err(res.z)), status])
    # ... and a warm cache with inputs that move a little between calls (the setting
    # warm starts are for: the same layer called on slowly changing parameters)
    g = torch.Generator().manual_seed(2)
    state = {"cache": cache, "its": []}

    def warm_call():
        moved = (qp[0], qp[1] + 1e-3 * torch.randn(qp[1].shape, generator=g, dtype=torch.float64)) + tuple(qp[2:])
        r, state["cache"] = solve_qp_osqp(*moved, cache=state["cache"])
        state["its"].append(int(r.iterations.max()))

    with torch.no_grad():
        t_warm = timed(warm_call, repeats, warmup=False)
    rows.append(["solve_qp_osqp direct, warm cache (c moved 1e-3 per call)", fmt_time(t_warm), "-",
                 str(max(state["its"])), "-", "-"])

    grad_c, grad_h, grad_b = osqp_direct_backward(qp, res, w)
    direct = to_params(grad_c, grad_h, grad_b)
    worst = max(float((direct[k] - ipm_grads[k]).abs().max()) for k in direct)
    notes.append(f"max |grad(OSQP direct: {', '.join(direct)}) - grad(ipm layer)|: {worst:.1e}")
    notes.append(f"reference: CVXPY/Clarabel, {ref_seconds:.2f} s for the batch")
    return rows, notes, wired


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="n = 1000 for the large problem")
    ap.add_argument("--n", type=int, default=None, help="size of the large sparse problem (default 2000)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: see the note in RESULTS_osqp.md)")
    ap.add_argument("--no-write", dest="write", action="store_false")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_big = args.n or (1000 if args.quick else 2000)
    warnings.simplefilter("ignore", UserWarning)
    start = time.perf_counter()

    header = ["method", "forward", "forward+backward", "iterations (max)", "max err vs reference", "status"]
    sections = []
    any_fallback = False
    for title, build, repeats, big in (
        (f"large sparse: n = {n_big}, m = {n_big - 1} (first differences), B = 2, Q = I",
         lambda: large_sparse(n_big, 2), max(1, args.repeats - 1), True),
        ("small dense batched: B = 128, n = 20, m = 20, p = 5", lambda: small_dense(128, 20, 20, 5),
         args.repeats * 3, False),
    ):
        t0 = time.perf_counter()
        rows, notes, wired = run_problem(title, *build(), repeats=repeats, big=big)
        any_fallback |= not wired
        body = f"### {title}\n\n{md_table(header, rows)}\n\n" + "\n".join(f"- {s}" for s in notes)
        body += f"\n- section wall time {time.perf_counter() - t0:.0f} s\n"
        print(body, flush=True)
        sections.append(body)

    text = (
        "# OSQP backend vs the interior point\n\n"
        f"Command: `python benchmarks/osqp.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` "
        f"(total {time.perf_counter() - start:.0f} s)\n\nMachine:\n\n{machine_info_md()}\n"
        f"- osqp: {_osqp_package.__version__}\n\n"
        "Forward timed under `torch.no_grad()`; forward+backward is the forward plus `backward()` of "
        "sum(w * x) for a fixed random w. Medians of a few repeats after one warm-up call (the large "
        "problem's forward+backward reuses the forward's warm-up). `iterations` are interior-point "
        "iterations for the ipm rows and OSQP ADMM iterations (summed over its tolerance stages) for "
        "the osqp rows. Set-up of the OSQP solvers (sparsity pattern, symbolic and numeric "
        "factorization) is inside the cold-cache time.\n\n"
        "torch runs with one intra-op thread by default (`--threads`): on this shared 2-core machine, "
        "with 2 threads the first torch operations after OSQP's single-threaded loop were measured to "
        "stall for 0.5-2 s (the idle intra-op worker competing with the loop and other processes), "
        "which would have been charged to the backward.\n\n"
        + "\n".join(sections)
    )
    if any_fallback:
        text += ("\nOSQP rows marked 'direct' bypass the layer: add the layer's parameter products and "
                 "data assembly (small next to the solves) for the layer-level cost.\n")
    if args.write:
        RESULTS.write_text(text)
        print(f"written to {RESULTS.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
