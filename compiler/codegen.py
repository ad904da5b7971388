"""Code generation: the derived KKT system as batched torch source.

A :class:`Routine` names its inputs and outputs (graph nodes); :func:`print_routine`
prints it as one Python function. Every tensor in generated code has one leading batch
dimension (of size B, or 1 for shared values), which einsum's ``...`` and explicit
``[:, None]`` insertions broadcast. Common einsums are printed as the direct call they
amount to (:func:`einsum_text`). Equal subexpressions are computed once (graph nodes
compare structurally). The module is registered with ``linecache`` so tracebacks and
debuggers show the generated lines.

Generated functions (all take ``consts``, the tuple of constant tensors, and the
parameters, each ``(B or 1, *shape)``):

``residuals(z, lam, nu, consts, *params)``  -> objective (B,), stationarity (B, n), g (B, m), h (B, p)
``kkt_residuals(z, lam, nu, consts, *params)`` -> stationarity, g, h (what the NLP line search
                                                evaluates when it backtracks)
``derivatives(z, lam, nu, consts, *params)`` -> stationarity, g, h, Jg (B, m, n), Jh (B, p, n), H (B, n, n)
``qp_data(ref, consts, *params)``            -> Q, c, G, hv, A, b of min z'Qz/2 + c'z, Gz <= hv, Az = b
                                                (LP and QP only)
``parameter_vjp(z, lam, nu, u_z, u_lam, u_nu, consts, *params)`` -> one gradient per parameter,
                                                (minus the parameter-side product: the sign of the
                                                implicit function theorem is folded in)
"""
from __future__ import annotations

import ast
import builtins
import hashlib
import keyword
import linecache
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import numpy as np
import sympy

from . import ir
from .atoms import in_domain, sigmoid, softplus
from .ir import Node
from .kkt import KKTSystem, LP, QP

_PRELUDE = '''\
import torch


# zeros and identities are made once per shape, dtype and device: generated code never
# writes into a tensor it did not create itself
_CONSTANTS = {}


def _in_domain(u):
    # 1 where u > 0, NaN elsewhere: a derivative finite outside its atom's domain times it
    return torch.where(u > 0, 1.0, float("nan")).to(u.dtype)


def _zeros(ref, shape):
    key = ("zeros", shape, ref.dtype, ref.device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = ref.new_zeros((1,) + shape)
    return _CONSTANTS[key]


def _eye(ref, n):
    key = ("eye", n, ref.dtype, ref.device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.eye(n, dtype=ref.dtype, device=ref.device).unsqueeze(0)
    return _CONSTANTS[key]


def _expand(x, shape):
    x = x.reshape(x.shape[:1] + (1,) * (len(shape) + 1 - x.dim()) + x.shape[1:])
    return x.expand((x.shape[0],) + shape)


def _cat(parts, dim):
    batch = max(p.shape[0] for p in parts)
    return torch.cat([p.expand((batch,) + p.shape[1:]) for p in parts], dim)


def _scatter(x, index, shape):
    out = x.new_zeros(x.shape[:1] + shape)
    out[(slice(None),) + index] = x
    return out


def _vecmat(x, A):
    """x'A per instance for x (B or 1, k), A (B or 1, k, j); a shared A takes one matrix
    product for the whole batch rather than B row-times-matrix products (2-3x faster at
    B = 1024; its rounding depends on the batch size, as torch.nn.Linear's does). A batch
    of one with a batched A takes the batched product, as every instance of a larger
    batch does: such an instance comes out alone as in any batch."""
    if A.shape[0] == 1 and x.shape[0] != 1:
        return x @ A[0]
    if x.shape[0] == A.shape[0]:  # bmm skips matmul's shape dispatch (~2 us a call)
        return torch.bmm(x.unsqueeze(-2), A).squeeze(-2)
    return (x.unsqueeze(-2) @ A).squeeze(-2)


def _matmat(a, b):
    """a b per instance for a (B or 1, r, k), b (B or 1, k, c); a shared b takes one
    matrix product for the whole batch."""
    if b.shape[0] == 1 and a.shape[0] != 1:
        return (a.reshape(-1, a.shape[-1]) @ b[0]).reshape(a.shape[:-1] + b.shape[-1:])
    if a.shape[0] == b.shape[0]:
        return torch.bmm(a, b)
    return a @ b


def _outer_sum(pairs, scale, weights=None):
    """scale * sum_k w_k outer(a_k, b_k) for vectors a_k (B or 1, r), b_k (B or 1, c) and
    numbers w_k (``weights``, one per pair after the first, whose is 1; default all 1):
    one (B, r, K) x (B, K, c) matrix product instead of K outer products and K - 1 sums
    over (B, r, c) temporaries (a difference of two took a third of the time at
    (1024, 50, 100)). Small ones are the outer products, accumulated in place: the two
    stacks cost more than the passes there (10 against 18 us at (32, 10, 10), K = 2)."""
    batch = max(x.shape[0] for pair in pairs for x in pair)
    (a, b), rest = pairs[0], pairs[1:]
    weights = (1.0,) * len(rest) if weights is None else weights
    if batch * a.shape[-1] * b.shape[-1] <= 1 << 13:
        out = torch.mul(a.unsqueeze(-1), b.unsqueeze(-2))
        if out.shape[0] != batch:  # (the first pair shared, a later one batched)
            out = out.expand(batch, -1, -1).contiguous()
        for (a, b), w in zip(rest, weights):
            out.addcmul_(a.unsqueeze(-1), b.unsqueeze(-2), value=w)
        return out if scale == 1.0 else out.mul_(scale)
    rest = [(a if w == 1.0 else a * w, b) for (a, b), w in zip(rest, weights)]
    pairs = [pairs[0]] + rest
    left = torch.stack([a if a.shape[0] == batch else a.expand(batch, -1) for a, _ in pairs], -1)
    right = torch.stack([b if b.shape[0] == batch else b.expand(batch, -1) for _, b in pairs], -2)
    # bmm, not @: matmul's shape dispatch costs about as much as a small product
    return torch.bmm(left if scale == 1.0 else scale * left, right)
'''


