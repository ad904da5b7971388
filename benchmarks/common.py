"""Shared helpers for the benchmark scripts in ``benchmarks/``.

Everything here is benchmark infrastructure: problem families, reference
solutions (CVXPY + Clarabel at tight tolerance, polished), timing with a
per-cell budget, robust "peer" cells (``missing`` / ``crash: ...``), markdown
formatting and the ``RESULTS.md`` writer.  Nothing in here is timed except the
callables handed to :func:`bench` and :func:`bench_interleaved`.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"

# Make ``import declarative`` / ``import solvers`` work when the scripts are run
# as ``python benchmarks/qp.py`` from a source checkout.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DTYPE = torch.float64

# Clarabel settings used for every reference solve.
CLARABEL_TIGHT = dict(
    tol_gap_abs=1e-12,
    tol_gap_rel=1e-12,
    tol_feas=1e-12,
    tol_ktratio=1e-10,
    max_iter=400,
)


# --------------------------------------------------------------------------
# Machine information
# --------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(mod: str) -> str:
    try:
        from importlib import metadata

        return metadata.version(mod)
    except Exception:
        try:
            m = importlib.import_module(mod)
            return getattr(m, "__version__", "?")
        except Exception:
            return "missing"


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def machine_info() -> Dict[str, str]:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cores": str(cores),
        "torch threads": str(torch.get_num_threads()),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "load average (1 min) at start": _loadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cvxpy": _version("cvxpy"),
        "clarabel": _version("clarabel"),
        "qpth": _version("qpth"),
        "cvxpylayers": _version("cvxpylayers"),
        "diffcp": _version("diffcp"),
    }


def start_run(threads: Optional[int] = None) -> float:
    """What every benchmark script does before its first cell: torch's thread count
    (when asked), the peers' deprecation chatter silenced, the machine printed. Returns
    the start time (``time.perf_counter()``)."""
    import warnings

    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    t_start = time.perf_counter()
    print(machine_info_md(), flush=True)
    return t_start


def machine_info_md(info: Optional[Dict[str, str]] = None) -> str:
    info = info or machine_info()
    return "\n".join(f"- {k}: {v}" for k, v in info.items())


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------
@dataclass
class Timing:
    median: float  # seconds
    repeats: int
    warmup: float  # seconds of the (untimed) warm-up call

    def __str__(self) -> str:
        return fmt_time(self.median)


def bench(fn: Callable[[], object], budget: float, max_repeats: int = 25,
          min_repeats: int = 1, warmup: bool = True) -> Timing:
    """Warm up once (unless ``warmup=False``: the caller already warmed the
    code path up), then take the median of R repeats.

    Repeats continue while less than ``budget`` seconds have been spent
    (at least ``min_repeats``, at most ``max_repeats``).
    """
    warm = 0.0
    if warmup:
        t0 = time.perf_counter()
        fn()
        warm = time.perf_counter() - t0
    # repeat until the budget is spent (at least min_repeats, at most max_repeats)
    times = []
    t_begin = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats
                                        or time.perf_counter() - t_begin < budget):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), len(times), warm)


def fmt_time(t: Optional[float]) -> str:
    if t is None or not math.isfinite(t):
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    if t < 1.0:
        return f"{t * 1e3:.3g} ms"
    return f"{t:.3g} s"


def fmt_err(e: Optional[float]) -> str:
    if e is None:
        return "-"
    if not math.isfinite(e):
        return "nan"
    return f"{e:.1e}"


def fmt_ratio(r: Optional[float]) -> str:
    if r is None or not math.isfinite(r):
        return "-"
    return f"{r:.3g}x"


def cvxpylayers_args(solver_args: dict) -> dict:
    """The peer's solver_args for one call.  diffcp takes ``mode`` (how its backward
    solves the derivative system) only with a derivative; cvxpylayers' forward under
    ``no_grad`` hands every argument to the solver itself, which rejects it."""
    if torch.is_grad_enabled():
        return solver_args
    return {k: v for k, v in solver_args.items() if k != "mode"}


def short_reason(exc: BaseException, limit: int = 60) -> str:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    msg = re.sub(r"\s+", " ", msg)
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# --------------------------------------------------------------------------
# One tool on one problem: a "cell" of the result table
# --------------------------------------------------------------------------
@dataclass
class CellResult:
    tool: str
    status: str = "ok"  # ok | missing | crash: ... | skipped: ...
    fwd: Optional[Timing] = None
    fwdbwd: Optional[Timing] = None
    err: Optional[float] = None
    extra: Dict[str, object] = field(default_factory=dict)
    fb_status: str = "ok"  # status of the forward+backward part alone

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def time_str(self, which: str) -> str:
        # the full reason goes in the first cell of the tool, later cells
        # only say "crash" / "missing"
        if not self.ok:
            return self.status if which == "fwd" else self.status.split(":")[0]
        if which == "fwd":
            return str(self.fwd) if self.fwd else "-"
        if self.fb_status != "ok":
            return self.fb_status
        return str(self.fwdbwd) if self.fwdbwd else "-"

    def err_str(self) -> str:
        if not self.ok:
            return self.status.split(":")[0]
        if "nan_rows" in self.extra:
            rest = self.extra.get("err_finite")
            return (f"NaN in {self.extra['nan_rows']} rows"
                    + (f"; {fmt_err(rest)} on the rest" if rest is not None else ""))
        return fmt_err(self.err)


def bench_interleaved(fns: Dict[str, Callable[[], object]], budget: float, max_repeats: int = 100,
                      rounds: int = 5):
    """Time several tools side by side: ``rounds`` rounds, each running every tool in
    turn for its share of ``budget`` (at least one call while the tool has budget left,
    at most ``max_repeats`` calls in all); the median of each tool's calls.

    This machine's speed drifts by 20-50 % over seconds; timing one tool after the other
    let a slow spell fall on one tool alone and skew the ratios. Interleaved, every tool
    sees the same spells. A tool whose call raises drops out; returns
    ``({tool: Timing}, {tool: exception})``."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    spent = {k: 0.0 for k in fns}
    errors: Dict[str, BaseException] = {}
    for r in range(rounds):
        share = budget * (r + 1) / rounds  # what each tool may have spent by the end of this round
        cap = math.ceil(max_repeats * (r + 1) / rounds)
        for k, fn in fns.items():
            if k in errors:
                continue
            while len(times[k]) < cap and (spent[k] < share or not times[k]):
                t0 = time.perf_counter()
                try:
                    fn()
                except Exception as e:  # noqa: BLE001
                    errors[k] = e
                    break
                t = time.perf_counter() - t0
                times[k].append(t)
                spent[k] += t
    return ({k: Timing(statistics.median(v), len(v), 0.0) for k, v in times.items() if v and k not in errors},
            errors)


