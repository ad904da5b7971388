"""declarative: neural networks with implicit layers.

Write a parametric optimization problem with the DSL, export it as a batched,
differentiable torch module in one line, and read what the compiler derived::

    import declarative as dl
    x = dl.Variable(n, name="x"); q = dl.Parameter(n, name="q")
    prob = dl.Problem(dl.Minimize(dl.sum_squares(x) + q @ x), [x >= 0])
    print(prob.kkt())
    layer = prob.to_torch()
    x_star = layer(q_tensor)
"""
from compiler.canonicalize import CompileError

from .expressions import (
    Constant,
    Expression,
    Parameter,
    Variable,
    abs,
    entropy,
    exp,
    log,
    maximum,
    norm1,
    norm_inf,
    pos,
    power,
    quad_form,
    sigmoid,
    softplus,
    sqrt,
    square,
    sum,
    sum_squares,
)
from .cvxpy_import import from_cvxpy
from .implicit_diff import Linearization, implicit_solution
from .implicit_layers import (
    DENSE_THRESHOLD,
    ConvergenceWarning,
    FixedPointInfo,
    FixedPointLayer,
    ImplicitInfo,
    ImplicitLayer,
    NonContractiveWarning,
    SingularJacobianWarning,
    newton,
)
from .layer import OptimizationLayer, SolveInfo
from .memory import retain_cpu_memory
from .problem import Constraint, Maximize, Minimize, Problem

__version__ = "0.1.0"

__all__ = [
    "Variable", "Parameter", "Constant", "Expression", "Constraint", "Minimize", "Maximize",
    "Problem", "OptimizationLayer", "SolveInfo", "CompileError",
    "sum", "quad_form", "sum_squares", "exp", "log", "entropy", "square", "power", "sqrt",
    "softplus", "sigmoid", "abs", "pos", "maximum", "norm1", "norm_inf",
    "Linearization", "implicit_solution", "from_cvxpy",
    "ImplicitLayer", "FixedPointLayer", "newton", "ImplicitInfo", "FixedPointInfo",
    "ConvergenceWarning", "NonContractiveWarning", "SingularJacobianWarning", "DENSE_THRESHOLD",
    "retain_cpu_memory",
]
