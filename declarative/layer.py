"""``OptimizationLayer``: a compiled problem as a batched, differentiable torch module.

The module is a thin shell: it checks and batches the inputs, calls the interior-point
solver with the generated functions, and attaches the implicit-function-theorem backward
through :mod:`declarative.implicit_diff`. All symbolic work happened in ``to_torch``.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from compiler.kkt import LP, QP
from solvers import interior_point as ipm
from solvers.buffers import BufferPool

from .expressions import Parameter, Variable
from .implicit_diff import (LOW_PRECISION, EmptyBatch, Linearization, full_precision_forward, implicit_solution,
                            user_stacklevel)

__all__ = ["OptimizationLayer", "SolveInfo"]

STATUS_NAMES = ipm.STATUS_NAMES

#: forward solvers by name: the interior point serves every problem class; OSQP (CPU,
#: sparse) serves LPs and QPs
SOLVERS = ("ipm", "osqp")
#: an inference call keeps its solver state until the next call up to this size (forward)
_PREVIOUS_STATE_BYTES = 64 << 20


# the dtype a parameter's dtype is solved in (LOW_PRECISION ones in float32, whose
# outputs they get, as autocast's softmax gives)
_SOLVED_IN = {torch.float32: torch.float32, torch.float64: torch.float64,
              **{low: torch.float32 for low in LOW_PRECISION}}


@dataclass
class SolveInfo:
    """Report of the last forward call, per batch instance.

    Attributes
    ----------
    status : list of str
        One of 'optimal', 'infeasible', 'max_iter', 'numerical_error', 'unbounded' per
        instance (NaN inputs give 'numerical_error').
    status_code, iterations : torch.Tensor
        ``(B,)`` int64; ``iterations`` counts interior-point iterations.
    active_set_rounds : torch.Tensor or None
        ``(B,)`` int64, for QPs with positive definite ``Q``: the rounds (equality-QP
        solves) of the active-set iteration that runs before the interior point. An
        instance it solves reports 0 iterations. None for other problems.
    active_set_pivots : torch.Tensor or None
        ``(B,)`` int64, for such QPs with few constraints, or with many per free
        dimension where the iteration would crawl: the pivots (single ones and exchange
        steps) that guessed the iteration's first active set. None where there were none.
    primal_residual, dual_residual, complementarity : torch.Tensor
        ``(B,)`` final residuals.
    problem_class : str
        'LP', 'QP' or 'NLP'.
    """

    status: List[str]
    status_code: torch.Tensor
    iterations: torch.Tensor
    primal_residual: torch.Tensor
    dual_residual: torch.Tensor
    complementarity: torch.Tensor
    problem_class: str
    active_set_rounds: Optional[torch.Tensor] = None
    active_set_pivots: Optional[torch.Tensor] = None

    def copied(self) -> "SolveInfo":
        """This report with its tensors copied (out of inference mode, see forward)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).clone() for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    @property
    def ok(self) -> torch.Tensor:
        """(B,) bool: instances solved to optimality."""
        return self.status_code == ipm.OPTIMAL

    def __repr__(self):
        counts: Dict[str, int] = {}
        for s in self.status:
            counts[s] = counts.get(s, 0) + 1
        if not counts:  # (an empty batch: no mean or max to show)
            return f"SolveInfo({self.problem_class}, batch=0)"
        its = self.iterations.float()
        rounds = "" if self.active_set_rounds is None else (
            f"active-set rounds mean {self.active_set_rounds.float().mean().item():.1f} "
            f"max {int(self.active_set_rounds.max())}, ")
        if self.active_set_pivots is not None:
            rounds += (f"pivots mean {self.active_set_pivots.float().mean().item():.1f} "
                       f"max {int(self.active_set_pivots.max())}, ")
        return (
            f"SolveInfo({self.problem_class}, batch={len(self.status)}, status={counts}, "
            f"{rounds}iterations mean {its.mean().item():.1f} max {int(self.iterations.max())}, "
            f"max primal residual {self.primal_residual.max().item():.2e}, "
            f"max dual residual {self.dual_residual.max().item():.2e})"
        )


#: how many signatures (shapes, dtypes, devices) of its parameters a layer remembers checked
_CHECKED_SIGNATURES = 32

#: the sizes the entries under a domain-restricted atom try, in order, as the NLP start
_START_SIZES = (1.0, 0.5, 0.1, 2.0, 10.0)


def _start_signs(stacked):
    """(signs, whole), arrays of z's length: the sign each entry starts with (the
    compiler's ``domain_start``: 1 where a domain-restricted atom takes it times a
    positive number, -1 where the number is negative, 0 elsewhere), and the same with
    each variable whose signed entries agree spread over its other entries (log(-u[0])
    beside log(-u[1] - 1.5) needs all of u negative)."""
    signs = np.zeros(stacked.n)
    for off, size, sign in stacked.domain_start:
        signs[off:off + size] = sign
    whole = signs.copy()
    for v, off in zip(stacked.variables, stacked.variable_offsets):
        part = whole[off:off + v.node.size]
        found = np.unique(part[part != 0])
        if found.size == 1:
            part[part == 0] = found[0]
    return signs, whole


