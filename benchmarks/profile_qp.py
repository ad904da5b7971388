"""Where the time of one QP layer call goes: phases and the busiest torch ops.

    python benchmarks/profile_qp.py                 # B, n, m, p = 128, 50, 50, 10
    python benchmarks/profile_qp.py 32,10,10,2 4,500,250,50

For each shape: one forward+backward of the benchmark QP layer (benchmarks/qp.py's
family) under ``torch.profiler``, with the solver's phases marked. Profiling slows every
op down (about 2x for tiny ones), so read the shares, not the absolute times.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import common as C  # noqa: E402

PHASES = ("QPFactor", "_constraint_space_solve", "_pivoted_active_set", "_constraint_space_ipm",
          "_active_set_solution", "_polish", "_verify", "_certify_infeasible", "qp_adjoint")


def _mark_phases(module):
    for name in PHASES:
        fn = getattr(module, name)

        def marked(*args, _fn=fn, _name=name, **kwargs):
            with record_function(f"phase: {_name}"):
                return _fn(*args, **kwargs)
        setattr(module, name, marked)


def profile_shape(B, n, m, p, top=8):
    layer, call = C.qp_layer_call(B, n, m, p)
    for _ in range(3):
        call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    total = by_name["_ImplicitFunction"].cpu_time_total + by_name["_ImplicitFunctionBackward"].cpu_time_total
    print(f"\n## B, n, m, p = {B}, {n}, {m}, {p}: {int(layer.info.iterations.max())} iterations, "
          f"{total / 1e3:.1f} ms profiled forward+backward\n")
    print("| part | ms | share |\n|---|---|---|")
    rows = [("forward (layer)", by_name["_ImplicitFunction"].cpu_time_total)]
    rows += [(f"  {name}", by_name[f"phase: {name}"].cpu_time_total) for name in PHASES
             if f"phase: {name}" in by_name and name != "qp_adjoint"]
    rows.append(("backward (layer)", by_name["_ImplicitFunctionBackward"].cpu_time_total))
    if "phase: qp_adjoint" in by_name:
        rows.append(("  qp_adjoint", by_name["phase: qp_adjoint"].cpu_time_total))
    for label, t in rows:
        print(f"| {label} | {t / 1e3:.2f} | {100 * t / total:.0f}% |")
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    n_ops = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"\nbusiest ops (self time; {n_ops} aten op calls in all):\n")
    print("| op | calls | ms | share |\n|---|---|---|---|")
    for e in ops[:top]:
        print(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.2f} | {100 * e.self_cpu_time_total / total:.0f}% |")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    shapes = [tuple(int(v) for v in a.split(",")) for a in argv] or [(128, 50, 50, 10)]
    torch.set_default_dtype(torch.float64)
    import solvers.interior_point as ipm

    _mark_phases(ipm)
    for shape in shapes:
        profile_shape(*shape)


if __name__ == "__main__":
    main()
