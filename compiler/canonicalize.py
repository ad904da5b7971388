"""Canonicalization: a chain of small passes from what the user wrote to smooth standard form

    minimize f(z; theta)  subject to  g(z; theta) <= 0,  h(z; theta) = 0

with z the stacked variables. Each pass is a pure function from one frozen dataclass to
the next and records what is needed to map results back (the sign of the objective, which
rows of g and h belong to which user constraint, where each variable sits in z):

1. :func:`flip_maximize`      Maximize(e) -> Minimize(-e)
2. :func:`split_constraints`  lhs <= rhs, lhs >= rhs, lhs == rhs -> g <= 0 and h == 0
3. :func:`epigraph_nonsmooth` abs, pos, maximum, norm1, norm_inf -> epigraph variables
4. :func:`domain_bounds`      x >= 0 for a variable a log or a non-integer power takes
5. :func:`stack`              variables into one vector z, constraints into g and h
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import sympy

from . import ir
from .derivatives import NONSMOOTH_HEADS
from .ir import Node


class CompileError(ValueError):
    """The problem cannot be brought into smooth standard form."""


@dataclass(frozen=True)
class VariableSpec:
    name: str
    node: Node            # the flat input node, shape (size,)
    shape: Tuple[int, ...]  # the user's shape
    auxiliary: bool = False  # True for epigraph variables the compiler introduced


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    node: Node
    shape: Tuple[int, ...]


@dataclass(frozen=True)
class ConstraintSpec:
    lhs: Node
    sense: str  # '<=', '>=', '=='
    rhs: Node


@dataclass(frozen=True)
class ProblemSpec:
    """What the DSL hands to the compiler."""

    sense: str  # 'minimize' or 'maximize'
    objective: Node
    constraints: Tuple[ConstraintSpec, ...]
    variables: Tuple[VariableSpec, ...]
    parameters: Tuple[ParameterSpec, ...]


@dataclass(frozen=True)
class Block:
    """A constraint block ``expr <= 0`` or ``expr == 0``; ``source`` is the index of the
    user constraint it came from, or None for constraints the compiler added."""

    expr: Node
    source: Optional[int]
    shape: Tuple[int, ...]  # the user's shape of the constraint


@dataclass(frozen=True)
class StandardForm:
    objective: Node  # minimized
    objective_sign: float  # user objective = objective_sign * objective
    inequalities: Tuple[Block, ...]
    equalities: Tuple[Block, ...]
    variables: Tuple[VariableSpec, ...]
    parameters: Tuple[ParameterSpec, ...]
    n_user_constraints: int


@dataclass(frozen=True)
class StackedProblem:
    """Smooth standard form with the layout of z, g and h."""

    objective: Node
    objective_sign: float
    g: Node  # (m,)
    h: Node  # (p,)
    variables: Tuple[VariableSpec, ...]
    parameters: Tuple[ParameterSpec, ...]
    variable_offsets: Tuple[int, ...]
    n: int
    m: int
    p: int
    #: for each user constraint: ('ineq'|'eq', row offset, shape)
    constraint_rows: Tuple[Tuple[str, int, Tuple[int, ...]], ...]
    #: entries of z that a domain-restricted atom (log, entropy, sqrt, ...) takes as its
    #: argument directly or negated, as (offset, size, sign): the solver starts them at
    #: sign (1 or -1) rather than 0
    domain_start: Tuple[Tuple[int, int, float], ...]


# ------------------------------------------------------------------------------------
# 1. Maximize -> Minimize
# ------------------------------------------------------------------------------------

def flip_maximize(spec: ProblemSpec) -> ProblemSpec:
    if spec.objective.shape != ():
        raise CompileError(f"the objective must be a scalar, got shape {spec.objective.shape}")
    if spec.sense == "minimize":
        return spec
    if spec.sense != "maximize":
        raise CompileError(f"unknown objective sense {spec.sense!r}")
    return dataclasses.replace(spec, sense="minimize", objective=ir.neg(spec.objective))


# ------------------------------------------------------------------------------------
# 2. constraints in zero form
# ------------------------------------------------------------------------------------

def split_constraints(spec: ProblemSpec, objective_sign: float) -> StandardForm:
    ineq, eq = [], []
    for k, c in enumerate(spec.constraints):
        try:
            shape = ir.broadcast_shape([c.lhs.shape, c.rhs.shape])
        except ValueError as err:
            raise CompileError(f"constraint {k} ({c.sense}): {err}") from None
        if c.sense == "<=":
            ineq.append(Block(ir.sub(c.lhs, c.rhs), k, shape))
        elif c.sense == ">=":
            ineq.append(Block(ir.sub(c.rhs, c.lhs), k, shape))
        elif c.sense == "==":
            eq.append(Block(ir.sub(c.lhs, c.rhs), k, shape))
        else:
            raise CompileError(f"constraint {k}: unknown sense {c.sense!r}")
    for b in ineq + eq:
        if not any(name in b.expr.free for name in (v.node.attrs[0] for v in spec.variables)):
            raise CompileError(
                f"constraint {b.source} does not involve any variable; check the parameters instead"
            )
    return StandardForm(
        objective=spec.objective,
        objective_sign=objective_sign,
        inequalities=tuple(ineq),
        equalities=tuple(eq),
        variables=spec.variables,
        parameters=spec.parameters,
        n_user_constraints=len(spec.constraints),
    )


# ------------------------------------------------------------------------------------
# 3. epigraph rewrites of nonsmooth atoms
# ------------------------------------------------------------------------------------

def nonsmooth_kind(node: Node) -> Optional[str]:
    """The nonsmooth atom a node is ('abs', 'pos', 'maximum', 'norm1', 'norm_inf'), or None."""
    if node.op == "reduce":
        return node.attrs
    if node.op != "elementwise" or not node.attrs.expr.has(*NONSMOOTH_HEADS):
        return None
    expr = node.attrs.expr
    if isinstance(expr, sympy.Abs) and expr.args[0].is_Symbol:
        return "abs"
    if isinstance(expr, sympy.Max) and all(a.is_Symbol or a.is_number for a in expr.args):
        if len(expr.args) == 2 and any(a == 0 for a in expr.args):
            return "pos"
        return "maximum"
    raise CompileError(
        f"the nonsmooth expression {expr} cannot be rewritten into smooth form: nonsmooth atoms "
        "(abs, pos, maximum, norm1, norm_inf) must be applied directly to an expression, "
        "not composed inside another elementwise function"
    )


_ATOM_NAMES = {"abs": "dl.abs", "pos": "dl.pos", "maximum": "dl.maximum",
               "norm1": "dl.norm1", "norm_inf": "dl.norm_inf"}


def _monotonicity(roots: Sequence[Node]) -> Dict[Node, int]:
    """For every node below ``roots``: +1 if each root is nondecreasing in it, -1 if
    nonincreasing, 0 if neither or unknown (e.g. multiplied by a parameter)."""
    sign: Dict[Node, int] = {}
    for r in roots:
        sign[r] = _combine(sign.get(r), 1)
    for node in reversed(ir.topological(roots)):
        s = sign.get(node)
        if s is None:
            continue
        for k, arg in enumerate(node.args):
            sign[arg] = _combine(sign.get(arg), s * _arg_monotonicity(node, k))
    return sign


def _combine(a, b):
    if a is None:
        return b
    return a if a == b else 0


def _arg_monotonicity(node: Node, k: int) -> int:
    op = node.op
    if op in ("index", "reshape", "concat", "scatter"):
        return 1
    if op == "reduce":
        return 0
    if op == "einsum":
        others = [a for j, a in enumerate(node.args) if j != k]
        return int(np.prod([_sign_of_data(a) for a in others]))
    if op == "elementwise":
        fn = node.attrs
        if isinstance(fn.expr, sympy.Max):
            return 1
        if fn.expr.has(sympy.Abs):
            return 0
        d = sympy.diff(fn.expr, fn.variables[k])
        # Other arguments are tensors whose sign is unknown; positive symbols model the
        # domain of log/sqrt/entropy, for the arguments inside one alone: a parameter
        # folded in beside it (t * log(1 + pos(x))) keeps its unknown sign, where making
        # it positive too passed t = -1 through an epigraph rewrite that is then unbounded
        from .atoms import domain_symbols

        # (data of a known sign: constants, parameters declared nonneg)
        known = {}
        for v, a in zip(fn.variables, node.args):
            sign = _sign_of_data(a)
            if sign > 0:
                known[v] = sympy.Symbol(v.name, nonnegative=True)
            elif sign < 0:
                known[v] = sympy.Symbol(v.name, nonpositive=True)
        d = d.xreplace(known)
        d_pos = d.xreplace({known.get(v, v): sympy.Symbol(v.name, positive=True) for v in domain_symbols(fn.expr)})
        if d.is_nonnegative or d_pos.is_nonnegative and _needs_positive(fn.expr):
            return 1
        if d.is_nonpositive or d_pos.is_nonpositive and _needs_positive(fn.expr):
            return -1
        return 0
    return 0


def _sign_of_data(node: Node) -> int:
    """1 where every entry of ``node`` is known >= 0 (a constant, a parameter declared
    nonneg, an index or reshape of one), -1 where <= 0 (a constant), else 0."""
    while node.op in ("index", "reshape"):
        node = node.args[0]
    if node.op == "input":
        return 1 if node.attrs[1] == "nonneg parameter" else 0
    if node.op in ("const", "eye", "zeros"):
        v = ir.const_value(node)
        return 1 if np.all(v >= 0) else -1 if np.all(v <= 0) else 0
    return 0


def _needs_positive(expr) -> bool:
    from .atoms import domain_of

    return domain_of(expr) == "positive"


def _refuse_data(node: Node, kind: str, names) -> None:
    """Where the epigraph rewrite of a nonsmooth atom is refused, the error for one of
    parameters alone (no variable among ``names`` below it): it is data, which the user
    can compute first. (Where the rewrite is valid, as in ``norm1(a) <= sum(x)``, it
    serves parameters too.)"""
    if not names & node.free:
        raise CompileError(
            f"{_ATOM_NAMES[kind]} of parameters alone: it is data, not part of the problem's smooth "
            "structure; compute it with torch before the layer and pass the result as a parameter "
            "(its gradient then flows through torch's autograd)"
        )


def epigraph_nonsmooth(sf: StandardForm) -> StandardForm:
    counter = itertools.count()
    names = {v.node.attrs[0] for v in sf.variables}
    for b in sf.equalities:
        for node in ir.topological([b.expr]):
            kind = nonsmooth_kind(node)
            if kind:
                _refuse_data(node, kind, names)
                raise CompileError(
                    f"{_ATOM_NAMES[kind]} appears in equality constraint {b.source}; a nonsmooth "
                    "atom can only be rewritten in epigraph form inside the objective or an "
                    "inequality constraint, where the problem is nondecreasing in it"
                )
    while True:
        roots = [sf.objective] + [b.expr for b in sf.inequalities]
        sign = _monotonicity(roots)
        found = [n for n in ir.topological(roots) if nonsmooth_kind(n)]
        if not found:
            return sf
        inner = set()
        for n in found:
            for d in ir.topological(list(n.args)):
                if d is not n:
                    inner.add(d)
        outermost = [n for n in found if n not in inner]
        mapping: Dict[Node, Node] = {}
        new_blocks: List[Block] = []
        new_vars: List[VariableSpec] = []
        for node in outermost:
            kind = nonsmooth_kind(node)
            if sign.get(node, 0) != 1:
                _refuse_data(node, kind, names)
                raise CompileError(
                    f"{_ATOM_NAMES[kind]} appears where the problem is not nondecreasing in it "
                    "(for example it is maximized, subtracted, multiplied by a parameter of "
                    "unknown sign, or on the right of <=); its epigraph rewrite would change the "
                    "problem, so it cannot be made smooth"
                )
            t_shape = () if kind == "norm_inf" else (node.args[0].shape if kind == "norm1" else node.shape)
            name = f"_epi_{kind}{next(counter)}_{len(sf.variables) + len(new_vars)}"
            size = int(np.prod(t_shape, dtype=np.int64))
            t_flat = ir.input_node(f"{name}#aux", (size,), "variable")
            t = ir.reshape(t_flat, t_shape)
            new_vars.append(VariableSpec(name, t_flat, t_shape, auxiliary=True))
            bounds: List[Node] = []
            if kind in ("abs", "norm1", "norm_inf"):
                (e,) = node.args
                bounds = [e, ir.neg(e)]
            else:  # pos, maximum: Max of symbols and numbers
                fn = node.attrs
                sym_to_arg = dict(zip(fn.variables, node.args))
                for a in fn.expr.args:
                    bounds.append(sym_to_arg[a] if a.is_Symbol else ir.const(float(a)))
            for e in bounds:
                expr = ir.sub(e, t)
                new_blocks.append(Block(expr, None, expr.shape))
            mapping[node] = ir.total(t) if kind == "norm1" else t
        objective = ir.substitute([sf.objective], mapping)[0]
        ineq = tuple(
            dataclasses.replace(b, expr=e)
            for b, e in zip(sf.inequalities, ir.substitute([b.expr for b in sf.inequalities], mapping))
        )
        sf = dataclasses.replace(
            sf,
            objective=objective,
            inequalities=ineq + tuple(new_blocks),
            variables=sf.variables + tuple(new_vars),
        )


# ------------------------------------------------------------------------------------
# 4. the bounds of domains
# ------------------------------------------------------------------------------------

def domain_bounds(sf: StandardForm) -> StandardForm:
    """``x >= 0`` for each variable x that a log or a non-integer power (entropy, sqrt,
    x ** 1.5) takes whole as its argument, where no constraint ``x >= c`` with c >= 0 is
    there already. The problem is the same (no point outside the domain was feasible),
    but the interior point's barrier now keeps the iterate inside, where the line search
    alone crawled toward entries of 1e-9: softmax written without ``z >= 0`` ended
    max_iter on 10 of 64 instances of logits 20 x randn, weighted entropy with three rows
    was not optimal after 1000 iterations (29 with the bound). A slice or an expression
    under such an atom gets no bound (the other entries, or the variable, may be
    negative)."""
    from .atoms import domain_arguments

    flat = {v.node.attrs[0]: v for v in sf.variables}
    roots = [sf.objective] + [b.expr for b in sf.inequalities + sf.equalities]
    under: Dict[str, VariableSpec] = {}
    for node in ir.topological(roots):
        if node.op != "elementwise":
            continue
        positive = {a for a in domain_arguments(node.attrs.expr) if a.is_Symbol}
        for sym, arg in zip(node.attrs.variables, node.args):
            while arg.op == "reshape":
                arg = arg.args[0]
            if sym in positive and arg.op == "input" and arg.attrs[0] in flat:
                under.setdefault(arg.attrs[0], flat[arg.attrs[0]])
    for b in sf.inequalities:
        bounded = _lower_bound_of(b.expr)
        if bounded is not None:
            under.pop(bounded, None)
    if not under:
        return sf
    added = tuple(Block(ir.neg(v.node), None, v.node.shape) for v in under.values())
    return dataclasses.replace(sf, inequalities=sf.inequalities + added)


def _lower_bound_of(expr: Node) -> Optional[str]:
    """The name of the variable whose every entry ``expr <= 0`` bounds below by a
    number c >= 0 (``expr`` = c - x), or None."""
    if expr.op != "elementwise" or len(expr.args) != 1:
        return None
    arg = expr.args[0]
    while arg.op == "reshape":
        arg = arg.args[0]
    if arg.op != "input" or arg.attrs[1] != "variable":
        return None
    (u,) = expr.attrs.variables
    c = sympy.expand(expr.attrs.expr + u)
    return arg.attrs[0] if c.is_number and bool(c >= 0) else None


# ------------------------------------------------------------------------------------
# 5. stack
# ------------------------------------------------------------------------------------

def stack(sf: StandardForm) -> StackedProblem:
    offsets, n = [], 0
    for v in sf.variables:
        offsets.append(n)
        n += v.node.shape[0]
    rows: List[Optional[Tuple[str, int, Tuple[int, ...]]]] = [None] * sf.n_user_constraints
    g_parts, m = [], 0
    for b in sf.inequalities:
        if b.source is not None:
            rows[b.source] = ("ineq", m, b.shape)
        g_parts.append(ir.flatten(_broadcast_to(b.expr, b.shape)))
        m += g_parts[-1].size
    h_parts, p = [], 0
    for b in sf.equalities:
        rows[b.source] = ("eq", p, b.shape)
        h_parts.append(ir.flatten(_broadcast_to(b.expr, b.shape)))
        p += h_parts[-1].size
    g = ir.concat(g_parts) if g_parts else ir.zeros((0,))
    h = ir.concat(h_parts) if h_parts else ir.zeros((0,))
    return StackedProblem(
        objective=sf.objective,
        objective_sign=sf.objective_sign,
        g=g,
        h=h,
        variables=sf.variables,
        parameters=sf.parameters,
        variable_offsets=tuple(offsets),
        n=n,
        m=m,
        p=p,
        constraint_rows=tuple(rows),
        domain_start=_domain_start(sf, offsets),
    )


def _broadcast_to(node: Node, shape) -> Node:
    if node.shape == tuple(shape):
        return node
    return ir.add(node, ir.zeros(tuple(shape)))


def _domain_start(sf: StandardForm, offsets) -> Tuple[Tuple[int, int, float], ...]:
    """Runs (offset, size, sign) of the entries of z that a domain-restricted atom takes
    as its argument itself or times a number (a variable or a slice, reshape or
    transpose of one, not an expression of it), with the sign of that number: at 1 (-1
    under ``entropy(-y)``, ``log(-x)``), the atom starts inside its domain, while
    log(1 - x) would start on its edge and log(h - G x) anywhere (at 0, both are inside
    when 1 and h are positive). Logs and non-integer powers decide the signs; a negative
    power (whose argument may have either sign, not 0) gives 1 to entries they leave
    unset. Entries atoms take with both signs (no point is inside both) get none."""
    from .atoms import domain_arguments

    roots = [sf.objective] + [b.expr for b in sf.inequalities + sf.equalities]
    layout = {v.node.attrs[0]: (off, v.node.shape) for v, off in zip(sf.variables, offsets)}
    n = sum(int(np.prod(shape, dtype=np.int64)) for _, shape in layout.values())
    signs, clash = np.zeros(n), np.zeros(n, dtype=bool)
    nodes = [node for node in ir.topological(roots) if node.op == "elementwise"]
    for nonzero in (False, True):
        for node in nodes:
            fn = node.attrs
            found = domain_arguments(fn.expr)
            if nonzero:
                found = [a for a in domain_arguments(fn.expr, nonzero=True) if a not in found]
            for a in found:
                factor, sym = a.as_coeff_Mul()
                if not (sym.is_Symbol and sym in fn.variables and factor.is_nonzero):
                    continue
                entries = _variable_entries(node.args[fn.variables.index(sym)], layout)
                if entries is None:
                    continue
                entries = entries.ravel()
                sign = 1.0 if factor.is_positive or nonzero else -1.0
                if nonzero:  # (only entries no log or root has set)
                    entries = entries[signs[entries] == 0]
                clash[entries] |= (signs[entries] != 0) & (signs[entries] != sign)
                signs[entries] = sign
    signs[clash] = 0.0
    starts = np.flatnonzero(np.diff(signs, prepend=np.nan))  # (where each run of one sign begins)
    sizes = np.diff(np.append(starts, n))
    return tuple((int(a), int(k), float(signs[a])) for a, k in zip(starts, sizes) if signs[a])


def _variable_entries(node: Node, layout) -> Optional[np.ndarray]:
    """The entries of z that ``node`` is (an int array of its shape) where it is a
    variable, or an index, reshape or transpose of one; else None."""
    if node.op == "input":
        if node.attrs[0] not in layout:
            return None
        off, shape = layout[node.attrs[0]]
        return off + np.arange(int(np.prod(shape, dtype=np.int64))).reshape(shape)
    if node.op not in ("index", "reshape", "einsum") or len(node.args) != 1:
        return None
    inner = _variable_entries(node.args[0], layout)
    if inner is None:
        return None
    if node.op == "index":
        return inner[node.attrs[0]]
    if node.op == "reshape":
        return inner.reshape(node.shape)
    ins, out = node.attrs.split("->")
    if sorted(ins) != sorted(out) or len(set(ins)) != len(ins):
        return None  # (a sum or a diagonal, not a permutation)
    return np.einsum(node.attrs, inner)


def canonicalize(spec: ProblemSpec) -> StackedProblem:
    """The whole chain: flip_maximize -> split_constraints -> epigraph_nonsmooth ->
    domain_bounds -> stack."""
    sign = -1.0 if spec.sense == "maximize" else 1.0
    spec = flip_maximize(spec)
    sf = split_constraints(spec, sign)
    sf = epigraph_nonsmooth(sf)
    sf = domain_bounds(sf)
    return stack(sf)