@dataclass
class _Prepared:
    forward: Optional[Callable[[], object]] = None
    forward_backward: Optional[Callable[[], object]] = None
    leaves: Sequence[torch.Tensor] = ()


def run_cells(builders: Dict[str, Callable[[], Callable[..., torch.Tensor]]],
              params: Sequence[torch.Tensor], ref: np.ndarray, weights: torch.Tensor,
              budget: float, max_repeats: int = 100,
              post_forward: Optional[Dict[str, Callable[[Callable], Dict[str, object]]]] = None,
              timeout_hint: Optional[float] = None, slow_warmup: float = 2.0,
              sync: Optional[Callable[[], None]] = None) -> Dict[str, CellResult]:
    """One table row: for each tool, ``layer = builders[tool]()`` (untimed), its
    accuracy from a first forward call (the warm-up), then the forward (no grad) and
    forward+backward of ``sum(weights * layer(*params))`` w.r.t. every parameter,
    each timed for all tools at once by :func:`bench_interleaved`. Any exception is
    caught and reported in its tool's cell; a build raising ImportError means
    ``missing``. ``post_forward[tool](layer)`` adds to the cell's extra after the first
    call. ``sync`` (e.g. ``torch.cuda.synchronize``) runs after every timed call, so
    that a GPU's queued work is inside the time."""
    post_forward = post_forward or {}
    cells, prepared = {}, {}
    for tool, make_layer in builders.items():
        cells[tool], prepared[tool] = _prepare_cell(tool, make_layer, params, ref, weights,
                                                    post_forward.get(tool), timeout_hint)
        if sync is not None:
            prepared[tool].forward = _synced(prepared[tool].forward, sync)
            prepared[tool].forward_backward = _synced(prepared[tool].forward_backward, sync)
    forward = {t: p.forward for t, p in prepared.items() if p.forward is not None}
    timings, errors = bench_interleaved(forward, budget, max_repeats)
    for tool in forward:
        if tool in errors:
            cells[tool].status = "crash: " + short_reason(errors[tool])
            prepared[tool].forward_backward = None
        else:
            cells[tool].fwd = timings[tool]
    # forward+backward gets its own warm-up (backward code paths), except for very slow
    # tools (> slow_warmup s per forward), whose forward calls already warmed them up
    fb = {}
    for tool, p in prepared.items():
        if p.forward_backward is None or not cells[tool].ok:
            continue
        warm = not (cells[tool].fwd is not None and cells[tool].fwd.median > slow_warmup)
        cells[tool].extra["fb_warmup"] = warm
        try:
            if warm:
                p.forward_backward()
            fb[tool] = p.forward_backward
        except Exception as e:  # noqa: BLE001
            cells[tool].fb_status = "crash: " + short_reason(e)
            cells[tool].extra["traceback_fb"] = traceback.format_exc()
    timings, errors = bench_interleaved(fb, budget, max_repeats)
    for tool in fb:
        res = cells[tool]
        if tool in errors:
            res.fb_status = "crash: " + short_reason(errors[tool])
            continue
        res.fwdbwd = timings[tool]
        grads = [t.grad for t in prepared[tool].leaves]
        if any(g is None for g in grads):
            res.extra["grad_note"] = "some parameter got no gradient"
        elif not all(torch.isfinite(g).all() for g in grads):
            res.extra["grad_note"] = "non-finite gradient"
        res.extra["grads"] = [None if g is None else g.detach().clone() for g in grads]
    return cells