def _other_starts(signs, whole, batch):
    """The NLP starts an instance tries, in order, where the first (``signs`` times
    _START_SIZES[0], see :func:`_start_signs`) lies outside a domain: the signed
    entries at the other _START_SIZES (log(x) + log(1 - x) at x = 1); ``whole`` at each
    of _START_SIZES; the signed entries at their signs and the others at each of
    _START_SIZES and each of their negatives, for atoms that take an expression of
    the variables (log(1 + x), entropy(P.T @ x), log(-1 - y), which the first starts
    leave at 0) beside the direct ones; then every entry at each of these. Made as
    they are tried: most calls try none."""
    shape = (batch, signs.shape[0])
    sizes = _START_SIZES + tuple(-size for size in _START_SIZES)
    signed = signs != 0
    if bool(signed.any()):
        for size in _START_SIZES[1:]:
            yield signs.expand(shape) * size
        if not torch.equal(whole, signs):
            for size in _START_SIZES:
                yield whole.expand(shape) * size
        if not bool(signed.all()):
            for size in sizes:
                yield torch.where(signed, signs, size).expand(shape)
    for size in sizes:
        yield signs.new_full(shape, size)


class OptimizationLayer(torch.nn.Module):
    """A differentiable, batched solution map ``theta -> argmin`` of a ``dl.Problem``.

    Created by ``problem.to_torch(parameters=None, variables=None, **options)``.

    Call with one tensor per parameter, positionally (in ``parameters`` order, by default
    the order of first appearance in the problem) or by name. Each tensor has the
    parameter's shape, or one extra leading batch dimension B; unbatched tensors are shared
    across the batch. Returns the chosen variables (one tensor, or a tuple), each with a
    leading B when any input was batched; with ``return_duals=True`` the duals of every
    constraint follow, in the order of the constraints.

    Options (keyword-only):

    tol
        stopping tolerance (default 1e-8 in float64, 1e-5 in float32)
    max_iter
        interior-point iteration limit (default 100)
    active_set_rounds
        QPs with positive definite ``Q``: rounds of the primal-dual active-set iteration
        tried before the interior point (default 20; 0 turns it off). It solves most
        well-posed QPs exactly in 4-10 rounds, each cheaper than an interior-point
        iteration, and hands what it cannot solve to the interior point; where it does
        not converge (many active constraints) it costs up to a fifth more
        (``benchmarks/qp_families.py``).
    return_duals
        also return the constraint duals (default False)
    warn
        warn when instances fail (default True)
    solver
        ``'ipm'`` (default: the batched interior point, any problem, CPU or GPU) or
        ``'osqp'`` (LPs and QPs: OSQP per instance on the CPU with sparse matrices,
        warm started from the previous call, for large sparse problems; ``tol`` becomes
        its eps_abs = eps_rel, ``max_iter`` does not apply). Both share the implicit
        backward.
    """

    def __init__(self, problem, parameters=None, variables=None, *, tol: Optional[float] = None,
                 max_iter: int = 100, return_duals: bool = False, warn: bool = True, solver: str = "ipm",
                 active_set_rounds: int = ipm.ACTIVE_SET_ROUNDS):
        super().__init__()
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
        self.solver = solver
        if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol must be a positive number, got {tol!r}")
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        if not isinstance(active_set_rounds, int) or isinstance(active_set_rounds, bool) or active_set_rounds < 0:
            raise ValueError(f"active_set_rounds must be an int >= 0, got {active_set_rounds!r}")
        self.active_set_rounds = active_set_rounds
        self.problem = problem
        self.compiled = problem.compile()
        self.tol, self.max_iter, self.return_duals, self.warn = tol, max_iter, bool(return_duals), warn
        all_params = problem.parameters()
        self.parameters_order: List[Parameter] = _choose(all_params, parameters, "parameters", Parameter)
        all_vars = problem.variables()
        self.variables_out: List[Variable] = _choose(all_vars, variables, "variables", Variable, subset=True)
        # position of each problem parameter among the generated functions' arguments
        spec_params = self.compiled.problem.parameters
        self._param_pos = [
            next(k for k, p in enumerate(self.parameters_order) if p.node is sp.node) for sp in spec_params
        ]
        self._nonneg_pos = [k for k, p in enumerate(self.parameters_order) if getattr(p, "nonneg", False)]
        stacked = self.compiled.problem
        offsets = {v.node: off for v, off in zip(stacked.variables, stacked.variable_offsets)}
        self._var_slices = [(offsets[v.flat], v.flat.shape[0], v.shape) for v in self.variables_out]
        if solver == "osqp" and self.problem_class not in (LP, QP):
            raise ValueError(
                f"solver='osqp' solves LPs and QPs; this problem is {self.problem_class} "
                "(use the default interior point)"
            )
        self._const_cache: Dict[Tuple[torch.dtype, torch.device], tuple] = {}
        self._checked: Dict[tuple, tuple] = {}  # _check's answers by the parameters' shapes, dtypes, devices
        self._osqp_cache = None  # sparsity pattern, OSQP objects and warm starts
        self.info: Optional[SolveInfo] = None
        self._previous_state = None  # see forward: the last inference call's solver state
        self._block_pool = BufferPool()  # the QP factor's large blocks, from one call to the next

    # ---- pickling: generated functions are rebuilt, not pickled ----------------------
    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("compiled", None)
        state["_const_cache"] = {}
        state["_checked"] = {}
        state["_osqp_cache"] = None
        state["_previous_state"] = None
        return state

    def __setstate__(self, state):
        state.setdefault("active_set_rounds", ipm.ACTIVE_SET_ROUNDS)  # pickled before the option
        state.setdefault("_block_pool", BufferPool())
        state.setdefault("_checked", {})
        super().__setstate__(state)
        self.compiled = self.problem.compile()

    # ---- what users read ------------------------------------------------------------
    @property
    def source(self) -> str:
        """The generated torch code (valid Python)."""
        return self.compiled.code.source

    @property
    def kkt(self):
        """The derived KKT system (``print(layer.kkt)`` shows it)."""
        return self.compiled.kkt

    @property
    def problem_class(self) -> str:
        """'LP', 'QP' or 'NLP', as the compiler classified the problem."""
        return self.compiled.kkt.problem_class

    def extra_repr(self):
        names = ", ".join(p.name for p in self.parameters_order)
        outs = ", ".join(v.name for v in self.variables_out)
        return f"{self.problem_class}, parameters=({names}) -> ({outs}), tol={self.tol}, max_iter={self.max_iter}"

    # ---- forward --------------------------------------------------------------------
    @full_precision_forward
    def forward(self, *args, **kwargs):
        """Solve for a batch of parameter values; see the class docstring."""
        tensors = self._bind(args, kwargs)
        batch, dtype, device, batched = self._check(tensors)
        for k in self._nonneg_pos:
            # (the compiler took it as a nonnegative factor: a negative value would solve
            # another, possibly nonconvex, problem)
            if bool((tensors[k] < 0).any()):
                raise ValueError(f"parameter {self.parameters_order[k].name!r} is declared nonneg but has a "
                                 f"negative entry ({float(tensors[k].min()):g})")
        params = [t if t.dtype == dtype else t.to(dtype) for t in tensors]  # (a no-op .to costs a dispatch)
        params = [t if t.shape[:1] == (batch,) and b else t.unsqueeze(0) for t, b in zip(params, batched)]
        params = [params[k] for k in self._param_pos]
        batched_spec = [batched[k] for k in self._param_pos]
        # An inference call (no gradient to record) keeps its solver state until the next
        # call, on the CPU and up to _PREVIOUS_STATE_BYTES: freed at the end of the call,
        # glibc returns those pages to the system and the next call faults them back in
        # (4000-6500 faults, a quarter of the forward at B, n = 512, 20 and 32, 100). A
        # training call's state lives until the backward anyway, so nothing is kept then.
        keep = (device.type == "cpu" and not (torch.is_grad_enabled() and any(p.requires_grad for p in params))
                and self._state_bytes(batch, dtype) <= _PREVIOUS_STATE_BYTES)
        if not keep:
            self._previous_state = None

        def solve(*p):
            # The solver runs in inference mode: its hundreds to thousands of small ops skip
            # autograd's bookkeeping (version counters, view tracking), about a sixth of
            # each small op's cost (benchmarks/linalg_ops.py) and 10-18 % of a small solve.
            # Nothing in it needs autograd: the backward is the implicit one. Inference
            # tensors must not reach the caller (autograd cannot save them, nor may they be
            # changed in place), so the report is copied out here and the outputs by
            # implicit_solution; the linearization only feeds the backward, which reads it.
            with torch.inference_mode():
                outputs, linearization, info = self._solve(p, batched_spec, batch, dtype, device)
            self.info = info.copied()
            if keep:  # its tensors: the linearization itself refers back to the layer
                self._previous_state = {k: v for k, v in vars(linearization).items() if k != "layer"}
            return outputs, linearization
        outputs = implicit_solution(solve, *params)
        if not any(batched):
            outputs = tuple(o.squeeze(0) for o in outputs)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _state_bytes(self, batch, dtype) -> int:
        """About the size of one call's solver state: (B, n + m + p)^2 entries."""
        stacked = self.compiled.problem
        return batch * (stacked.n + stacked.m + stacked.p) ** 2 * torch.finfo(dtype).bits // 8

    def _bind(self, args, kwargs) -> List[torch.Tensor]:
        """The parameters in order, as tensors (their dtypes are _check's)."""
        if not kwargs and len(args) == len(self.parameters_order) and all(
                isinstance(v, torch.Tensor) for v in args):
            return list(args)  # the usual call: every parameter a tensor, in order
        names = [p.name for p in self.parameters_order]
        if len(args) > len(names):
            raise TypeError(f"the layer takes {len(names)} parameters ({', '.join(names)}), got {len(args)}")
        values: Dict[str, object] = dict(zip(names, args))
        for key, val in kwargs.items():
            if key not in names:
                raise TypeError(f"unknown parameter {key!r}; the parameters are {names}")
            if key in values:
                raise TypeError(f"parameter {key!r} given twice (positionally and by name)")
            values[key] = val
        missing = [n for n in names if n not in values]
        if missing:
            raise TypeError(f"missing parameter(s) {missing}; the layer takes ({', '.join(names)})")
        out = []
        for p in self.parameters_order:
            v = values[p.name]
            if not isinstance(v, torch.Tensor):
                try:
                    v = torch.as_tensor(v, dtype=torch.float64)
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError(f"parameter {p.name!r}: expected a tensor, got {type(v).__name__}") from None
            out.append(v)
        return out

    def _check(self, tensors):
        """(batch, dtype, device, batched) for the parameters, or the error that names the
        culprit. The answer depends on their shapes, dtypes and devices alone: a call like
        an earlier one reads it from a small cache (about a quarter of the checks' cost)."""
        key = tuple([(t.shape, t.dtype, t.device) for t in tensors])
        answer = self._checked.get(key)
        if answer is None:
            answer = self._check_anew(tensors)
            if len(self._checked) >= _CHECKED_SIGNATURES:
                self._checked.clear()
            self._checked[key] = answer
        return answer

    def _check_anew(self, tensors):
        for p, t in zip(self.parameters_order, tensors):
            if not t.is_floating_point():
                raise TypeError(f"parameter {p.name!r}: expected a floating-point tensor, got dtype {t.dtype}")
            if t.dtype not in _SOLVED_IN:
                raise TypeError(f"parameter {p.name!r}: dtype {t.dtype} is not supported (use float32 or float64)")
        batched, batches = [], {}
        for p, t in zip(self.parameters_order, tensors):
            shape = tuple(p.shape)
            if tuple(t.shape) == shape:
                batched.append(False)
            elif t.dim() == len(shape) + 1 and tuple(t.shape[1:]) == shape:
                batched.append(True)
                batches[p.name] = t.shape[0]
            else:
                raise ValueError(
                    f"parameter {p.name!r} has shape {tuple(t.shape)}; expected {shape} "
                    f"or (B, {', '.join(map(str, shape))})".replace(", )", ")")
                )
        if len(set(batches.values())) > 1:
            raise ValueError(f"mismatched batch sizes: {batches}")
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise ValueError(f"parameters are on different devices: {sorted(map(str, devices))}")
        solved_in = {_SOLVED_IN[t.dtype] for t in tensors}
        dtype = solved_in.pop() if len(solved_in) == 1 else torch.float64
        if solved_in:  # (float16 or bfloat16 mixed with float32 is float32; with float64, an error)
            raise TypeError(
                "parameters have mixed dtypes: "
                + ", ".join(f"{p.name}: {t.dtype}" for p, t in zip(self.parameters_order, tensors))
            )
        device = tensors[0].device if tensors else torch.device("cpu")
        batch = next(iter(batches.values()), 1)
        return batch, dtype, device, tuple(batched)

    def _constants(self, dtype, device):
        key = (dtype, device)
        if key not in self._const_cache:
            self._const_cache[key] = tuple(
                torch.tensor(c, dtype=dtype, device=device).unsqueeze(0) for c in self.compiled.code.constants
            )
        return self._const_cache[key]

    def _structured(self) -> bool:
        """Use the compiler's structure (diagonal Hessian, bound rows) for Newton steps:
        when there is one and its system (general rows + equalities) is smaller than n."""
        structure = self.compiled.kkt.structure
        stacked = self.compiled.problem
        return structure is not None and structure.k + stacked.p <= stacked.n

    def _start_signs(self, dtype, device):
        """:func:`_start_signs` of this problem, as tensors (made once per dtype and device)."""
        key = ("start", dtype, device)
        if key not in self._const_cache:
            self._const_cache[key] = tuple(torch.as_tensor(a, dtype=dtype, device=device)
                                           for a in _start_signs(self.compiled.problem))
        return self._const_cache[key]

    def _bound_indices(self, dtype, device):
        key = ("bounds", dtype, device)
        if key not in self._const_cache:
            s = self.compiled.kkt.structure
            self._const_cache[key] = ipm.BoundedJacobian.index_sets(
                s.bound_rows, s.bound_cols, s.bound_signs, s.general_rows, dtype, device)
        return self._const_cache[key]

    def _derivatives(self, code, consts, params, full, dtype, device):
        """The solver's oracle: stationarity, g, h, Jg, Jh and the Hessian at (z, lam, nu),
        the last two structured (:class:`~solvers.interior_point.BoundedJacobian`,
        :class:`~solvers.interior_point.DiagonalMatrix`) when :meth:`_structured`."""
        stacked = self.compiled.problem
        n, m, p = stacked.n, stacked.m, stacked.p
        if self._structured():
            bounds = self._bound_indices(dtype, device)
            k = self.compiled.kkt.structure.k

            def derivatives(z, lam, nu):
                rd, g, h, Jg_general, Jh, H_diag = code["derivatives_diagonal"](z, lam, nu, consts, *params)
                Jg = ipm.BoundedJacobian(full(Jg_general, (k, n)), m, *bounds)
                return (full(rd, (n,)), full(g, (m,)), full(h, (p,)), Jg, full(Jh, (p, n)),
                        ipm.DiagonalMatrix(full(H_diag, (n,))))
            return derivatives

        def derivatives(z, lam, nu):
            out = code["derivatives"](z, lam, nu, consts, *params)
            shapes = [(n,), (m,), (p,), (m, n), (p, n), (n, n)]
            return tuple(full(o, s) for o, s in zip(out, shapes))
        return derivatives

    def _solve(self, params, batched, batch, dtype, device, nested=False):
        stacked = self.compiled.problem
        code = self.compiled.code
        consts = self._constants(dtype, device)
        # instances with NaN/inf inputs are not solved (bad, None when there are none);
        # their inputs are zeroed so that nothing non-finite enters the batched linear
        # algebra. The interior point's QPs are checked after their solve instead, and
        # only when an instance failed: a NaN or inf entry of a QP's data leaves its
        # instance's residuals, which _verify recomputes from all of it, non-finite, so it
        # is never reported optimal (the check took 1-2 % of a call at (32, 10, 10, 2)).
        # A batch with one is solved again without it.
        checked_after = self.problem_class in (LP, QP) and self.solver != "osqp"
        codes = None  # the statuses as a list, once read
        bad = None if checked_after else _nonfinite_instances(params, batched, batch, device)
        if bad is not None:
            params = _zeroed(params)
        tol = ipm.default_tol(dtype) if self.tol is None else self.tol
        n, m, p = stacked.n, stacked.m, stacked.p
        ref = consts[0] if consts else torch.empty(0, dtype=dtype, device=device)  # (the dtype and device)

        full = _batch_full(batch)

        def qp_data(params):
            Q, c, G, hv, A, b = code["qp_data"](ref, consts, *params)
            return full(Q, (n, n)), full(c, (n,)), full(G, (m, n)), full(hv, (m,)), full(A, (p, n)), full(b, (p,))

        wide = None  # (float32 NLP instances solved again in float64: _in_float64_for_failures)
        if not batch:  # (an empty batch: nothing to solve, and nothing to differentiate)
            none = torch.zeros(0, dtype=torch.int64, device=device)
            result = ipm.InteriorPointResult(
                z=ref.new_zeros(0, n), s=ref.new_zeros(0, m), lam=ref.new_zeros(0, m), nu=ref.new_zeros(0, p),
                status=none, iterations=none, primal_residual=ref.new_zeros(0), dual_residual=ref.new_zeros(0),
                complementarity=ref.new_zeros(0))
            qp = derivatives = None
        elif self.problem_class in (LP, QP):
            qp = qp_data(params)
            if self.solver == "osqp":
                from solvers.osqp_backend import solve_qp_osqp

                eps = {} if self.tol is None else dict(eps_abs=self.tol, eps_rel=self.tol)
                result, self._osqp_cache = solve_qp_osqp(*qp, skip=bad, cache=self._osqp_cache, **eps)
            else:
                options = dict(tol=tol, max_iter=self.max_iter, active_set_rounds=self.active_set_rounds,
                               pool=self._block_pool)
                result = ipm.solve_qp(*qp, skip=bad, **options)
                codes = result.status.tolist()
                if (codes.count(ipm.OPTIMAL) < batch
                        and (bad := _nonfinite_instances(params, batched, batch, device)) is not None):
                    params = _zeroed(params)
                    qp = qp_data(params)
                    result = ipm.solve_qp(*qp, skip=bad, **options)
                    codes = None
            derivatives = None
        else:
            def nlp_oracle(params, batch):
                full = _batch_full(batch)

                def residuals(z, lam, nu):
                    rd, g, h = code["kkt_residuals"](z, lam, nu, consts, *params)
                    return full(rd, (n,)), full(g, (m,)), full(h, (p,))
                return self._derivatives(code, consts, params, full, dtype, device), residuals

            def select(rows):
                # the oracle of the instances ``rows`` alone: the solver drops those it has
                # finished once they are most of the batch
                return nlp_oracle([t[rows] if b else t for t, b in zip(params, batched)], rows.numel())

            derivatives, residuals = nlp_oracle(params, batch)

            # the entries a log, entropy, sqrt ... takes as its argument start at 1 (-1
            # where it takes them negated), the others at 0 (_other_starts: where that is
            # outside a domain)
            signs, whole = self._start_signs(dtype, device)
            z0 = signs.expand(batch, n) * _START_SIZES[0]
            retry = ipm.retries_in_float64(z0)
            result = ipm.solve_nlp(derivatives, residuals, z0, m, p, tol=tol, max_iter=self.max_iter, skip=bad,
                                   other_starts=_other_starts(signs, whole, batch), select=select,
                                   stop_collapsed=retry, affine_constraints=self.compiled.kkt.affine_constraints)
            qp = None
            if retry:
                codes = result.status.tolist()
                if ipm.NUMERICAL_ERROR in codes or ipm.MAX_ITER in codes:
                    wide = self._in_float64_for_failures(result, params, batched, bad, tol, device)
                    codes = None if wide is not None else codes

        narrow = result  # (the float32 solve, whose linearization serves its own instances)
        if wide is not None:
            result = wide.merged
        status = result.status
        if codes is None:
            codes = status.tolist()
        # (in C: at B = 512 a comprehension over the codes took ~60 us, the count as a
        # generator over the names ~80 us)
        n_failed = len(codes) - codes.count(ipm.OPTIMAL)
        info = SolveInfo(
            status=list(map(STATUS_NAMES.__getitem__, codes)),
            status_code=status,
            iterations=result.iterations,
            primal_residual=result.primal_residual,
            dual_residual=result.dual_residual,
            complementarity=result.complementarity,
            problem_class=self.problem_class,
            active_set_rounds=result.active_set_rounds,
            active_set_pivots=result.active_set_pivots,
        )
        if n_failed and self.warn and not nested:
            counts = {}
            for s in info.status:
                if s != "optimal":
                    counts[s] = counts.get(s, 0) + 1
            warnings.warn(
                f"{n_failed} of {batch} instances were not solved to optimality ({counts}); "
                "see layer.info. Their outputs are NaN (max_iter: the last iterate) and their "
                "gradients NaN where the loss reads them (leave them out of it: zeros).",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        # users get NaN for a failed instance (or the last iterate for max_iter)
        shown = None if not n_failed else ((status == ipm.OPTIMAL) | (status == ipm.MAX_ITER))[:, None]
        nan = float("nan")

        def shown_or_nan(x):
            return x if shown is None else torch.where(shown, x, torch.full_like(x, nan))

        z_out = shown_or_nan(result.z)
        outputs = [z_out[:, off:off + size].reshape((batch,) + shape) for off, size, shape in self._var_slices]
        if self.return_duals:
            lam_out, nu_out = shown_or_nan(result.lam), shown_or_nan(result.nu)
            for kind, off, shape in stacked.constraint_rows:
                size = int(torch.Size(shape).numel())
                src = lam_out if kind == "ineq" else nu_out
                outputs.append(src[:, off:off + size].reshape((batch,) + tuple(shape)))
        if not batch:
            return tuple(outputs), EmptyBatch(params, batched), info
        # a failed instance keeps a benign state inside, and the backward pass skips it
        valid = None if not n_failed and wide is None else narrow.status == ipm.OPTIMAL
        z, s, lam, nu = narrow.z, narrow.s, narrow.lam, narrow.nu
        if valid is not None:
            safe = valid[:, None]
            z = torch.where(safe, z, torch.zeros_like(z))
            s = torch.where(safe, s, torch.ones_like(s))
            lam = torch.where(safe, lam, torch.ones_like(lam))
            nu = torch.where(safe, nu, torch.zeros_like(nu))
        lin = _KKTLinearization(
            layer=self, params=params, batched=batched, consts=consts, z=z, s=s, lam=lam, nu=nu,
            qp=qp, derivatives=derivatives, valid=valid, qp_factor=narrow.qp_factor,
            active_set=_active_set_of(narrow),
        )
        if wide is not None:
            lin = _TwoPrecisions(lin, wide.linearization, wide.rows)
        return tuple(outputs), lin, info

    def _in_float64_for_failures(self, result, params, batched, bad, tol, device):
        """Float32 NLP instances the loop could not finish for want of precision (as
        :func:`solvers.interior_point._in_float64_for_failures` has it for QPs), solved
        again in float64 on their rows alone. Softmax of logits 20 x randn needs entries
        near 1e-52, below float32's range: 25 of 320 instances at n = 10 and 284 of 320
        at n = 100 ended ``numerical_error`` or ``max_iter`` (``benchmarks/spread.py
        --dtype float32``); in float64 they solve. Those that end optimal, infeasible or
        unbounded (of the same data: float32 numbers are float64 ones) take the float64
        result, rounded to float32 for the outputs; their backward runs in float64 too
        (:class:`_TwoPrecisions`), since the rounded point may leave the functions'
        domain (an entropy's entry rounded to 0). None where none qualify."""
        # (complementarity within tol absolutely: within the loop's scaled tolerance too)
        left, rows = ipm.wanting_precision(result, tol, bad)
        if not rows.numel():
            return None
        part = [(t.index_select(0, rows) if b else t).double() for t, b in zip(params, batched)]
        _, linearization, info = self._solve(part, batched, rows.numel(), torch.float64, device, nested=True)
        code = info.status_code
        taken = (code == ipm.OPTIMAL) | (code == ipm.INFEASIBLE) | (code == ipm.UNBOUNDED)
        take = torch.zeros_like(left).index_copy(0, rows, taken)

        def put(mine, theirs):
            mask = take.reshape(take.shape + (1,) * (mine.dim() - 1))
            return torch.where(mask, mine.index_copy(0, rows, theirs.to(mine.dtype)), mine)
        part_result = (linearization.z, linearization.s, linearization.lam, linearization.nu, code,
                       info.primal_residual, info.dual_residual, info.complementarity)
        names = ("z", "s", "lam", "nu", "status", "primal_residual", "dual_residual", "complementarity")
        merged = dataclasses.replace(
            result, **{name: put(getattr(result, name), theirs) for name, theirs in zip(names, part_result)},
            iterations=result.iterations.index_add(0, rows, info.iterations * taken))
        # (the float64 linearization holds a benign state where its solve failed too)
        return _Wide(merged, linearization, rows)


def _nonfinite_instances(params, batched, batch, device):
    """(B,) bool: the instances with a NaN or inf parameter entry (one in a shared
    parameter marks every instance), or None where every parameter's sum is finite."""
    # one pass without temporaries: a finite sum means finite entries (a sum that
    # overflows only sends the check below on the exact path)
    if not params or bool(torch.isfinite(torch.stack([p.sum() for p in params])).all()):
        return None
    bad = torch.zeros(batch, dtype=torch.bool, device=device)
    for p, b in zip(params, batched):
        finite = torch.isfinite(p).reshape(p.shape[0], -1).all(-1)
        bad = bad | ~(finite if b else finite.expand(batch))
    return bad


def _batch_full(batch):
    """``full(x, shape)``: x (batch or 1, *shape) as a (batch, *shape) tensor (a shared
    one expanded, not copied)."""
    def full(x, shape):
        return x if x.shape[0] == batch else x.expand((batch,) + shape)
    return full


def _zeroed(params):
    """The parameters with their NaN and inf entries replaced by zeros."""
    return tuple(torch.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0) for p in params)


