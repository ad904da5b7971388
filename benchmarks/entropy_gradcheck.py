"""Who is right where ours and cvxpylayers' entropy gradients differ?

    python benchmarks/entropy_gradcheck.py

On the weighted entropy family (B=32, n=10, the benchmark's data), take the instance
and parameter where the two tools' gradients of sum(w * z*) differ most, and compare
both with central finite differences of CVXPY/Clarabel solves (tolerance 1e-12,
step 1e-5): a reference that is neither tool's code.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common as C  # noqa: E402
from entropy import make_cvxpylayers, make_ours  # noqa: E402

NAMES = ("theta", "wt", "G", "h")


def clarabel_solution(theta, wt, G, h):
    import cvxpy as cp

    z = cp.Variable(theta.shape[0])
    prob = cp.Problem(cp.Maximize(theta @ z + wt @ cp.entr(z)), [cp.sum(z) == 1, z >= 0, G @ z <= h])
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return z.value


def main(B=32, n=10, step=1e-5):
    warnings.filterwarnings("ignore")
    torch.set_default_dtype(torch.float64)
    d = C.make_entropy(B, n, True)
    params, w = [d[k] for k in NAMES], d["w"]

    def grads(layer):
        leaves = [p.clone().requires_grad_() for p in params]
        (layer(*leaves) * w).sum().backward()
        return [x.grad for x in leaves]

    ours = grads(make_ours(n, True, tol=1e-12)())
    theirs = grads(make_cvxpylayers(n, True)())
    gaps = [(a - b).abs().reshape(B, -1) for a, b in zip(ours, theirs)]
    k = max(range(len(NAMES)), key=lambda j: float(gaps[j].max()))
    b = int(gaps[k].amax(-1).argmax())
    entry = int(gaps[k][b].argmax())
    values = [p[b].numpy().copy() for p in params]
    plus, minus = [v.copy() for v in values], [v.copy() for v in values]
    plus[k].reshape(-1)[entry] += step
    minus[k].reshape(-1)[entry] -= step
    fd = w[b].numpy() @ (clarabel_solution(*plus) - clarabel_solution(*minus)) / (2 * step)
    z = clarabel_solution(*values)
    flat = lambda g: float(g[b].reshape(-1)[entry])  # noqa: E731
    print(f"largest gap: d/d{NAMES[k]} of instance {b}, entry {entry} "
          f"(z* there: {z.reshape(-1)[entry] if k == 1 else float('nan'):.1e})")
    print(f"  finite differences of Clarabel: {fd:+.5f}")
    print(f"  ours:                           {flat(ours[k]):+.5f}")
    print(f"  cvxpylayers:                    {flat(theirs[k]):+.5f}")


if __name__ == "__main__":
    main()