def _synced(fn, sync):
    if fn is None:
        return None

    def run():
        fn()
        sync()
    return run


def _prepare_cell(tool, make_layer, params, ref, weights, post_forward, timeout_hint):
    """Build one tool's layer, check its accuracy with a first (warm-up) forward call and
    return ``(cell, _Prepared)`` with the callables to time (None where not to)."""
    res, prep = CellResult(tool), _Prepared()
    try:
        layer = make_layer()
    except ImportError as e:
        res.status = "missing"
        res.extra["reason"] = short_reason(e, 200)
        return res, prep
    except Exception as e:  # noqa: BLE001
        res.status = "crash: " + short_reason(e)
        res.extra["traceback"] = traceback.format_exc()
        return res, prep

    # Forward only (no autograd graph) + accuracy.
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            x = layer(*params)
            first = time.perf_counter() - t0
        x = _first_output(x)
        xn = x.detach().cpu().numpy().reshape(ref.shape)
        finite = np.all(np.isfinite(xn.reshape(xn.shape[0], -1)), axis=1) if xn.ndim > 1 \
            else np.isfinite(xn)
        if np.all(finite):
            res.err = float(np.max(np.abs(xn - ref)))
        else:
            # keep the NaN visible, but also report the error on the other rows
            res.err = float("nan")
            res.extra["nan_rows"] = int((~finite).sum())
            if finite.any():
                res.extra["err_finite"] = float(np.max(np.abs(xn[finite] - ref[finite])))
        if post_forward is not None:
            res.extra.update(post_forward(layer) or {})
    except Exception as e:  # noqa: BLE001
        res.status = "crash: " + short_reason(e)
        res.extra["traceback"] = traceback.format_exc()
        return res, prep
    if timeout_hint is not None and first > timeout_hint:
        # far too slow to repeat: report the single (cold) call
        res.fwd = Timing(first, 1, first)
        res.extra["fwd_cold_only"] = True
    else:
        def forward():
            with torch.no_grad():
                layer(*params)
        prep.forward = forward

    leaves = [p.detach().clone().requires_grad_(True) for p in params]

    def forward_backward():
        for t in leaves:
            t.grad = None
        out = _first_output(layer(*leaves))
        (out * weights).sum().backward()
    prep.forward_backward, prep.leaves = forward_backward, leaves
    return res, prep


def _first_output(x):
    if isinstance(x, (tuple, list)):
        return x[0]
    return x


def grad_discrepancy(a: CellResult, b: CellResult) -> Optional[float]:
    """Max relative difference of the parameter gradients of two cells."""
    ga, gb = a.extra.get("grads"), b.extra.get("grads")
    if not ga or not gb or len(ga) != len(gb):
        return None
    worst = 0.0
    for x, y in zip(ga, gb):
        if x is None or y is None or x.shape != y.shape:
            return None
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            return float("nan")
        scale = max(float(y.abs().max()), 1.0)
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


