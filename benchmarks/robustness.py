"""Hard QP families: statuses and errors of the QP layer, not timings.

    python benchmarks/robustness.py              # writes the 'robustness' section of RESULTS.md
    python benchmarks/robustness.py --no-write

Each row is one batch of a family that once broke the solver: an objective far from
unit scale, ill-conditioned or singular Q, a degenerate vertex, a projection whose
interior-point iterate suggested one constraint too many, redundant equalities,
float32 data (a QP family and LPs), infeasible instances mixed into a batch. Every
feasible instance has an optimum, so the row lists the statuses (``optimal`` is the
only right one, but for the instances made infeasible) and, over the optimal
instances, the largest error of x relative to max(1, |x_ref|). The reference is CVXPY/Clarabel at tight tolerance,
polished on its active set (``common.qp_reference``), on the problem as written or, for
a scaled objective, on the unscaled one (Clarabel's own tolerances are not scale-free);
for the degenerate vertex it is the constructed solution, for the LPs HiGHS' vertex
(scipy's ``linprog``).
"""
from __future__ import annotations

import argparse
import collections
import math
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common as C  # noqa: E402

DT = torch.float64
KEYS = ("Q", "q", "G", "h", "A", "b")


def _mv(M, v):
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def _random(B, n, m, p, seed, linear=1.0):
    d = C.make_qp(B, n, m, p, seed=seed)
    d["q"] = linear * d["q"]
    return [d[k] for k in KEYS]


def scaled_objective(k):
    def build(B, seed):
        Q, q, G, h, A, b = _random(B, 10, 20, 2, seed)
        return [k * Q, k * q, G, h, A, b], [Q, q, G, h, A, b], None
    return build


def spread_q(spread):
    def build(B, seed):
        g = torch.Generator().manual_seed(seed)
        U, _ = torch.linalg.qr(torch.randn(B, 20, 20, generator=g, dtype=DT))
        Q = U @ torch.diag_embed(torch.logspace(0, -math.log10(spread), 20, dtype=DT).expand(B, 20)) @ U.mT
        _, q, G, h, A, b = _random(B, 20, 40, 2, seed + 1)
        data = [0.5 * (Q + Q.mT), q, G, h, A, b]
        return data, data, None
    return build


def null_space(nzero, eps, m, p):
    """Q with ``nzero`` eigenvalues ``eps``, the box |x_i| <= 2 and m random rows."""
    def build(B, seed, n=20):
        g = torch.Generator().manual_seed(seed)
        kw = dict(generator=g, dtype=DT)
        U, _ = torch.linalg.qr(torch.randn(B, n, n, **kw))
        eig = torch.rand(n, **kw) + 0.5
        eig[:nzero] = eps
        Q = U @ torch.diag_embed(eig.expand(B, n)) @ U.mT
        q = torch.randn(B, n, **kw)
        G_r, x0 = torch.randn(B, m, n, **kw), 0.3 * torch.randn(B, n, **kw)
        eye = torch.eye(n, dtype=DT).expand(B, n, n)
        G = torch.cat([eye, -eye, G_r], 1)
        h = torch.cat([torch.full((B, 2 * n), 2.0, dtype=DT), _mv(G_r, x0) + torch.rand(B, m, **kw) + 0.1], 1)
        A = torch.randn(B, p, n, **kw)
        data = [0.5 * (Q + Q.mT), q, G, h, A, _mv(A, x0)]
        return data, data, None
    return build


def degenerate_vertex(B, seed, n=20, m=40, p=4, n_active=16, n_zero=3):
    """x* constructed: n_active = n - p constraints active, n_zero of them with zero
    multipliers; q from the KKT conditions."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=DT)
    L = torch.randn(B, n, n, **kw)
    Q = L @ L.mT / n + 0.1 * torch.eye(n, dtype=DT)
    G, A = torch.randn(B, m, n, **kw), torch.randn(B, p, n, **kw)
    x_star = torch.randn(B, n, **kw)
    slack = torch.rand(B, m, **kw) + 0.1
    slack[:, :n_active] = 0.0
    lam = torch.rand(B, m, **kw) + 0.1
    lam[:, :n_zero], lam[:, n_active:] = 0.0, 0.0
    nu = torch.randn(B, p, **kw)
    q = -_mv(Q, x_star) - _mv(G.mT, lam) - _mv(A.mT, nu)
    data = [Q, q, G, _mv(G, x_star) + slack, A, _mv(A, x_star)]
    return data, None, x_star.numpy()


def box_projection(B, seed, n=50):
    """Projection onto a box intersected with sum(x) = 0, q = -10 randn."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(n, dtype=DT)
    h = torch.cat([torch.rand(B, n, generator=g, dtype=DT), torch.rand(B, n, generator=g, dtype=DT)], -1)
    q = -10.0 * torch.randn(B, n, generator=g, dtype=DT)
    data = [eye.expand(B, n, n).clone(), q, torch.cat([eye, -eye]).expand(B, 2 * n, n).clone(), h,
            torch.ones(B, 1, n, dtype=DT), torch.zeros(B, 1, dtype=DT)]
    return data, data, None