@dataclass(frozen=True)
class Output:
    """One returned tensor: a single node, or blocks concatenated along the last axes
    (``blocks`` is a list of nodes, or a list of rows of nodes for a block matrix)."""

    comment: str
    blocks: tuple
    shape: Tuple[int, ...]


@dataclass(frozen=True)
class Routine:
    name: str
    args: Tuple[str, ...]
    #: (node, source text) for every input node, e.g. (x, "z[:, 0:5]")
    bindings: Tuple[Tuple[Node, str], ...]
    outputs: Tuple[Output, ...]
    doc: str = ""


class _Writer:
    def __init__(self, routine: Routine, constants: Dict[Node, int]):
        self.routine = routine
        self.constants = constants
        self.names: Dict[Node, str] = {}
        self.lines: List[str] = []
        self.counter = 0
        self.ref = routine.args[0]

    def name(self, node: Node) -> str:
        if node in self.names:
            return self.names[node]
        text = self.expression(node)
        if node.op in ("zeros", "eye", "const") or node.op == "input":
            self.names[node] = text
            return text
        tmp = f"t{self.counter}"
        self.counter += 1
        self.lines.append(f"    {tmp} = {text}")
        self.names[node] = tmp
        return tmp

    def expression(self, node: Node) -> str:
        op = node.op
        if op == "input":
            raise KeyError(f"input {node.attrs[0]} is not bound in routine {self.routine.name}")
        if op == "zeros":
            return f"_zeros({self.ref}, {node.shape!r})"
        if op == "eye":
            return f"_eye({self.ref}, {node.shape[0]})"
        if op == "const":
            return f"consts[{self.constants[node]}]"
        if op == "elementwise":
            fused = self._outer_sum(node)  # before naming the args: it skips the products
            if fused is not None:
                return fused
        args = [self.name(a) for a in node.args]
        if op == "einsum":
            ins, out = ir._split(node.attrs)
            lowered = einsum_text(ins, out, args)
            if lowered is not None:
                return lowered
            spec = ",".join("..." + s for s in ins) + "->..." + out
            return f"torch.einsum({spec!r}, {', '.join(args)})"
        if op == "elementwise":
            fn = node.attrs
            rank = node.ndim
            names = {}
            for sym, a, text in zip(fn.variables, node.args, args):
                names[sym] = text if a.ndim == rank else f"{text}[:{', None' * (rank - a.ndim)}]"
            text = torch_expression(fn.expr, names)
            if all(a.shape != node.shape for a in node.args):
                text = f"_expand({text}, {node.shape!r})"
            return text
        if op == "index":
            return f"{args[0]}[:, {_index_text(node.attrs[0])}]"
        if op == "scatter":
            idx, shape = node.attrs
            objs = ", ".join(f"slice({i.start}, {i.stop}, {i.step})" if isinstance(i, slice) else str(i) for i in idx)
            return f"_scatter({args[0]}, ({objs},), {shape!r})"
        if op == "reshape":
            return f"{args[0]}.reshape({args[0]}.shape[:1] + {node.shape!r})"
        if op == "concat":
            return f"_cat([{', '.join(args)}], -1)"
        raise NotImplementedError(f"cannot generate code for {op} nodes (nonsmooth atoms must be canonicalized)")

    def _outer_sum(self, node: Node):
        """``c1 outer(a1, b1) + c2 outer(a2, b2) + ...`` (numbers c_k) as one batched matrix
        product (:func:`_outer_sum` in the prelude), or None when ``node`` is not of that form.
        Gradients with respect to matrix parameters (dQ, dG, dA) have this form; as
        separate outer products they cost 2K passes over (B, r, c) tensors."""
        expr = node.attrs.expr
        if node.ndim != 2 or not expr.is_Add:
            return None
        coeffs = [float(t.as_coeff_Mul()[0]) for t in expr.args]
        by_symbol = dict(zip(node.attrs.variables, node.args))
        pairs = []
        for term in expr.args:
            sym = term.as_coeff_Mul()[1]
            arg = by_symbol.get(sym)
            if arg is None or arg.op != "einsum" or arg.shape != node.shape or len(arg.args) != 2:
                return None
            ins, out = ir._split(arg.attrs)
            if any(a.ndim != 1 for a in arg.args) or len(out) != 2 or len(set(out)) != 2:
                return None
            if tuple(ins) == (out[0], out[1]):
                pairs.append(arg.args)
            elif tuple(ins) == (out[1], out[0]):
                pairs.append(arg.args[::-1])
            else:
                return None
        text = ", ".join(f"({self.name(a)}, {self.name(b)})" for a, b in pairs)
        weights = tuple(c / coeffs[0] for c in coeffs[1:])
        if all(w == 1.0 for w in weights):
            return f"_outer_sum(({text},), {coeffs[0]!r})"
        return f"_outer_sum(({text},), {coeffs[0]!r}, {weights!r})"

    def output(self, out: Output) -> str:
        blocks = out.blocks
        if blocks and isinstance(blocks[0], tuple):
            rows = [self._cat_text([self.name(b) for b in row], -1) for row in blocks]
            return self._cat_text(rows, -2)
        return self._cat_text([self.name(b) for b in blocks], -1)

    @staticmethod
    def _cat_text(parts, dim):
        return parts[0] if len(parts) == 1 else f"_cat([{', '.join(parts)}], {dim})"

    def write(self) -> str:
        r = self.routine
        for node, text in r.bindings:
            self.names[node] = text
        results = []
        for k, out in enumerate(r.outputs):
            self.lines.append(f"    # {out.comment}")
            text = self.output(out)
            self.lines.append(f"    out{k} = {text}")
            results.append(f"out{k}")
        head = f"def {r.name}({', '.join(r.args)}):"
        doc = [f'    """{r.doc}"""'] if r.doc else []
        ret = f"    return ({', '.join(results)}{',' if len(results) == 1 else ''})"
        return "\n".join([head] + doc + self.lines + [ret]) + "\n"


