"""Every tensor a layer makes lives on its inputs' device.

The same code must run on a GPU without changes, but CI has none. A tensor created
without ``device=`` (``torch.zeros(B)``, ``torch.arange(k)``...) would land on the
default device, the CPU, and the first op mixing it with CUDA data would fail. Here the
default device is set to ``meta`` (shapes without data) while layers run on CPU inputs:
such a tensor then lands on ``meta`` and the first op mixing it with the CPU data
raises, so the CPU stands in for the accelerator. The default dtype is float16 at the
same time, so that a tensor made without ``dtype=`` would change the digits: forward
and backward must give bit for bit what they give with the usual defaults.
"""
import warnings

import pytest
import torch

import declarative as dl
from conftest import random_qp
from test_qp import qp_problem


def _run(layer, args):
    """Outputs and gradients of sum(outputs) (NaN rows zeroed) w.r.t. every input."""
    leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = layer(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.nan_to_num().sum() for o in outs).backward()
    return [o.detach() for o in outs], [a.grad for a in leaves]


def _run_on_meta_default(layer, args):
    """_run with the default device meta and the default dtype float16: a tensor made
    without device= then fails, one made without dtype= changes the digits."""
    dtype = torch.get_default_dtype()
    torch.set_default_device("meta")
    torch.set_default_dtype(torch.float16)
    try:
        return _run(layer, args)
    finally:
        torch.set_default_device(None)
        torch.set_default_dtype(dtype)


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
        else:
            assert x.device == y.device and torch.equal(x.nan_to_num(), y.nan_to_num())


def _qp(B=4, n=6, m=5, p=2, dtype=torch.float64, seed=0):
    return qp_problem(n, m, p), list(random_qp(B, n, m, p, seed=seed, dtype=dtype))


def _singular_qp():
    prob, (Q, q, G, h, A, b) = _qp()
    Q = Q.clone()
    Q[:, 0, :] = 0.0
    Q[:, :, 0] = 0.0  # positive semidefinite: the general (n-space) QP path
    return prob, [Q, q, G, h, A, b]


def _troubled_qp():
    prob, (Q, q, G, h, A, b) = _qp()
    G, h, q = G.clone(), h.clone(), q.clone()
    G[0, 1], h[0, 1] = -G[0, 0], -h[0, 0] - 1.0  # instance 0 infeasible
    q[1, 0] = float("nan")  # instance 1 bad input
    return prob, [Q, q, G, h, A, b]


def _lp():
    n, m = 6, 8
    x, c = dl.Variable(n, name="x"), dl.Parameter(n, name="c")
    G, h = dl.Parameter((m, n), name="G"), dl.Parameter(m, name="h")
    prob = dl.Problem(dl.Minimize(c @ x), [G @ x <= h, x >= -1, x <= 1])
    g = torch.Generator().manual_seed(1)
    kw = dict(generator=g, dtype=torch.float64)
    return prob, [torch.randn(3, n, **kw), torch.randn(3, m, n, **kw), torch.rand(3, m, **kw) + 1.0]


def _softmax(dtype=torch.float64):
    n = 7
    z, theta = dl.Variable(n, name="z"), dl.Parameter(n, name="theta")
    prob = dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))), [dl.sum(z) == 1, z >= 0])
    return prob, [3.0 * torch.randn(5, n, generator=torch.Generator().manual_seed(2), dtype=dtype)]


def _weighted_entropy():
    n, k = 8, 3
    z, theta = dl.Variable(n, name="z"), dl.Parameter(n, name="theta")
    G, h = dl.Parameter((k, n), name="G"), dl.Parameter(k, name="h")
    prob = dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))), [dl.sum(z) == 1, z >= 0, G @ z <= h])
    g = torch.Generator().manual_seed(3)
    Gt = torch.randn(4, k, n, generator=g, dtype=torch.float64)
    return prob, [torch.randn(4, n, generator=g, dtype=torch.float64), Gt, Gt.sum(-1) / n + 0.1]


def _scattered_bounds():
    # bounds on every other entry with a general row between them: index tensors, not slices
    n = 6
    x, y = dl.Variable(n, name="x"), dl.Parameter(n, name="y")
    prob = dl.Problem(dl.Minimize(dl.sum(dl.exp(x)) - y @ x),
                      [x[0::2] >= -1.0, dl.sum(x) <= 1.0, x[1::2] >= -2.0])
    return prob, [torch.randn(3, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)]


