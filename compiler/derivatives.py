"""Symbolic reverse-mode differentiation on the tensor graph of :mod:`compiler.ir`.

``vjp(output, cotangent, wrt)`` returns, for every input in ``wrt``, the graph of
``cotangent . d output / d input``. The cotangent may carry ``extra`` leading dimensions
(``cotangent.shape == T + output.shape``); seeding it with an identity matrix gives a
whole Jacobian in one sweep, and applying that to a gradient gives a Hessian. The rules
are per node kind and produce new graph nodes, so derivatives can be differentiated again
(the backward pass needs derivatives of the stationarity residual with respect to the
parameters). Scalar derivatives of elementwise functions come from sympy.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import sympy

from . import ir
from .atoms import guard_domain
from .ir import Node

#: sympy heads that have no derivative everywhere; canonicalization removes them first
NONSMOOTH_HEADS = ir._NONSMOOTH


class NotSmoothError(ValueError):
    """Raised when differentiation meets an expression with no derivative."""


def vjp(output: Node, cotangent: Node, wrt: Sequence[Node], extra: int = 0,
        guard_domains: bool = False) -> Dict[Node, Node]:
    """Vector-Jacobian products of ``output`` for each input node in ``wrt``.

    ``guard_domains``: the derivatives of atoms that are finite outside the atom's
    domain are NaN there (:func:`compiler.atoms.guard_domain`). The solver needs it in
    the stationarity residual only, which it evaluates without the objective: elsewhere
    (Jacobians, Hessian, the backward) a value of the same evaluation is already
    non-finite outside the domain.

    Parameters
    ----------
    output : Node of shape S
    cotangent : Node of shape T + S with ``len(T) == extra``
    wrt : input nodes
    Returns a dict mapping each node of ``wrt`` to a node of shape ``T + wrt.shape``.
    """
    lead = cotangent.shape[:extra]
    if cotangent.shape[extra:] != output.shape:
        raise ValueError(f"cotangent shape {cotangent.shape} does not fit output {output.shape}")
    names = {w.attrs[0] for w in wrt}
    adjoint: Dict[Node, Node] = {output: cotangent}
    for node in reversed(ir.topological([output])):
        g = adjoint.pop(node, None)
        if g is None or node.op == "input" or not (node.free & names):
            if node.op == "input" and g is not None:
                adjoint[node] = g
            continue
        for arg, contribution in _pullback(node, g, lead, guard_domains):
            if not (arg.free & names):
                continue
            prev = adjoint.get(arg)
            adjoint[arg] = contribution if prev is None else ir.add(prev, contribution)
    return {w: adjoint.get(w, ir.zeros(lead + w.shape)) for w in wrt}


def jacobian(output: Node, wrt: Node) -> Node:
    """Jacobian of a vector ``output`` (m,) with respect to a vector input (n,): (m, n)."""
    if output.ndim != 1 or wrt.ndim != 1:
        raise ValueError("jacobian expects vectors (flatten first)")
    return vjp(output, ir.eye(output.shape[0]), [wrt], extra=1)[wrt]


def gradient(output: Node, wrt: Sequence[Node], guard_domains: bool = False) -> Dict[Node, Node]:
    """Gradient of a scalar ``output`` with respect to each input of ``wrt``."""
    if output.shape != ():
        raise ValueError(f"gradient of a non-scalar of shape {output.shape}")
    return vjp(output, ir.const(1.0), wrt, guard_domains=guard_domains)


# ------------------------------------------------------------------------------------

def _pullback(node: Node, g: Node, lead, guard_domains=False):
    op = node.op
    t = len(lead)
    prefix = tuple(slice(0, d, 1) for d in lead)
    if op == "einsum":
        yield from _einsum_pullback(node, g, t)
    elif op == "elementwise":
        yield from _elementwise_pullback(node, g, lead, guard_domains)
    elif op == "index":
        (arg,) = node.args
        yield arg, ir.scatter(g, prefix + node.attrs[0], lead + arg.shape)
    elif op == "scatter":
        (arg,) = node.args
        yield arg, ir.index(g, prefix + node.attrs[0])
    elif op == "reshape":
        (arg,) = node.args
        yield arg, ir.reshape(g, lead + arg.shape)
    elif op == "concat":
        offset = 0
        for arg in node.args:
            yield arg, ir.index(g, prefix + (slice(offset, offset + arg.size, 1),))
            offset += arg.size
    elif op == "reduce":
        raise NotSmoothError(f"'{node.attrs}' is not differentiable; it must be rewritten in epigraph form first")
    else:  # const, zeros, eye: no inputs below
        return


def _einsum_pullback(node: Node, g: Node, t: int):
    ins, out = ir._split(node.attrs)
    used = set("".join(ins)) | set(out)
    lead_letters = "".join(ir._fresh(used, t))
    sizes = {}
    for sub, a in zip(ins, node.args):
        sizes.update(zip(sub, a.shape))
    for k, arg in enumerate(node.args):
        others = [(s, a) for j, (s, a) in enumerate(zip(ins, node.args)) if j != k]
        available = set(out).union(*[set(s) for s, _ in others]) if others else set(out)
        operands = [g] + [a for _, a in others]
        subs = [lead_letters + out] + [s for s, _ in others]
        for ch in ins[k]:
            if ch not in available:  # the operand was summed over ch alone: broadcast back
                operands.append(ir.const(np.ones(sizes[ch])))
                subs.append(ch)
        spec = ",".join(subs) + "->" + lead_letters + ins[k]
        yield arg, ir.einsum(spec, *operands)


def _elementwise_pullback(node: Node, g: Node, lead, guard_domains=False):
    fn: sympy.Lambda = node.attrs
    if fn.expr.has(*NONSMOOTH_HEADS):
        raise NotSmoothError(
            f"'{fn.expr}' is not differentiable everywhere; it must be rewritten in epigraph form first"
        )
    for sym, arg in zip(fn.variables, node.args):
        d = sympy.diff(fn.expr, sym)
        if d == 0:
            continue
        if guard_domains:
            d = guard_domain(fn.expr, d)
        if d.is_number:  # e.g. d(a + b)/da = 1: no need for a tensor of ones
            partial = ir.const(float(d))
        else:
            partial = ir.elementwise(sympy.Lambda(fn.variables, d), node.args)
        contribution = ir.mul(g, partial)  # shape lead + node.shape
        yield arg, _sum_to(contribution, len(lead), arg.shape)


def _sum_to(x: Node, t: int, shape) -> Node:
    """Sum the broadcast (leading, non-``lead``) dimensions of ``x`` down to ``lead + shape``."""
    body = x.shape[t:]
    if body == tuple(shape):
        return x
    letters = ir._LETTERS[: x.ndim]
    keep = letters[:t] + letters[x.ndim - len(shape):]
    return ir.einsum(f"{letters}->{keep}", x)
