"""CVXPY in, declarative layer out.

``dl.from_cvxpy(problem)`` rebuilds a ``cvxpy.Problem`` in the DSL. Variables and
parameters keep their names, and the result's ``to_torch(parameters=[...],
variables=[...])`` takes the *cvxpy* objects in those lists and returns a layer with
``CvxpyLayer``'s call convention (a tuple of solutions, batched parameters allowed), so
it is a drop-in replacement::

    layer = CvxpyLayer(problem, parameters=[A, b], variables=[x])           # before
    layer = dl.from_cvxpy(problem).to_torch(parameters=[A, b], variables=[x])  # after
    (x_star,) = layer(A_t, b_t)

Unlike CVXPY's DPP rules, parameters may appear anywhere (also nonlinearly); the
problem only has to be smooth after canonicalization. cvxpy is imported lazily: it is
only needed to call :func:`from_cvxpy`.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from . import expressions as ex
from .problem import Constraint, Maximize, Minimize, Problem

__all__ = ["from_cvxpy", "CvxpyProblem", "CvxpyCompatLayer"]


def _binary(op: Callable):
    return lambda e, args: op(args[0], args[1])


def _sum(e, args):
    axis = e.get_data()[0] if hasattr(e, "get_data") else None
    if isinstance(axis, (tuple, list)):
        if len(axis) != 1:
            raise TypeError("from_cvxpy: sum over several axes is not supported")
        axis = axis[0]
    return ex.sum(args[0], axis=None if axis is None else int(axis))


def _index(e, args):
    key = []
    for k in e.key:
        if isinstance(k, slice):
            key.append(slice(*(None if v is None else int(v) for v in (k.start, k.stop, k.step))))
        elif isinstance(k, (int, np.integer)):
            key.append(int(k))
        else:
            raise TypeError(f"from_cvxpy: index {k!r} is not supported (only ints and slices)")
    out = args[0][tuple(key)]
    if out.shape != e.shape and out.size == int(np.prod(e.shape)):
        # cvxpy keeps integer indices as length-1 slices and drops the axis afterwards
        from compiler import ir

        out = ex._derived(ir.reshape(out.node, e.shape), out)
    return out


def _power(e, args):
    p = e.p.value if hasattr(e.p, "value") else e.p
    return ex.power(args[0], float(p))


def _quad_over_lin(e, args):
    return ex.sum_squares(args[0]) / args[1]


def _promote(e, args):
    (a,) = args
    if a.shape not in ((), (1,)) and a.shape != e.shape:
        raise TypeError(f"from_cvxpy: cannot promote shape {a.shape} to {e.shape}")
    return a if a.shape == () else a[0]


def _transpose(e, args):
    return args[0].T


def _reshape(e, args):
    (a,) = args
    if a.size != int(np.prod(e.shape)):
        raise TypeError(f"from_cvxpy: bad reshape of {a.shape} to {e.shape}")
    from compiler import ir

    order = e.get_data()[1] if hasattr(e, "get_data") and len(e.get_data()) > 1 else "F"
    if order != "C" and len(e.shape) > 1 and len(a.shape) > 1:
        raise TypeError("from_cvxpy: only row-major (order='C') reshapes of matrices are supported")
    return ex._derived(ir.reshape(a.node, e.shape), a)


#: cvxpy expression class name -> how to rebuild it from its translated arguments
_ATOMS: Dict[str, Callable] = {
    "AddExpression": lambda e, args: _add_all(args),
    "NegExpression": lambda e, args: -args[0],
    "MulExpression": _binary(lambda a, b: a @ b),
    "multiply": _binary(lambda a, b: a * b),
    "DivExpression": _binary(lambda a, b: a / b),
    "index": _index,
    "transpose": _transpose,
    "Sum": _sum,
    "Promote": _promote,
    "reshape": _reshape,
    "QuadForm": lambda e, args: ex.quad_form(args[0], args[1]),
    "psd_wrap": lambda e, args: args[0],
    "quad_over_lin": _quad_over_lin,
    "power": _power,
    "PowerApprox": _power,
    "exp": lambda e, args: ex.exp(args[0]),
    "log": lambda e, args: ex.log(args[0]),
    "entr": lambda e, args: ex.entropy(args[0]),
    "logistic": lambda e, args: ex.softplus(args[0]),
    "abs": lambda e, args: ex.abs(args[0]),
    "maximum": lambda e, args: ex.maximum(*args),
    "norm1": lambda e, args: ex.norm1(args[0]),
    "norm_inf": lambda e, args: ex.norm_inf(args[0]),
}


def _add_all(args):
    out = args[0]
    for a in args[1:]:
        out = out + a
    return out


class _Translator:
    def __init__(self):
        self.objects: Dict[int, ex.Expression] = {}  # id(cvxpy leaf) -> DSL object
        self.memo: Dict[int, ex.Expression] = {}

    def leaf(self, e):
        kind = type(e).__name__
        if id(e) in self.objects:
            return self.objects[id(e)]
        if kind == "Variable":
            obj = ex.Variable(e.shape, name=_name(e))
        elif kind == "Parameter":
            obj = ex.Parameter(e.shape, name=_name(e))
        else:
            return ex.Constant(np.asarray(e.value, dtype=np.float64))
        self.objects[id(e)] = obj
        return obj

    def __call__(self, e):
        if id(e) in self.memo:
            return self.memo[id(e)]
        kind = type(e).__name__
        if kind in ("Variable", "Parameter", "Constant", "CallbackParam"):
            out = self.leaf(e)
        else:
            rule = _ATOMS.get(kind)
            if rule is None:
                raise TypeError(
                    f"from_cvxpy: atom '{kind}' is not supported; supported atoms: {sorted(_ATOMS)}"
                )
            out = rule(e, [self(a) for a in e.args])
        if tuple(out.shape) != tuple(e.shape):
            raise ValueError(f"from_cvxpy: '{kind}' translated to shape {out.shape}, cvxpy says {e.shape}")
        self.memo[id(e)] = out
        return out

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
        raise TypeError(f"from_cvxpy: constraint '{kind}' is not supported (only <=, >=, ==)")


def _name(leaf) -> str:
    name = leaf.name()
    if not name.isidentifier():
        raise ValueError(f"from_cvxpy: the name {name!r} of a cvxpy {type(leaf).__name__} is not a Python identifier")
    return name


class CvxpyProblem(Problem):
    """A :class:`Problem` built from a ``cvxpy.Problem``; ``to_torch`` takes cvxpy objects."""

    def __init__(self, objective, constraints, cvxpy_objects: Dict[int, ex.Expression]):
        super().__init__(objective, constraints)
        self.cvxpy_objects = cvxpy_objects

    def _translate(self, objs, what):
        if objs is None:
            return None
        out = []
        for o in objs:
            if isinstance(o, ex.Expression):
                out.append(o)
            elif id(o) in self.cvxpy_objects:
                out.append(self.cvxpy_objects[id(o)])
            else:
                raise ValueError(f"{what}: {o!r} is not part of the converted cvxpy problem")
        return out

    def to_torch(self, parameters=None, variables=None, **solver_options):
        """Like :meth:`Problem.to_torch`, but ``parameters`` and ``variables`` may be the
        cvxpy objects, and the layer always returns a tuple (as ``CvxpyLayer`` does)."""
        layer = super().to_torch(
            parameters=self._translate(parameters, "parameters"),
            variables=self._translate(variables, "variables"),
            **solver_options,
        )
        return CvxpyCompatLayer(layer)


class CvxpyCompatLayer(torch.nn.Module):
    """An :class:`OptimizationLayer` with ``CvxpyLayer``'s call convention: positional
    parameter tensors in, a tuple of solutions out. ``info``, ``source`` and ``kkt`` are
    the wrapped layer's."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *params, **kwargs):
        out = self.layer(*params, **kwargs)
        return out if isinstance(out, tuple) else (out,)

    @property
    def info(self):
        return self.layer.info

    @property
    def source(self):
        return self.layer.source

    @property
    def kkt(self):
        return self.layer.kkt


