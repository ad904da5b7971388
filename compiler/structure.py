"""Structure of a smooth NLP that the solver can exploit: an analysis pass.

    KKTSystem --nlp_structure--> NLPStructure or None

Two facts, read off the graph rather than off numbers, so they hold for every value of
the variables and parameters:

* the Hessian of the Lagrangian is diagonal (:func:`diagonal_of`): separable objectives
  such as entropy, logarithms, powers and softplus of entries, with linear constraints;
* some rows of g are simple bounds ``+-z_c + r(theta) <= 0`` (:func:`bounds_of`), e.g.
  ``z >= 0`` or ``z <= u``.

With both, the interior point's Newton step needs one factorization of size
(k + p) -- k the other inequality rows, p the equalities -- instead of one of size n,
and no (n, n) matrix is ever formed: softmax-like layers cost O(n) per instance and
iteration instead of O(n^3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import sympy

from . import ir
from .canonicalize import StackedProblem
from .derivatives import vjp
from .ir import Node


@dataclass(frozen=True)
class NLPStructure:
    """What :func:`nlp_structure` found. Row and column numbers index g and z."""

    #: per variable block, the diagonal (n_i,) of its Hessian block (the others are zero)
    hessian_diagonal: Tuple[Node, ...]
    #: rows of g that are bounds: g[bound_rows] = bound_signs * z[bound_cols] + r(theta)
    bound_rows: np.ndarray
    bound_cols: np.ndarray
    bound_signs: np.ndarray
    #: the other rows of g, and their Jacobian per variable block (k, n_i)
    general_rows: np.ndarray
    general_jacobian: Tuple[Node, ...]

    @property
    def k(self) -> int:
        return int(self.general_rows.shape[0])


def nlp_structure(problem: StackedProblem, hessian) -> Optional[NLPStructure]:
    """The structure of ``problem`` (with the Hessian blocks ``hessian[i][j]`` of its KKT
    system), or None when its Hessian is not diagonal."""
    diagonal = []
    for i, row in enumerate(hessian):
        for j, block in enumerate(row):
            if i != j and not ir.is_zero(block):
                return None
        d = diagonal_of(row[i])
        if d is None:
            return None
        diagonal.append(d)

    offsets = {v.node.attrs[0]: off for v, off in zip(problem.variables, problem.variable_offsets)}
    parts = problem.g.args if problem.g.op == "concat" else (problem.g,) if problem.m else ()
    cols, signs, general_parts = [], [], []
    for part in parts:
        c, s = bounds_of(part, offsets)
        c, s = c.reshape(-1), s.reshape(-1)
        cols.append(c)
        signs.append(s)
        general_parts.extend(_runs(part, c < 0))
    cols = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    signs = np.concatenate(signs) if signs else np.zeros(0)
    is_bound = cols >= 0
    general_rows = np.flatnonzero(~is_bound)
    variables = [v.node for v in problem.variables]
    if general_parts:
        general_g = ir.concat(general_parts)
        jac = vjp(general_g, ir.eye(general_g.shape[0]), variables, extra=1)
        general_jacobian = tuple(jac[v] for v in variables)
    else:
        general_jacobian = tuple(ir.zeros((0,) + v.shape) for v in variables)
    return NLPStructure(
        hessian_diagonal=tuple(diagonal),
        bound_rows=np.flatnonzero(is_bound),
        bound_cols=cols[is_bound],
        bound_signs=signs[is_bound],
        general_rows=general_rows,
        general_jacobian=general_jacobian,
    )


def _runs(part: Node, keep: np.ndarray):
    """``part`` restricted to the entries ``keep`` (flat bool), as contiguous pieces."""
    if keep.all():
        return [part]
    flat = ir.flatten(part)
    pieces, start = [], None
    for k, flag in enumerate(list(keep) + [False]):
        if flag and start is None:
            start = k
        elif not flag and start is not None:
            pieces.append(ir.index(flat, (slice(start, k, 1),)))
            start = None
    return pieces


# ------------------------------------------------------------------------------------
# diagonal matrices
# ------------------------------------------------------------------------------------

def diagonal_of(node: Node) -> Optional[Node]:
    """The diagonal (n,) of a square matrix node that is zero off the diagonal for every
    input value, or None when the graph does not show that."""
    if node.ndim != 2 or node.shape[0] != node.shape[1]:
        return None
    n = node.shape[0]
    if node.op == "zeros":
        return ir.zeros((n,))
    if node.op == "eye":
        return ir.const(np.ones(n))
    if node.op == "const":
        a = node.attrs
        return ir.const(np.diag(a).copy()) if not np.any(a - np.diag(np.diag(a))) else None
    if node.op == "elementwise":
        return _elementwise_diagonal(node)
    if node.op == "einsum":
        return _einsum_diagonal(node)
    return None


def _elementwise_diagonal(node: Node) -> Optional[Node]:
    # every full-size argument must be diagonal; off the diagonal those are zero, and the
    # function of what is left (broadcast vectors and scalars) must vanish identically
    fn = node.attrs
    args, off_diagonal = [], {}
    for sym, a in zip(fn.variables, node.args):
        if a.shape == node.shape:
            d = diagonal_of(a)
            if d is None:
                return None
            off_diagonal[sym] = 0
            args.append(d)
        elif a.ndim <= 1:
            # a vector broadcast over rows holds v[j] at (i, j): v[i] on the diagonal
            args.append(a)
        else:
            return None
    if not off_diagonal or sympy.simplify(fn.expr.xreplace(off_diagonal)) != 0:
        return None
    # a diagonal of ones enters as the scalar 1, so that the formula simplifies
    args = [ir.const(1.0) if _is_ones(a) else a for a in args]
    d = ir.elementwise(fn, args)
    n = node.shape[0]
    return d if d.shape == (n,) else ir.mul(d, ir.const(np.ones(n)))


def _is_ones(node: Node) -> bool:
    return node.op == "const" and node.ndim == 1 and bool(np.all(node.attrs == 1.0))


def _einsum_diagonal(node: Node) -> Optional[Node]:
    # Each term of the sum is a product of entries; a diagonal operand with indices (a, b)
    # makes every term with a != b vanish. When the output's two indices are linked by a
    # chain of such operands, only i == j survives.
    ins, out = node.attrs.split("->")
    ins = ins.split(",")
    parent: Dict[str, str] = {}

    def find(c):
        while parent.get(c, c) != c:
            c = parent[c]
        return c

    diagonals = {}
    for k, (letters, a) in enumerate(zip(ins, node.args)):
        if a.ndim == 2 and letters[0] != letters[1]:
            d = diagonal_of(a)
            if d is not None:
                diagonals[k] = d
                parent[find(letters[0])] = find(letters[1])
    i, j = out
    if find(i) != find(j):
        return None
    new_ins, new_args = [], []
    for k, (letters, a) in enumerate(zip(ins, node.args)):
        if k in diagonals:
            new_ins.append(find(letters[0]))
            new_args.append(diagonals[k])
            continue
        renamed = "".join(find(c) for c in letters)
        if len(set(renamed)) != len(renamed):
            return None  # a general operand would be read along a diagonal
        new_ins.append(renamed)
        new_args.append(a)
    return ir.einsum(",".join(new_ins) + "->" + find(i), *new_args)


# ------------------------------------------------------------------------------------
# bound rows
# ------------------------------------------------------------------------------------

def bounds_of(node: Node, offsets: Dict[str, int]):
    """For each entry of ``node`` (a piece of g), the entry of z it bounds and the sign:
    ``(cols, signs)`` shaped like ``node``, with ``cols = -1`` where the entry is not of the
    form ``+-z_c + r(theta)``."""
    none = (np.full(node.shape, -1, dtype=np.int64), np.zeros(node.shape))
    selection = _selection(node, offsets)
    if selection is not None:
        return selection, np.ones(node.shape)
    if node.op == "reshape":
        c, s = bounds_of(node.args[0], offsets)
        return c.reshape(node.shape), s.reshape(node.shape)
    if node.op == "concat":
        parts = [bounds_of(a, offsets) for a in node.args]
        return np.concatenate([c.reshape(-1) for c, _ in parts]), np.concatenate([s.reshape(-1) for _, s in parts])
    if node.op != "elementwise":
        return none
    names = set(offsets)
    moving = [(sym, a) for sym, a in zip(node.attrs.variables, node.args) if a.free & names]
    if len(moving) != 1 or moving[0][1].shape != node.shape:
        return none
    sym, arg = moving[0]
    selection = _selection(arg, offsets)
    slope = sympy.diff(node.attrs.expr, sym)
    if selection is None or slope.free_symbols or abs(float(slope)) != 1.0:
        return none
    return selection, np.full(node.shape, float(slope))


def _selection(node: Node, offsets: Dict[str, int]) -> Optional[np.ndarray]:
    """Which entries of z ``node`` is, when it is a plain selection of them (int array
    shaped like ``node``), else None."""
    if node.op == "input":
        off = offsets.get(node.attrs[0])
        return None if off is None else off + np.arange(node.size).reshape(node.shape)
    if node.op in ("index", "reshape"):
        inner = _selection(node.args[0], offsets)
        if inner is None:
            return None
        return inner[node.attrs[0]] if node.op == "index" else inner.reshape(node.shape)
    return None
