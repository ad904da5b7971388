"""A small tensor-level expression graph: what the DSL builds and what the compiler derives.

Every node is a whole tensor (scalar, vector or matrix), never one entry, so the size of
the graph, of its derivatives and of the generated code does not depend on the problem
dimensions. Shapes exclude the batch dimension: at run time every tensor carries one
leading batch dimension (of size B, or 1 when shared).

Node kinds (``Node.op``):

``input``       a named variable, parameter, dual or seed vector (attrs: name, role)
``const``       a numeric constant (attrs: a read-only numpy array)
``zeros``       all zeros of the node's shape
``eye``         the identity matrix of size ``shape[0]``
``einsum``      ``torch.einsum`` over the arguments (attrs: the spec, no batch letters)
``elementwise`` a scalar sympy function applied entrywise with scalar broadcasting
                (attrs: the sympy ``Lambda``); the function may be nonsmooth (abs,
                max) only before canonicalization
``index``       basic indexing (attrs: one ``slice`` or ``int`` per dimension)
``scatter``     the adjoint of ``index``: zeros with the argument placed at the index
``reshape``     row-major reshape (attrs: the new shape)
``concat``      concatenation of vectors
``reduce``      a nonsmooth reduction the compiler must rewrite (attrs: 'norm1' | 'norm_inf')

Nodes are immutable and compare structurally, so equal subexpressions are computed once
by the code generator. Constructors (``add``, ``mul``, ``einsum`` ...) simplify as they
build: zeros vanish, identities are contracted away and constants fold.
"""
from __future__ import annotations

import functools
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import sympy

Shape = Tuple[int, ...]

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Node:
    __slots__ = ("op", "args", "attrs", "shape", "_hash", "_free")

    def __init__(self, op: str, args: Sequence["Node"], attrs, shape: Shape):
        self.op = op
        self.args = tuple(args)
        self.attrs = attrs
        self.shape = tuple(int(d) for d in shape)
        self._hash = hash((op, self.args, _attrs_key(op, attrs), self.shape))
        if op == "input":
            self._free = frozenset([attrs[0]])
        else:
            self._free = frozenset().union(*(a._free for a in self.args)) if self.args else frozenset()

    def __reduce__(self):
        # rebuild through __init__: the cached hash depends on the process's string
        # hashing and must not travel in a pickle
        return (Node, (self.op, self.args, self.attrs, self.shape))

    # structural identity ------------------------------------------------------------
    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        if self is other:
            return True
        if not isinstance(other, Node) or self._hash != other._hash:
            return False
        return (
            self.op == other.op
            and self.shape == other.shape
            and _attrs_key(self.op, self.attrs) == _attrs_key(other.op, other.attrs)
            and self.args == other.args
        )

    @property
    def free(self) -> frozenset:
        """Names of the ``input`` nodes this node depends on."""
        return self._free

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __repr__(self):
        return f"Node({self.op}, shape={self.shape})"


def _attrs_key(op, attrs):
    if op == "const":
        return (attrs.shape, attrs.tobytes())
    if op == "index" or op == "scatter":
        return tuple(_index_key(i) for i in attrs[0]) + tuple(attrs[1:])
    return attrs


def _index_key(i):
    return ("s", i.start, i.stop, i.step) if isinstance(i, slice) else ("i", i)


# ------------------------------------------------------------------------------------
# leaves
# ------------------------------------------------------------------------------------

def input_node(name: str, shape: Shape, role: str) -> Node:
    """A named input; ``role`` is one of 'variable', 'parameter', 'nonneg parameter',
    'dual', 'seed'."""
    return Node("input", (), (name, role), shape)


