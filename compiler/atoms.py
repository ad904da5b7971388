"""The atom table: one entry per atom, in one place.

An elementwise atom is a scalar sympy function applied entrywise; its definition is all
the compiler needs. From it sympy derives the scalar derivatives, :func:`domain_of`
reads the domain the argument must stay in (the solver starts such variables inside it
and its line search keeps them there), and the sign of the derivative tells whether an
epigraph rewrite nested inside the atom stays exact. Nonsmooth atoms (abs, pos,
maximum, norm1, norm_inf) are rewritten by :mod:`compiler.canonicalize` into epigraph
form before any derivative is taken.

Adding an atom touches this file only (plus a one-line wrapper in the DSL).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import sympy


class softplus(sympy.Function):
    """log(1 + exp(u)), printed as the overflow-safe torch.nn.functional.softplus."""

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return self.args[0].is_real


class sigmoid(sympy.Function):
    """1 / (1 + exp(-u)), printed as torch.sigmoid."""

    def fdiff(self, argindex=1):
        u = self.args[0]
        return sigmoid(u) * (1 - sigmoid(u))

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return self.args[0].is_real


class in_domain(sympy.Function):
    """1 where u > 0, NaN elsewhere, printed as ``_in_domain(u)``. It multiplies the
    derivative of an atom that is finite outside the atom's domain (log: 1/u), so that
    a point outside the domain has non-finite residuals, which the solver's line search
    rejects; without it ``-log(h - G x)`` came back 'optimal' at G x - h = 17."""

    def fdiff(self, argindex=1):
        return sympy.Integer(0)


@dataclass(frozen=True)
class ElementwiseAtom:
    name: str
    definition: Callable[[sympy.Symbol], sympy.Expr]
    description: str = ""


def _atoms(*atoms):
    return {a.name: a for a in atoms}


ELEMENTWISE_ATOMS: Dict[str, ElementwiseAtom] = _atoms(
    ElementwiseAtom("exp", sympy.exp, description="exp(x)"),
    ElementwiseAtom("log", sympy.log, description="log(x), x > 0"),
    ElementwiseAtom("entropy", lambda u: -u * sympy.log(u), description="-x log(x), x > 0"),
    ElementwiseAtom("square", lambda u: u**2, description="x^2"),
    ElementwiseAtom("sqrt", sympy.sqrt, description="sqrt(x), x > 0"),
    ElementwiseAtom("softplus", softplus, description="log(1 + exp(x))"),
    ElementwiseAtom("sigmoid", sigmoid, description="1 / (1 + exp(-x))"),
)


def power_atom(k: float) -> ElementwiseAtom:
    """x**k; a non-integer power needs x > 0 (read off the definition by domain_of)."""
    # (an exponent that is a short binary fraction, as 0.5 or 1.5, exactly: sympy then
    # knows (x**2)**0.5 is |x|, which the abs rewrite serves, where the float 0.5 left
    # Abs(x)**1.0, refused as a nonsmooth atom composed inside another)
    exact = sympy.Rational(float(k))
    k_sym = exact if exact.q <= 1024 else sympy.Float(k)
    return ElementwiseAtom(f"power({k:g})", lambda u: u**k_sym, description=f"x^{k:g}")


def guard_domain(expr: sympy.Expr, derivative: sympy.Expr) -> sympy.Expr:
    """``derivative`` of ``expr``, NaN where an argument of a log or a non-integer power
    in ``expr`` is not positive, unless the derivative already needs that argument
    positive itself (that of entropy has the log, that of sqrt the root): see
    :class:`in_domain`. Argument by argument: x log(x) - log(1 - x) as one atom has the
    derivative log(x) + 1 + 1 / (1 - x), finite for x > 1, and a test of the whole
    derivative let it converge there."""
    own = set(domain_arguments(derivative))
    needed = [a for a in domain_arguments(expr) if a not in own]
    return derivative * sympy.Mul(*map(in_domain, needed)) if needed else derivative


def domain_arguments(expr: sympy.Expr, nonzero: bool = False):
    """The subexpressions of ``expr`` that must stay positive: the arguments of its logs
    and the bases of its non-integer powers (in order, without repeats); with
    ``nonzero``, also those that must not be zero (bases of negative powers)."""
    found = [sub.args[0] for sub in sympy.preorder_traversal(expr)
             if (isinstance(sub, sympy.log) or (isinstance(sub, sympy.Pow) and not sub.exp.is_integer)
                 or (nonzero and isinstance(sub, sympy.Pow) and sub.exp.is_negative))
             and not sub.args[0].is_number]  # (sqrt(2), split off sqrt(2 x), has no domain)
    return list(dict.fromkeys(found))


def domain_of(expr: sympy.Expr) -> Optional[str]:
    """'positive' if the scalar expression needs a positive argument somewhere, else
    'nonzero' if it needs a nonzero one (a negative power), else None. (Not the first
    kind met: x**-2 - log(2 x) was 'nonzero', and its derivative then went unguarded
    outside the log's domain.)"""
    kinds = set()
    for sub in sympy.preorder_traversal(expr):
        if isinstance(sub, sympy.log) or (isinstance(sub, sympy.Pow) and not sub.exp.is_integer):
            return "positive"
        if isinstance(sub, sympy.Pow) and sub.exp.is_negative:
            kinds.add("nonzero")
    return "nonzero" if kinds else None


def domain_symbols(expr: sympy.Expr) -> set:
    """The symbols inside the arguments of the logs and non-integer powers of ``expr``."""
    return set().union(*(a.free_symbols for a in domain_arguments(expr)))
