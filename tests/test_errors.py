"""Bad input gets a clear error naming the culprit; failed instances never harm others."""
import numpy as np
import pytest
import torch

import declarative as dl
from conftest import random_qp
from references import qp_reference
from test_qp import qp_problem


@pytest.fixture
def layer():
    return qp_problem(4, 3, 1).to_torch()


def test_shape_errors_at_construction():
    x = dl.Variable(3, name="x")
    A = dl.Parameter((2, 4), name="A")
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(3,\)"):
        A @ x
    with pytest.raises(ValueError, match="do not broadcast"):
        x + dl.Parameter(2, name="p")
    with pytest.raises(ValueError, match="constraint"):
        x <= np.ones(2)
    with pytest.raises(ValueError, match="scalar"):
        dl.Minimize(x)
    with pytest.raises(ValueError, match="identifier"):
        dl.Variable(3, name="not a name")
    with pytest.raises(ValueError, match="positive"):
        dl.Variable((3, 0))
    with pytest.raises(TypeError, match="constraint"):
        dl.Problem(dl.Minimize(dl.sum(x)), [x])
    with pytest.raises(ValueError, match="distinct names"):
        y = dl.Variable(3, name="x")
        dl.Problem(dl.Minimize(dl.sum_squares(x) + dl.sum_squares(y)))


def test_division_by_a_constant_zero_raises_when_built():
    # (it raised "Cannot convert complex to float" from deep in the compiler, or a
    # complaint about non-finite constants)
    x = dl.Variable(2, name="x")
    for divide in (lambda: x / 0, lambda: x / np.array([1.0, 0.0]), lambda: 1 / (x - x)):
        with pytest.raises(ValueError, match="division by zero"):
            divide()


def test_reversed_slices_are_refused_and_strided_ones_solve():
    # a reversed slice of a constant once folded to an empty array (numpy read its
    # normalized stop -1 as the last entry), and one of a variable failed in torch
    x = dl.Variable(5, name="x")
    c = dl.Parameter(2, name="c")
    for expr in (x, dl.Constant(np.arange(4.0))):
        with pytest.raises(IndexError, match="reversed slices"):
            expr[::-1]
    with pytest.raises(IndexError, match="reversed slices"):
        x[3:0:-2]
    # argmin |x|^2 - c'x[1::2]: x[1::2] = c / 2, the other entries 0
    layer = dl.Problem(dl.Minimize(dl.sum_squares(x) - c @ x[1::2])).to_torch()
    c_t = torch.tensor([1.0, -3.0], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.5, 0.0, -1.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(layer(c_t), expected, atol=1e-9, rtol=0)


def test_call_errors_name_the_parameter(layer):
    Q, q, G, h, A, b = (t[0] for t in random_qp(1, 4, 3, 1))
    layer(Q, q, G, h, A, b)  # (a good call first: the layer remembers its checks by signature)
    with pytest.raises(ValueError, match=r"'q' has shape \(5,\); expected \(4,\)"):
        layer(Q, torch.zeros(5, dtype=torch.float64), G, h, A, b)
    with pytest.raises(TypeError, match="takes 6 parameters"):
        layer(Q, q, G, h, A, b, b)
    with pytest.raises(TypeError, match=r"missing parameter\(s\) \['b'\]"):
        layer(Q, q, G, h, A)
    with pytest.raises(TypeError, match="unknown parameter 'c'"):
        layer(Q, q, G, h, A, c=b)
    with pytest.raises(TypeError, match="given twice"):
        layer(Q, q, G, h, A, b, q=q)
    with pytest.raises(TypeError, match="'h'.*floating-point"):
        layer(Q, q, G, torch.ones(3, dtype=torch.int64), A, b)
    with pytest.raises(TypeError, match=r"mixed dtypes: .*q: torch.float16"):  # (float16 is solved in float32)
        layer(Q, q.half(), G, h, A, b)
    with pytest.raises(TypeError, match="'q'.*float8_e4m3fn is not supported"):
        layer(Q, q.to(torch.float8_e4m3fn), G, h, A, b)
    with pytest.raises(TypeError, match="'b'.*expected a tensor"):
        layer(Q, q, G, h, A, "b")
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        layer(Q, q.expand(2, 4), G, h.expand(3, 3), A, b)
    with pytest.raises(TypeError, match="mixed dtypes"):
        layer(Q, q.float(), G, h, A, b)


def test_unknown_option_and_bad_option_values():
    prob = qp_problem(3, 2, 1)
    with pytest.raises(TypeError, match="tolerance"):
        prob.to_torch(tolerance=1e-6)
    with pytest.raises(ValueError, match="tol"):
        prob.to_torch(tol=-1)
    with pytest.raises(ValueError, match="max_iter"):
        prob.to_torch(max_iter=0)
    with pytest.raises(ValueError, match="active_set_rounds"):
        prob.to_torch(active_set_rounds=-1)
    with pytest.raises(ValueError, match="active_set_rounds"):
        prob.to_torch(active_set_rounds=2.5)
    with pytest.raises(ValueError, match="do not appear"):
        prob.to_torch(variables=[dl.Variable(3, name="other")])
    with pytest.raises(ValueError, match="missing"):
        prob.to_torch(parameters=prob.parameters()[:2])


def test_warnings_name_the_line_that_called_the_layer():
    # (they named torch/autograd/function.py, or a frame of the layer)
    x = dl.Variable(2, name="x")
    q = dl.Parameter(2, name="q")
    layer = dl.Problem(dl.Minimize(q @ x), [x <= 1]).to_torch()
    with pytest.warns(RuntimeWarning, match="unbounded") as record:
        layer(torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64))
    assert record[0].filename == __file__
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    implicit = dl.ImplicitLayer(lambda a, y: y - w * a, lambda a: w.detach() * a)
    with pytest.warns(UserWarning, match="neither inputs nor parameters") as record:
        implicit(torch.randn(3, 2, dtype=torch.float64, requires_grad=True))
    assert record[0].filename == __file__


