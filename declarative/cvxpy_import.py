"""CVXPY in, declarative layer out.

``dl.from_cvxpy(problem)`` rebuilds a ``cvxpy.Problem`` in the DSL. Variables and
parameters keep their names, and the result's ``to_torch(parameters=[...],
variables=[...])`` takes the *cvxpy* objects in those lists and returns a layer with
``CvxpyLayer``'s call convention (always a tuple of solutions; any parameter may carry a
leading batch dimension), so it is a drop-in replacement::

    layer = CvxpyLayer(problem, parameters=[A, b], variables=[x])              # before
    layer = dl.from_cvxpy(problem).to_torch(parameters=[A, b], variables=[x])  # after
    (x_star,) = layer(A_t, b_t)

Unlike CVXPY's DPP rules, parameters may appear anywhere (also nonlinearly); the
problem only has to be smooth after the DSL's canonicalization. cvxpy is imported
lazily: it is only needed to call :func:`from_cvxpy`.

What is translated (cvxpy expression class -> DSL):

* leaves: ``Variable`` (attributes ``nonneg``/``nonpos``/``pos``/``neg`` and numeric
  ``bounds`` become constraints), ``Parameter``, ``Constant``; any subtree without
  variables and parameters is evaluated once and becomes a constant;
* affine: ``AddExpression``, ``NegExpression``, ``MulExpression`` (``@``), ``multiply``,
  ``DivExpression`` (denominator free of variables), ``Promote``, ``index`` and
  ``special_index`` (basic indexing directly, fancy/boolean/reversed indexing through a
  constant selection matrix), ``transpose``, ``Sum`` (with ``axis``/``keepdims``),
  ``reshape``/``vec`` (both orders), ``Hstack``, ``Vstack``, ``Trace``;
* smooth: ``QuadForm`` (also of ``psd_wrap``), ``quad_over_lin`` (``sum_squares``; the
  denominator free of variables), ``power``/``Power``/``PowerApprox`` (``square``,
  ``sqrt``, ``inv_pos``; numeric exponents), ``exp``, ``log``, ``log1p``, ``entr``,
  ``logistic``;
* nonsmooth (epigraph form): ``abs``, ``maximum`` (``pos``), ``minimum`` (``neg``),
  ``norm1`` and ``norm_inf`` of a whole expression (``pnorm``/``norm`` with p = 1 or inf);
* constraints ``Inequality`` (``<=``, ``>=``), ``Equality``, ``Zero``, ``NonPos``,
  ``NonNeg``; objectives ``Minimize`` and ``Maximize``.

Anything else raises a ``TypeError`` naming the cvxpy class.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from compiler import ir

from . import expressions as ex
from .problem import Constraint, Maximize, Minimize, Problem

__all__ = ["from_cvxpy", "CvxpyProblem", "CvxpyCompatLayer"]


class _Unsupported(TypeError):
    pass


def _reshape(a: ex.Expression, shape) -> ex.Expression:
    """Row-major (C order) reshape of a DSL expression."""
    return ex._derived(ir.reshape(a.node, tuple(int(d) for d in shape)), a)


def _flatten(a: ex.Expression) -> ex.Expression:
    return _reshape(a, (a.size,))


def _concat(parts: List[ex.Expression]) -> ex.Expression:
    """Row-major concatenation of the flattened parts: a vector."""
    return ex._derived(ir.concat([p.node for p in parts]), *parts)


def _has_variables(e) -> bool:
    return bool(e.variables())


# ------------------------------------------------------------------------------------
# atoms: each rule gets the cvxpy expression, its translated arguments and the
# translator (for atoms that add domain constraints)
# ------------------------------------------------------------------------------------

def _add(e, args, tr):
    out = args[0]
    for a in args[1:]:
        out = out + a
    return out


def _matmul(e, args, tr):
    return args[0] @ args[1]


def _multiply(e, args, tr):
    return args[0] * args[1]


def _divide(e, args, tr):
    if _has_variables(e.args[1]):
        raise _Unsupported("from_cvxpy: division by an expression with variables is not supported")
    return args[0] / args[1]


def _is_basic_key(key) -> bool:
    """ints, Ellipsis and slices with a positive step: what the DSL indexes directly
    (torch slicing has no negative steps)."""
    items = key if isinstance(key, tuple) else (key,)
    for k in items:
        if k is Ellipsis or (isinstance(k, (numbers.Integral, np.integer)) and not isinstance(k, bool)):
            continue
        if isinstance(k, slice) and (k.step is None or int(k.step) > 0):
            continue
        return False
    return True


def _select(a: ex.Expression, key, shape) -> ex.Expression:
    """Any numpy index (integer arrays, masks, negative steps) as a constant 0/1
    selection matrix applied to the flattened argument."""
    positions = np.arange(max(a.size, 1)).reshape(a.shape)[key]
    positions = np.asarray(positions).reshape(-1)
    if positions.size == 0:
        raise _Unsupported("from_cvxpy: an index that selects no entries is not supported")
    S = np.zeros((positions.size, a.size))
    S[np.arange(positions.size), positions] = 1.0
    flat = a if a.ndim == 1 else _flatten(a)
    return _reshape(ex.Constant(S) @ flat, shape)


def _index(e, args, tr):
    (a,) = args
    kind = type(e).__name__
    # 'index' stores cvxpy's normalized key first and the user's key second; the
    # user's key has plain numpy semantics, the normalized one does not (negative steps)
    data = e.get_data()
    key = data[1] if kind == "index" and len(data) > 1 else data[0]
    if isinstance(key, list):
        key = np.asarray(key)
    if _is_basic_key(key):
        out = a[key]
        return out if out.shape == tuple(e.shape) else _reshape(out, e.shape)
    return _select(a, key, e.shape)


def _transpose(e, args, tr):
    axes = e.get_data()[0] if e.get_data() else None
    if axes is not None and tuple(axes) != tuple(reversed(range(len(e.args[0].shape)))):
        raise _Unsupported(f"from_cvxpy: transpose with axes {axes} is not supported")
    return args[0].T


def _sum(e, args, tr):
    data = e.get_data()
    axis = data[0] if data else None
    if isinstance(axis, (tuple, list)):
        if len(axis) != 1:
            raise _Unsupported("from_cvxpy: a sum over several axes is not supported")
        axis = axis[0]
    out = ex.sum(args[0], axis=None if axis is None else int(axis))
    # keepdims=True only adds unit dimensions
    return out if out.shape == tuple(e.shape) else _reshape(out, e.shape)


def _promote(e, args, tr):
    # kept a scalar: the DSL broadcasts it where cvxpy needed the Promote; parents that
    # do not broadcast get it materialized (see _Translator.__call__)
    (a,) = args
    if a.size != 1:
        raise _Unsupported(f"from_cvxpy: cannot promote shape {a.shape} to {tuple(e.shape)}")
    return a if a.shape == () else _reshape(a, ())


def _cvx_reshape(e, args, tr):
    (a,) = args
    data = e.get_data()
    order = data[1] if len(data) > 1 else "F"
    shape = tuple(e.shape)
    if order == "C" or (a.ndim <= 1 and len(shape) <= 1):
        return _reshape(a, shape)
    # column-major reshape = transpose, row-major reshape to the reversed shape, transpose
    return _reshape(a.T, tuple(reversed(shape))).T


def _hstack(e, args, tr):
    if all(a.ndim <= 1 for a in args):
        return _concat(args)
    if all(a.ndim == 2 for a in args):  # columns side by side: vstack of the transposes
        return _reshape(_concat([a.T for a in args]), tuple(reversed(e.shape))).T
    raise _Unsupported("from_cvxpy: hstack of mixed vectors and matrices is not supported")


def _vstack(e, args, tr):
    if all(a.ndim == 1 for a in args) or all(a.ndim == 2 for a in args):
        return _reshape(_concat(args), e.shape)
    raise _Unsupported("from_cvxpy: vstack of mixed vectors and matrices is not supported")


def _trace(e, args, tr):
    (a,) = args
    return ex.sum(a * ex.Constant(np.eye(a.shape[0])))


def _quad_form(e, args, tr):
    x, P = args
    if x.ndim == 0:
        return x * P[0, 0] * x if P.ndim == 2 else x * P * x
    return ex.quad_form(x, P)


def _quad_over_lin(e, args, tr):
    data = e.get_data()
    if data and data[0] is not None:
        raise _Unsupported("from_cvxpy: quad_over_lin with an axis is not supported")
    if _has_variables(e.args[1]):
        raise _Unsupported(
            "from_cvxpy: quad_over_lin(x, y) with a variable y is not supported "
            "(only a constant or parameter denominator)"
        )
    x, y = args
    ss = ex.sum_squares(x)
    if y.node.op == "const" and float(ir.const_value(y.node)) == 1.0:
        return ss  # sum_squares
    return ss / y


def _power(e, args, tr):
    (a,) = args
    p = e.get_data()[0]  # the exponent as the user gave it (PowerApprox rounds it)
    if not isinstance(p, numbers.Real):
        value = getattr(p, "value", None)
        if getattr(p, "parameters", None) and p.parameters():
            raise _Unsupported("from_cvxpy: power with a parameter exponent is not supported")
        if value is None:
            raise _Unsupported(f"from_cvxpy: power with exponent {p!r} is not supported")
        p = value
    p = float(p)
    if p == 1.0:
        return a
    if p == 2.0:
        return ex.square(a)
    if p == 0.5:
        return ex.sqrt(a)
    if (p.is_integer() and p > 2 and int(p) % 2 == 1) or p < 0:
        # cvxpy's power(x, 3) is x^3 on x >= 0 and +inf elsewhere (convex), and
        # inv_pos(x) = x^-1 is +inf for x <= 0; the DSL's x^3 is defined everywhere and
        # its x^-1 for x != 0, so the domain becomes an explicit constraint (without it
        # sum(inv_pos(x)) + c'x was 'unbounded' towards x -> 0-)
        tr.domain.append(a >= 0)
    # non-integer exponents: the DSL keeps x > 0, cvxpy's domain too
    return ex.power(a, p)


def _minimum(e, args, tr):
    return -ex.maximum(*[-a for a in args])


def _norm(kind):
    def rule(e, args, tr):
        data = e.get_data()
        if data and data[0] is not None:
            raise _Unsupported(f"from_cvxpy: {kind} with an axis is not supported")
        return ex.norm1(args[0]) if kind == "norm1" else ex.norm_inf(args[0])

    return rule


def _unary(fn):
    return lambda e, args, tr: fn(args[0])


#: cvxpy expression class name -> rule rebuilding it from its translated arguments
_ATOMS: Dict[str, Callable] = {
    "AddExpression": _add,
    "NegExpression": lambda e, args, tr: -args[0],
    "MulExpression": _matmul,
    "multiply": _multiply,
    "DivExpression": _divide,
    "index": _index,
    "special_index": _index,
    "transpose": _transpose,
    "Sum": _sum,
    "Promote": _promote,
    "reshape": _cvx_reshape,
    "Hstack": _hstack,
    "Vstack": _vstack,
    "Trace": _trace,
    "QuadForm": _quad_form,
    "psd_wrap": lambda e, args, tr: args[0],
    "quad_over_lin": _quad_over_lin,
    "power": _power,
    "Power": _power,
    "PowerApprox": _power,
    "exp": _unary(ex.exp),
    "log": _unary(ex.log),
    "log1p": _unary(lambda a: ex.log(1.0 + a)),
    "entr": _unary(ex.entropy),
    "logistic": _unary(ex.softplus),
    "abs": _unary(ex.abs),
    "maximum": lambda e, args, tr: ex.maximum(*args),
    "minimum": _minimum,
    "norm1": _norm("norm1"),
    "norm_inf": _norm("norm_inf"),
}

#: why some common cvxpy atoms are missing, for the error message
_HINTS = {
    "PnormApprox": " (cp.norm/pnorm with p other than 1 and inf; sum_squares is supported)",
    "Pnorm": " (cp.norm/pnorm with p other than 1 and inf)",
    "max": " (cp.max over the entries of an expression; cp.maximum of expressions and norm_inf are supported)",
    "min": " (cp.min over the entries of an expression)",
    "log_sum_exp": " (no log-sum-exp atom in the DSL)",
}

#: rules that broadcast a scalar argument where cvxpy had promoted it to a shape
_BROADCASTING = {"AddExpression", "NegExpression", "multiply", "DivExpression", "maximum", "minimum",
                 "Promote", "abs", "exp", "log", "log1p", "entr", "logistic", "power", "Power",
                 "PowerApprox"}


class _Translator:
    def __init__(self):
        self.objects: Dict[int, Tuple[object, ex.Expression]] = {}  # id(cvxpy leaf) -> (leaf, DSL object)
        self.memo: Dict[int, ex.Expression] = {}
        self.domain: List[Constraint] = []  # implicit domains cvxpy atoms carry
        self.names: Dict[str, int] = {}
        self.renamed: List[Tuple[str, str]] = []

    def _unique(self, name: str) -> str:
        # cvxpy allows two leaves with one name (e.g. built in a loop); the DSL does not
        if name not in self.names:
            self.names[name] = 1
            return name
        k = self.names[name] + 1
        while f"{name}_{k}" in self.names:
            k += 1
        self.names[name] = k
        new = f"{name}_{k}"
        self.names[new] = 1
        self.renamed.append((name, new))
        return new

    def leaf(self, e) -> ex.Expression:
        if id(e) in self.objects:
            return self.objects[id(e)][1]
        kind = type(e).__name__
        if kind == "Variable":
            obj = ex.Variable(_shape(e), name=self._unique(_name(e)))
            self.objects[id(e)] = (e, obj)
            self._variable_attributes(e, obj)
        elif kind == "Parameter":
            # (CVXPY's sign attributes: a DPP lasso weight lam * norm1(x) needs lam >= 0)
            attrs = getattr(e, "attributes", {}) or {}
            nonneg = bool(attrs.get("nonneg") or attrs.get("pos"))
            obj = ex.Parameter(_shape(e), name=self._unique(_name(e)), nonneg=nonneg)
            self.objects[id(e)] = (e, obj)
        elif kind == "Constant":
            obj = _constant(e.value, e)
        else:
            raise _Unsupported(f"from_cvxpy: leaf '{kind}' is not supported (Variable, Parameter and Constant are)")
        return obj

    def _variable_attributes(self, e, obj):
        attrs = getattr(e, "attributes", {}) or {}
        for key in ("nonneg", "pos"):
            if attrs.get(key):
                self.domain.append(obj >= 0)
        for key in ("nonpos", "neg"):
            if attrs.get(key):
                self.domain.append(obj <= 0)
        bounds = attrs.get("bounds")
        if bounds is not None:
            lower, upper = bounds
            for value, sense in ((lower, ">="), (upper, "<=")):
                if value is None:
                    continue
                if hasattr(value, "variables"):  # a cvxpy expression (parameter bounds)
                    bound = self(value)
                else:
                    arr = np.asarray(value, dtype=np.float64)
                    if not np.isfinite(arr).any():
                        continue
                    if not np.isfinite(arr).all():
                        raise _Unsupported(
                            f"from_cvxpy: variable {e.name()!r} has bounds that are infinite in some "
                            "entries; write them as constraints on the finite entries"
                        )
                    bound = ex.Constant(arr)
                self.domain.append(obj >= bound if sense == ">=" else obj <= bound)
        unsupported = [k for k in ("boolean", "integer", "symmetric", "diag", "PSD", "NSD", "hermitian",
                                   "complex", "imag", "sparsity") if attrs.get(k)]
        if unsupported:
            raise _Unsupported(
                f"from_cvxpy: variable {e.name()!r} has attribute(s) {unsupported}; only nonneg, nonpos, "
                "pos, neg and bounds are supported"
            )

    def __call__(self, e) -> ex.Expression:
        if id(e) in self.memo:
            return self.memo[id(e)]
        kind = type(e).__name__
        if kind in ("Variable", "Parameter", "Constant"):
            out = self.leaf(e)
        elif not e.variables() and not e.parameters() and hasattr(e, "value"):
            # any subtree of constants (hstack of numbers, psd_wrap(matrix), ...) folds
            out = _constant(e.value, e)
        else:
            rule = _ATOMS.get(kind)
            if rule is None:
                hint = _HINTS.get(kind, "")
                raise _Unsupported(
                    f"from_cvxpy: atom '{kind}' is not supported{hint}; supported: {', '.join(sorted(_ATOMS))}"
                )
            args = [self(a) for a in e.args]
            if kind not in _BROADCASTING:
                args = [_materialize(t, a) for t, a in zip(args, e.args)]
            try:
                out = rule(e, args, self)
            except _Unsupported:
                raise
            except (ValueError, TypeError, IndexError) as err:
                raise ValueError(f"from_cvxpy: cannot translate '{kind}' {e}: {err}") from None
        shape = tuple(e.shape)
        if tuple(out.shape) != shape and not (out.shape == () and kind in _BROADCASTING):
            raise ValueError(f"from_cvxpy: '{kind}' translated to shape {out.shape}, cvxpy says {shape}")
        self.memo[id(e)] = out
        return out

    def full(self, e) -> ex.Expression:
        """The translation of ``e`` with cvxpy's exact shape (promoted scalars expanded)."""
        return _materialize(self(e), e)

    def constraint(self, c) -> Constraint:
        kind = type(c).__name__
        if kind == "Inequality":
            return self(c.args[0]) <= self(c.args[1])
        if kind == "Equality":
            return self(c.args[0]) == self(c.args[1])
        if kind == "Zero":
            return self(c.args[0]) == 0
        if kind == "NonPos":
            return self(c.args[0]) <= 0
        if kind == "NonNeg":
            return self(c.args[0]) >= 0
        raise _Unsupported(
            f"from_cvxpy: constraint '{kind}' is not supported (only <=, >=, == and "
            "Zero/NonPos/NonNeg)"
        )


