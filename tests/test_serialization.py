"""Layers round-trip through torch.save / torch.load, also into a fresh process."""
import io
import os
import subprocess
import sys

import torch

from conftest import random_qp
from test_nlp import softmax_layer
from test_qp import qp_problem


def test_round_trip_in_process():
    layer = qp_problem(5, 3, 1).to_torch()
    data = random_qp(2, 5, 3, 1)
    expected = layer(*data)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(*data), expected)
    assert loaded.source == layer.source


def test_round_trip_into_a_fresh_process(tmp_path):
    layer = softmax_layer(4, tol=1e-10)
    theta = torch.tensor([[0.3, -1.0, 2.0, 0.5]], dtype=torch.float64)
    path = tmp_path / "layer.pt"
    torch.save({"layer": layer, "theta": theta}, path)
    code = (
        "import torch, sys\n"
        f"obj = torch.load({str(path)!r}, weights_only=False)\n"
        "out = obj['layer'](obj['theta'])\n"
        "err = (out - torch.softmax(obj['theta'], -1)).abs().max().item()\n"
        "sys.exit(0 if err < 1e-8 else 1)\n"
    )
    # a different hash seed: graph nodes must not carry hashes across processes
    env = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_pickled_cvxpy_import_still_builds_its_layer():
    # its cvxpy objects stay behind, and the default orders of parameters and variables
    # went with them: to_torch() then said the parameter 'a' was missing. The projection
    # of a onto x >= -1 is max(a, -1).
    import pickle

    import cvxpy as cp

    import declarative as dl

    x, a = cp.Variable(3, name="x"), cp.Parameter(3, name="a")
    problem = pickle.loads(pickle.dumps(dl.from_cvxpy(cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= -1]))))
    a_t = torch.tensor([0.3, -2.0, 1.0], dtype=torch.float64)
    (out,) = problem.to_torch()(a_t)
    torch.testing.assert_close(out, a_t.clamp(min=-1.0), atol=1e-9, rtol=0)