def test_nan_instance_is_isolated_and_reported(layer):
    B = 4
    Q, q, G, h, A, b = random_qp(B, 4, 3, 1, seed=3)
    clean = layer(Q, q, G, h, A, b)
    q_bad = q.clone()
    q_bad[1, 2] = float("nan")
    q_bad.requires_grad_()
    with pytest.warns(RuntimeWarning, match="1 of 4 instances"):
        x = layer(Q, q_bad, G, h, A, b)
    assert layer.info.status[1] == "numerical_error"
    assert [s for i, s in enumerate(layer.info.status) if i != 1] == ["optimal"] * 3
    assert torch.isnan(x[1]).all()
    keep = [0, 2, 3]
    torch.testing.assert_close(x[keep], clean[keep])
    # gradients: NaN for the failed instance's own row where the loss reads it, zero
    # where it does not (a loss that leaves failed instances out is how a training loop
    # copes with them: NaN there reached every weight of a shared encoder upstream)
    (g_read,) = torch.autograd.grad(x.sum(), q_bad, retain_graph=True)
    assert torch.isnan(g_read[1]).all() and torch.isfinite(g_read[keep]).all()
    x[keep].sum().backward()
    assert not q_bad.grad[1].any()
    clean_q = q.clone().requires_grad_()
    layer(Q, clean_q, G, h, A, b)[keep].sum().backward()
    torch.testing.assert_close(q_bad.grad[keep], clean_q.grad[keep])


@pytest.mark.parametrize("B", [4, 32])  # (32: the active sets are guessed by pivots)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", range(6))
def test_a_non_finite_entry_of_any_parameter_fails_its_instance_alone(which, value, B):
    # The interior point's QPs are checked for NaN and inf after their solve (a
    # non-finite entry leaves its instance's verified residuals non-finite, so it is
    # never optimal); the batch is then solved again without that instance. Either way
    # the others get what a clean batch gives them, and it gets numerical_error.
    n, m, p = 6, 5, 1
    layer = qp_problem(n, m, p).to_torch(warn=False)
    data = list(random_qp(B, n, m, p, seed=8))
    clean = layer(*data)
    assert layer.info.status == ["optimal"] * B
    bad = data[which].clone()
    bad[2].view(-1)[3 % bad[2].numel()] = value
    data[which] = bad
    x = layer(*data)
    assert layer.info.status == ["optimal"] * 2 + ["numerical_error"] + ["optimal"] * (B - 3)
    assert torch.isnan(x[2]).all()
    keep = [i for i in range(B) if i != 2]
    torch.testing.assert_close(x[keep], clean[keep], rtol=0, atol=1e-12)


def test_a_non_finite_shared_parameter_fails_every_instance():
    n, m, p, B = 6, 5, 1, 4
    layer = qp_problem(n, m, p).to_torch(warn=False)
    data = list(random_qp(B, n, m, p, seed=8))
    data[1] = data[1][0].clone()  # q shared by the batch
    data[1][0] = float("nan")
    x = layer(*data)
    assert layer.info.status == ["numerical_error"] * B
    assert torch.isnan(x).all()


def test_infeasible_instance_gets_status_and_nan():
    x = dl.Variable(2, name="x")
    lo = dl.Parameter(2, name="lo")
    hi = dl.Parameter(2, name="hi")
    prob = dl.Problem(dl.Minimize(dl.sum_squares(x)), [x >= lo, x <= hi])
    layer = prob.to_torch()
    lo_t = torch.tensor([[0.5, 0.5], [2.0, 0.0], [-1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    hi_t = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="1 of 3"):
        out = layer(lo_t, hi_t)
    assert layer.info.status[1] == "infeasible"
    assert layer.info.status[0] == layer.info.status[2] == "optimal"
    assert torch.isnan(out[1]).all()
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2], torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)
    out[[0, 2]].sum().backward()
    # a shared parameter would be summed over instances: the failed one must not poison it
    assert torch.isfinite(lo_t.grad[[0, 2]]).all()