def einsum_text(ins: List[str], out: str, args: List[str]):
    """The einsum ``...ins[0],...ins[1]->...out`` on the tensors named ``args`` as a
    direct torch call, for the forms generated code is made of (transposes, sums,
    broadcast products, matrix and vector products), or None for other forms.

    torch.einsum parses its spec and plans its contraction on every call: 3-5 us, as much
    as the product itself on small tensors, and the NLP loop evaluates these routines
    several times per iteration. Every operand has the leading batch dimension (B or 1),
    which the direct calls broadcast as einsum does."""
    if any(len(set(s)) != len(s) for s in ins) or len(set(out)) != len(out):
        return None  # diagonals and traces
    if len(ins) == 1:
        (a,), (x,) = ins, args
        if sorted(a) == sorted(out):
            if a == out:
                return x
            return f"{x}.permute({', '.join(['0'] + [str(1 + a.index(c)) for c in out])})"
        if set(out) <= set(a) and [c for c in a if c in out] == list(out):
            return f"{x}.sum({tuple(1 + i for i, c in enumerate(a) if c not in out)!r})"
        return None
    if len(ins) != 2:
        return None
    (a, b), (x, y) = ins, args
    if set(a) | set(b) == set(out):
        # no contraction: a broadcast product, each operand's letters in out's order
        def spread(s, t):
            if [c for c in out if c in s] != list(s):
                return None
            if s == out:
                return t
            return f"{t}[:, {', '.join(':' if c in s else 'None' for c in out)}]"
        xs, ys = spread(a, x), spread(b, y)
        return None if xs is None or ys is None else f"({xs} * {ys})"
    contracted = (set(a) & set(b)) - set(out)
    if len(contracted) != 1 or len(a) > 2 or len(b) > 2 or set(a) & set(b) & set(out):
        return None
    (k,) = contracted
    if a == k and b == k:
        return f"torch.linalg.vecdot({x}, {y})"
    # as a matrix product (rows of a) x (columns of b); a vector is a 1-row/1-column matrix
    rows, cols = a.replace(k, ""), b.replace(k, "")
    if rows + cols != out:
        return None
    def oriented(t, letters, want):  # t with its two letters in the order ``want``
        return t if letters == want else f"{t}.transpose(-1, -2)"
    if not rows:
        return f"_vecmat({x}, {oriented(y, b, k + cols)})"
    if not cols:
        # matrix times vector as the row vector times the transpose: on the CPU that batched
        # product is 1.5-3x faster than the one with a single column
        return f"_vecmat({y}, {oriented(x, a, k + rows)})"
    return f"_matmat({oriented(x, a, rows + k)}, {oriented(y, b, k + cols)})"


