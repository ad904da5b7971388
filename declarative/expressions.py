"""The problem DSL: variables, parameters, constants, expressions and atoms.

An :class:`Expression` is a thin, operator-overloading wrapper around a node of the
compiler's tensor graph (:mod:`compiler.ir`); every expression is a whole scalar,
vector or matrix. Arithmetic follows numpy for shapes, with two deliberate limits:
``*`` and ``/`` are elementwise (use ``@`` for matrix products), and broadcasting only
fills in missing leading dimensions (a scalar with anything, a vector with the rows of a
matrix).
"""
from __future__ import annotations

import itertools
import numbers
from typing import Optional, Tuple

import numpy as np
import sympy

from compiler import ir
from compiler.atoms import ELEMENTWISE_ATOMS, ElementwiseAtom, power_atom

__all__ = [
    "Expression", "CompoundExpression", "Variable", "Parameter", "Constant", "as_expression",
    "sum", "quad_form", "sum_squares", "exp", "log", "entropy", "square", "power",
    "sqrt", "softplus", "sigmoid", "abs", "pos", "maximum", "norm1", "norm_inf",
]

_ids = itertools.count()


def _shape_of(shape) -> Tuple[int, ...]:
    if shape is None:
        return ()
    if isinstance(shape, numbers.Integral):
        shape = (int(shape),)
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a tuple of ints, got {shape!r}") from None
    if len(shape) > 2:
        raise ValueError(f"shape {shape}: only scalars, vectors and matrices are supported")
    if any(d <= 0 for d in shape):
        raise ValueError(f"shape {shape}: dimensions must be positive")
    return shape


class Expression:
    """A scalar, vector or matrix expression of variables, parameters and constants."""

    __array_ufunc__ = None  # make numpy defer to our reflected operators
    __array_priority__ = 100

    def __init__(self, node: ir.Node, leaves: Optional[dict] = None):
        self.node = node
        # input node name -> the Variable/Parameter owning it, so a Problem can list
        # the DSL objects it uses
        self.leaves = leaves if leaves is not None else {}

    # ---- shape -------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, ...]:
        return self.node.shape

    @property
    def ndim(self) -> int:
        return self.node.ndim

    @property
    def size(self) -> int:
        return self.node.size

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of a scalar expression")
        return self.shape[0]

    def __iter__(self):
        raise TypeError("expressions are not iterable; index them or use dl.sum")

    def __bool__(self):
        raise TypeError(
            "an expression has no truth value; use <=, >= and == only to build constraints"
        )

    def __repr__(self):
        return f"{type(self).__name__}(shape={self.shape})"

    def __str__(self):
        from compiler.printing import math_string

        return math_string(self.node)

    # ---- arithmetic --------------------------------------------------------------
    def _binary(self, other, build, name, reflected=False):
        other = as_expression(other)
        a, b = (other, self) if reflected else (self, other)
        try:
            return _derived(build(a.node, b.node), a, b)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None

    def __add__(self, other):
        return self._binary(other, ir.add, "+")

    def __radd__(self, other):
        return self._binary(other, ir.add, "+", reflected=True)

    def __sub__(self, other):
        return self._binary(other, ir.sub, "-")

    def __rsub__(self, other):
        return self._binary(other, ir.sub, "-", reflected=True)

    def __mul__(self, other):
        return self._binary(other, ir.mul, "*")

    def __rmul__(self, other):
        return self._binary(other, ir.mul, "*", reflected=True)

    def __truediv__(self, other):
        return self._binary(other, ir.div, "/")

    def __rtruediv__(self, other):
        return self._binary(other, ir.div, "/", reflected=True)

    def __matmul__(self, other):
        return self._binary(other, ir.matmul, "@")

    def __rmatmul__(self, other):
        return self._binary(other, ir.matmul, "@", reflected=True)

    def __neg__(self):
        return _derived(ir.neg(self.node), self)

    def __pos__(self):
        return self

    def __pow__(self, k):
        return power(self, k)

    def __getitem__(self, key):
        try:
            return _derived(ir.index(self.node, key), self)
        except (IndexError, TypeError) as err:
            raise type(err)(f"indexing an expression of shape {self.shape}: {err}") from None

    @property
    def T(self):
        return _derived(ir.transpose(self.node), self)

    # ---- constraints -------------------------------------------------------------
    def __le__(self, other):
        from .problem import Constraint

        return Constraint(self, "<=", as_expression(other))

    def __ge__(self, other):
        from .problem import Constraint

        return Constraint(self, ">=", as_expression(other))

    def __eq__(self, other):
        from .problem import Constraint

        return Constraint(self, "==", as_expression(other))

    __hash__ = object.__hash__