def test_shared_parameter_gradient_survives_a_failed_instance():
    x = dl.Variable(2, name="x")
    lo = dl.Parameter(2, name="lo")
    c = dl.Parameter(2, name="c")
    prob = dl.Problem(dl.Minimize(dl.sum_squares(x - c)), [x >= lo, x <= 1])
    layer = prob.to_torch(warn=False)
    lo_t = torch.tensor([[0.5, 0.5], [2.0, 0.0]], dtype=torch.float64)
    c_shared = torch.tensor([0.0, 0.3], dtype=torch.float64, requires_grad=True)
    assert [p.name for p in prob.parameters()] == ["c", "lo"]  # objective first
    out = layer(lo=lo_t, c=c_shared)
    assert layer.info.status == ["optimal", "infeasible"]
    out[0].sum().backward()
    # instance 0 alone: x = max(c, lo) -> dx/dc = [0, 0] for c[0] < lo[0], and c[1] < 0.5 too
    torch.testing.assert_close(c_shared.grad, torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_max_iter_is_reported():
    z = dl.Variable(4, name="z")
    theta = dl.Parameter(4, name="theta")
    prob = dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))), [dl.sum(z) == 1, z >= 0])
    layer = prob.to_torch(max_iter=2, warn=False)
    out = layer(torch.randn(2, 4, dtype=torch.float64))
    assert layer.info.status == ["max_iter", "max_iter"]
    assert (layer.info.iterations == 2).all()
    assert torch.isfinite(out).all()  # max_iter returns the last iterate


def test_badly_scaled_feasible_rows_are_never_called_infeasible():
    # Strictly feasible instances (h = G x0 + s0) whose constraint rows are scaled over
    # ten decades: the solve may fail on some (numerical_error), but a failure must not
    # pass as an infeasibility certificate, and what is reported optimal must be right.
    n, m, p, B = 10, 15, 2, 32
    Q, q, G, h, A, b = random_qp(B, n, m, p, seed=4)
    scale = 10.0 ** (10 * torch.rand(B, m, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64) - 5)
    G, h = G * scale, h * scale[..., 0]
    layer = qp_problem(n, m, p).to_torch(warn=False)
    x = layer(Q, q, G, h, A, b)
    assert "infeasible" not in layer.info.status
    optimal = [i for i, s in enumerate(layer.info.status) if s == "optimal"]
    assert optimal, "nothing solved: the test lost its point"
    for i in optimal[:4]:
        xr, _, _ = qp_reference(*(t[i].numpy() for t in (Q, q, G, h, A, b)))
        np.testing.assert_allclose(x[i].numpy(), xr, atol=1e-6)


def test_an_input_changed_in_place_before_the_backward_raises():
    # as torch's own functions do; the gradient once mixed the forward's solution with
    # the new values (off by 2.46 for exp(theta) below). An optimizer step taken with a
    # backward still pending does this to a fixed-point layer's weights.
    x = dl.Variable(4, name="x")
    th = dl.Parameter(4, name="theta")
    layer = dl.Problem(dl.Minimize(dl.sum_squares(x - dl.exp(th))), [x >= 0.5]).to_torch()
    theta = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = layer(theta)
    with torch.no_grad():
        theta.add_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    cell = torch.nn.Linear(3, 3).double()
    deq = dl.FixedPointLayer(lambda y, u: torch.tanh(0.5 * cell(y) + u), extra_parameters=list(cell.parameters()))
    y = deq(torch.randn(2, 3, dtype=torch.float64))
    with torch.no_grad():
        cell.weight.add_(0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_a_buffer_changed_in_place_before_the_backward_raises():
    # T reads a buffer that requires no grad: torch's version check on the layer's own
    # inputs and parameters does not see it, and the hooks that save the residual's graph
    # had turned off autograd's. The gradient came out at the new value, 1 / (1 - 0.6)
    # where y = A y + x with A = 0.3 I has dy/dx = 1 / 0.7, without an error.
    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("A", 0.3 * torch.eye(3, dtype=torch.float64))

        def forward(self, y, x):
            return y @ self.A.T + x

    cell = Cell()
    layer = dl.FixedPointLayer(cell, tol=1e-12)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x).sum(), x)
    torch.testing.assert_close(g, torch.full((2, 3), 1 / 0.7, dtype=torch.float64))
    y = layer(x)
    cell.A.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