def _materialize(t: ex.Expression, e) -> ex.Expression:
    shape = tuple(e.shape)
    if tuple(t.shape) == shape:
        return t
    return t * ex.Constant(np.ones(shape))


def _shape(e):
    shape = tuple(e.shape)
    if len(shape) > 2:
        raise _Unsupported(f"from_cvxpy: {type(e).__name__} {e.name()!r} has shape {shape}; "
                           "only scalars, vectors and matrices are supported")
    return shape


def _constant(value, e) -> ex.Constant:
    if value is None:
        raise ValueError(f"from_cvxpy: the constant expression {e} has no value")
    if hasattr(value, "toarray"):  # scipy sparse
        value = value.toarray()
    arr = np.asarray(value)
    if np.iscomplexobj(arr):
        raise _Unsupported(f"from_cvxpy: complex constant in {e} is not supported")
    arr = arr.astype(np.float64).reshape(tuple(e.shape))
    if arr.ndim > 2:
        raise _Unsupported(f"from_cvxpy: constant of shape {arr.shape} (only up to matrices)")
    return ex.Constant(arr)


def _name(leaf) -> str:
    name = leaf.name()
    if not name.isidentifier():
        raise ValueError(
            f"from_cvxpy: the name {name!r} of a cvxpy {type(leaf).__name__} is not a Python identifier; "
            "give it one with name=... (the layer's keyword arguments use the names)"
        )
    return name


