"""Diagnostics of the NLP path: what its starts reach, how tiny entries and their
bounds' duals come out, where the entropy family's iterations go, and how many torch
calls a call makes.

    python benchmarks/nlp_diagnostics.py starts   # problems whose start needs signs
    python benchmarks/nlp_diagnostics.py tiny     # duals of z >= 0, tiny entries
    python benchmarks/nlp_diagnostics.py path     # the slowest instance of an entropy cell
    python benchmarks/nlp_diagnostics.py ops      # aten calls per forward and backward
    python benchmarks/nlp_diagnostics.py backward # gradients through nearly flat columns

Each prints a markdown table; none writes RESULTS.md.
"""
from __future__ import annotations

import argparse
import collections
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import entropy as E  # noqa: E402


def _status_row(name, build, *args, **kwargs):
    try:
        layer = build()
        layer(*args, **kwargs)
        statuses = ", ".join(sorted(set(layer.info.status)))
        return f"| {name} | {statuses} | {int(layer.info.iterations.max())} |"
    except Exception as e:  # noqa: BLE001  (a crash is a result here)
        return f"| {name} | {C.short_reason(e)} | - |"


def starts():
    dl = C.import_declarative()
    g = torch.Generator().manual_seed(0)
    n = 5

    def two_simplices():
        x, y = dl.Variable(n, name="x"), dl.Variable(n, name="y")
        a, b = dl.Parameter(n, name="a"), dl.Parameter(n, name="b")
        return dl.Problem(dl.Maximize(a @ x - b @ y + dl.sum(dl.entropy(x)) + dl.sum(dl.entropy(-y))),
                          [dl.sum(x) == 1, dl.sum(y) == -1]).to_torch(tol=1e-11)

    def slices():
        x = dl.Variable(4, name="x")
        return dl.Problem(dl.Minimize(-dl.sum(dl.log(x[:2])) - dl.sum(dl.log(-x[2:]))
                                      + np.array([1.0, 2.0, -1.0, -2.0]) @ x)).to_torch(tol=1e-11)

    def transposed():
        X, Y = dl.Variable((2, 3), name="X"), dl.Variable((3, 2), name="Y")
        return dl.Problem(dl.Maximize(dl.sum(dl.entropy(X)) + dl.sum(dl.entropy(-Y.T))),
                          [dl.sum(X) == 1, dl.sum(Y) == -1]).to_torch(tol=1e-11)

    def vector_factor():
        y, w = dl.Variable(2, name="y"), dl.Variable(3, name="w")
        return dl.Problem(dl.Maximize(dl.sum(dl.log(np.array([-1.0, -2.0]) * y)) + y @ np.array([1.0, 0.5])
                                      + dl.sum(dl.entropy(w))), [dl.sum(w) == 1]).to_torch(tol=1e-11)

    x2 = dl.Variable(2, name="x")
    orders = {
        "x^-2 - log(-x) - x, power first": lambda: dl.sum(dl.power(x2, -2)) - dl.sum(dl.log(-x2)) - dl.sum(x2),
        "the same, log first": lambda: -dl.sum(dl.log(-x2)) + dl.sum(dl.power(x2, -2)) - dl.sum(x2),
        "the same, one atom": lambda: dl.sum(dl.power(x2, -2) - dl.log(-x2)) - dl.sum(x2),
    }

    def empty_domain():
        x, c = dl.Variable(3, name="x"), dl.Parameter(3, name="c")
        return dl.Problem(dl.Minimize(dl.sum(dl.power(x, -2) - dl.log(x) - dl.log(-x)) + c @ x)).to_torch(tol=1e-10)

    def scaled_root():
        y = dl.Variable(3, name="y")
        return dl.Problem(dl.Maximize(dl.sum(dl.sqrt(2 * y)) - dl.sum_squares(y))).to_torch(tol=1e-11)

    def signed_in_part():
        u, w = dl.Variable(2, name="u"), dl.Variable(name="w")
        return dl.Problem(dl.Minimize(-dl.log(-u[0]) - dl.log(-u[0] - 1.5) - dl.log(-u[1] - 1.5) - dl.log(w)
                                      - dl.log(w - 1.5) + dl.sum_squares(u) + dl.square(w))).to_torch(tol=1e-11)

    def two_domains_one_atom():
        x, c = dl.Variable(1, name="x"), dl.Parameter(1, name="c")
        return dl.Problem(dl.Minimize(dl.sum(-dl.entropy(x) - dl.log(1 - x)) - c @ x)).to_torch(tol=1e-11)

    print("| problem | statuses | max iterations |\n|---|---|---|")
    print(_status_row("entropy(x) + entropy(-y), two simplices", two_simplices,
                      torch.randn(4, n, dtype=torch.float64, generator=g),
                      torch.randn(4, n, dtype=torch.float64, generator=g)))
    print(_status_row("log(x[:2]) + log(-x[2:])", slices))
    print(_status_row("entropy(X) + entropy(-Y.T)", transposed))
    print(_status_row("log([-1, -2] * y) + entropy(w)", vector_factor))
    for name, objective in orders.items():
        print(_status_row(name, lambda: dl.Problem(dl.Minimize(objective())).to_torch(tol=1e-11)))
    print(_status_row("x^-2 - log(x) - log(-x), one atom (empty domain)", empty_domain,
                      torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64)))
    print(_status_row("sqrt(2 y) - sum_squares(y)", scaled_root))
    print(_status_row("log(-u[0]) beside log(-u[1] - 1.5), log(w - 1.5)", signed_in_part))
    print(_status_row("x log x - log(1 - x), one atom, c = 5, 6, 10", two_domains_one_atom,
                      c=torch.tensor([[5.0], [6.0], [10.0]], dtype=torch.float64)))