class CompoundExpression(Expression):
    """The result of an operation or atom.

    A sibling of Variable and Parameter rather than their base class: Python gives the
    reflected comparison of a subclass priority, so ``G @ x <= h`` would otherwise be
    built as ``h >= G @ x`` and lose the reading order the layer's arguments follow."""


class Variable(Expression):
    """An optimization variable of the given shape (``()``, ``n`` or ``(m, n)``)."""

    def __init__(self, shape=(), name: Optional[str] = None):
        shape = _shape_of(shape)
        self.name = name if name is not None else f"var{next(_ids)}"
        _check_name(self.name)
        size = int(np.prod(shape, dtype=np.int64))
        # Variables are flat vectors inside the compiler; the user sees a reshape.
        self.flat = ir.input_node(f"{self.name}#{next(_ids)}", (size,), "variable")
        super().__init__(ir.reshape(self.flat, shape), {self.flat.attrs[0]: self})

    def __repr__(self):
        return f"Variable({self.shape}, name={self.name!r})"


class Parameter(Expression):
    """A problem parameter; its value is a layer input (optionally batched).

    ``nonneg=True`` declares its entries >= 0: the compiler may then take it as a
    nonnegative factor where a sign matters (``lam * norm1(x)``, a lasso weight, whose
    epigraph rewrite is refused for a parameter of unknown sign), and the layer raises
    on a negative value."""

    def __init__(self, shape=(), name: Optional[str] = None, *, nonneg: bool = False):
        shape = _shape_of(shape)
        self.name = name if name is not None else f"param{next(_ids)}"
        _check_name(self.name)
        self.nonneg = bool(nonneg)
        role = "nonneg parameter" if self.nonneg else "parameter"
        node = ir.input_node(f"{self.name}#{next(_ids)}", shape, role)
        super().__init__(node, {node.attrs[0]: self})

    def __repr__(self):
        return f"Parameter({self.shape}, name={self.name!r}{', nonneg=True' if self.nonneg else ''})"


class Constant(Expression):
    """A fixed numeric value (numbers, numpy arrays, torch tensors are converted)."""

    def __init__(self, value):
        try:
            import torch

            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        arr = np.asarray(value)
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
            raise TypeError(f"cannot use a {type(value).__name__} as a constant")
        if np.iscomplexobj(arr):
            raise TypeError("complex constants are not supported")
        _shape_of(arr.shape)
        super().__init__(ir.const(arr.astype(np.float64)))


def _check_name(name):
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name {name!r} must be a valid Python identifier")


def _derived(node: ir.Node, *sources: Expression) -> Expression:
    leaves = {}
    for src in sources:
        leaves.update(src.leaves)
    return CompoundExpression(node, leaves)


def as_expression(value) -> Expression:
    if isinstance(value, Expression):
        return value
    return Constant(value)


# ------------------------------------------------------------------------------------
# atoms
# ------------------------------------------------------------------------------------

def _apply(atom: ElementwiseAtom, x) -> Expression:
    x = as_expression(x)
    return _derived(ir.elementwise(sympy.Lambda((_U,), atom.definition(_U)), (x.node,)), x)


_U = ir._SYMS[0]


def sum(x, axis: Optional[int] = None) -> Expression:  # noqa: A001 - mirrors numpy
    """Sum of all entries, or along ``axis``."""
    x = as_expression(x)
    return _derived(ir.total(x.node, axis), x)