def _index_text(index) -> str:
    parts = []
    for i in index:
        if isinstance(i, slice):
            step = "" if i.step in (None, 1) else f":{i.step}"
            parts.append(f"{i.start}:{i.stop}{step}")
        else:
            parts.append(str(i))
    return ", ".join(parts)


def torch_expression(expr: sympy.Expr, names: Dict[sympy.Symbol, str]) -> str:
    """Print a scalar sympy expression as torch code on tensors named by ``names``."""
    p = lambda e: torch_expression(e, names)  # noqa: E731
    if expr.is_Symbol:
        return names[expr]
    if expr.is_number:  # (also sqrt(2), which sympy splits off sqrt(2 x))
        return repr(float(expr))
    if expr.is_Add:
        # a coefficient shared by every term is applied once: c*(a + b) reads each tensor
        # once and writes one temporary fewer than c*a + c*b
        # (scaled in place: the sum is a fresh temporary, and a second one costs a pass
        # over memory not yet in cache)
        coeffs = {float(a.as_coeff_Mul()[0]) for a in expr.args}
        if len(coeffs) == 1 and (c := coeffs.pop()) != 1.0:
            inner = "(" + " + ".join(p(a.as_coeff_Mul()[1]) for a in expr.args) + ")"
            return f"{inner}.neg_()" if c == -1.0 else f"{inner}.mul_({c!r})"
        # terms with coefficient -1 are subtracted: a - b is one op, a + (-b) two
        added, subtracted = [], []
        for a in expr.args:
            coeff, rest = a.as_coeff_Mul()
            if float(coeff) == -1.0:
                subtracted.append(p(rest))
            else:
                added.append(p(a))
        return "(" + " + ".join(added) + "".join(f" - {t}" for t in subtracted) + ")"
    if expr.is_Mul:
        coeff, rest = expr.as_coeff_Mul()
        parts = list(sympy.Mul.make_args(rest))
        if float(coeff) < 0:
            # -u * (-v - 1) as u * (v + 1): a negative coefficient goes into a sum whose
            # terms are all negative (sympy leaves it outside), which saves two negations
            for k, f in enumerate(parts):
                if f.is_Add and all(float(t.as_coeff_Mul()[0]) < 0 for t in f.args):
                    parts[k], coeff = -f, -coeff
                    break
        factors = [p(a) for a in parts]
        body = " * ".join(factors)
        if float(coeff) == 1.0:  # also sympy's Float 1.0, which is not == 1
            return body if len(factors) == 1 else f"({body})"
        if float(coeff) == -1.0:
            return f"(-{body})"
        return f"({float(coeff)!r} * {body})"
    if expr.is_Pow:
        base, e = expr.args
        b = p(base)
        if e == sympy.Rational(1, 2):
            return f"torch.sqrt({b})"
        if e == -sympy.Rational(1, 2):
            return f"torch.rsqrt({b})"
        if e == -1:  # (1.0 / x would go through Tensor.__rdiv__: a Python wrapper and two ops)
            return f"torch.reciprocal({b})"
        if e.is_Integer:
            return f"({b} ** {int(e)})"
        return f"({b} ** {float(e)!r})"
    if isinstance(expr, sympy.exp):
        return f"torch.exp({p(expr.args[0])})"
    if isinstance(expr, sympy.log):
        return f"torch.log({p(expr.args[0])})"
    if isinstance(expr, softplus):
        return f"torch.nn.functional.softplus({p(expr.args[0])})"
    if isinstance(expr, sigmoid):
        return f"torch.sigmoid({p(expr.args[0])})"
    if isinstance(expr, in_domain):
        return f"_in_domain({p(expr.args[0])})"
    if isinstance(expr, sympy.Abs):
        return f"torch.abs({p(expr.args[0])})"
    raise NotImplementedError(f"no torch translation for {expr}")