def tiny():
    dl = C.import_declarative()

    def softmax_layer(n, tol):
        z, theta = dl.Variable(n, name="z"), dl.Parameter(n, name="theta")
        return dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))), [dl.sum(z) == 1, z >= 0]).to_torch(
            tol=tol, return_duals=True)

    scales = (5, 10, 20, 100)
    print("Duals of z >= 0 in softmax (exactly 0), 64 instances, n = 10: the largest multiplier "
          "(the largest |d sum(lam) / d theta|, exactly 0)\n")
    print("| dtype, tol | " + " | ".join(f"logits {s} x randn" for s in scales) + " |")
    print("|---|" + "---|" * len(scales))
    for dtype, tol in ((torch.float64, None), (torch.float64, 1e-11), (torch.float32, None)):
        layer, cells = softmax_layer(10, tol), []
        for scale in scales:
            theta = scale * torch.randn(64, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            leaf = theta.to(dtype).requires_grad_()
            _, _, lam = layer(leaf)
            (grad,) = torch.autograd.grad(lam.sum(), leaf)
            solved = torch.tensor([s == "optimal" for s in layer.info.status])
            cells.append(f"{lam.detach()[solved].max():.1e} ({grad[solved].abs().max():.1e})")
        print(f"| {str(dtype)[6:]}, {'default' if tol is None else tol} | " + " | ".join(cells) + " |")

    print("\nSoftmax entries, n = 100, 64 instances, default tolerance: the largest relative error "
          "(the largest absolute one)\n")
    print("| dtype | logits 5 x randn | logits 20 x randn |\n|---|---|---|")
    layer = softmax_layer(100, None)
    for dtype in (torch.float64, torch.float32):
        cells = []
        for scale in (5, 20):
            theta = scale * torch.randn(64, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                out = layer(theta.to(dtype))[0].double()
            p = torch.softmax(theta, -1)
            kept = p > torch.finfo(dtype).tiny * 1e3  # (entries the dtype can hold)
            cells.append(f"{((out - p).abs() / p)[kept].max():.1e} ({(out - p).abs().max():.1e})")
        print(f"| {str(dtype)[6:]} | " + " | ".join(cells) + " |")


def path(B, n, weighted):
    data = C.make_entropy(B, n, weighted)
    params = E.params_of(data, weighted)
    layer = E.make_ours(n, weighted)()
    with torch.no_grad():
        layer(*params)
    iterations = layer.info.iterations
    slow = int(iterations.argmax())
    print(f"{'weighted' if weighted else 'plain'} {B}x{n}, tol 1e-11: iterations max {int(iterations.max())}, "
          f"median {int(iterations.median())}; instance {slow} after k iterations (max_iter = k):\n")
    print("| k | primal | stationarity | complementarity |\n|---|---|---|---|")
    for k in range(1, int(iterations.max()) + 1):
        layer = E.make_ours(n, weighted, max_iter=k)()
        with torch.no_grad():
            layer(*params)
        info = layer.info
        print(f"| {k} | {info.primal_residual[slow]:.1e} | {info.dual_residual[slow]:.1e} | "
              f"{info.complementarity[slow]:.1e} |")
    print("\n| tol | iterations (max / median) |\n|---|---|")
    for tol in (1e-8, 1e-9, 1e-10, 1e-11):
        layer = E.make_ours(n, weighted, tol=tol)()
        with torch.no_grad():
            layer(*params)
        print(f"| {tol:g} | {int(layer.info.iterations.max())} / {int(layer.info.iterations.median())} |")


def ops():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    print("| cell | aten calls per forward | per backward |\n|---|---|---|")
    for B, n, weighted in ((32, 10, False), (32, 100, False), (32, 10, True), (32, 100, True)):
        data = C.make_entropy(B, n, weighted)
        layer = E.make_ours(n, weighted)()
        params = E.params_of(data, weighted)
        with torch.no_grad():
            layer(*params)  # (warm: compiled code and caches)
            with Count() as forward:
                layer(*params)
        leaves = [p.clone().requires_grad_() for p in params]
        z = layer(*leaves)
        loss = (z * torch.randn(z.shape, dtype=z.dtype, generator=torch.Generator().manual_seed(0))).sum()
        with Count() as backward:
            loss.backward()
        print(f"| {'weighted' if weighted else 'plain'} {B}x{n} | {sum(forward.calls.values())} | "
              f"{sum(backward.calls.values())} |")


def backward():
    """dz0/dtheta0 of maximize theta'z + w'entropy(z), sum(z) = 1 (times r), z >= 0, at
    theta = s [5, -10, 0.3, 1], w = s [w0, 0, 1, 0.5]: a column nearly without curvature
    (w0 small), the objective times s (the solution unchanged, s dz0/dtheta0 too), the
    equality times r. Against the closed form d0 S' / S (d_j = z_j / w_j over the
    interior entries, S their sum, S' without entry 0), and whether the layer warned."""
    dl = C.import_declarative()
    z, theta, w = dl.Variable(4, name="z"), dl.Parameter(4, name="theta"), dl.Parameter(4, nonneg=True, name="w")
    layers = {}
    print("| w0 | s | r | dtype | s dz0/dtheta0 | closed form | relative error | warned |")
    print("|---|---|---|---|---|---|---|---|")
    cases = [(0.0, 1, 1, "float64"), (1e-14, 1, 1, "float64"), (1e-12, 1, 1, "float64"), (1e-10, 1, 1, "float64"),
             (1e-6, 1e6, 1, "float64"), (1e-10, 1e10, 1, "float64"), (1e-12, 1e12, 1, "float64"),
             (1e-12, 1, 1e-10, "float64"), (1e-12, 1, 1e-12, "float64"), (1e-6, 1, 1, "float32"),
             (1e-3, 1, 1, "float32"), (1e-5, 100, 1, "float32"), (1e-4, 1e3, 1, "float32"), (1e-7, 1e4, 1, "float32")]
    for w0, s, r, dtype_name in cases:
        dtype = getattr(torch, dtype_name)
        if (r, dtype) not in layers:
            kw = {"tol": 1e-10} if dtype == torch.float64 else {}
            layers[r, dtype] = dl.Problem(dl.Maximize(theta @ z + w @ dl.entropy(z)),
                                          [r * dl.sum(z) == r, z >= 0]).to_torch(**kw)
        layer = layers[r, dtype]
        th = (s * torch.tensor([[5.0, -10.0, 0.3, 1.0]], dtype=dtype)).requires_grad_(True)
        wt = s * torch.tensor([[w0, 0.0, 1.0, 0.5]], dtype=dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = layer(theta=th, w=wt)
            (g,) = torch.autograd.grad(out[0, 0], th)
        warned = any("may be inaccurate" in str(c.message) for c in caught)
        zv = out.detach().double()[0]
        d = [float(zv[0] / w0) if w0 else float("inf"), float(zv[2]), float(zv[3] / 0.5)]
        rest = d[1] + d[2]
        exact = rest if not w0 else d[0] * rest / (d[0] + rest)
        got = float(g[0, 0]) * s
        print(f"| {w0:g} | {s:g} | {r:g} | {dtype_name} | {got:.6g} | {exact:.6g} | "
              f"{abs(got - exact) / exact:.1e} | {'yes' if warned else 'no'} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("starts", "tiny", "path", "ops", "backward"))
    parser.add_argument("--cell", default="32,100,weighted", help="B,n,plain|weighted (path)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # (the statuses are the report)
    if args.what == "starts":
        starts()
    elif args.what == "tiny":
        tiny()
    elif args.what == "path":
        B, n, variant = args.cell.split(",")
        path(int(B), int(n), variant == "weighted")
    elif args.what == "backward":
        backward()
    else:
        ops()


if __name__ == "__main__":
    main()