def from_cvxpy(problem) -> CvxpyProblem:
    """Convert a ``cvxpy.Problem`` into a :class:`CvxpyProblem` (a ``dl.Problem``).

    Supported: cvxpy Variables, Parameters and constants; the atoms in ``_ATOMS``
    (affine operations, quad_form, sum_squares, power, exp, log, entr, logistic, abs,
    pos, maximum, norm1, norm_inf); constraints ``<=``, ``>=``, ``==``. Anything else
    raises a ``TypeError`` naming the atom.
    """
    try:
        import cvxpy as cp
    except ImportError as err:  # pragma: no cover - cvxpy is needed to have a problem at all
        raise ImportError("from_cvxpy needs cvxpy installed") from err
    if not isinstance(problem, cp.Problem):
        raise TypeError(f"from_cvxpy expects a cvxpy.Problem, got {type(problem).__name__}")
    tr = _Translator()
    objective = problem.objective
    expr = tr(objective.args[0])
    sense = Minimize if type(objective).__name__ == "Minimize" else Maximize
    constraints = [tr.constraint(c) for c in problem.constraints]
    # cvxpy objects the problem uses, including leaves that vanish in simplification
    for leaf in problem.variables() + problem.parameters():
        tr.leaf(leaf)
    return CvxpyProblem(sense(expr), constraints, tr.objects)