# --------------------------------------------------------------------------
# Problem families
# --------------------------------------------------------------------------
def make_qp(B: int, n: int, m: int, p: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Batched random strictly feasible QP family (float64).

    Q = L L'/n + 0.1 I, q, G, A Gaussian; h = G x0 + s0 (s0 > 0), b = A x0.
    """
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=DTYPE)
    L = torch.randn(B, n, n, **kw)
    Q = L @ L.transpose(-1, -2) / n + 0.1 * torch.eye(n, dtype=DTYPE)
    Q = 0.5 * (Q + Q.transpose(-1, -2))
    q = torch.randn(B, n, **kw)
    G = torch.randn(B, m, n, **kw)
    A = torch.randn(B, p, n, **kw)
    x0 = torch.randn(B, n, **kw)
    s0 = torch.rand(B, m, **kw) + 0.1  # in [0.1, 1.1)
    h = (G @ x0.unsqueeze(-1)).squeeze(-1) + s0
    b = (A @ x0.unsqueeze(-1)).squeeze(-1)
    w = torch.randn(B, n, **kw)  # weights of the linear functional for backward
    return dict(Q=Q, q=q, G=G, h=h, A=A, b=b, w=w)


def make_entropy(B: int, n: int, weighted: bool, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Batched entropy-regularised (softmax-as-optimisation) family.

    plain:    maximize theta'z + sum(entr(z))        s.t. sum(z) == 1, z >= 0
    weighted: maximize theta'z + sum(wt * entr(z))   s.t. sum(z) == 1, z >= 0,
                                                       G z <= h
    with wt in [0.5, 1.5], G (k x n) Gaussian, k = n // 2, and
    h = G z0 + s0 where z0 = 1/n (strictly feasible, s0 in [0.02, 0.2)).
    """
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=DTYPE)
    theta = 2.0 * torch.randn(B, n, **kw)
    out = dict(theta=theta)
    if weighted:
        k = max(1, n // 2)
        out["wt"] = 0.5 + torch.rand(B, n, **kw)
        G = torch.randn(B, k, n, **kw)
        z0 = torch.full((B, n), 1.0 / n, dtype=DTYPE)
        s0 = 0.02 + 0.18 * torch.rand(B, k, **kw)
        out["G"] = G
        out["h"] = (G @ z0.unsqueeze(-1)).squeeze(-1) + s0
    out["w"] = torch.randn(B, n, **kw)
    return out


# --------------------------------------------------------------------------
# Reference solutions: CVXPY + Clarabel (tight), then polished
# --------------------------------------------------------------------------
def _clarabel_solve(prob, accept_inaccurate: bool = False) -> float:
    """Solve with Clarabel at the tightest tolerance that succeeds
    (1e-12, then 1e-10, then 1e-8); returns the tolerance used. With
    ``accept_inaccurate``, a last solve that ends 'optimal_inaccurate' is kept
    (returns inf): for references that are polished afterwards."""
    import cvxpy as cp

    last = None
    for tol in (1e-12, 1e-10, 1e-8):
        opts = dict(CLARABEL_TIGHT, tol_gap_abs=tol, tol_gap_rel=tol, tol_feas=tol,
                    tol_ktratio=min(1e-6, tol * 100))
        try:
            prob.solve(solver=cp.CLARABEL, **opts)
        except cp.error.SolverError as e:
            last = e
            continue
        if prob.status == "optimal":
            return tol
        last = RuntimeError(f"reference solve: {prob.status}")
    if accept_inaccurate and prob.status == "optimal_inaccurate":
        return math.inf
    raise RuntimeError(f"reference solve failed: {last}")


def qp_reference(d: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """Per-instance CVXPY/Clarabel reference for the QP family.

    Each Clarabel solution is polished by solving the KKT system on the
    active set identified from Clarabel's duals (accepted only when the
    polished point is primal and dual feasible); ``polish_delta`` is the max
    change made by polishing, i.e. an estimate of the raw Clarabel error.
    """
    import cvxpy as cp

    Q, q, G, h, A, b = (d[k].numpy() for k in ("Q", "q", "G", "h", "A", "b"))
    B, n = q.shape
    p = A.shape[1]
    X = np.empty((B, n))
    delta, polished = 0.0, 0
    t0 = time.perf_counter()
    x = cp.Variable(n)
    for i in range(B):
        cons = [G[i] @ x <= h[i]]
        if p:
            cons.append(A[i] @ x == b[i])
        prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, cp.psd_wrap(Q[i])) + q[i] @ x), cons)
        _clarabel_solve(prob)
        xr = np.asarray(x.value, dtype=float)
        lam = np.asarray(cons[0].dual_value, dtype=float)
        xp = _polish_qp(Q[i], q[i], G[i], h[i], A[i], b[i], xr, lam)
        if xp is not None:
            delta = max(delta, float(np.max(np.abs(xp - xr))))
            polished += 1
            X[i] = xp
        else:
            X[i] = xr
    return dict(x=X, polish_delta=delta, polished=polished, B=B,
                seconds=time.perf_counter() - t0)