def quad_form(x, P) -> Expression:
    """x' P x for a vector x and a square matrix P (P need not be symmetric)."""
    x, P = as_expression(x), as_expression(P)
    if x.ndim != 1 or P.ndim != 2 or P.shape != (x.shape[0], x.shape[0]):
        raise ValueError(f"quad_form(x, P) needs x of shape (n,) and P of shape (n, n); got {x.shape} and {P.shape}")
    return _derived(ir.einsum("i,ij,j->", x.node, P.node, x.node), x, P)


def sum_squares(x) -> Expression:
    """Sum of the squared entries."""
    x = as_expression(x)
    return _derived(ir.dot(x.node, x.node), x)


def exp(x) -> Expression:
    """Elementwise exp(x)."""
    return _apply(ELEMENTWISE_ATOMS["exp"], x)


def log(x) -> Expression:
    """Elementwise log(x); needs x > 0 (the solver keeps iterates inside)."""
    return _apply(ELEMENTWISE_ATOMS["log"], x)


def entropy(x) -> Expression:
    """Elementwise -x log x (concave; x > 0)."""
    return _apply(ELEMENTWISE_ATOMS["entropy"], x)


def square(x) -> Expression:
    """Elementwise x**2."""
    return _apply(ELEMENTWISE_ATOMS["square"], x)


def sqrt(x) -> Expression:
    """Elementwise sqrt(x); needs x > 0."""
    return _apply(ELEMENTWISE_ATOMS["sqrt"], x)


def softplus(x) -> Expression:
    """Elementwise log(1 + exp(x))."""
    return _apply(ELEMENTWISE_ATOMS["softplus"], x)


def sigmoid(x) -> Expression:
    """Elementwise 1 / (1 + exp(-x))."""
    return _apply(ELEMENTWISE_ATOMS["sigmoid"], x)


def power(x, k) -> Expression:
    """Elementwise x**k for a numeric exponent k (non-integer k needs x > 0)."""
    if not isinstance(k, numbers.Real) or isinstance(k, bool):
        raise TypeError(f"power: the exponent must be a number, got {type(k).__name__}")
    return _apply(power_atom(float(k)), x)


# nonsmooth atoms: kept as sympy Abs/Max until the canonicalizer rewrites them

def abs(x) -> Expression:  # noqa: A001 - mirrors numpy
    """Elementwise ``|x|`` (nonsmooth: rewritten in epigraph form)."""
    x = as_expression(x)
    return _derived(ir.elementwise(sympy.Lambda((_U,), sympy.Abs(_U)), (x.node,)), x)


def pos(x) -> Expression:
    """Elementwise max(x, 0) (nonsmooth: rewritten in epigraph form)."""
    x = as_expression(x)
    return _derived(ir.elementwise(sympy.Lambda((_U,), sympy.Max(_U, 0)), (x.node,)), x)


def maximum(*args) -> Expression:
    """Elementwise maximum of several expressions (nonsmooth: epigraph form)."""
    if len(args) < 2:
        raise ValueError("maximum needs at least two arguments")
    if len(args) > len(ir._SYMS):
        raise ValueError(f"maximum takes at most {len(ir._SYMS)} arguments")
    exprs = [as_expression(a) for a in args]
    syms = ir._SYMS[: len(exprs)]
    try:
        node = ir.elementwise(sympy.Lambda(tuple(syms), sympy.Max(*syms)), [e.node for e in exprs])
    except ValueError as err:
        raise ValueError(f"maximum: {err}") from None
    return _derived(node, *exprs)


def norm1(x) -> Expression:
    """Sum of absolute values (nonsmooth: epigraph form)."""
    x = as_expression(x)
    return _derived(ir.nonsmooth_reduce("norm1", x.node), x)


def norm_inf(x) -> Expression:
    """Largest absolute value (nonsmooth: epigraph form)."""
    x = as_expression(x)
    return _derived(ir.nonsmooth_reduce("norm_inf", x.node), x)