class _KKTLinearization(Linearization):
    """The KKT residual F = [grad_z L; lam * g; h] at the solution."""

    def __init__(self, layer, params, batched, consts, z, s, lam, nu, qp, derivatives, valid, qp_factor=None,
                 active_set=(None, None, None)):
        self.layer, self.params, self.consts = layer, params, consts
        self.z, self.s, self.lam, self.nu = z, s, lam, nu
        self.qp, self.derivatives, self.qp_factor = qp, derivatives, qp_factor
        self.active_set = active_set
        self.valid = valid
        self.parameter_batched = tuple(batched)

    def transposed_solve(self, cotangents):
        layer = self.layer
        stacked = layer.compiled.problem
        B, n = self.z.shape
        slices = layer._var_slices
        if len(slices) == 1 and slices[0][1] == n and cotangents[0] is not None:
            w_z = cotangents[0].reshape(B, n)  # one variable is all of z (the solvers only read w_z)
        else:
            w_z = torch.zeros_like(self.z)
            for (off, size, _), g in zip(slices, cotangents):
                if g is not None:
                    w_z[:, off:off + size] += g.reshape(B, size)
        w_lam = w_nu = None  # no cotangent on the duals unless they are outputs
        k = len(slices)
        if layer.return_duals:
            w_lam, w_nu = torch.zeros_like(self.lam), torch.zeros_like(self.nu)
            for kind, off, shape in stacked.constraint_rows:
                g = cotangents[k]
                k += 1
                if g is None:
                    continue
                size = int(torch.Size(shape).numel())
                target = w_lam if kind == "ineq" else w_nu
                target[:, off:off + size] += g.reshape(B, size)
        if self.qp_factor is not None:  # reuse the forward's constraint-space factorization
            # in inference mode, like the forward's solve (its ~40 small ops skip autograd's
            # bookkeeping: 0.9x the backward's time at (32, 10, 10, 2)); parameter_vjp
            # copies out any of its results that would reach the caller as they are
            with torch.inference_mode():
                u_z, u_lam, u_nu, failed = ipm.qp_adjoint(self.qp_factor, self.s, self.lam, w_z, w_lam, w_nu,
                                                          *self.active_set)
        else:
            if w_lam is None:
                w_lam, w_nu = torch.zeros_like(self.lam), torch.zeros_like(self.nu)
            if self.qp is not None:
                Q, c, G, _, A, _ = self.qp
                u_z, u_lam, u_nu, failed, error = ipm.scaled_kkt_adjoint(Q, c, G, A, self.s, self.lam, w_z,
                                                                         w_lam, w_nu)
            else:
                _, _, _, Jg, Jh, H = self.derivatives(self.z, self.lam, self.nu)
                u_z, u_lam, u_nu, failed, error = ipm.kkt_adjoint(H, Jg, Jh, self.s, self.lam, w_z, w_lam, w_nu)
            self._warn_if_inaccurate(error, failed)
        if failed is not None and bool(failed.any()):
            self.valid = ~failed if self.valid is None else self.valid & ~failed
            keep = self.valid[:, None]
            u_z, u_lam, u_nu = (torch.where(keep, u, torch.zeros_like(u)) for u in (u_z, u_lam, u_nu))
        return u_z, u_lam, u_nu

    def _warn_if_inaccurate(self, error, failed):
        """Warn where the transposed KKT system's answer kept a backward error above
        :func:`solvers.interior_point.adjoint_tolerance` after its second solve: those
        gradients may be inaccurate (a KKT system nearly singular at the solution)."""
        tolerance = ipm.adjoint_tolerance(error.dtype)
        inaccurate = (error > tolerance) & ~failed
        if self.valid is not None:
            inaccurate &= self.valid
        if not self.layer.warn or not bool(inaccurate.any()):
            return
        rows = inaccurate.nonzero().squeeze(-1).tolist()
        warnings.warn(
            f"the gradients of {len(rows)} of {error.shape[0]} instances (rows {rows[:10]}"
            f"{' ...' if len(rows) > 10 else ''}) may be inaccurate: the transposed KKT system's "
            f"backward error reached {float(error[inaccurate].max()):.1e} (tolerance {tolerance:.1e}); "
            "the KKT system is nearly singular at their solution",
            RuntimeWarning, stacklevel=user_stacklevel())

    def parameter_vjp(self, u):
        u_z, u_lam, u_nu = u
        code = self.layer.compiled.code
        grads = code["parameter_vjp"](self.z, self.lam, self.nu, u_z, u_lam, u_nu, self.consts, *self.params)
        out = []
        for g, p, b in zip(grads, self.params, self.parameter_batched):
            if g.is_inference():  # u itself (db = u_nu): no inference tensor may reach autograd
                g = g.clone()
            if b:
                g = g if g.shape == p.shape else g.expand_as(p)
            else:
                g = g.sum(0, keepdim=True) if g.shape[0] != 1 else g
            out.append(g)
        return tuple(out)