# ------------------------------------------------------------------------------------
# the problem and the layer
# ------------------------------------------------------------------------------------

class CvxpyProblem(Problem):
    """A :class:`Problem` built from a ``cvxpy.Problem`` by :func:`from_cvxpy`.

    ``to_torch(parameters=None, variables=None, **options)`` accepts the cvxpy
    Parameter/Variable objects (or the DSL ones) and returns a :class:`CvxpyCompatLayer`.
    By default the parameters follow ``cvxpy_problem.parameters()`` and the outputs
    ``cvxpy_problem.variables()``.
    """

    def __init__(self, objective, constraints, cvxpy_objects: Dict[int, Tuple[object, ex.Expression]],
                 cvxpy_parameters: list, cvxpy_variables: list):
        super().__init__(objective, constraints)
        # id -> (cvxpy object, DSL object): the cvxpy object is kept so that its id
        # cannot be reused by another object while this map exists
        self._cvxpy_objects = cvxpy_objects
        self._cvxpy_parameters = list(cvxpy_parameters)
        self._cvxpy_variables = list(cvxpy_variables)

    @property
    def cvxpy_map(self) -> Dict[int, ex.Expression]:
        """``id(cvxpy Variable/Parameter) -> DSL Variable/Parameter``."""
        return {k: v[1] for k, v in self._cvxpy_objects.items()}

    def dsl_object(self, obj) -> ex.Expression:
        """The DSL Variable/Parameter a cvxpy Variable/Parameter became (DSL objects pass)."""
        if isinstance(obj, (ex.Variable, ex.Parameter)):
            return obj
        entry = self._cvxpy_objects.get(id(obj))
        if entry is None or entry[0] is not obj:
            raise ValueError(f"{obj!r} is not a variable or parameter of the converted cvxpy problem")
        return entry[1]

    def to_torch(self, parameters=None, variables=None, **solver_options):
        """Like :meth:`Problem.to_torch`, but ``parameters`` and ``variables`` may list
        the cvxpy objects, and the layer always returns a tuple (as ``CvxpyLayer``)."""
        params = self._cvxpy_parameters if parameters is None else list(parameters)
        dsl_params = [self.dsl_object(p) for p in params]
        present = {id(p) for p in self.parameters()}
        # a parameter whose every occurrence simplified away (e.g. 0 * a) is not a
        # layer input; its tensor is accepted and ignored, as CvxpyLayer would
        keep = [k for k, p in enumerate(dsl_params) if id(p) in present]
        dropped = [dsl_params[k].name for k in range(len(dsl_params)) if k not in keep]
        if parameters is not None:
            missing = [p.name for p in self.parameters() if id(p) not in {id(q) for q in dsl_params}]
            if missing:
                raise ValueError(f"parameters must list every parameter of the problem; missing {missing}")
        variables = self._cvxpy_variables if variables is None else list(variables)
        dsl_vars = [self.dsl_object(v) for v in variables]
        known = {id(v) for v in self.variables()}
        absent = [v.name for v in dsl_vars if id(v) not in known]
        if absent:
            raise ValueError(f"variables: {absent} do not appear in the problem after translation")
        layer = super().to_torch(parameters=[dsl_params[k] for k in keep], variables=dsl_vars, **solver_options)
        return CvxpyCompatLayer(layer, n_inputs=len(dsl_params), keep=keep, dropped=dropped)

    def __getstate__(self):
        state = super().__getstate__()
        # cvxpy objects stay behind (ids mean nothing in another process); the default
        # orders go on as the DSL objects they became, which dsl_object passes (emptied,
        # they left to_torch() with no parameters and no variables)
        state["_cvxpy_objects"] = {}
        state["_cvxpy_parameters"] = [self.dsl_object(p) for p in self._cvxpy_parameters]
        state["_cvxpy_variables"] = [self.dsl_object(v) for v in self._cvxpy_variables]
        return state


