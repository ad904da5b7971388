"""Constraints, objectives and ``Problem``: the user's side of the compiler."""
from __future__ import annotations

from typing import List, Optional, Sequence

from compiler import (
    CompiledProblem,
    ConstraintSpec,
    KKTSystem,
    ParameterSpec,
    ProblemSpec,
    VariableSpec,
    compile_problem,
)
from compiler import ir

from .expressions import Expression, Parameter, Variable, as_expression

__all__ = ["Constraint", "Minimize", "Maximize", "Problem"]


class Constraint:
    """``lhs <= rhs``, ``lhs >= rhs`` or ``lhs == rhs``, elementwise."""

    def __init__(self, lhs: Expression, sense: str, rhs: Expression):
        try:
            ir.broadcast_shape([lhs.shape, rhs.shape])
        except ValueError as err:
            raise ValueError(f"constraint {sense}: {err}") from None
        self.lhs, self.sense, self.rhs = lhs, sense, rhs

    @property
    def shape(self):
        return ir.broadcast_shape([self.lhs.shape, self.rhs.shape])

    def __bool__(self):
        raise TypeError("a constraint has no truth value (did you mean to compare numbers?)")

    def __repr__(self):
        return f"Constraint({self.lhs} {self.sense} {self.rhs})"


class _Objective:
    sense = ""

    def __init__(self, expr):
        self.expr = as_expression(expr)
        if self.expr.shape != ():
            raise ValueError(f"{type(self).__name__}: the objective must be a scalar, got shape {self.expr.shape}")

    def __repr__(self):
        return f"{type(self).__name__}({self.expr})"


class Minimize(_Objective):
    sense = "minimize"


class Maximize(_Objective):
    sense = "maximize"


class Problem:
    """``Problem(Minimize(f) | Maximize(f), [constraints])``.

    ``variables()`` and ``parameters()`` list them in order of first appearance
    (objective first, then the constraints in order, each read left to right); that is
    the default positional order of the layer's inputs and outputs.
    """

    def __init__(self, objective, constraints: Optional[Sequence[Constraint]] = None):
        if not isinstance(objective, _Objective):
            raise TypeError("the objective must be dl.Minimize(expr) or dl.Maximize(expr)")
        constraints = list(constraints or [])
        for k, c in enumerate(constraints):
            if not isinstance(c, Constraint):
                raise TypeError(
                    f"constraint {k} is a {type(c).__name__}, not a constraint built with <=, >= or =="
                )
        self.objective = objective
        self.constraints: List[Constraint] = constraints
        self._variables, self._parameters = self._collect()
        if not self._variables:
            raise ValueError("the problem has no variables")
        self._compiled: Optional[CompiledProblem] = None

    def _collect(self):
        exprs = [self.objective.expr] + [e for c in self.constraints for e in (c.lhs, c.rhs)]
        leaves = {}
        for e in exprs:
            leaves.update(e.leaves)
        owners = [leaves[n.attrs[0]] for n in ir.inputs_of([e.node for e in exprs])]
        variables = [o for o in owners if isinstance(o, Variable)]
        parameters = [o for o in owners if isinstance(o, Parameter)]
        names = [v.name for v in variables] + [p.name for p in parameters]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variables and parameters need distinct names; repeated: {dup}")
        return variables, parameters

    def variables(self) -> List[Variable]:
        return list(self._variables)

    def parameters(self) -> List[Parameter]:
        return list(self._parameters)

    def spec(self) -> ProblemSpec:
        """The problem as the compiler sees it."""
        return ProblemSpec(
            sense=self.objective.sense,
            objective=self.objective.expr.node,
            constraints=tuple(ConstraintSpec(c.lhs.node, c.sense, c.rhs.node) for c in self.constraints),
            variables=tuple(VariableSpec(v.name, v.flat, v.shape) for v in self._variables),
            parameters=tuple(ParameterSpec(p.name, p.node, p.shape) for p in self._parameters),
        )

    def compile(self) -> CompiledProblem:
        """Canonicalize, derive the KKT system and generate code (cached)."""
        if self._compiled is None:
            self._compiled = compile_problem(self.spec())
        return self._compiled

    def kkt(self) -> KKTSystem:
        """The derived KKT system; ``print(prob.kkt())`` shows it readably."""
        return self.compile().kkt

    @property
    def problem_class(self) -> str:
        """'LP', 'QP' or 'NLP' (after canonicalization)."""
        return self.compile().kkt.problem_class

    def to_torch(self, parameters=None, variables=None, **solver_options):
        """Export as a ``torch.nn.Module``: see :class:`declarative.OptimizationLayer`."""
        from .layer import OptimizationLayer

        return OptimizationLayer(self, parameters=parameters, variables=variables, **solver_options)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_compiled"] = None  # generated functions are rebuilt on demand
        return state

    def __repr__(self):
        return f"Problem({self.objective!r}, {len(self.constraints)} constraints)"