@dataclass
class _Wide:
    """The float64 solve of some float32 instances: the batch's result with theirs in
    place, their linearization, and their rows."""

    merged: "ipm.InteriorPointResult"
    linearization: Linearization
    rows: torch.Tensor


class _TwoPrecisions(Linearization):
    """A batch whose instances ``rows`` were solved in float64 and the others in the
    batch's dtype: each linearization differentiates its own instances, in its own
    precision (``narrow`` holds a benign state at ``rows``, which it treats as failed),
    and the parameters' cotangents are put together: a batched one's rows from
    ``wide``, a shared one's sum of both."""

    def __init__(self, narrow: Linearization, wide: Linearization, rows: torch.Tensor):
        self.narrow, self.wide, self.rows = narrow, wide, rows
        self.parameter_batched = narrow.parameter_batched

    @property
    def valid(self):  # (read again after the backward, which may clear entries of either)
        narrow, wide = self.narrow.valid, self.wide.valid
        if wide is None:
            wide = torch.ones(self.rows.shape, dtype=torch.bool, device=self.rows.device)
        return narrow.index_copy(0, self.rows, wide)

    def transposed_solve(self, output_cotangents):
        narrow = tuple(None if g is None else g.index_fill(0, self.rows, 0.0) for g in output_cotangents)
        wide = tuple(None if g is None else g.index_select(0, self.rows).double() for g in output_cotangents)
        return self.narrow.transposed_solve(narrow), self.wide.transposed_solve(wide)

    def parameter_vjp(self, u):
        out = []
        for mine, theirs, batched in zip(self.narrow.parameter_vjp(u[0]), self.wide.parameter_vjp(u[1]),
                                         self.parameter_batched):
            theirs = theirs.to(mine.dtype)
            out.append(mine.index_copy(0, self.rows, theirs) if batched else mine + theirs)
        return tuple(out)


def _active_set_of(result):
    """(active set, its factor, the factor's row order) when every instance's solution
    is an exact active-set solution whose factorization the backward can reuse, else
    Nones."""
    if result.polished is None or result.active_factor is None or not bool(result.polished.all()):
        return (None, None, None)
    return (result.active_set, result.active_factor, result.active_order)


def _choose(available, chosen, what, kind, subset=False):
    if chosen is None:
        return list(available)
    chosen = list(chosen)
    for c in chosen:
        if not isinstance(c, kind):
            raise TypeError(f"{what} must be a list of dl.{kind.__name__} objects, got {type(c).__name__}")
    ids = [id(c) for c in chosen]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what} lists the same {kind.__name__.lower()} twice")
    known = {id(a) for a in available}
    unknown = [c.name for c in chosen if id(c) not in known]
    if unknown:
        raise ValueError(f"{what}: {unknown} do not appear in the problem")
    if not subset and len(chosen) != len(available):
        missing = [a.name for a in available if id(a) not in set(ids)]
        raise ValueError(f"{what} must list every parameter of the problem; missing {missing}")
    if subset and not chosen:
        raise ValueError(f"{what} must not be empty")
    return chosen