class CvxpyCompatLayer(torch.nn.Module):
    """An :class:`OptimizationLayer` with ``CvxpyLayer``'s call convention: one tensor
    per parameter, positionally in the ``parameters`` order, a tuple of solutions out.

    ``info``, ``source``, ``kkt`` and ``problem_class`` are the wrapped layer's
    (``.layer``). ``solver_args`` is accepted for compatibility and ignored with a
    warning: the solver's options (``tol``, ``max_iter``, ...) are set in ``to_torch``.
    """

    def __init__(self, layer, n_inputs: Optional[int] = None, keep: Optional[List[int]] = None,
                 dropped: Optional[List[str]] = None):
        super().__init__()
        self.layer = layer
        n = len(layer.parameters_order)
        self.n_inputs = n if n_inputs is None else n_inputs
        self.keep = list(range(n)) if keep is None else list(keep)
        self.dropped = list(dropped or [])

    def forward(self, *params, solver_args=None, **kwargs):
        if solver_args:
            warnings.warn(
                f"solver_args {sorted(solver_args)} are ignored: pass tol=, max_iter= to to_torch()",
                UserWarning,
                stacklevel=2,
            )
        if len(params) > self.n_inputs:
            raise TypeError(f"the layer takes {self.n_inputs} parameter tensors, got {len(params)}")
        args = [params[k] for k in self.keep if k < len(params)]
        for name in self.dropped:
            kwargs.pop(name, None)
        out = self.layer(*args, **kwargs)
        return out if isinstance(out, tuple) else (out,)

    @property
    def info(self):
        return self.layer.info

    @property
    def source(self) -> str:
        return self.layer.source

    @property
    def kkt(self):
        return self.layer.kkt

    @property
    def problem_class(self) -> str:
        return self.layer.problem_class


