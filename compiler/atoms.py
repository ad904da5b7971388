"""The atom table: one entry per atom, in one place.

An elementwise atom is a scalar sympy function applied entrywise. Its entry says what
the compiler needs to know: the definition (sympy derives the scalar derivatives from
it), the domain the argument must stay in (the interior-point line search keeps
iterates inside it), the monotonicity (used to check that an epigraph rewrite of a
nonsmooth atom nested inside it stays exact) and whether it is smooth. Nonsmooth atoms
are rewritten by :mod:`compiler.canonicalize` into epigraph form before any derivative
is taken.

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


@dataclass(frozen=True)
class ElementwiseAtom:
    name: str
    definition: Callable[[sympy.Symbol], sympy.Expr]
    #: 'real' or 'positive': the argument must stay > 0 for the function to be defined
    domain: str = "real"
    #: +1 nondecreasing, -1 nonincreasing, 0 neither (over the domain)
    monotonicity: int = 0
    description: str = ""


def _atoms(*atoms):
    return {a.name: a for a in atoms}


ELEMENTWISE_ATOMS: Dict[str, ElementwiseAtom] = _atoms(
    ElementwiseAtom("exp", sympy.exp, monotonicity=1, description="exp(x)"),
    ElementwiseAtom("log", sympy.log, domain="positive", monotonicity=1, description="log(x), x > 0"),
    ElementwiseAtom("entropy", lambda u: -u * sympy.log(u), domain="positive",
                    description="-x log(x), x > 0"),
    ElementwiseAtom("square", lambda u: u**2, description="x^2"),
    ElementwiseAtom("sqrt", sympy.sqrt, domain="positive", monotonicity=1, description="sqrt(x), x > 0"),
    ElementwiseAtom("softplus", softplus, monotonicity=1, description="log(1 + exp(x))"),
    ElementwiseAtom("sigmoid", sigmoid, monotonicity=1, description="1 / (1 + exp(-x))"),
)


def power_atom(k: float) -> ElementwiseAtom:
    """x**k; a non-integer power needs x > 0."""
    k_sym = sympy.Integer(int(k)) if float(k).is_integer() else sympy.Float(k)
    integer = float(k).is_integer()
    mono = 0
    if not integer:
        mono = 1 if k > 0 else -1
    elif int(k) % 2 == 1:
        mono = 1
    return ElementwiseAtom(
        f"power({k:g})", lambda u: u**k_sym, domain="real" if integer and k >= 0 else "positive",
        monotonicity=mono, description=f"x^{k:g}",
    )


#: Nonsmooth atoms and the epigraph rewrite the canonicalizer applies to each.
NONSMOOTH_ATOMS: Dict[str, str] = {
    "abs": "|x| -> t with x <= t, -x <= t",
    "pos": "max(x, 0) -> t with x <= t, 0 <= t",
    "maximum": "max(a, b, ...) -> t with a <= t, b <= t, ...",
    "norm1": "sum|x| -> sum(t) with x <= t, -x <= t",
    "norm_inf": "max|x| -> t (scalar) with x <= t, -x <= t",
}


def domain_of(expr: sympy.Expr) -> Optional[str]:
    """'positive' if the scalar expression needs a positive argument somewhere."""
    for sub in sympy.preorder_traversal(expr):
        if isinstance(sub, sympy.log):
            return "positive"
        if isinstance(sub, sympy.Pow) and not sub.exp.is_integer:
            return "positive"
        if isinstance(sub, sympy.Pow) and sub.exp.is_negative:
            return "nonzero"
    return None