def const(value) -> Node:
    arr = np.array(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("constants must be finite; got a NaN or inf entry")
    if arr.size > 0 and not np.any(arr):
        return zeros(arr.shape)
    arr.setflags(write=False)
    return Node("const", (), arr, arr.shape)


def zeros(shape: Shape) -> Node:
    return Node("zeros", (), None, shape)


def eye(n: int) -> Node:
    return Node("eye", (), None, (n, n))


def is_zero(node: Node) -> bool:
    return node.op == "zeros"


def is_scalar_const(node: Node, value: Optional[float] = None) -> bool:
    if node.op == "zeros" and node.shape == ():
        return value is None or value == 0.0
    if node.op != "const" or node.shape != ():
        return False
    return value is None or float(node.attrs) == value


def const_value(node: Node) -> np.ndarray:
    """Numeric value of a node without inputs (constant folding)."""
    if node.op == "const":
        return node.attrs
    if node.op == "zeros":
        return np.zeros(node.shape)
    if node.op == "eye":
        return np.eye(node.shape[0])
    raise TypeError(f"{node.op} node is not a constant")


# ------------------------------------------------------------------------------------
# elementwise
# ------------------------------------------------------------------------------------

_SYMS = sympy.symbols("u0:8", real=True)
_NONSMOOTH = (sympy.Abs, sympy.Max, sympy.Min, sympy.sign, sympy.Heaviside)


def broadcast_shape(shapes: Iterable[Shape]) -> Shape:
    """numpy broadcasting restricted to missing leading dimensions: every shape must be
    a suffix of the common shape, e.g. () and (n,) and (m, n)."""
    out: Shape = ()
    for s in shapes:
        if len(s) > len(out):
            s, out = out, s
        if s != out[len(out) - len(s):]:
            raise ValueError(f"shapes {out} and {s} do not broadcast (only missing leading dimensions do)")
    return out


def elementwise(fn: sympy.Lambda, args: Sequence[Node], shape: Shape = ()) -> Node:
    """Apply the scalar function ``fn`` (a sympy Lambda of len(args) symbols) entrywise,
    broadcast to ``shape`` as well (a node rebuilt keeps the shape it had)."""
    args = tuple(args)
    shape = broadcast_shape([a.shape for a in args] + [tuple(shape)])
    fn, args = _compose_unary(fn, args)
    expr = fn.expr
    # Constant-valued arguments that are scalars are substituted into the formula so
    # sympy can simplify, e.g. 0.5*u or u**2. So are constants with one value in every
    # entry (the ones and minus ones that sums and signs leave, e.g. in the gradient of
    # sum(entr(x))) where an argument that is not constant has the node's whole shape:
    # the node keeps its shape, and the generated code loses a product by a constant.
    carried = any(a.shape == shape and a.op not in ("const", "zeros", "eye") for a in args)
    keep, subs = [], {}
    for sym, a in zip(fn.variables, args):
        if a.op in ("const", "zeros") and (a.shape == () or (carried and _uniform(a))):
            subs[sym] = _number(a)
        else:
            keep.append((sym, a))
    if subs:
        expr = expr.xreplace(subs)
    free = expr.free_symbols
    keep = [(s, a) for s, a in keep if s in free]
    if not keep:
        value = float(expr) if expr.is_number else None
        if value is None:
            raise ValueError(f"cannot evaluate constant expression {expr}")
        return _full(shape, value)
    if all(a.op in ("const", "zeros") for _, a in keep):
        f = sympy.lambdify([s for s, _ in keep], expr, modules=[_NUMPY_FUNCTIONS, "numpy"])
        value = np.broadcast_to(np.asarray(f(*[const_value(a) for _, a in keep]), dtype=np.float64), shape)
        return const(value)
    # zeros that remain symbolic (non-scalar): substitute 0 and retry (the node keeps its
    # shape, which may then be larger than its arguments': t + zeros(3) is t, of shape (3,),
    # broadcast by whatever uses it)
    zero_syms = {s: 0 for s, a in keep if a.op == "zeros"}
    if zero_syms:
        expr = expr.xreplace(zero_syms)
        keep = [(s, a) for s, a in keep if s not in zero_syms and s in expr.free_symbols]
        if not keep:
            return _full(shape, float(expr))
    if len(keep) == 1 and expr == keep[0][0] and keep[0][1].shape == shape:
        return keep[0][1]
    # canonical symbol names keep structurally equal nodes equal
    syms = _SYMS[: len(keep)]
    expr = expr.xreplace({s: t for (s, _), t in zip(keep, syms)})
    return Node("elementwise", [a for _, a in keep], sympy.Lambda(tuple(syms), expr), shape)


def _uniform(node: Node) -> bool:
    """A constant or zeros node with the same value in every entry."""
    if node.op == "zeros":
        return True
    flat = node.attrs.reshape(-1)
    return flat.size > 0 and bool(np.all(flat == flat[0]))


def _number(node: Node) -> sympy.Expr:
    """The one value of a uniform constant, as sympy should see it: whole numbers as
    integers, so that -1 * -(u) simplifies to u rather than 1.0*u."""
    value = float(const_value(node).reshape(-1)[0]) if node.size else 0.0
    return sympy.Integer(int(value)) if value.is_integer() and abs(value) < 2 ** 53 else sympy.Float(value)


# elementwise meanings for lambdify (its default maps Max to a reduction)
_NUMPY_FUNCTIONS = {
    "Max": lambda *a: functools.reduce(np.maximum, a),
    "Min": lambda *a: functools.reduce(np.minimum, a),
    "softplus": lambda u: np.logaddexp(0.0, u),
    "sigmoid": lambda u: 0.5 * (1.0 + np.tanh(0.5 * u)),
}


def _compose_unary(fn: sympy.Lambda, args):
    """Inline unary elementwise arguments (negations, scalings, ...) and merge repeated
    arguments, so that e.g. -(-h) is h and x*x is x**2."""
    from .atoms import domain_symbols

    if not any(a.op == "elementwise" and len(a.args) == 1 for a in args) and len(set(args)) == len(args):
        return fn, args
    # nonsmooth atoms must stay separate nodes: canonicalization rewrites them one by one
    if fn.expr.has(*_NONSMOOTH):
        return fn, args
    expr = fn.expr
    new_args: List[Node] = []
    symbol_of: Dict[Node, sympy.Symbol] = {}
    fresh = iter(sympy.symbols("w0:16", real=True))
    subs = {}
    needed = set()  # (the symbols of inlined arguments that need a positive value)
    for sym, a in zip(fn.variables, args):
        inner = a.attrs if a.op == "elementwise" and len(a.args) == 1 and not a.attrs.expr.has(*_NONSMOOTH) else None
        target = a.args[0] if inner is not None else a
        if target not in symbol_of:
            symbol_of[target] = next(fresh)
            new_args.append(target)
        t = symbol_of[target]
        if inner is not None and domain_symbols(inner.expr):
            needed.add(t)
        subs[sym] = inner.expr.xreplace({inner.variables[0]: t}) if inner is not None else t
    expr = expr.xreplace(subs)
    # sympy folds exp(log(t)) and sqrt(t)**2 to t as they meet: an inlined argument that
    # needed t > 0 would lose that domain (x came out negative where the problem read
    # sum(exp(log(x)))), so such compositions keep their nodes apart
    if needed - domain_symbols(expr):
        return fn, args
    syms = tuple(symbol_of[a] for a in new_args)
    return sympy.Lambda(syms, expr), tuple(new_args)


def _full(shape: Shape, value: float) -> Node:
    return zeros(shape) if value == 0.0 else const(np.full(shape, value))


def lam(n: int, expr_fn) -> sympy.Lambda:
    syms = _SYMS[:n]
    return sympy.Lambda(tuple(syms), expr_fn(*syms))


_ADD = lam(2, lambda a, b: a + b)
_SUB = lam(2, lambda a, b: a - b)
_MUL = lam(2, lambda a, b: a * b)
_DIV = lam(2, lambda a, b: a / b)
_NEG = lam(1, lambda a: -a)


def add(a: Node, b: Node) -> Node:
    if is_zero(a) and broadcast_shape([a.shape, b.shape]) == b.shape:
        return b
    if is_zero(b) and broadcast_shape([a.shape, b.shape]) == a.shape:
        return a
    return elementwise(_ADD, (a, b))


def sub(a: Node, b: Node) -> Node:
    if is_zero(b) and broadcast_shape([a.shape, b.shape]) == a.shape:
        return a
    return elementwise(_SUB, (a, b))


def mul(a: Node, b: Node) -> Node:
    shape = broadcast_shape([a.shape, b.shape])
    if is_zero(a) or is_zero(b):
        return zeros(shape)
    if is_scalar_const(a, 1.0) and b.shape == shape:
        return b
    if is_scalar_const(b, 1.0) and a.shape == shape:
        return a
    return elementwise(_MUL, (a, b))


def div(a: Node, b: Node) -> Node:
    # (sympy folds a division by a constant zero to complex infinity, which failed far
    # from here: "Cannot convert complex to float")
    if is_zero(b) or (b.op == "const" and not np.all(const_value(b))):
        raise ValueError("division by zero: the divisor is a constant with a zero entry")
    return elementwise(_DIV, (a, b))


def neg(a: Node) -> Node:
    return elementwise(_NEG, (a,))


def add_all(terms: Sequence[Node], shape: Shape) -> Node:
    out = zeros(shape)
    for t in terms:
        out = add(out, t)
    return out


# ------------------------------------------------------------------------------------
# einsum
# ------------------------------------------------------------------------------------

def einsum(spec: str, *args: Node) -> Node:
    """``torch.einsum(spec, *args)`` without batch letters; simplifies as it builds."""
    ins, out = spec.split("->")
    ins = ins.split(",")
    if len(ins) != len(args):
        raise ValueError(f"einsum spec {spec!r} needs {len(ins)} operands, got {len(args)}")
    sizes: Dict[str, int] = {}
    for sub_, a in zip(ins, args):
        if len(sub_) != a.ndim:
            raise ValueError(f"einsum spec {spec!r}: operand {sub_!r} has shape {a.shape}")
        for ch, d in zip(sub_, a.shape):
            if sizes.setdefault(ch, d) != d:
                raise ValueError(f"einsum spec {spec!r}: index {ch} is {sizes[ch]} and {d}")
    shape = tuple(sizes[ch] for ch in out)
    if any(is_zero(a) for a in args):
        return zeros(shape)
    ins, args = list(ins), list(args)
    # c * X as an operand: contract X and scale the result (keeps identities contractible)
    for k, a in enumerate(args):
        if a.op == "elementwise" and len(a.args) == 1 and a.args[0].shape == a.shape:
            coeff, rest = a.attrs.expr.as_coeff_Mul()
            if rest == a.attrs.variables[0] and coeff != 1:
                args[k] = a.args[0]
                return mul(const(float(coeff)), einsum(spec, *args))

    # fold transposes and nested einsums whose operands are single (cheap and readable)
    changed = True
    while changed:
        changed = False
        for k, a in enumerate(args):
            if a.op == "einsum" and len(a.args) == 1:
                (inner_in,), inner_out = _split(a.attrs)
                mapping = dict(zip(inner_out, ins[k]))
                extra = [c for c in inner_in if c not in mapping]
                fresh = _fresh(set("".join(ins)) | set(out), len(set(extra)))
                for c, f in zip(dict.fromkeys(extra), fresh):
                    mapping[c] = f
                ins[k] = "".join(mapping[c] for c in inner_in)
                args[k] = a.args[0]
                changed = True
    # contract identity matrices away: eye_ab * X_..b.. -> X_..a..
    changed = True
    while changed:
        changed = False
        for k, a in enumerate(args):
            if a.op != "eye" or len(args) == 1:
                continue
            i, j = ins[k]
            if i == j:
                continue
            others = "".join(s for t, s in enumerate(ins) if t != k)
            if j in out and i in out:
                continue
            keep, drop = (i, j) if j not in out else (j, i)
            if drop not in others:
                continue
            new_ins = [s.replace(drop, keep) for t, s in enumerate(ins) if t != k]
            if any(len(set(s)) != len(s) for s in new_ins):
                continue  # would need a diagonal; keep the identity
            del args[k]
            ins = new_ins
            out = out.replace(drop, keep)
            changed = True
            break
    # constants fold
    if all(a.op in ("const", "zeros", "eye") for a in args):
        value = np.einsum(",".join(ins) + "->" + out, *[const_value(a) for a in args])
        return const(value)
    spec = ",".join(ins) + "->" + out
    # identity permutation of a single operand
    if len(args) == 1 and ins[0] == out:
        return args[0]
    # scalar constant factors become an elementwise product (more readable, same cost)
    scalars = [k for k, a in enumerate(args) if a.ndim == 0 and a.op == "const"]
    if scalars and len(args) > 1:
        factor = args[scalars[0]]
        rest_ins = [s for t, s in enumerate(ins) if t != scalars[0]]
        rest = [a for t, a in enumerate(args) if t != scalars[0]]
        return mul(factor, einsum(",".join(rest_ins) + "->" + out, *rest))
    # a constant with one value c in every entry (the ones of a sum, e.g. Jh = 1' of a
    # simplex row): c times the einsum of the others, times the sizes of the indices only
    # it had and that are summed over; indices only it had that stay in the output must
    # lead it, and the rest is broadcast over them (an elementwise node, which the code
    # generator inlines into its consumers)
    for k, a in enumerate(args):
        if a.op != "const" or len(args) == 1 or not _uniform(a):
            continue
        rest_ins, rest = ins[:k] + ins[k + 1:], args[:k] + args[k + 1:]
        only = [ch for ch in ins[k] if ch not in "".join(rest_ins)]
        kept = [ch for ch in out if ch in only]
        if out[:len(kept)] != "".join(kept):
            continue
        factor = float(const_value(a).reshape(-1)[0])
        for ch in only:
            if ch not in out:
                factor *= sizes[ch]
        inner = mul(const(factor), einsum(",".join(rest_ins) + "->" + out[len(kept):], *rest))
        if not kept:
            return inner
        return elementwise(_ADD, [inner, zeros(shape)])  # (zeros of the whole shape: a broadcast)
    for s in ins:
        if len(set(s)) != len(s):
            raise ValueError(f"einsum spec {spec!r}: repeated index within an operand")
    return Node("einsum", args, spec, shape)


def _split(spec: str):
    ins, out = spec.split("->")
    return ins.split(","), out


def _fresh(used: set, n: int) -> List[str]:
    out = [c for c in _LETTERS if c not in used][:n]
    if len(out) < n:
        raise ValueError("einsum ran out of index letters (tensor rank too large)")
    return out


def matmul(a: Node, b: Node) -> Node:
    if a.ndim == 0 or b.ndim == 0:
        return mul(a, b)
    specs = {
        (1, 1): "i,i->",
        (2, 1): "ij,j->i",
        (1, 2): "j,jk->k",
        (2, 2): "ij,jk->ik",
    }
    key = (a.ndim, b.ndim)
    if key not in specs:
        raise ValueError(f"@ supports vectors and matrices, got shapes {a.shape} and {b.shape}")
    inner_a = a.shape[-1]
    inner_b = b.shape[0]
    if inner_a != inner_b:
        raise ValueError(f"@ of shapes {a.shape} and {b.shape}: inner dimensions {inner_a} != {inner_b}")
    return einsum(specs[key], a, b)


def transpose(a: Node) -> Node:
    if a.ndim < 2:
        return a
    if a.ndim != 2:
        raise ValueError(f".T supports matrices, got shape {a.shape}")
    return einsum("ij->ji", a)


def total(a: Node, axis: Optional[int] = None) -> Node:
    if a.ndim == 0:
        return a
    letters = _LETTERS[: a.ndim]
    if axis is None:
        out = ""
    else:
        if not -a.ndim <= axis < a.ndim:
            raise ValueError(f"sum: axis {axis} out of range for shape {a.shape}")
        axis %= a.ndim
        out = letters[:axis] + letters[axis + 1 :]
    return einsum(f"{letters}->{out}", a)


def dot(a: Node, b: Node) -> Node:
    """Full contraction sum(a * b) of equal shapes."""
    if a.shape != b.shape:
        raise ValueError(f"dot of shapes {a.shape} and {b.shape}")
    if a.ndim == 0:
        return mul(a, b)
    letters = _LETTERS[: a.ndim]
    return einsum(f"{letters},{letters}->", a, b)


# ------------------------------------------------------------------------------------
# structure
# ------------------------------------------------------------------------------------

def normalize_index(key, shape: Shape):
    """Turn a Python index into one slice/int per dimension; returns (index, shape)."""
    if not isinstance(key, tuple):
        key = (key,)
    if sum(k is Ellipsis for k in key) > 1:
        raise IndexError("an index can only have a single ellipsis")
    if Ellipsis in key:
        pos = key.index(Ellipsis)
        key = key[:pos] + (slice(None),) * (len(shape) - len(key) + 1) + key[pos + 1 :]
    if len(key) > len(shape):
        raise IndexError(f"too many indices ({len(key)}) for shape {shape}")
    key = key + (slice(None),) * (len(shape) - len(key))
    index, out = [], []
    for k, d in zip(key, shape):
        if isinstance(k, (int, np.integer)):
            k = int(k)
            if not -d <= k < d:
                raise IndexError(f"index {k} out of range for dimension of size {d}")
            index.append(k % d)
        elif isinstance(k, slice):
            start, stop, step = k.indices(d)
            if step < 0:
                # torch slices only step forward, and the derivative pass scatters back
                # through the same slices: a reversed one would go wrong far from here
                raise IndexError(f"slice {k} steps backward: reversed slices are not supported")
            n = len(range(start, stop, step))
            if n == 0:
                raise IndexError(f"empty slice {k} of a dimension of size {d}")
            index.append(slice(start, stop, step))
            out.append(n)
        else:
            raise TypeError(f"indices must be ints or slices, got {type(k).__name__}")
    return tuple(index), tuple(out)


def index(a: Node, key) -> Node:
    idx, shape = normalize_index(key, a.shape)
    if all(isinstance(i, slice) and i == slice(0, d, 1) for i, d in zip(idx, a.shape)):
        return a
    if is_zero(a):
        return zeros(shape)
    if a.op == "const" or (a.op == "eye" and int(np.prod(shape, dtype=np.int64)) <= a.shape[0]):
        # (part of an identity folds where it is no larger than a vector: a unit vector
        # is data like any other, an (n, n) identity is not)
        return const(const_value(a)[idx])
    if a.op == "scatter" and a.attrs[0] == idx:
        return a.args[0]
    return Node("index", (a,), (idx,), shape)


def scatter(a: Node, idx, full_shape: Shape) -> Node:
    if is_zero(a):
        return zeros(full_shape)
    if all(isinstance(i, slice) and i == slice(0, d, 1) for i, d in zip(idx, full_shape)):
        return a
    return Node("scatter", (a,), (tuple(idx), tuple(full_shape)), full_shape)


def reshape(a: Node, shape: Shape) -> Node:
    shape = tuple(int(d) for d in shape)
    if int(np.prod(shape, dtype=np.int64)) != a.size:
        raise ValueError(f"cannot reshape {a.shape} to {shape}")
    if shape == a.shape:
        return a
    if is_zero(a):
        return zeros(shape)
    if a.op == "const" or (a.op == "eye" and a.size == 1):  # (the (1, 1) identity of one equality)
        return const(const_value(a).reshape(shape))
    if a.op == "reshape":
        return reshape(a.args[0], shape)
    return Node("reshape", (a,), shape, shape)


def flatten(a: Node) -> Node:
    return reshape(a, (a.size,))


def concat(parts: Sequence[Node]) -> Node:
    parts = [flatten(p) for p in parts]
    n = sum(p.size for p in parts)
    if len(parts) == 1:
        return parts[0]
    if all(is_zero(p) for p in parts):
        return zeros((n,))
    return Node("concat", parts, None, (n,))


def nonsmooth_reduce(kind: str, a: Node) -> Node:
    return Node("reduce", (a,), kind, ())


# ------------------------------------------------------------------------------------
# graph utilities
# ------------------------------------------------------------------------------------

def topological(outputs: Sequence[Node]) -> List[Node]:
    """All nodes reachable from ``outputs``, arguments before users (iterative DFS)."""
    order, seen = [], set()
    stack = [(o, False) for o in reversed(list(outputs))]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        for a in reversed(node.args):
            if a not in seen:
                stack.append((a, False))
    return order


def substitute(outputs: Sequence[Node], mapping: Dict[Node, Node]) -> List[Node]:
    """Rebuild ``outputs`` with nodes replaced per ``mapping`` (re-simplifying)."""
    memo: Dict[Node, Node] = dict(mapping)
    for node in topological(outputs):
        if node in memo:
            continue
        new_args = [memo[a] for a in node.args]
        memo[node] = node if all(x is y for x, y in zip(new_args, node.args)) else rebuild(node, new_args)
    return [memo[o] for o in outputs]


def rebuild(node: Node, args: Sequence[Node]) -> Node:
    op = node.op
    if op == "einsum":
        return einsum(node.attrs, *args)
    if op == "elementwise":
        # (its own shape too: one whose zeros folded away is larger than its arguments,
        # and rebuilt from them alone it shrank: t + zeros(3), with t substituted, came
        # back as a scalar under a sum over its 3 entries, and the QP's code generation
        # failed: "einsum spec 'a->': operand 'a' has shape ()")
        return elementwise(node.attrs, args, node.shape)
    if op == "index":
        return index(args[0], node.attrs[0])
    if op == "scatter":
        return scatter(args[0], node.attrs[0], node.attrs[1])
    if op == "reshape":
        return reshape(args[0], node.attrs)
    if op == "concat":
        return concat(args)
    if op == "reduce":
        return nonsmooth_reduce(node.attrs, args[0])
    return node


def inputs_of(outputs: Sequence[Node]) -> List[Node]:
    return [n for n in topological(outputs) if n.op == "input"]