def _polish_qp(Q, q, G, h, A, b, x, lam):
    slack = h - G @ x
    act = lam > slack
    na, p, n = int(act.sum()), A.shape[0], Q.shape[0]
    C = np.vstack([A, G[act]]) if p or na else np.zeros((0, n))
    d = np.concatenate([b, h[act]])
    K = np.block([[Q, C.T], [C, np.zeros((p + na, p + na))]])
    rhs = np.concatenate([-q, d])
    try:
        sol = np.linalg.solve(K, rhs)
    except np.linalg.LinAlgError:
        return None
    xp, mult = sol[:n], sol[n:]
    lam_a = mult[p:]
    tolf = 1e-9 * max(1.0, float(np.abs(h).max()))
    if na and lam_a.min() < -1e-9:
        return None
    if (G[~act] @ xp - h[~act]).max(initial=-1.0) > tolf:
        return None
    if np.max(np.abs(xp - x)) > 1e-5:  # polishing should be a tiny correction
        return None
    return xp


def entropy_reference(d: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """Reference for the entropy family.

    plain: the exact solution is softmax(theta); we also check Clarabel (exp
    cone) against it on a few instances and report that difference.
    weighted: Clarabel with exponential cones at tight tolerance, polished by
    Newton's method on the KKT system of the identified active set.
    """
    import cvxpy as cp
    from scipy.special import softmax

    t0 = time.perf_counter()
    theta = d["theta"].numpy()
    B, n = theta.shape
    if "G" not in d:
        X = softmax(theta, axis=1)
        z = cp.Variable(n)
        th = cp.Parameter(n)
        prob = cp.Problem(cp.Maximize(th @ z + cp.sum(cp.entr(z))), [cp.sum(z) == 1, z >= 0])
        diff = 0.0
        for i in range(min(B, 8)):
            th.value = theta[i]
            _clarabel_solve(prob)
            diff = max(diff, float(np.max(np.abs(z.value - X[i]))))
        return dict(x=X, polish_delta=diff, polished=B, B=B,
                    seconds=time.perf_counter() - t0,
                    note="exact softmax; Clarabel differs by polish_delta on 8 instances")
    wt, G, h = d["wt"].numpy(), d["G"].numpy(), d["h"].numpy()
    k = G.shape[1]
    z = cp.Variable(n)
    th, wp = cp.Parameter(n), cp.Parameter(n, nonneg=True)
    Gp, hp = cp.Parameter((k, n)), cp.Parameter(k)
    cons = [cp.sum(z) == 1, z >= 0, Gp @ z <= hp]
    prob = cp.Problem(cp.Maximize(th @ z + wp @ cp.entr(z)), cons)
    X = np.empty((B, n))
    delta, polished, nact, inaccurate = 0.0, 0, 0, 0
    for i in range(B):
        th.value, wp.value, Gp.value, hp.value = theta[i], wt[i], G[i], h[i]
        # Clarabel ends some of these 'optimal_inaccurate' even at 1e-8 (on one CPU and
        # not another): kept, and polished like the others, the polish allowed to move
        # further (one at (1024, 100) was 1.7e-5 off the KKT point it polished to)
        rough = _clarabel_solve(prob, accept_inaccurate=True) == math.inf
        inaccurate += rough
        zr = np.asarray(z.value, dtype=float)
        lam = np.asarray(cons[2].dual_value, dtype=float)
        zp = _polish_entropy(theta[i], wt[i], G[i], h[i], zr, lam, max_correction=1e-3 if rough else 1e-5)
        if zp is not None:
            delta = max(delta, float(np.max(np.abs(zp - zr))))
            polished += 1
            X[i] = zp
        else:
            X[i] = zr
        nact += int((lam > h[i] - G[i] @ zr).sum())
    return dict(x=X, polish_delta=delta, polished=polished, B=B,
                seconds=time.perf_counter() - t0, active_per_instance=nact / B, inaccurate=inaccurate)


def _polish_entropy(theta, wt, G, h, z, lam, iters=20, max_correction=1e-5):
    """Newton on  theta - wt*(log z + 1) - nu*1 - Ga' lam = 0, 1'z = 1, Ga z = ha.

    The result is kept only if it is a KKT point of the whole problem (stationary,
    feasible, the active rows' multipliers nonnegative, the others' rows satisfied:
    with a strictly concave objective, the unique solution) and within
    ``max_correction`` of Clarabel's z, a check on the active set guessed from it."""
    slack = h - G @ z
    act = lam > slack
    Ga, ha = G[act], h[act]
    n, na = z.size, int(act.sum())
    C = np.vstack([np.ones((1, n)), Ga])
    d = np.concatenate([[1.0], ha])
    zz = np.maximum(z.copy(), 1e-300)
    mult = np.concatenate([[0.0], lam[act]])
    # initial multipliers: least squares on stationarity
    r0 = theta - wt * (np.log(zz) + 1.0)
    mult = np.linalg.lstsq(C.T, r0, rcond=None)[0]
    for _ in range(iters):
        rs = theta - wt * (np.log(zz) + 1.0) - C.T @ mult
        rp = C @ zz - d
        Hd = wt / zz  # Hessian of -objective is diag(wt/z)
        K = np.block([[np.diag(Hd), C.T], [C, np.zeros((1 + na, 1 + na))]])
        try:
            step = np.linalg.solve(K, np.concatenate([rs, -rp]))
        except np.linalg.LinAlgError:
            return None
        dz, dm = step[:n], step[n:]
        # stay positive
        t = 1.0
        neg = dz < 0
        if neg.any():
            t = min(1.0, 0.99 * float(np.min(-zz[neg] / dz[neg])))
        zz = zz + t * dz
        mult = mult + t * dm
        if np.max(np.abs(dz)) < 1e-16:
            break
    rs = theta - wt * (np.log(zz) + 1.0) - C.T @ mult
    if np.max(np.abs(rs)) > 1e-8 or np.max(np.abs(C @ zz - d)) > 1e-12:
        return None
    if na and mult[1:].min() < -1e-9:
        return None
    if (G[~act] @ zz - h[~act]).max(initial=-1.0) > 1e-10:
        return None
    if np.max(np.abs(zz - z)) > max_correction:
        return None
    return zz


# --------------------------------------------------------------------------
# Our project (declarative) and the solver kernel
# --------------------------------------------------------------------------
def import_declarative():
    import declarative as dl  # noqa: F401  (ImportError -> "missing")

    return dl


def qp_problem(n: int, m: int, p: int):
    """The benchmark QP in the DSL: min 1/2 x'Qx + q'x s.t. Gx <= h, Ax = b, every
    matrix and vector a parameter (in the order Q, q, G, h, A, b)."""
    dl = import_declarative()
    x = dl.Variable(n, name="x")
    Q = dl.Parameter((n, n), name="Q")
    q = dl.Parameter(n, name="q")
    G = dl.Parameter((m, n), name="G")
    h = dl.Parameter(m, name="h")
    A = dl.Parameter((p, n), name="A")
    b = dl.Parameter(p, name="b")
    return dl.Problem(dl.Minimize(0.5 * dl.quad_form(x, Q) + q @ x), [G @ x <= h, A @ x == b])


def qp_layer_call(B: int, n: int, m: int, p: int, tol: float = 1e-9):
    """The benchmark QP layer on :func:`make_qp` data and a callable that runs one
    forward+backward of sum(w * x*) through it: ``(layer, call)``."""
    d = make_qp(B, n, m, p)
    layer = qp_problem(n, m, p).to_torch(tol=tol, max_iter=100)
    args = [d[k].clone().requires_grad_() for k in ("Q", "q", "G", "h", "A", "b")]

    def call():
        (d["w"] * layer(*args)).sum().backward()

    return layer, call


def layer_iterations(layer) -> Optional[torch.Tensor]:
    info = getattr(layer, "info", None)
    it = getattr(info, "iterations", None) if info is not None else None
    if it is None:
        return None
    return torch.as_tensor(it)


def layer_status(layer) -> Optional[List[str]]:
    info = getattr(layer, "info", None)
    st = getattr(info, "status", None) if info is not None else None
    if st is None:
        return None
    return list(st) if not isinstance(st, str) else [st]


def solver_info(layer) -> Dict[str, object]:
    """Iterations and statuses reported by our layer after a forward."""
    it = layer_iterations(layer)
    st = layer_status(layer)
    out: Dict[str, object] = {}
    if it is not None:
        out["iters_max"] = int(it.max())
        out["iters_median"] = float(it.float().median())
    rounds = getattr(getattr(layer, "info", None), "active_set_rounds", None)
    if rounds is not None:
        out["rounds_max"] = int(rounds.max())
        out["rounds_mean"] = float(rounds.double().mean())
    pivots = getattr(getattr(layer, "info", None), "active_set_pivots", None)
    if pivots is not None:
        out["pivots_max"] = int(pivots.max())
        out["pivots_mean"] = float(pivots.double().mean())
    if st is not None:
        bad = [s for s in st if str(s).lower() not in ("solved", "optimal", "converged")]
        out["n_not_solved"] = len(bad)
        if bad:
            out["status_example"] = str(bad[0])
    return out


def time_kernel(B: int, n: int, m: int, p: int, budget: float = 0.5, seed: int = 1,
                device="cpu", dtype=DTYPE, sync: Optional[Callable[[], None]] = None):
    """Time the per-iteration linear algebra of our QP path on random data of the
    same size: ``solvers.interior_point.constraint_space_kernel``, one Cholesky
    factorization of W + diag(D) (B, m, m) plus the predictor's and corrector's
    triangular solves. (n and p only enter the once-per-call setup, not the floor.)"""
    from solvers.interior_point import constraint_space_kernel

    kw, W = _random_w(B, m, seed)
    D = torch.rand(B, m, **kw) + 0.01
    rhs = torch.randn(B, m, **kw)
    W, D, rhs = (t.to(device, dtype) for t in (W, D, rhs))
    return _time_synced(lambda: constraint_space_kernel(W, D, rhs), budget, sync), \
        "solvers.interior_point.constraint_space_kernel"


def time_setup_kernel(B: int, n: int, m: int, p: int, budget: float = 0.5, seed: int = 1, device="cpu",
                      dtype=DTYPE, sync: Optional[Callable[[], None]] = None):
    """Time the once-per-call linear algebra of our QP path on random data of the same
    size: ``solvers.interior_point.setup_kernel``, the Cholesky factorization of Q
    (B, n, n), the half-solve of G', A' and c, and the constraint-space matrix W."""
    from solvers.interior_point import setup_kernel

    kw = dict(generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    F = torch.randn(B, n, n, **kw)
    Q = F @ F.transpose(-1, -2) / n + 0.1 * torch.eye(n, dtype=DTYPE)
    c, G, A = torch.randn(B, n, **kw), torch.randn(B, m, n, **kw), torch.randn(B, p, n, **kw)
    Q, c, G, A = (t.to(device, dtype) for t in (Q, c, G, A))
    return _time_synced(lambda: setup_kernel(Q, c, G, A), budget, sync), "solvers.interior_point.setup_kernel"


def time_active_set_kernel(B: int, m: int, budget: float = 0.5, seed: int = 1, device="cpu", dtype=DTYPE,
                           sync: Optional[Callable[[], None]] = None):
    """Time one round of our QP path's active-set iteration on random data of the same
    size: ``solvers.interior_point.active_set_kernel``, one Cholesky factorization of
    W (B, m, m) restricted to about half the constraints, and one solve."""
    from solvers.interior_point import active_set_kernel

    kw, W = _random_w(B, m, seed)
    active = torch.rand(B, m, **kw) < 0.5
    rhs = torch.randn(B, m, **kw)
    W, rhs, active = W.to(device, dtype), rhs.to(device, dtype), active.to(device)
    return _time_synced(lambda: active_set_kernel(W, active, rhs), budget, sync), \
        "solvers.interior_point.active_set_kernel"


def time_pivot_kernel(B: int, m: int, budget: float = 0.5, seed: int = 1, device="cpu", dtype=DTYPE,
                      sync: Optional[Callable[[], None]] = None):
    """Time one single pivot of the tableau that guesses the active set of small blocks,
    on random data of the same size, in the layout the solver takes for it: a rank-one
    update of (B, m, m + 1) (``solvers.interior_point.pivot_kernel``) or, from
    ``_ROW_PIVOTS_FROM`` entries on, of the rows (B, m, m) (``row_pivot_kernel``), on a
    random row per instance (a pivot undoes itself, so the repeats alternate between two
    tableaus)."""
    from solvers.interior_point import _ROW_PIVOTS_FROM, pivot_kernel, row_pivot_kernel

    kw, W = _random_w(B, m, seed)
    k = torch.randint(0, m, (B,), generator=kw["generator"]).to(device)
    if B * m * m >= _ROW_PIVOTS_FROM:
        rows, live = W.to(device, dtype), torch.ones(B, 1, dtype=dtype, device=device)
        sign = torch.ones(B, m, dtype=dtype, device=device)
        return _time_synced(lambda: row_pivot_kernel(rows, k, live, sign), budget, sync), \
            "solvers.interior_point.row_pivot_kernel"
    tableau = torch.cat([W, torch.randn(B, m, 1, **kw)], -1).to(device, dtype)
    live = torch.ones(B, 1, 1, dtype=dtype, device=device)
    return _time_synced(lambda: pivot_kernel(tableau, k, live), budget, sync), "solvers.interior_point.pivot_kernel"


def _random_w(B, m, seed):
    """The generator's keywords and a random well-conditioned W (B, m, m) like G P G'."""
    kw = dict(generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    F = torch.randn(B, m, m, **kw)
    return kw, F @ F.transpose(-1, -2) / m + 0.1 * torch.eye(m, dtype=DTYPE)


def _time_synced(kernel, budget, sync):
    def call():
        kernel()
        if sync is not None:
            sync()
    with torch.no_grad():
        return bench(call, budget, max_repeats=200, min_repeats=5)


def time_structured_nlp_kernel(B: int, n: int, k: int, p: int, budget: float = 0.5, seed: int = 1):
    """Time the per-iteration linear algebra of the structured NLP step the entropy
    problems take (diagonal Hessian, z >= 0 as bound rows, k general rows, p equalities):
    ``solvers.interior_point.diagonal_kkt_kernel``, one (k + p) Cholesky factorization
    and the solve."""
    from solvers.interior_point import BoundedJacobian, DiagonalMatrix, diagonal_kkt_kernel

    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=DTYPE)
    m = n + k
    H = DiagonalMatrix(torch.rand(B, n, **kw) + 0.1)
    idx = torch.arange(n)
    index_sets = BoundedJacobian.index_sets(idx, idx, -torch.ones(n), n + torch.arange(k), DTYPE, "cpu")
    Jg = BoundedJacobian(torch.randn(B, k, n, **kw), m, *index_sets)
    Jh = torch.randn(B, p, n, **kw)
    lam, s = torch.rand(B, m, **kw) + 0.01, torch.rand(B, m, **kw) + 0.01
    rd, rc, rp, re = (torch.randn(B, d, **kw) for d in (n, m, m, p))
    workspace = {}  # the solver keeps its scratch tensors across iterations; so does the floor
    with torch.no_grad():
        t = bench(lambda: diagonal_kkt_kernel(H, Jg, Jh, lam, s, rd, rc, rp, re, workspace), budget,
                  max_repeats=200, min_repeats=5)
    return t, "solvers.interior_point.diagonal_kkt_kernel"


# --------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------
def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def publish(md: str, section: str, write: bool) -> None:
    """Print a script's markdown and, with ``write``, put it in RESULTS.md as ``section``."""
    print()
    print(md)
    if write:
        write_results_section(section, md)
        print(f"\nwritten to {RESULTS_MD}")


def write_results_section(name: str, body: str, path: Path = RESULTS_MD) -> None:
    """Replace (or append) the section delimited by markers for ``name`` in
    RESULTS.md, and refresh the machine header at the top of the file."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        if not text.strip():
            text = "# Benchmark results\n\n<!-- BEGIN header -->\n<!-- END header -->\n"
        text = text.rstrip() + "\n\n" + block + "\n"
    hb, he = "<!-- BEGIN header -->", "<!-- END header -->"
    header = (f"{hb}\nGenerated by the scripts in `benchmarks/` (see `benchmarks/README.md`).\n"
              f"Each section below records the machine it was measured on.\n{he}")
    if hb in text and he in text:
        pre, rest = text.split(hb, 1)
        _, post = rest.split(he, 1)
        text = pre + header + post
    path.write_text(text)


def section_header(title: str, argv: Sequence[str]) -> str:
    return (f"## {title}\n\nCommand: `python {' '.join(argv)}`\n\n"
            f"Machine:\n\n{machine_info_md()}\n")
