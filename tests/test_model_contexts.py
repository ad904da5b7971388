"""Layers inside models as they are trained: compiled, under autocast.

Inside a ``torch.compile``-d model a layer runs eagerly (a graph break around each); the
backend here is ``aot_eager``: dynamo's tracing and aot_autograd, where the layers once
failed, without inductor's C++ code generation (no compiler needed on the test machine).
Under autocast a layer computes in its inputs' dtype, float16 and bfloat16 inputs in
float32. A second derivative through a layer raises.
"""
import pytest
import torch
from torch import nn

import declarative as dl

DOUBLE = torch.float64


def _qp_layer(n=4, m=6):
    x = dl.Variable(n, name="x")
    c, G = dl.Parameter(n, name="c"), dl.Parameter((m, n), name="G")
    return dl.Problem(dl.Minimize(dl.sum_squares(x) + c @ x), [G @ x <= 1]).to_torch()


def _softmax_layer(n=4):
    z, theta = dl.Variable(n, name="z"), dl.Parameter(n, name="theta")
    return dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))), [dl.sum(z) == 1, z >= 0]).to_torch()


def _layers(dtype=DOUBLE):
    torch.manual_seed(0)
    G = torch.randn(6, 4, dtype=dtype)
    qp, softmax = _qp_layer(), _softmax_layer()
    cell = nn.Linear(4, 4).to(dtype)
    fixed_point = dl.FixedPointLayer(lambda y, x: torch.tanh(0.5 * cell(y) + x), extra_parameters=list(cell.parameters()))
    implicit = dl.ImplicitLayer(lambda x, y: y ** 3 + y - x, dl.newton, initial_guess=torch.zeros(4, dtype=dtype))
    def qp_of_c(c):
        return qp(c, G)
    qp_of_c.layer = qp  # (its report)
    return {
        "qp": qp_of_c,
        "nlp": softmax,
        "fixed_point": fixed_point,
        "implicit": implicit,
    }


@pytest.mark.parametrize("kind", ["qp", "nlp", "fixed_point", "implicit"])
def test_a_compiled_model_runs_the_layer_eagerly(kind):
    # A linear map before the layer and a loss after it, compiled: the same loss and
    # gradients as eager. (The QP and NLP layers' generated code failed dynamo's import
    # of its module; a fixed-point layer's autograd calls were a double backward to
    # aot_autograd.)
    torch._dynamo.reset()
    layer = _layers()[kind]
    torch.manual_seed(1)
    linear = nn.Linear(4, 4).double()

    def model(a):
        return layer(linear(a)).square().sum()

    a = torch.randn(3, 4, dtype=DOUBLE)
    expected = model(a)
    expected.backward()
    expected_grad = linear.weight.grad.clone()
    linear.weight.grad = None
    loss = torch.compile(model, backend="aot_eager")(a)
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(linear.weight.grad, expected_grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["qp", "nlp", "fixed_point", "implicit"])
def test_under_autocast_a_layer_computes_in_its_inputs_dtype(kind):
    # CPU autocast (bfloat16) made the interior point's batched products bfloat16: every
    # QP instance ended numerical_error, its outputs NaN. Inside and outside autocast,
    # forward and backward (called inside), a layer now gives the same float32 numbers.
    layer = _layers(torch.float32)[kind]
    a = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    outside = a.clone().requires_grad_()
    expected = layer(outside)
    expected.square().sum().backward()
    inside = a.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(inside)
        out.square().sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(inside.grad, outside.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["qp", "nlp", "fixed_point", "implicit"])
def test_bfloat16_and_float16_inputs_are_solved_in_float32(kind):
    # Autocast hands a layer bfloat16 tensors (a linear map's outputs, say): they are
    # solved in float32, whose outputs they get, and gradients flow back in their dtype.
    # (They raised TypeError in optimization layers; a fixed-point layer met LU, which
    # has no bfloat16 kernel on the CPU, or a float32 cell.)
    layer = _layers(torch.float32)[kind]
    a = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    for low in (torch.bfloat16, torch.float16):
        a_low = a.to(low).requires_grad_()
        out = layer(a_low)
        info = (layer if kind != "qp" else layer.layer).info
        assert out.dtype == torch.float32 and set(info.status) <= {"optimal", "converged"}
        a_32 = a_low.detach().float().requires_grad_()
        expected = layer(a_32)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        out.sum().backward()
        expected.sum().backward()
        assert a_low.grad.dtype == low
        torch.testing.assert_close(a_low.grad, a_32.grad.to(low), atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["qp", "nlp", "fixed_point", "implicit"])
