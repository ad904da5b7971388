"""Layers inside a ``torch.compile``-d model run eagerly (a graph break around each).

The backend is ``aot_eager``: dynamo's tracing and aot_autograd, where the layers once
failed, without inductor's C++ code generation (no compiler needed on the test machine).
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


def _layers():
    torch.manual_seed(0)
    G = torch.randn(6, 4, dtype=DOUBLE)
    qp, softmax = _qp_layer(), _softmax_layer()
    cell = nn.Linear(4, 4).double()
    fixed_point = dl.FixedPointLayer(lambda y, x: torch.tanh(0.5 * cell(y) + x), extra_parameters=list(cell.parameters()))
    implicit = dl.ImplicitLayer(lambda x, y: y ** 3 + y - x, dl.newton, initial_guess=torch.zeros(4, dtype=DOUBLE))
    return {
        "qp": lambda a: qp(a, G),
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
