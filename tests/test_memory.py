"""dl.retain_cpu_memory: freed tensors are reused without page faults (glibc only).

Each check runs in a fresh interpreter, since the setting is process-wide."""
import subprocess
import sys
import textwrap

import pytest

import declarative as dl

_ROUNDS = textwrap.dedent("""
    import resource, sys, torch
    import declarative as dl
    applied = dl.retain_cpu_memory() if sys.argv[1] == "retain" else None

    def faults_of_rounds():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            blocks = [torch.ones(10 * 2**17, dtype=torch.float64) for _ in range(3)]  # 3 x 10 MiB
            del blocks
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_rounds()  # the first rounds map the memory
    print(applied, faults_of_rounds())
""")


def _faults(mode):
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


def test_retained_memory_is_reused_without_page_faults():
    applied, faults = _faults("retain")
    if applied != "True":
        pytest.skip("no glibc mallopt on this platform")
    # 15 blocks of 10 MiB touched again: ~38000 faults when each is fresh memory
    assert faults < 500, faults


def test_retain_cpu_memory_rejects_bad_sizes():
    with pytest.raises(ValueError, match="keep_mib"):
        dl.retain_cpu_memory(0)
    with pytest.raises(ValueError, match="keep_mib"):
        dl.retain_cpu_memory(2.5)


def test_inference_calls_keep_their_solver_state_until_the_next_call(monkeypatch):
    """Without autograd, a small problem's solver state stays with the layer until the next
    call (its pages are reused instead of returned and faulted back in); with autograd,
    large problems, and pickles, nothing is kept. Results do not depend on it."""
    import gc
    import pickle
    import weakref

    import torch

    from test_qp import qp_problem
    from conftest import random_qp

    layer = qp_problem(6, 5, 1).to_torch()
    data = random_qp(4, 6, 5, 1, seed=3)
    with torch.no_grad():
        first = layer(*data)
    assert layer._previous_state is not None
    # what is kept does not refer back to the layer: deleting it frees it at once
    gc.disable()
    try:
        other = qp_problem(6, 5, 1).to_torch()
        with torch.no_grad():
            other(*data)
        alive = weakref.ref(other)
        del other
        assert alive() is None
    finally:
        gc.enable()
    assert pickle.loads(pickle.dumps(layer))._previous_state is None
    with torch.no_grad():
        torch.testing.assert_close(layer(*data), first, rtol=0, atol=0)
    layer(*[d.clone().requires_grad_() for d in data])
    assert layer._previous_state is None
    monkeypatch.setattr("declarative.layer._PREVIOUS_STATE_BYTES", 0)
    with torch.no_grad():
        layer(*data)
    assert layer._previous_state is None