def _nonsmooth():
    n = 6
    x, y = dl.Variable(n, name="x"), dl.Parameter(n, name="y")
    prob = dl.Problem(dl.Minimize(dl.sum_squares(x - y) + 0.5 * dl.norm1(x)), [dl.norm_inf(x) <= 2])
    return prob, [torch.randn(3, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)]


def _dense_nlp():
    n = 5
    x, a = dl.Variable(n, name="x"), dl.Parameter(n, name="a")
    prob = dl.Problem(dl.Minimize(dl.sum(dl.exp(x)) - a @ x + dl.sum_squares(x[:2] - x[3:])), [dl.sum(x) <= 1])
    return prob, [torch.randn(3, n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)]


def _from_cvxpy():
    cp = pytest.importorskip("cvxpy")
    n = 5
    x, c = cp.Variable(n, name="x"), cp.Parameter(n, name="c")
    prob = dl.from_cvxpy(cp.Problem(cp.Minimize(cp.sum_squares(x) + c @ x), [x >= -0.2, cp.sum(x) == 1]))
    return prob, [torch.randn(3, n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)]


OPTIMIZATION_CASES = {
    "qp": (_qp, {}),
    "qp float32": (lambda: _qp(dtype=torch.float32), {}),
    "qp large batch (instance subsets)": (lambda: _qp(B=300, n=12, m=12, p=3), {}),
    "qp active sets factored on their own rows": (lambda: _qp(B=96, n=40, m=48, p=6), {}),
    "qp many rows (exchange steps)": (lambda: _qp(B=32, n=12, m=30, p=2), {}),
    "qp duals": (_qp, dict(return_duals=True)),
    "qp singular Q": (_singular_qp, {}),
    "qp infeasible and NaN instances": (_troubled_qp, {}),
    "qp osqp": (_qp, dict(solver="osqp")),
    "qp from cvxpy": (lambda: _from_cvxpy(), {}),
    "lp": (_lp, {}),
    "softmax": (_softmax, {}),
    "softmax float32": (lambda: _softmax(torch.float32), {}),
    "weighted entropy": (_weighted_entropy, {}),
    "scattered bounds": (_scattered_bounds, {}),
    "nonsmooth": (_nonsmooth, {}),
    "dense nlp": (_dense_nlp, {}),
}


@pytest.mark.parametrize("case", list(OPTIMIZATION_CASES))
def test_optimization_layers_make_no_tensor_off_device(case):
    build, options = OPTIMIZATION_CASES[case]
    prob, args = build()
    reference = prob.to_torch(**options)
    expected = _run(reference, args)
    statuses = set(reference.info.status)
    assert "optimal" in statuses
    layer = prob.to_torch(**options)  # a fresh layer: its caches are filled on the meta default
    got = _run_on_meta_default(layer, args)
    assert set(layer.info.status) == statuses
    _same(got[0], expected[0])
    _same(got[1], expected[1])


def _fixed_point_layer(solver, backward, n, linear_solver="auto"):
    torch.manual_seed(0)
    lin = torch.nn.Linear(n, n).double()
    with torch.no_grad():
        lin.weight.mul_(0.3)
    layer = dl.FixedPointLayer(lambda y, x: torch.tanh(lin(y) + x), solver=solver, backward=backward,
                               linear_solver=linear_solver)
    return layer, [torch.randn(4, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)]


def _newton_layer():
    layer = dl.ImplicitLayer(lambda x, y: y ** 3 + y - x, dl.newton,
                             initial_guess=torch.zeros(3, dtype=torch.float64))
    return layer, [torch.randn(4, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)]


IMPLICIT_CASES = {
    "newton": _newton_layer,
    "anderson ift": lambda: _fixed_point_layer("anderson", "ift", 8),
    "broyden ift": lambda: _fixed_point_layer("broyden", "ift", 8),
    "iteration jfb": lambda: _fixed_point_layer("iteration", "jfb", 8),
    "anderson unroll": lambda: _fixed_point_layer("anderson", "unroll", 8),
    "anderson ift gmres": lambda: _fixed_point_layer("anderson", "ift", 80, "gmres"),
    "anderson ift cg": lambda: _fixed_point_layer("anderson", "ift", 8, "cg"),
}


@pytest.mark.parametrize("case", list(IMPLICIT_CASES))
def test_implicit_layers_make_no_tensor_off_device(case):
    reference, args = IMPLICIT_CASES[case]()
    expected = _run(reference, args)
    layer, args = IMPLICIT_CASES[case]()
    got = _run_on_meta_default(layer, args)
    _same(got[0], expected[0])
    _same(got[1], expected[1])
