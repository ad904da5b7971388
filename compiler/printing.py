"""Readable math for graph nodes and for the KKT system (what ``prob.kkt()`` prints)."""
from __future__ import annotations

from typing import Dict

import numpy as np
import sympy

from .ir import Node

# einsum specs (letters renamed in order of appearance) and how to read them
_EINSUM_FORMS = {
    "i,i->": "{0} @ {1}",
    "ij,j->i": "{0} @ {1}",
    "ij,i->j": "{0}.T @ {1}",
    "i,ij->j": "{1}.T @ {0}",
    "i,ji->j": "{1} @ {0}",
    "ij,jk->ik": "{0} @ {1}",
    "ij,ik->jk": "{0}.T @ {1}",
    "ij,kj->ik": "{0} @ {1}.T",
    "ij->ji": "{0}.T",
    "i->": "sum({0})",
    "ij->": "sum({0})",
    "ij->i": "sum({0}, axis=1)",
    "ij->j": "sum({0}, axis=0)",
    "i,ij,j->": "{0} @ {1} @ {2}",
    "i,ij->ij": "diag({0}) @ {1}",
    "ij,i->ij": "diag({1}) @ {0}",
    "ij,j->ij": "{0} @ diag({1})",
    "i,j->ij": "outer({0}, {1})",
}


def _canonical_spec(spec: str) -> str:
    mapping: Dict[str, str] = {}
    out = []
    for ch in spec:
        if ch.isalpha():
            if ch not in mapping:
                mapping[ch] = "ijklmnopqrstuvwxyz"[len(mapping)]
            out.append(mapping[ch])
        else:
            out.append(ch)
    return "".join(out)


def _display_name(node: Node) -> str:
    return node.attrs[0].split("#")[0]


def math_string(node: Node, memo=None) -> str:
    """A one-line, human-readable form of a graph node."""
    memo = {} if memo is None else memo
    if node in memo:
        return memo[node]
    op = node.op
    if op == "input":
        text = _display_name(node)
    elif op == "const":
        v = node.attrs
        if v.ndim == 0:
            text = f"{float(v):g}"
        elif v.size <= 4:
            text = np.array2string(v, precision=4, separator=", ")
        elif np.all(v == v.flat[0]):
            text = f"{float(v.flat[0]):g}*ones{v.shape}"
        else:
            text = f"const{v.shape}"
    elif op == "zeros":
        text = "0"
    elif op == "eye":
        text = "I"
    else:
        args = [math_string(a, memo) for a in node.args]
        if op == "einsum":
            form = _EINSUM_FORMS.get(_canonical_spec(node.attrs))
            wrapped = [_wrap(a) for a in args]
            text = form.format(*wrapped) if form else f"einsum('{node.attrs}', {', '.join(args)})"
        elif op == "elementwise":
            fn = node.attrs
            syms = {s: sympy.Symbol(_wrap(a)) for s, a in zip(fn.variables, args)}
            text = sympy.sstr(fn.expr.xreplace(syms))
        elif op == "index":
            text = f"{_wrap(args[0])}[{_index(node.attrs[0])}]"
        elif op == "scatter":
            text = f"embed({args[0]} at [{_index(node.attrs[0])}] of {node.attrs[1]})"
        elif op == "reshape":
            (a,) = node.args
            text = args[0] if a.op == "input" else f"reshape({args[0]}, {node.shape})"
        elif op == "concat":
            text = "[" + "; ".join(args) + "]"
        elif op == "reduce":
            text = f"{node.attrs}({args[0]})"
        else:
            text = f"<{op}>"
    memo[node] = text
    return text


def _wrap(text: str) -> str:
    simple = text.replace("_", "").replace(".", "").replace("[", "").replace("]", "").replace(":", "")
    return text if simple.isalnum() else f"({text})"


def _index(index) -> str:
    parts = []
    for i in index:
        if isinstance(i, slice):
            parts.append(f"{i.start}:{i.stop}" + ("" if i.step == 1 else f":{i.step}"))
        else:
            parts.append(str(i))
    return ", ".join(parts)


def format_kkt(kkt) -> str:
    prob = kkt.problem
    memo: dict = {}
    s = lambda node: math_string(node, memo)  # noqa: E731
    layout = ", ".join(
        f"{v.name}{list(v.shape) if v.shape else ''} = z[{off}:{off + v.node.shape[0]}]"
        + (" (epigraph)" if v.auxiliary else "")
        for v, off in zip(prob.variables, prob.variable_offsets)
    )
    lines = [
        f"KKT system ({kkt.problem_class}: n = {prob.n} variables, m = {prob.m} inequalities, "
        f"p = {prob.p} equalities)",
        f"  variables: {layout}",
        f"  minimize    f = {s(kkt.objective)}"
        + ("   (the negated objective of the Maximize)" if prob.objective_sign < 0 else ""),
        "  Lagrangian  L = f + lam @ g + nu @ h",
        "",
        "Stationarity (grad_z L = 0):",
    ]
    for v, r in zip(prob.variables, kkt.stationarity):
        lines.append(f"  grad_{v.name} L = {s(r)} = 0")
    lines.append("")
    lines.append("Primal feasibility:")
    for label, kind, node, rel, dual in (("g", "ineq", kkt.inequalities, "<= 0", "lam"),
                                         ("h", "eq", kkt.equalities, "== 0", "nu")):
        parts = node.args if node.op == "concat" else ([node] if node.size else [])
        # which user constraint each block is; the others the compiler added (epigraph
        # rows of nonsmooth atoms, the x >= 0 of a log's domain)
        sources = {row[1]: k for k, row in enumerate(prob.constraint_rows) if row is not None and row[0] == kind}
        offset = 0
        for part in parts:
            rows = f"{offset}:{offset + part.size}"
            source = f"constraint {sources[offset]}" if offset in sources else "added by the compiler"
            lines.append(f"  {label}[{rows}] = {s(part)} {rel}     (dual {dual}[{rows}]; {source})")
            offset += part.size
    if not kkt.inequalities.size and not kkt.equalities.size:
        lines.append("  (no constraints)")
    lines.append("")
    lines.append("Complementarity:")
    if kkt.inequalities.size:
        lines.append("  lam * g = 0,  lam >= 0")
    else:
        lines.append("  (no inequalities)")
    if kkt.structure is not None:
        st = kkt.structure
        lines.append("")
        lines.append(f"Structure: the Hessian of L is diagonal; {len(st.bound_rows)} rows of g are simple bounds, "
                     f"so a Newton system has size {st.k} + {prob.p} (other rows + equalities) instead of {prob.n}")
    return "\n".join(lines)
