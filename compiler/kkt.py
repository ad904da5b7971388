"""Symbolic derivation of the KKT system and of everything the solver and backward need.

For the stacked problem ``min f(z) s.t. g(z) <= 0, h(z) = 0`` with duals ``lam >= 0``
and ``nu``, and the Lagrangian ``L = f + lam'g + nu'h``, the KKT residual is

    stationarity          grad_z L(z, lam, nu; theta)        = 0
    primal feasibility    g(z; theta) <= 0,  h(z; theta)    = 0
    complementarity       lam * g(z; theta)                  = 0,  lam >= 0

All derivatives are taken per variable block on the tensor graph (never per entry):
the constraint Jacobians, the Hessian of the Lagrangian, and the parameter-side product
``d/dtheta [u_z' grad_z L + (lam * u_lam)' g + u_nu' h]`` the backward pass needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from . import ir
from .canonicalize import StackedProblem
from .derivatives import gradient, vjp
from .ir import Node
from .structure import NLPStructure, nlp_structure

LP, QP, NLP = "LP", "QP", "NLP"


@dataclass(frozen=True)
class KKTSystem:
    """The derived KKT system of a stacked problem (all entries are graph nodes).

    Per variable block ``i`` (in ``problem.variables`` order): ``stationarity[i]`` has the
    block's flat shape ``(n_i,)``; ``ineq_jacobian[i]`` is ``(m, n_i)``;
    ``eq_jacobian[i]`` is ``(p, n_i)``; ``hessian[i][j]`` is ``(n_i, n_j)``.
    """

    problem: StackedProblem
    lam: Node  # (m,) inequality duals
    nu: Node   # (p,) equality duals
    objective: Node
    objective_gradient: Tuple[Node, ...]
    stationarity: Tuple[Node, ...]
    inequalities: Node  # g (m,)
    equalities: Node    # h (p,)
    complementarity: Node  # lam * g (m,)
    ineq_jacobian: Tuple[Node, ...]
    eq_jacobian: Tuple[Node, ...]
    hessian: Tuple[Tuple[Node, ...], ...]
    #: seeds of the backward pass and minus the parameter-side products they give
    seed_z: Tuple[Node, ...]
    seed_lam: Node
    seed_nu: Node
    parameter_vjp: Tuple[Node, ...]
    problem_class: str
    #: for an NLP with a diagonal Hessian: what the solver's structured step needs
    structure: Optional[NLPStructure] = None
    #: whether g and h are affine in z (constant Jacobians): then an NLP's feasible set
    #: is a polyhedron (within its atoms' domains), which an LP can test
    affine_constraints: bool = False

    def __str__(self):
        from .printing import format_kkt

        return format_kkt(self)


def derive_kkt(problem: StackedProblem) -> KKTSystem:
    variables = [v.node for v in problem.variables]
    params = [p.node for p in problem.parameters]
    lam = ir.input_node("lam#dual", (problem.m,), "dual")
    nu = ir.input_node("nu#dual", (problem.p,), "dual")
    f, g, h = problem.objective, problem.g, problem.h

    lagrangian = ir.add(ir.add(f, ir.dot(lam, g)), ir.dot(nu, h))
    grad_f = gradient(f, variables)
    grad_l = gradient(lagrangian, variables, guard_domains=True)
    stationarity = tuple(grad_l[v] for v in variables)
    jac_g = vjp(g, ir.eye(problem.m), variables, extra=1) if problem.m else {v: ir.zeros((0,) + v.shape) for v in variables}
    jac_h = vjp(h, ir.eye(problem.p), variables, extra=1) if problem.p else {v: ir.zeros((0,) + v.shape) for v in variables}
    hessian = []
    for v, r in zip(variables, stationarity):
        block = vjp(r, ir.eye(v.shape[0]), variables, extra=1)
        hessian.append(tuple(block[w] for w in variables))

    seed_z = tuple(ir.input_node(f"u_{v.attrs[0]}", v.shape, "seed") for v in variables)
    seed_lam = ir.input_node("u_lam#seed", (problem.m,), "seed")
    seed_nu = ir.input_node("u_nu#seed", (problem.p,), "seed")
    phi = ir.add_all(
        [ir.dot(u, r) for u, r in zip(seed_z, stationarity)]
        + [ir.dot(ir.mul(lam, seed_lam), g), ir.dot(seed_nu, h)],
        (),
    )
    # minus the product: the sign of the implicit function theorem, folded into the
    # generated code's constants instead of costing a pass over every gradient
    param_grads = gradient(ir.neg(phi), params) if params else {}
    moving = {v.attrs[0] for v in variables} | {lam.attrs[0], nu.attrs[0]}
    affine = all(not (j.free & moving) for j in list(jac_g.values()) + list(jac_h.values()))
    problem_class = _classify(affine, moving, hessian)

    return KKTSystem(
        problem=problem,
        lam=lam,
        nu=nu,
        objective=f,
        objective_gradient=tuple(grad_f[v] for v in variables),
        stationarity=stationarity,
        inequalities=g,
        equalities=h,
        complementarity=ir.mul(lam, g),
        ineq_jacobian=tuple(jac_g[v] for v in variables),
        eq_jacobian=tuple(jac_h[v] for v in variables),
        hessian=tuple(hessian),
        seed_z=seed_z,
        seed_lam=seed_lam,
        seed_nu=seed_nu,
        parameter_vjp=tuple(param_grads.get(p, ir.zeros(p.shape)) for p in params),
        problem_class=problem_class,
        structure=nlp_structure(problem, hessian) if problem_class == NLP else None,
        affine_constraints=affine,
    )


def _classify(affine, moving, hessian) -> str:
    """LP/QP when the constraints are ``affine`` and the Hessian depends on none of the
    ``moving`` symbols (z and the duals); the solver then builds the problem data once
    per call."""
    blocks = [b for row in hessian for b in row]
    if not affine or any(b.free & moving for b in blocks):
        return NLP
    return LP if all(ir.is_zero(b) for b in blocks) else QP