def test_a_second_derivative_through_a_layer_raises(kind):
    # The backward is not recorded: with create_graph=True the gradient was a constant,
    # and a second-order loss that also depends on the input otherwise (a gradient
    # penalty plus a first-order term, MAML's outer loss) came out silently without the
    # layer's part. The first-order gradient is as without create_graph; differentiating
    # it raises.
    # (A loss linear in the output, so that its cotangent does not require grad: one
    # that does, as from y.square().sum(), raised torch's once_differentiable error.)
    layer = _layers()[kind]
    a = torch.randn(3, 4, dtype=DOUBLE, generator=torch.Generator().manual_seed(5)).requires_grad_()
    w = torch.randn(3, 4, dtype=DOUBLE, generator=torch.Generator().manual_seed(6))
    (plain,) = torch.autograd.grad((w * layer(a)).sum(), a)
    (gradient,) = torch.autograd.grad((w * layer(a)).sum(), a, create_graph=True)
    torch.testing.assert_close(gradient, plain, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="differentiable once"):
        (gradient.square().sum() + a.sum()).backward()


@pytest.mark.parametrize("kind", ["qp", "nlp", "fixed_point", "implicit"])
def test_under_inference_mode_a_layer_gives_its_no_grad_results(kind):
    # Lightning validates and predicts under inference_mode, where autograd records
    # nothing, enable_grad included: Newton inside an implicit layer raised, and a
    # fixed-point layer's contraction estimate read 0. Inputs made there are inference
    # tensors.
    layer = _layers()[kind]
    a = torch.randn(3, 4, dtype=DOUBLE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = layer(a)
    report = getattr(layer, "layer", layer).info
    with torch.inference_mode():
        got = layer(a.clone())
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    if kind == "fixed_point":
        assert bool((report.contraction_factor > 0).all())
        torch.testing.assert_close(layer.info.contraction_factor, report.contraction_factor)
    if kind == "implicit":  # y^3 + y = a
        torch.testing.assert_close(got ** 3 + got, a, atol=1e-9, rtol=0)


@pytest.mark.parametrize("kind", ["qp", "fixed_point"])
def test_under_activation_checkpointing_the_backward_does_not_solve_again(kind, monkeypatch):
    # Saved for the backward, the inputs (a fixed-point layer's graph of F too) were
    # checkpoint placeholders, and unpacking them ran the checkpointed forward again,
    # solve and all (T 39 times instead of none). The gradient is the plain one.
    from torch.utils.checkpoint import checkpoint

    import solvers.interior_point as ipm

    calls = {"n": 0}
    if kind == "fixed_point":
        cell = nn.Linear(4, 4).double()

        def T(y, x):
            calls["n"] += 1
            return torch.tanh(0.5 * cell(y) + x)
        layer = dl.FixedPointLayer(T, extra_parameters=list(cell.parameters()), tol=1e-12)
    else:
        layer, solve_qp = _layers()[kind], ipm.solve_qp

        def counted(*args, **kwargs):
            calls["n"] += 1
            return solve_qp(*args, **kwargs)
        monkeypatch.setattr(ipm, "solve_qp", counted)
    a = torch.randn(3, 4, dtype=DOUBLE, generator=torch.Generator().manual_seed(4), requires_grad=True)
    (expected,) = torch.autograd.grad(layer(a).square().sum(), a)
    out = checkpoint(layer, a, use_reentrant=False)
    before = calls["n"]
    (grad,) = torch.autograd.grad(out.square().sum(), a)
    assert before > 0 and calls["n"] == before
    torch.testing.assert_close(grad, expected, atol=1e-10, rtol=0)