def from_cvxpy(problem) -> CvxpyProblem:
    """Convert a ``cvxpy.Problem`` into a :class:`CvxpyProblem` (a ``dl.Problem``).

    Variables and parameters keep their cvxpy names (cvxpy's automatic names such as
    ``param12`` for unnamed ones; a repeated name gets a ``_2`` suffix, with a warning).
    The supported atoms are listed in this module's docstring; anything else raises a
    ``TypeError`` naming the cvxpy class. A problem that is not DCP is converted with a
    warning: the layer then returns a KKT point, not necessarily a global minimum.

    Constraints that cvxpy keeps implicit become explicit ones, appended after the
    problem's own constraints (so ``return_duals=True`` lists the problem's duals first):
    variable attributes (``nonneg``, ``nonpos``, ``pos``, ``neg``, ``bounds``) and the
    domain ``x >= 0`` of ``power(x, p)`` for odd integers ``p >= 3`` and for negative ``p``
    (``inv_pos``) (cvxpy's ``x**3`` and ``x**-1`` are +inf for x < 0; the DSL's are
    defined there). The domains of ``log``, ``entr``, ``sqrt`` and non-integer powers
    (x > 0) are the DSL atoms' own.
    """
    try:
        import cvxpy as cp
    except ImportError as err:  # pragma: no cover - cvxpy is needed to have a problem at all
        raise ImportError("from_cvxpy needs cvxpy installed") from err
    if not isinstance(problem, cp.Problem):
        raise TypeError(f"from_cvxpy expects a cvxpy.Problem, got {type(problem).__name__}")
    tr = _Translator()
    # leaves first, in cvxpy's order, so names and renaming follow that order
    for leaf in problem.variables() + problem.parameters():
        tr.leaf(leaf)
    objective = problem.objective
    expr = tr.full(objective.args[0])
    sense = Maximize if type(objective).__name__ == "Maximize" else Minimize
    constraints = [tr.constraint(c) for c in problem.constraints] + tr.domain
    if tr.renamed:
        warnings.warn(
            "from_cvxpy: cvxpy objects share names; renamed "
            + ", ".join(f"{old!r} -> {new!r}" for old, new in tr.renamed),
            UserWarning,
            stacklevel=2,
        )
    if not problem.is_dcp():
        warnings.warn(
            "from_cvxpy: the cvxpy problem is not DCP; the layer returns a KKT point, which need "
            "not be a global minimum",
            UserWarning,
            stacklevel=2,
        )
    return CvxpyProblem(sense(expr), constraints, tr.objects, problem.parameters(), problem.variables())