# ------------------------------------------------------------------------------------

@dataclass
class GeneratedCode:
    source: str
    namespace: dict
    constants: Tuple[np.ndarray, ...]
    filename: str

    def __getitem__(self, name) -> Callable:
        return self.namespace[name]


def _top_level_names(source: str) -> frozenset:
    tree = ast.parse(source)
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


# the generated routines' own arguments, every name the prelude defines and Python's
# builtins: a parameter named like a helper (``_eye``) or a builtin the routines call
# (``slice``) would shadow it inside them
_RESERVED = (frozenset({"consts", "ref", "z", "lam", "nu", "u_z", "u_lam", "u_nu"})
             | _top_level_names(_PRELUDE) | frozenset(dir(builtins)))


def _identifier(name: str, used: set) -> str:
    base = name.split("#")[0]
    base = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in base) or "v"
    if base[0].isdigit() or keyword.iskeyword(base):
        base = "_" + base
    out, k = base, 1
    while (out in used or out in _RESERVED or out.startswith("t") and out[1:].isdigit()
           or out.startswith("out") and out[3:].isdigit()):
        out = f"{base}_{k}"
        k += 1
    used.add(out)
    return out


def generate(kkt: KKTSystem) -> GeneratedCode:
    prob = kkt.problem
    used: set = set()
    param_names = [_identifier(p.name, used) for p in prob.parameters]
    var_slices = []
    var_bindings = []
    seed_bindings = []
    for v, off, u in zip(prob.variables, prob.variable_offsets, kkt.seed_z):
        n = v.node.shape[0]
        sl = f"{off}:{off + n}"
        var_slices.append(sl)
        # a variable that is all of z is z itself: no slice (a view, one op per use)
        whole = off == 0 and n == prob.n
        var_bindings.append((v.node, "z" if whole else f"z[:, {sl}]"))
        seed_bindings.append((u, "u_z" if whole else f"u_z[:, {sl}]"))
    param_bindings = [(p.node, name) for p, name in zip(prob.parameters, param_names)]
    duals = [(kkt.lam, "lam"), (kkt.nu, "nu")]
    seeds = [(kkt.seed_lam, "u_lam"), (kkt.seed_nu, "u_nu")]
    n, m, p = prob.n, prob.m, prob.p

    stationarity = Output("stationarity: grad_z L", tuple(kkt.stationarity), (n,))
    g = Output("inequalities g(z) <= 0", (kkt.inequalities,), (m,))
    h = Output("equalities h(z) = 0", (kkt.equalities,), (p,))
    jg = Output("Jacobian of g", tuple(kkt.ineq_jacobian), (m, n))
    jh = Output("Jacobian of h", tuple(kkt.eq_jacobian), (p, n))
    hess = Output("Hessian of the Lagrangian", tuple(kkt.hessian), (n, n))
    base_args = ("z", "lam", "nu", "consts") + tuple(param_names)
    base_bindings = tuple(var_bindings + duals + param_bindings)
    routines = [
        Routine("residuals", base_args, base_bindings,
                (Output("objective f(z)", (kkt.objective,), ()), stationarity, g, h),
                "objective (B,), stationarity (B, n), g (B, m), h (B, p)"),
        Routine("kkt_residuals", base_args, base_bindings, (stationarity, g, h),
                "stationarity (B, n), g (B, m), h (B, p)"),
        Routine("derivatives", base_args, base_bindings, (stationarity, g, h, jg, jh, hess),
                "stationarity (B, n), g (B, m), h (B, p), Jg (B, m, n), Jh (B, p, n), H (B, n, n)"),
        Routine(
            "parameter_vjp",
            ("z", "lam", "nu", "u_z", "u_lam", "u_nu", "consts") + tuple(param_names),
            base_bindings + tuple(seed_bindings + seeds),
            tuple(Output(f"-d/d{name} [u_z'grad_z L + (lam*u_lam)'g + u_nu'h]", (node,), node.shape)
                  for name, node in zip(param_names, kkt.parameter_vjp)),
            "one (B or 1, *shape) tensor per parameter",
        ),
    ]
    if kkt.problem_class in (LP, QP):
        routines.append(_qp_routine(kkt, param_names, param_bindings))
    if kkt.structure is not None:
        k = kkt.structure.k
        routines.append(Routine(
            "derivatives_diagonal", base_args, base_bindings,
            (stationarity, g, h,
             Output("Jacobian of the general rows of g (the others are bounds)",
                    tuple(kkt.structure.general_jacobian), (k, n)),
             jh,
             Output("diagonal of the Hessian of the Lagrangian (it has no other entries)",
                    tuple(kkt.structure.hessian_diagonal), (n,))),
            f"stationarity (B, n), g (B, m), h (B, p), Jg of the {k} general rows (B, k, n), "
            "Jh (B, p, n), diag H (B, n)",
        ))

    constants: Dict[Node, int] = {}
    all_nodes = []
    for r in routines:
        for out in r.outputs:
            for b in out.blocks:
                all_nodes.extend(b if isinstance(b, tuple) else (b,))
    for node in ir.topological(all_nodes):
        if node.op == "const" and node not in constants:
            constants[node] = len(constants)

    header = [
        '"""Generated by declarative from the problem\'s KKT system. Do not edit.',
        "",
        f"problem class: {kkt.problem_class}; z has {n} entries "
        + "(" + ", ".join(f"{v.name}: z[{sl}]" for v, sl in zip(prob.variables, var_slices)) + "); "
        + f"{m} inequalities g(z) <= 0; {p} equalities h(z) = 0",
        '"""',
    ]
    source = "\n".join(header) + "\n" + _PRELUDE + "\n\n" + "\n\n".join(
        _Writer(r, constants).write() for r in routines
    )
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    filename = f"<declarative-generated-{digest}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {"__name__": f"declarative_generated_{digest}"}
    exec(compile(source, filename, "exec"), namespace)
    ordered = [None] * len(constants)
    for node, k in constants.items():
        ordered[k] = np.asarray(node.attrs)
    return GeneratedCode(source, namespace, tuple(ordered), filename)