def redundant_equalities(B, seed):
    """A with 3 more rows, combinations of its 4 (consistent b)."""
    Q, q, G, h, A, b = _random(B, 20, 40, 4, seed, linear=2.0)
    Cm = torch.randn(B, 3, 4, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    data = [Q, q, G, h, torch.cat([A, Cm @ A], 1), torch.cat([b, _mv(Cm, b)], 1)]
    return data, data, None


def float32_family(B, seed):
    data = _random(B, 20, 30, 4, seed, linear=2.0)
    return [t.float() for t in data], data, None


def float32_infeasible(B, seed):
    """A quarter of the instances made infeasible: row 1 = -row 0, h_1 = -h_0 - 1."""
    Q, q, G, h, A, b = _random(B, 20, 20, 4, seed)
    bad = torch.arange(B) % 4 == 0
    G[:, 1] = torch.where(bad[:, None], -G[:, 0], G[:, 1])
    h[:, 1] = torch.where(bad, -h[:, 0] - 1.0, h[:, 1])
    data = [Q, q, G, h, A, b]
    return [t.float() for t in data], data, bad


def random_lp(B, seed, n=50, m=100, dtype=torch.float32):
    """min c'x s.t. G x <= h, |x_i| <= 3, a'x = 0, in ``dtype``: c, G, a Gaussian (every
    eighth c 30x larger), h ~ U(0.1, 1.1) (x = 0 strictly feasible); Q = 0."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(B, n, generator=g, dtype=DT)
    c[::8] *= 30
    eye = torch.eye(n, dtype=DT).expand(B, n, n)
    G = torch.cat([torch.randn(B, m, n, generator=g, dtype=DT), -eye, eye], 1)
    h = torch.cat([torch.rand(B, m, generator=g, dtype=DT) + 0.1, torch.full((B, 2 * n), 3.0, dtype=DT)], 1)
    data = [torch.zeros(B, n, n, dtype=DT), c, G, h, torch.randn(B, 1, n, generator=g, dtype=DT),
            torch.zeros(B, 1, dtype=DT)]
    data = [t.to(dtype) for t in data]
    # the reference: HiGHS' vertex of the data as rounded to dtype (Clarabel ends some of
    # these LPs 'optimal_inaccurate' at tight tolerances)
    from scipy.optimize import linprog

    _, c, G, h, A, b = (t.double().numpy() for t in data)
    x_ref = []
    for i in range(B):
        ref = linprog(c[i], A_ub=G[i], b_ub=h[i], A_eq=A[i], b_eq=b[i], bounds=(None, None), method="highs")
        if ref.status != 0:
            raise RuntimeError(f"reference solve of LP instance {i} failed: {ref.message}")
        x_ref.append(ref.x)
    return data, None, np.stack(x_ref)


def far_row_lp(far, dtype=DT):
    """:func:`random_lp` (n = 20, 40 rows and the box) with one more row, sum(x) <= far;
    the reference is HiGHS' without it (the box keeps sum(x) within 60)."""
    def build(B, seed):
        (Q, c, G, h, A, b), _, x_ref = random_lp(B, seed, n=20, m=40, dtype=dtype)
        G_far = torch.cat([G, torch.ones(B, 1, 20, dtype=dtype)], 1)
        h_far = torch.cat([h, torch.full((B, 1), far, dtype=dtype)], 1)
        return [Q, c, G_far, h_far, A, b], None, x_ref
    return build


def far_row(far, dtype=DT):
    """A random QP with one more row, bounded so far that it never binds (sum(x) <= far,
    a "no limit" written as a number); the reference solves it without that row."""
    def build(B, seed):
        Q, q, G, h, A, b = _random(B, 20, 40, 2, seed, linear=2.0)
        G_far = torch.cat([G, torch.ones(B, 1, 20, dtype=DT)], 1)
        h_far = torch.cat([h, torch.full((B, 1), far, dtype=DT)], 1)
        return [t.to(dtype) for t in (Q, q, G_far, h_far, A, b)], [Q, q, G, h, A, b], None
    return build


FAMILIES = {
    "objective x 1e-6, (10, 20, 2)": scaled_objective(1e-6),
    "objective x 1e6, (10, 20, 2)": scaled_objective(1e6),
    "Q eigenvalues over 1e7, (20, 40, 2)": spread_q(1e7),
    "Q eigenvalues over 1e8, (20, 40, 2)": spread_q(1e8),
    "Q with 3 zero eigenvalues, box + 5 rows, p = 1": null_space(3, 0.0, 5, 1),
    "Q with an eigenvalue 1e-11, box + 10 rows, p = 2": null_space(1, 1e-11, 10, 2),
    "degenerate vertex (16 active in n - p = 16, 3 with zero multipliers)": degenerate_vertex,
    "box and hyperplane projection, n = 50": box_projection,
    "redundant equalities (4 + 3 combinations), (20, 40)": redundant_equalities,
    "float32, (20, 30, 4)": float32_family,
    "float32, a quarter infeasible, (20, 20, 4)": float32_infeasible,
    "float32 LPs, (50, 100 + box, 1)": random_lp,
    "a far row, sum(x) <= 1e10, (20, 40 + 1, 2)": far_row(1e10),
    "float32, a far row, sum(x) <= 1e6, (20, 40 + 1, 2)": far_row(1e6, torch.float32),
    "LPs, a far row, sum(x) <= 1e20, (20, 40 + box + 1, 1)": far_row_lp(1e20),
    "float32 LPs, a far row, sum(x) <= 1e20, (20, 40 + box + 1, 1)": far_row_lp(1e20, torch.float32),
}


def run_family(build, B, seed):
    data, reference_data, x_known = build(B, seed)
    if isinstance(x_known, torch.Tensor):  # the infeasible mask
        bad, x_known = x_known, None
    else:
        bad = torch.zeros(B, dtype=torch.bool)
    n, m, p = data[1].shape[-1], data[2].shape[-2], data[4].shape[-2]
    layer = C.qp_problem(n, m, p).to_torch(warn=False)
    with torch.no_grad():
        x = layer(*data).double().numpy()
    status = layer.info.status
    wrong = sum(1 for i, s in enumerate(status) if s != ("infeasible" if bad[i] else "optimal"))
    worst = 0.0
    for i, s in enumerate(status):
        if s != "optimal" or bad[i]:
            continue
        if x_known is not None:
            x_ref = x_known[i]
        else:
            ref = C.qp_reference({k: t[i:i + 1].double() for k, t in zip(KEYS, reference_data)})
            x_ref = ref["x"][0]
        worst = max(worst, float(np.abs(x[i] - x_ref).max() / max(1.0, np.abs(x_ref).max())))
    counts = ", ".join(f"{k} {v}" for k, v in sorted(collections.Counter(status).items()))
    return counts, wrong, worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--no-write", dest="write", action="store_false")
    args = ap.parse_args(argv)
    C.import_declarative()
    warnings.simplefilter("ignore")
    rows = []
    for name, build in FAMILIES.items():
        counts, wrong, worst = run_family(build, args.batch, args.seed)
        rows.append([name, counts, str(wrong), f"{worst:.1e}"])
        print(" | ".join(rows[-1]), flush=True)
    body = [C.section_header("Hard QP families: statuses and errors (benchmarks/robustness.py)",
                             ["benchmarks/robustness.py"] + list(argv or sys.argv[1:])),
            f"One batch of {args.batch} per family (seed {args.seed}), float64 unless named, the layer's default "
            "tol. `wrong statuses`: instances not `optimal` (not `infeasible` for those made infeasible); "
            "`max error`: over the optimal instances, max |x - x_ref| / max(1, |x_ref|).\n",
            C.md_table(["family", "statuses", "wrong statuses", "max error"], rows)]
    C.publish("\n".join(body), "robustness", args.write)


if __name__ == "__main__":
    main()