def _qp_routine(kkt: KKTSystem, param_names, param_bindings) -> Routine:
    """Q, c, G, hv, A, b: the derivatives at z = 0 (they do not depend on z or the duals)."""
    prob = kkt.problem
    origin = {v.node: ir.zeros(v.node.shape) for v in prob.variables}
    origin[kkt.lam] = ir.zeros(kkt.lam.shape)
    origin[kkt.nu] = ir.zeros(kkt.nu.shape)
    grad0 = ir.substitute(list(kkt.objective_gradient), origin)
    g0, h0 = ir.substitute([kkt.inequalities, kkt.equalities], origin)
    hess = tuple(tuple(ir.substitute(list(row), origin)) for row in kkt.hessian)
    jg = tuple(ir.substitute(list(kkt.ineq_jacobian), origin))
    jh = tuple(ir.substitute(list(kkt.eq_jacobian), origin))
    n, m, p = prob.n, prob.m, prob.p
    return Routine(
        "qp_data",
        ("ref", "consts") + tuple(param_names),
        tuple(param_bindings),
        (
            Output("Q: Hessian of the objective", hess, (n, n)),
            Output("c: gradient of the objective at z = 0", tuple(grad0), (n,)),
            Output("G: Jacobian of g", jg, (m, n)),
            Output("hv = -g(0)", (ir.neg(g0),), (m,)),
            Output("A: Jacobian of h", jh, (p, n)),
            Output("b = -h(0)", (ir.neg(h0),), (p,)),
        ),
        "Q (B, n, n), c (B, n), G (B, m, n), hv (B, m), A (B, p, n), b (B, p)",
    )
