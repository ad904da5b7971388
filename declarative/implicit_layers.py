"""Layers defined by an equation ``F(theta, y) = 0`` or a fixed point ``y = T(y, x)``.

Both layers differentiate their solution through the implicit function theorem with the
shared mechanism of :mod:`declarative.implicit_diff`: the forward solver (any code at
all) is not recorded, and the backward pass solves one linear system with the Jacobian
``dF/dy`` at the solution, whose products come from torch autograd applied to ``F``.

* :class:`ImplicitLayer`: ``F`` is user torch code, the forward solver is user code
  (scipy, ``torch.linalg.eigh`` ...) or the built-in batched Newton method
  :func:`newton`.
* :class:`FixedPointLayer`: ``F(x, y) = y - T(y, x)`` for a torch module or function
  ``T``; forward by plain iteration, Anderson acceleration or Broyden's method;
  backward exact ("ift"), Jacobian-free ("jfb") or unrolled ("unroll").

Backward linear solve (``linear_solver``)
----------------------------------------
``"dense"``  forms ``dF/dy`` per instance, ``(B, n, n)``, from ``n`` vectorized
             vector-Jacobian products and solves with batched LU;
``"gmres"``  matrix-free restarted GMRES on vector-Jacobian products ``v -> (dF/dy)' v``;
``"cg"``     matrix-free conjugate gradients, only for ``dF/dy`` symmetric positive
             definite (e.g. ``F`` the gradient of a strictly convex function);
``"auto"``   ``"dense"`` when ``n <= dense_threshold`` (default
             :data:`DENSE_THRESHOLD` = 64 unknowns per instance), else ``"gmres"``.

Failure handling
----------------
Every instance carries a status in the layer's ``.info`` (the last call's
:class:`ImplicitInfo` / :class:`FixedPointInfo`). An instance whose forward solve did
not reach the tolerance, or whose ``dF/dy`` turns out singular (or whose Krylov solve
does not converge) in the backward pass, gets NaN gradients for its own batched inputs
(zeros where the loss leaves its outputs out) and contributes nothing to the gradients
of shared parameters; a warning says which instances. Other instances are unaffected.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from declarative.implicit_diff import (EmptyBatch, Linearization, full_precision_forward, implicit_solution,
                                      solvable, user_stacklevel)
from solvers.dense import EquilibratedQR
from solvers.fixed_point import (
    FIXED_POINT_SOLVERS,
    STATUS_NAMES,
    SolverResult,
    default_tolerance,
    lipschitz_estimate,
    newton_solve,
    vjp_jacobian,
)
from solvers.krylov import cg, gmres

__all__ = [
    "ImplicitLayer",
    "FixedPointLayer",
    "newton",
    "ImplicitInfo",
    "FixedPointInfo",
    "ConvergenceWarning",
    "NonContractiveWarning",
    "SingularJacobianWarning",
    "DENSE_THRESHOLD",
]

#: ``linear_solver="auto"`` uses a dense Jacobian up to this many unknowns per instance.
DENSE_THRESHOLD = 64

_LINEAR_SOLVERS = ("auto", "dense", "gmres", "cg")
_IMPLICIT_BACKWARDS = ("ift",)
_FIXED_POINT_BACKWARDS = ("ift", "jfb", "unroll")


class ConvergenceWarning(RuntimeWarning):
    """A forward solve left some instances above the tolerance."""


class NonContractiveWarning(RuntimeWarning):
    """The estimated Lipschitz constant of ``T`` in ``y`` at the solution exceeds 1."""


class SingularJacobianWarning(RuntimeWarning):
    """``dF/dy`` could not be inverted for some instances in the backward pass."""


@dataclass
class ImplicitInfo:
    """Per-instance report of the last call of an :class:`ImplicitLayer`.

    Attributes
    ----------
    status : list of str
        ``B`` entries: ``"converged"``; ``"max_iter"`` (iterative solver stopped above
        the tolerance); ``"diverged"`` (non-finite values); ``"singular_jacobian"``
        (Newton met a singular ``dF/dy``); ``"residual_above_tol"`` (the solver
        returned a point with ``||F||_inf > tol``).
    residual : torch.Tensor
        ``(B,)``: ``||F(theta, y)||_inf`` at the returned ``y`` (for fixed points the
        relative residual ``||T(y) - y|| / (1 + ||y||)``).
    iterations : torch.Tensor or None
        ``(B,)`` int64 iterations of a built-in solver; None for user solvers.
    linear_solver : str or None
        The backward linear solve that will be used ("dense", "gmres", "cg").
    backward_status : list of str or None
        Set by the backward pass: ``"ok"``, ``"skipped"`` (forward failed),
        ``"singular_jacobian"`` or ``"linear_solve_failed"``; None before any backward.
    """

    status: List[str]
    residual: torch.Tensor
    iterations: Optional[torch.Tensor] = None
    linear_solver: Optional[str] = None
    backward_status: Optional[List[str]] = None

    @property
    def converged(self) -> torch.Tensor:
        """``(B,)`` bool: forward status is ``"converged"``."""
        return torch.tensor([s == "converged" for s in self.status], dtype=torch.bool,
                            device=self.residual.device)


@dataclass
class FixedPointInfo(ImplicitInfo):
    """Per-instance report of the last call of a :class:`FixedPointLayer`.

    Adds to :class:`ImplicitInfo`:

    contraction_factor : torch.Tensor or None
        ``(B,)`` estimate of ``||dT/dy||_2`` at the solution (power iteration on
        vector-Jacobian products; a lower bound of the true norm). Above 1, ``T`` is not
        a contraction there. None when disabled (``contraction_iterations=0``).
    solver, backward : str
        The options used.
    """

    contraction_factor: Optional[torch.Tensor] = None
    solver: str = ""
    backward: str = ""


def _resolve(name: str, value, valid: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")
    return value


class _AutogradLinearization(Linearization):
    """``F`` at the solution, with both products from autograd on ``F``.

    Holds only the inputs and the solution (nothing of the forward solver) and the graph
    of ``F`` at the solution on the valid instances alone, so a failed instance (NaN
    solution, singular Jacobian) cannot leak into other instances or into the gradients
    of shared parameters. The layer builds that graph as its forward ends
    (:func:`_prepare_backward`), and it lives as long as the linearization (a second
    backward uses it again).
    """

    def __init__(self, residual: Callable, inputs: Sequence[torch.Tensor], input_batched: Sequence[bool],
                 module_parameters: Sequence[torch.Tensor], y: torch.Tensor, valid: torch.Tensor, *,
                 linear_solver: str, tol: float, max_iter: Optional[int], restart: int,
                 info: ImplicitInfo, layer_name: str):
        self.residual = residual
        self.inputs = tuple(x.detach() for x in inputs)
        self.needs_grad = tuple(bool(x.requires_grad) for x in inputs)
        self.input_batched = tuple(input_batched)
        self.module_parameters = tuple(module_parameters)
        self.parameter_batched = self.input_batched + (False,) * len(self.module_parameters)
        self.y = y.detach()
        self.valid = valid
        self.linear_solver = linear_solver
        self.tol = tol
        self.max_iter = max_iter
        self.restart = restart
        self.info = info
        self.layer_name = layer_name
        self._graph = None
        self._no_cotangent = False

    def _build_graph(self):
        valid = self.valid
        index = None if bool(valid.all()) else valid.nonzero()[:, 0]
        # (its tensors saved by hooks of its own: under a checkpoint's (use_reentrant=False)
        # the backward's first use of them ran the whole checkpointed forward again, solve
        # included: a fixed-point layer's T 39 times instead of once)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_saved, _unsaved):
            y = (self.y if index is None else self.y[index]).requires_grad_(True)
            inputs = []
            for x, batched, needs in zip(self.inputs, self.input_batched, self.needs_grad):
                x = x[index] if (batched and index is not None) else x
                inputs.append(x.detach().requires_grad_(needs))
            f = self.residual(*inputs, y)
        _check_residual(f, y)
        self._warn_undeclared_leaves(f, inputs, y)
        self._graph = (index, y, inputs, f)

    def _warn_undeclared_leaves(self, f, inputs, y) -> None:
        known = {id(t) for t in inputs} | {id(p) for p in self.module_parameters} | {id(y)}
        undeclared = [t for t in _graph_leaves(f) if id(t) not in known]
        if undeclared:
            shapes = [tuple(t.shape) for t in undeclared[:5]]
            warnings.warn(
                f"{self.layer_name}: the residual uses {len(undeclared)} tensor(s) that require grad but are "
                f"neither inputs nor parameters of an nn.Module (shapes {shapes}); the implicit backward gives "
                "them no gradient. Pass them as inputs, make the residual (or T) an nn.Module, or list them "
                "in extra_parameters=", UserWarning, stacklevel=user_stacklevel())

    def check_closure(self) -> None:
        """Build the graph of ``F`` once, only to warn about undeclared leaves."""
        if bool(self.valid.any()):
            self._build_graph()
            self._graph = None

    def transposed_solve(self, output_cotangents):
        (ybar,) = output_cotangents
        batch = self.y.shape[0]
        n = self.y[0].numel()
        u = self.y.new_zeros(batch, n)
        skipped = ~self.valid
        self._no_cotangent = ybar is None or not bool(self.valid.any())
        if self._no_cotangent:
            self._record_backward(skipped, None, None)
            return u
        if self._graph is None:
            self._build_graph()
        index, y, _, f = self._graph
        rows = y.shape[0]
        rhs = ybar.reshape(batch, n)
        rhs = rhs if index is None else rhs[index]
        if self.linear_solver == "dense":
            jacobian = vjp_jacobian(f, y)                                   # (b, n, n)
            factor = EquilibratedQR(jacobian)
            solution = factor.solve_transposed(rhs)
            failed = factor.singular | ~torch.isfinite(solution).all(dim=1)
            reason = "singular_jacobian"
        else:
            def matvec(v):
                (product,) = torch.autograd.grad(f, y, v.reshape(f.shape), retain_graph=True, allow_unused=True)
                return torch.zeros_like(v) if product is None else product.reshape(rows, n)

            krylov = gmres if self.linear_solver == "gmres" else cg
            options = dict(tol=self.tol, max_iter=self.max_iter)
            if krylov is gmres:
                options["restart"] = self.restart
            result = krylov(matvec, rhs, **options)
            solution = result.solution
            failed = ~result.converged
            reason = "linear_solve_failed"
        solution = torch.where(failed[:, None], torch.zeros_like(solution), solution)
        failed_full = torch.zeros_like(self.valid)
        if index is None:
            u = solution
            failed_full = failed
        else:
            u[index] = solution
            failed_full[index] = failed
        if bool(failed_full.any()):
            # The mechanism reads ``valid`` again after the products: these instances
            # get NaN gradients instead of silently wrong ones.
            self.valid = self.valid & ~failed_full
            where = failed_full.nonzero()[:, 0].tolist()
            warnings.warn(
                f"{self.layer_name}: dF/dy could not be inverted in the backward pass for instances "
                f"{where} ({reason}, linear solver {self.linear_solver!r}); their gradients are NaN "
                "and they contribute nothing to shared parameters (see .info.backward_status)",
                SingularJacobianWarning, stacklevel=user_stacklevel())
        self._record_backward(skipped, failed_full, reason)
        return u

    def _record_backward(self, skipped, failed, reason):
        status = ["skipped" if s else "ok" for s in skipped.tolist()]
        if failed is not None:
            for k in failed.nonzero()[:, 0].tolist():
                status[k] = reason
        self.info.backward_status = status

    def parameter_vjp(self, u):
        grads: List[Optional[torch.Tensor]] = [None] * (len(self.inputs) + len(self.module_parameters))
        if self._graph is None or self._no_cotangent:
            for k, (x, needs) in enumerate(zip(self.inputs, self.needs_grad)):
                if needs:
                    grads[k] = torch.zeros_like(x)
            return tuple(grads)
        # (the graph is kept for a second backward, with the linearization: rebuilt then,
        # it would miss parameters swapped in by functional_call, see _prepare_backward)
        index, y, inputs, f = self._graph
        wanted = [(k, x) for k, (x, needs) in enumerate(zip(inputs, self.needs_grad)) if needs]
        wanted += [(len(inputs) + k, p) for k, p in enumerate(self.module_parameters) if p.requires_grad]
        if not wanted:
            return tuple(grads)
        u_rows = u if index is None else u[index]
        with torch.enable_grad():
            products = torch.autograd.grad(f, [x for _, x in wanted], -u_rows.reshape(f.shape),
                                           allow_unused=True, retain_graph=True)
        for (k, tensor), g in zip(wanted, products):
            if g is None:
                g = torch.zeros_like(tensor)
            if k < len(inputs) and self.input_batched[k] and index is not None:
                full = self.inputs[k].new_zeros(self.inputs[k].shape)
                full[index] = g
                g = full
            grads[k] = g
        return tuple(grads)


def _graph_leaves(output: torch.Tensor) -> List[torch.Tensor]:
    """Leaf tensors requiring grad that ``output`` was computed from."""
    leaves, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def newton(residual: Callable[..., torch.Tensor], *inputs: torch.Tensor, y0: torch.Tensor,
           tol: Optional[float] = None, max_iter: int = 50, line_search: bool = True) -> SolverResult:
    """Batched Newton method for ``residual(*inputs, y) = 0`` in ``y``.

    Usable on its own or as the forward solver of an :class:`ImplicitLayer`
    (``ImplicitLayer(residual, newton, initial_guess=...)``, or
    ``functools.partial(newton, max_iter=...)`` to set options); the layer then passes
    the residual, its inputs, ``y0`` and its ``tol``. Jacobians come from autograd:
    ``n`` vectorized vector-Jacobian products per step, ``(B, n, n)``; steps are
    batched LU solves with a per-instance backtracking line search.

    Parameters
    ----------
    residual : callable
        ``residual(*inputs, y) -> F``: ``y`` is ``(B, *shape)``, ``F`` has ``B`` rows
        and ``prod(shape)`` entries per row; each instance independent of the others.
    *inputs : torch.Tensor
        Passed to ``residual`` unchanged (not differentiated here).
    y0 : torch.Tensor
        ``(B, *shape)`` initial guess.
    tol : float, optional
        Stop when ``||F||_inf <= tol`` (default ``sqrt(eps)`` of the dtype).
    max_iter : int
        Maximum Newton steps.
    line_search : bool
        Backtracking on ``||F||^2``.

    Returns
    -------
    SolverResult
        ``solution`` ``(B, *shape)``, ``status`` codes ("converged", "max_iter",
        "diverged", "singular_jacobian"), ``iterations`` and ``residual`` ``(B,)``.
    """
    if not callable(residual):
        raise TypeError(f"residual must be callable, got {type(residual).__name__}")
    for k, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input {k} must be a tensor, got {type(x).__name__}")
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"y0 must be a tensor (B, *shape), got {type(y0).__name__}")
    detached = tuple(x.detach() for x in inputs)
    with torch.no_grad():
        return newton_solve(lambda y: residual(*detached, y), y0.detach(), tol=tol, max_iter=max_iter,
                            line_search=line_search)


def _is_newton(solve) -> bool:
    return solve is newton or (isinstance(solve, functools.partial) and solve.func is newton)


def _module_parameters(*objects, extra: Sequence[torch.Tensor] = ()) -> List[torch.Tensor]:
    params: List[torch.Tensor] = []
    seen = set()
    for p in extra:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    for obj in objects:
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def _check_extra_parameters(extra) -> Tuple[torch.Tensor, ...]:
    extra = tuple(extra)
    for k, p in enumerate(extra):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"extra_parameters[{k}] must be a tensor, got {type(p).__name__}")
    return extra


def _check_linear_options(linear_solver, dense_threshold, backward_tol, backward_max_iter, gmres_restart):
    _resolve("linear_solver", linear_solver, _LINEAR_SOLVERS)
    if not isinstance(dense_threshold, int) or dense_threshold < 0:
        raise ValueError(f"dense_threshold must be a non-negative int, got {dense_threshold!r}")
    if backward_tol is not None and not backward_tol > 0:
        raise ValueError(f"backward_tol must be positive, got {backward_tol!r}")
    if backward_max_iter is not None and (not isinstance(backward_max_iter, int) or backward_max_iter < 1):
        raise ValueError(f"backward_max_iter must be a positive int, got {backward_max_iter!r}")
    if not isinstance(gmres_restart, int) or gmres_restart < 1:
        raise ValueError(f"gmres_restart must be a positive int, got {gmres_restart!r}")


def _pick_linear_solver(linear_solver: str, n: int, dense_threshold: int) -> str:
    if linear_solver == "auto":
        return "dense" if n <= dense_threshold else "gmres"
    return linear_solver


def _default_backward_tol(dtype: torch.dtype) -> float:
    # eps^(2/3): about 4e-11 in float64, 2e-5 in float32; tighter than the forward
    # tolerance, so the linear solve is not what limits the gradient's accuracy.
    return torch.finfo(dtype).eps ** (2 / 3)


class ImplicitLayer(nn.Module):
    """A layer whose output ``y`` solves ``residual(*inputs, y) = 0``.

    The forward pass runs ``solve(*inputs)``, any solver at all (it runs without
    autograd recording), checks ``||F||_inf <= tol`` per instance, and returns ``y``.
    The backward pass is the implicit function theorem: for an output cotangent
    ``ybar`` it solves ``(dF/dy)' u = ybar`` and returns ``-(dF/dtheta)' u``, with both
    Jacobians from autograd applied to ``residual`` at the solution.

    Parameters
    ----------
    residual : callable or nn.Module
        ``residual(*inputs, y) -> F`` in torch. ``y`` is ``(B, *shape)``; ``F`` must have
        ``B`` rows with ``prod(shape)`` entries each (a square system), and each
        instance must depend on its own row of ``y`` and of the batched inputs only.
        Parameters of an ``nn.Module`` residual receive gradients as shared parameters;
        tensors captured in a closure do not (pass them as inputs).
    solve : callable
        ``solve(*inputs) -> y``: a tensor ``(B, *shape)``, a numpy array (converted to
        the dtype and device of the inputs) or a :class:`~solvers.fixed_point.SolverResult`.
        Or :func:`newton` (optionally through ``functools.partial``), which then needs
        ``initial_guess`` or ``y0``.
    backward : str
        ``"ift"`` (the only mode: exact implicit differentiation).
    tol : float, optional
        Residual tolerance per instance (default ``sqrt(eps)`` of the dtype, about 1.5e-8
        in float64, 3.5e-4 in float32); instances above it are reported and their
        gradients are NaN.
    input_batched : sequence of bool, optional
        For each input, whether it carries the leading batch dimension ``B``
        (default: all do). Shared inputs get gradients summed over the batch.
    initial_guess : tensor or callable, optional
        For :func:`newton`: a shared ``(*shape)`` tensor, or ``initial_guess(*inputs)
        -> (B, *shape)``. ``forward(..., y0=...)`` overrides it per call.
    linear_solver : str
        ``"auto"`` (default), ``"dense"``, ``"gmres"`` or ``"cg"``; see the module
        docstring. ``"auto"`` is dense up to ``dense_threshold`` unknowns.
    dense_threshold : int
        Default :data:`DENSE_THRESHOLD` (64): about where, on CPU, n vectorized
        vector-Jacobian products plus a batched LU start to cost more than a GMRES
        solve for a well-conditioned (e.g. contractive fixed-point) Jacobian.
    backward_tol : float, optional
        Relative tolerance of the Krylov solves (default ``eps**(2/3)``).
    backward_max_iter : int, optional
        Krylov iteration limit (default ``max(2 n, 100)`` capped at 1000).
    gmres_restart : int
        GMRES restart length.
    extra_parameters : sequence of tensors
        Shared tensors the residual uses through a closure (not as inputs and not as
        parameters of an ``nn.Module`` residual) that must receive gradients. Leaves
        requiring grad that are none of these trigger a warning in the backward pass.

    Attributes
    ----------
    info : ImplicitInfo or None
        The last call's per-instance report.
    """

    def __init__(self, residual: Callable[..., torch.Tensor], solve: Callable[..., torch.Tensor], *,
                 backward: str = "ift", tol: Optional[float] = None,
                 input_batched: Optional[Sequence[bool]] = None,
                 initial_guess: Union[torch.Tensor, Callable[..., torch.Tensor], None] = None,
                 linear_solver: str = "auto", dense_threshold: int = DENSE_THRESHOLD,
                 backward_tol: Optional[float] = None, backward_max_iter: Optional[int] = None,
                 gmres_restart: int = 30, extra_parameters: Sequence[torch.Tensor] = ()):
        super().__init__()
        if not callable(residual):
            raise TypeError(f"residual must be callable, got {type(residual).__name__}")
        if not callable(solve):
            raise TypeError(f"solve must be callable, got {type(solve).__name__}")
        self.backward_mode = _resolve("backward", backward, _IMPLICIT_BACKWARDS)
        _check_linear_options(linear_solver, dense_threshold, backward_tol, backward_max_iter, gmres_restart)
        if tol is not None and not tol > 0:
            raise ValueError(f"tol must be positive, got {tol!r}")
        if initial_guess is not None and not (callable(initial_guess) or isinstance(initial_guess, torch.Tensor)):
            raise TypeError("initial_guess must be a tensor or a callable, got "
                            f"{type(initial_guess).__name__}")
        self.residual = residual
        self.solve = solve
        self.extra_parameters = _check_extra_parameters(extra_parameters)
        self.tol = tol
        self.input_batched = None if input_batched is None else tuple(bool(b) for b in input_batched)
        if isinstance(initial_guess, torch.Tensor):
            # a buffer, so that .to() and .double() move it with the layer; not in the state
            # dict (an argument of the layer, like the residual, not state it learns)
            self.register_buffer("initial_guess", initial_guess.detach().clone(), persistent=False)
        else:
            self.initial_guess = initial_guess
        self.linear_solver = linear_solver
        self.dense_threshold = dense_threshold
        self.backward_tol = backward_tol
        self.backward_max_iter = backward_max_iter
        self.gmres_restart = gmres_restart
        self.info: Optional[ImplicitInfo] = None

    @full_precision_forward
    def forward(self, *inputs: torch.Tensor, y0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Solve for ``y`` given ``inputs``.

        Parameters
        ----------
        *inputs : torch.Tensor
            ``theta``: batched inputs are ``(B, ...)``.
        y0 : torch.Tensor, optional
            ``(B, *shape)`` initial guess for :func:`newton`.

        Returns
        -------
        torch.Tensor
            ``y``, ``(B, *shape)``.
        """
        batched = self._batched_flags(inputs)
        inputs, y0 = tuple(solvable(x) for x in inputs), solvable(y0)  # (float16, bfloat16: in float32)
        batch = self._batch_size(inputs, batched)
        dtype, device = self._dtype_device(inputs)
        parameters = _module_parameters(self.residual, extra=self.extra_parameters)
        layer = self

        def solve(*arguments):
            explicit = arguments[: len(inputs)]
            y, codes, iterations = layer._run_solver(explicit, y0, batch, dtype, device)
            if not y.shape[0]:  # an empty batch: nothing to check, nothing to differentiate
                layer.info = ImplicitInfo(status=[], residual=y.new_zeros(0), iterations=iterations)
                return (y,), EmptyBatch(arguments, batched + (False,) * len(parameters))
            f = layer.residual(*explicit, y)
            _check_residual(f, y)
            residual = f.reshape(y.shape[0], -1).abs().amax(dim=1)
            status = _combine_status(codes, residual, layer._status_tol(y.dtype))
            valid = torch.tensor([s == "converged" for s in status], dtype=torch.bool, device=y.device)
            method = _pick_linear_solver(layer.linear_solver, y[0].numel(), layer.dense_threshold)
            info = ImplicitInfo(status=status, residual=residual, iterations=iterations, linear_solver=method)
            layer.info = info
            linearization = _AutogradLinearization(
                layer.residual, explicit, batched, parameters, y, valid, linear_solver=method,
                tol=layer.backward_tol if layer.backward_tol is not None else _default_backward_tol(y.dtype),
                max_iter=layer.backward_max_iter, restart=layer.gmres_restart, info=info,
                layer_name=type(layer).__name__)
            holder["linearization"] = linearization
            return (y,), linearization

        holder = {}
        (y,) = implicit_solution(solve, *inputs, *parameters)
        if "linearization" in holder:
            _prepare_backward(holder["linearization"], y, inputs, parameters)
        _warn_failures(self.info, type(self).__name__, _NAN_GRADIENTS)
        return y

    def _status_tol(self, dtype) -> float:
        """The tolerance the solution's residual is held to: the one Newton solved to.
        That is ``functools.partial(newton, tol=...)``'s where given, as in
        :meth:`_run_solver` (judged against the default instead, an instance Newton had
        solved to its tol was reported max_iter and got NaN gradients); else the
        layer's; else the dtype's default."""
        given = (getattr(self.solve, "keywords", None) or {}).get("tol") if _is_newton(self.solve) else None
        if given is not None:
            return given
        return self.tol if self.tol is not None else default_tolerance(dtype)

    def _batched_flags(self, inputs) -> Tuple[bool, ...]:
        for k, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"input {k} must be a tensor, got {type(x).__name__}")
        if self.input_batched is None:
            return (True,) * len(inputs)
        if len(self.input_batched) != len(inputs):
            raise ValueError(f"input_batched has {len(self.input_batched)} entries but the layer got "
                             f"{len(inputs)} inputs")
        return self.input_batched

    @staticmethod
    def _batch_size(inputs, batched) -> Optional[int]:
        sizes = {}
        for k, (x, b) in enumerate(zip(inputs, batched)):
            if b:
                if x.dim() == 0:
                    raise ValueError(f"input {k} is marked batched but is a scalar; give it shape (B, ...)")
                sizes[k] = x.shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError("batched inputs disagree on the batch size: "
                             + ", ".join(f"input {k} has {s}" for k, s in sizes.items()))
        return next(iter(sizes.values()), None)

    @staticmethod
    def _dtype_device(inputs):
        for x in inputs:
            if x.is_floating_point():
                return x.dtype, x.device
        device = inputs[0].device if inputs else torch.device("cpu")
        return torch.get_default_dtype(), device

    def _initial_point(self, inputs, y0, batch, dtype, device):
        """Newton's start, in the inputs' dtype and on their device (a float32 guess with
        float64 inputs failed deep inside the solver's LU solve)."""
        start = self._given_start(inputs, y0, batch)
        if batch is not None and (start.dim() == 0 or start.shape[0] != batch):
            # (else the residual got it and failed, or was blamed for the shape)
            source = "y0" if y0 is not None else "initial_guess"
            raise ValueError(f"{source} gives a start of shape {tuple(start.shape)}; expected (B, ...) with the "
                             f"inputs' batch size B = {batch}")
        return start.to(dtype=dtype, device=device)

    def _given_start(self, inputs, y0, batch):
        if y0 is not None:
            if not isinstance(y0, torch.Tensor):
                raise TypeError(f"y0 must be a tensor, got {type(y0).__name__}")
            return y0.detach()
        guess = self.initial_guess
        if guess is None:
            raise ValueError("solve=newton needs a starting point: pass initial_guess= to ImplicitLayer "
                             "or y0= to the call")
        if callable(guess):
            start = guess(*inputs)
            if not isinstance(start, torch.Tensor):
                raise TypeError(f"initial_guess must return a tensor, got {type(start).__name__}")
            return start.detach()
        if batch is None:
            raise ValueError("a shared initial_guess needs at least one batched input to fix B; pass y0=")
        return guess.detach().expand((batch,) + tuple(guess.shape)).clone()

    def _run_solver(self, inputs, y0, batch, dtype, device):
        codes = iterations = None
        if _is_newton(self.solve):
            keywords = {"y0": self._initial_point(inputs, y0, batch, dtype, device)}
            partial_keywords = getattr(self.solve, "keywords", {}) or {}
            if "tol" not in partial_keywords:
                keywords["tol"] = self.tol
            out = self.solve(self.residual, *inputs, **keywords)
        else:
            out = self.solve(*inputs)
        if isinstance(out, SolverResult):
            codes, iterations, out = out.status, out.iterations, out.solution
        elif not isinstance(out, torch.Tensor):
            if type(out).__module__ == "numpy":
                out = torch.as_tensor(out, dtype=dtype, device=device)
            else:
                raise TypeError(f"solve must return a tensor (B, *shape), a numpy array or a SolverResult, "
                                f"got {type(out).__name__}")
        if not out.is_floating_point():
            raise TypeError(f"solve returned a {out.dtype} tensor; y must be floating point")
        if out.dim() == 0 or (batch is not None and out.shape[0] != batch):
            raise ValueError(f"solve returned shape {tuple(out.shape)}; expected (B, *shape) with B = {batch}")
        return out.detach(), codes, iterations


def _saved(tensor):
    # (saved as itself, an op's saved output would hold its own grad_fn, and the pair
    # would never be freed: four (B, n) tensors a call leaked so.) A detached tensor
    # shares the original's version counter; its version is kept beside it, since hooks
    # turn off autograd's own check that a saved tensor was not changed in place
    return tensor.detach(), tensor._version


def _unsaved(packed):
    tensor, version = packed
    if tensor._version != version:
        # (a buffer of T's module doubled in place between forward and backward gave the
        # gradient at the new value, silently)
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace "
            f"operation: a tensor of shape {tuple(tensor.shape)} that the layer's residual (or T) read is at "
            f"version {tensor._version}; expected version {version}. The implicit backward "
            "differentiates the residual at the solution with the values the forward saw: change "
            "buffers, parameters and closure tensors only after the backward, or out of place")
    return tensor


def _prepare_backward(linearization, y, inputs, parameters) -> None:
    """Build ``F``'s graph at the solution now, where the output ``y`` will be
    differentiated: in the caller's context, which may have swapped parameters in for
    the module's own (``torch.func.functional_call``: hypernetworks, MAML's fast
    weights). A backward run after the context put the module's back differentiated
    those instead, and gave the swapped-in weights zero gradients. Where nothing
    requires grad, only the closure check."""
    if y.requires_grad:
        if bool(linearization.valid.any()):
            linearization._build_graph()
    else:
        _check_closure_if_detached(linearization, inputs, parameters)


def _check_closure_if_detached(linearization, inputs, parameters) -> None:
    # With grad recording on but nothing declared requiring grad, the output is detached;
    # if the residual reads tensors that do require grad through a closure, say so now
    # rather than let the user meet "does not require grad" or a silently zero gradient.
    if torch.is_grad_enabled() and not any(t.requires_grad for t in (*inputs, *parameters)):
        linearization.check_closure()


def _check_residual(f, y) -> None:
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"residual must return a tensor, got {type(f).__name__}")
    if f.dim() == 0 or f.shape[0] != y.shape[0] or f[0].numel() != y[0].numel():
        raise ValueError(f"residual returned shape {tuple(f.shape)} for y of shape {tuple(y.shape)}; F must have "
                         f"B = {y.shape[0]} rows with {y[0].numel()} entries each (one equation per unknown)")


def _combine_status(codes: Optional[torch.Tensor], residual: torch.Tensor, tol: float) -> List[str]:
    finite = torch.isfinite(residual)
    above = residual > tol
    solver = [None] * residual.shape[0] if codes is None else [STATUS_NAMES[c] for c in codes.tolist()]
    status = []
    for name, ok, high in zip(solver, finite.tolist(), above.tolist()):
        if name is not None and name != "converged":
            status.append(name)
        elif not ok:
            status.append("diverged")
        elif high:
            status.append("residual_above_tol" if name is None else "max_iter")
        else:
            status.append("converged")
    return status


_NAN_GRADIENTS = "Their gradients will be NaN and they contribute nothing to shared parameters"


def _warn_failures(info: ImplicitInfo, layer_name: str, consequence: str) -> None:
    failed = [k for k, s in enumerate(info.status) if s != "converged"]
    if failed:
        kinds = sorted({info.status[k] for k in failed})
        shown = failed if len(failed) <= 10 else failed[:10] + ["..."]
        warnings.warn(
            f"{layer_name}: {len(failed)} of {len(info.status)} instances did not solve the equation "
            f"({', '.join(kinds)}) at instances {shown}; worst residual "
            f"{float(info.residual[failed].nan_to_num(math.inf).max()):.3g}. {consequence} "
            "(see .info.status)", ConvergenceWarning, stacklevel=user_stacklevel())


class FixedPointLayer(nn.Module):
    """A layer whose output is the fixed point ``y = T(y, x)``.

    Parameters
    ----------
    T : callable or nn.Module
        ``T(y, x, *more) -> y``: ``y`` is ``(B, *state_shape)``, ``x`` (and any further
        inputs) ``(B, ...)``; each instance independent of the others. Parameters of an
        ``nn.Module`` are trained.
    solver : str
        Forward solver: ``"anderson"`` (default), ``"broyden"`` or ``"iteration"``.
    backward : str
        ``"ift"`` (default): exact implicit gradient, solving ``(I - dT/dy)' u = ybar``;
        ``"jfb"``: Jacobian-free backprop, the output is ``T(y*, x)`` recorded by
        autograd from the (detached) fixed point ``y*``, so the backward is one
        application of ``T``; ``"unroll"``: ``unroll_steps`` plain iterations recorded
        by autograd (memory grows with the number of steps).
    tol : float, optional
        Relative residual ``||T(y) - y|| / (1 + ||y||)`` to reach (default ``sqrt(eps)``).
    max_iter : int
        Maximum evaluations of ``T`` in the forward solve.
    unroll_steps : int, optional
        ``K`` for ``backward="unroll"`` (default ``max_iter``): exactly ``K``
        differentiable applications of ``T`` from ``y0``, whatever ``solver`` says.
    state_shape : tuple, optional
        Shape of ``y`` without the batch dimension, for the default start ``y0 = 0``
        (default: the shape of ``x``).
    anderson_memory, anderson_regularization, damping, broyden_memory
        Solver options (see :mod:`solvers.fixed_point`).
    linear_solver, dense_threshold, backward_tol, backward_max_iter, gmres_restart
        The IFT linear solve, as in :class:`ImplicitLayer`.
    contraction_iterations : int
        Power iterations for the contraction-factor estimate in ``.info`` (0 disables
        it). A :class:`NonContractiveWarning` is issued when it exceeds 1.
    extra_parameters : sequence of tensors
        Shared tensors ``T`` uses through a closure that must receive IFT gradients
        (parameters of an ``nn.Module`` ``T`` are found automatically).

    Attributes
    ----------
    info : FixedPointInfo or None
        The last call's per-instance report.
    """

    def __init__(self, T: Callable[..., torch.Tensor], *, solver: str = "anderson", backward: str = "ift",
                 tol: Optional[float] = None, max_iter: int = 100, unroll_steps: Optional[int] = None,
                 state_shape: Optional[Sequence[int]] = None, anderson_memory: int = 5,
                 anderson_regularization: Optional[float] = None, damping: float = 1.0,
                 broyden_memory: int = 30, linear_solver: str = "auto",
                 dense_threshold: int = DENSE_THRESHOLD, backward_tol: Optional[float] = None,
                 backward_max_iter: Optional[int] = None, gmres_restart: int = 30,
                 contraction_iterations: int = 10, extra_parameters: Sequence[torch.Tensor] = ()):
        super().__init__()
        if not callable(T):
            raise TypeError(f"T must be callable, got {type(T).__name__}")
        self.solver = _resolve("solver", solver, tuple(FIXED_POINT_SOLVERS))
        self.backward_mode = _resolve("backward", backward, _FIXED_POINT_BACKWARDS)
        _check_linear_options(linear_solver, dense_threshold, backward_tol, backward_max_iter, gmres_restart)
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        if unroll_steps is not None and (not isinstance(unroll_steps, int) or unroll_steps < 1):
            raise ValueError(f"unroll_steps must be a positive int, got {unroll_steps!r}")
        if tol is not None and not tol > 0:
            raise ValueError(f"tol must be positive, got {tol!r}")
        if not 0 < damping <= 1:
            raise ValueError(f"damping must lie in (0, 1], got {damping}")
        if not isinstance(contraction_iterations, int) or contraction_iterations < 0:
            raise ValueError(f"contraction_iterations must be a non-negative int, got {contraction_iterations!r}")
        self.T = T
        self.extra_parameters = _check_extra_parameters(extra_parameters)
        self.tol = tol
        self.max_iter = max_iter
        self.unroll_steps = unroll_steps
        self.state_shape = None if state_shape is None else tuple(state_shape)
        self.anderson_memory = anderson_memory
        self.anderson_regularization = anderson_regularization
        self.damping = damping
        self.broyden_memory = broyden_memory
        self.linear_solver = linear_solver
        self.dense_threshold = dense_threshold
        self.backward_tol = backward_tol
        self.backward_max_iter = backward_max_iter
        self.gmres_restart = gmres_restart
        self.contraction_iterations = contraction_iterations
        self.info: Optional[FixedPointInfo] = None

    @full_precision_forward
    def forward(self, x: torch.Tensor, *more: torch.Tensor, y0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Return the fixed point ``y`` of ``T(., x, *more)``, ``(B, *state_shape)``.

        ``y0`` ``(B, *state_shape)`` overrides the default start (zeros).
        """
        inputs = (x,) + tuple(more)
        for k, tensor in enumerate(inputs):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"input {k} must be a tensor, got {type(tensor).__name__}")
            if tensor.dim() == 0 or tensor.shape[0] != x.shape[0]:
                raise ValueError(f"input {k} has shape {tuple(tensor.shape)}; every input must be batched "
                                 f"with B = {x.shape[0]} rows")
        inputs, y0 = tuple(solvable(t) for t in inputs), solvable(y0)  # (float16, bfloat16: in float32)
        x = inputs[0]
        start = self._start(x, y0)
        if not x.shape[0]:
            return self._empty(inputs, start)
        tol = self.tol if self.tol is not None else default_tolerance(start.dtype)
        if self.backward_mode == "unroll":
            y, result = self._unroll(inputs, start, tol)
            y_star = y.detach()
        elif self.backward_mode == "jfb":
            detached = tuple(t.detach() for t in inputs)
            with torch.no_grad():
                result = self._solve(detached, start, tol)
            y_star = result.solution
            y = self.T(y_star, *inputs)  # one recorded application: the JFB backward
        else:
            y, result = self._ift(inputs, start, tol)
            y_star = y.detach()
        contraction = None
        if self.contraction_iterations > 0:
            detached = tuple(t.detach() for t in inputs)
            contraction = lipschitz_estimate(lambda v: self.T(v, *detached), y_star,
                                             iterations=self.contraction_iterations)
        info = self.info if self.backward_mode == "ift" else None
        status = result.status_names()
        if info is None:
            info = FixedPointInfo(status=status, residual=result.residual, iterations=result.iterations)
        info.contraction_factor = contraction
        info.solver = self.solver if self.backward_mode != "unroll" else "iteration"
        info.backward = self.backward_mode
        self.info = info
        _warn_failures(info, type(self).__name__, _NAN_GRADIENTS if self.backward_mode == "ift" else
                       f"backward={self.backward_mode!r} still differentiates what was computed")
        if contraction is not None:
            above = (contraction > 1) & torch.isfinite(contraction)
            if bool(above.any()):
                where = above.nonzero()[:, 0].tolist()
                warnings.warn(
                    f"{type(self).__name__}: T is not contractive at the solution for {len(where)} instance(s) "
                    f"{where[:10]}: estimated Lipschitz constant in y up to {float(contraction[above].max()):.3g} > 1. "
                    "The fixed point may be non-unique or unstable, the forward solver may fail and IFT/JFB "
                    "gradients may be unreliable", NonContractiveWarning, stacklevel=user_stacklevel())
        return y

    def _empty(self, inputs, start):
        """A batch of no instances: the empty state, attached to the inputs and parameters
        with zero gradients, and an empty report."""
        parameters = _module_parameters(self.T, extra=self.extra_parameters)
        flags = (True,) * len(inputs) + (False,) * len(parameters)
        (y,) = implicit_solution(lambda *arguments: ((start,), EmptyBatch(arguments, flags)),
                                 *inputs, *parameters)
        self.info = FixedPointInfo(status=[], residual=start.new_zeros(0),
                                   iterations=torch.zeros(0, dtype=torch.int64, device=start.device),
                                   solver=self.solver if self.backward_mode != "unroll" else "iteration",
                                   backward=self.backward_mode)
        return y

    def _start(self, x, y0):
        if y0 is not None:
            if not isinstance(y0, torch.Tensor):
                raise TypeError(f"y0 must be a tensor, got {type(y0).__name__}")
            if y0.dim() == 0 or y0.shape[0] != x.shape[0]:
                raise ValueError(f"y0 has shape {tuple(y0.shape)}; expected (B, *state_shape) with B = {x.shape[0]}")
            return y0.detach()
        shape = self.state_shape if self.state_shape is not None else tuple(x.shape[1:])
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        return torch.zeros((x.shape[0],) + shape, dtype=dtype, device=x.device)

    def _solve(self, inputs, start, tol) -> SolverResult:
        T = lambda y: self.T(y, *inputs)
        if self.solver == "anderson":
            return FIXED_POINT_SOLVERS["anderson"](T, start, tol=tol, max_iter=self.max_iter,
                                                   memory=self.anderson_memory,
                                                   regularization=self.anderson_regularization,
                                                   damping=self.damping)
        if self.solver == "broyden":
            return FIXED_POINT_SOLVERS["broyden"](T, start, tol=tol, max_iter=self.max_iter,
                                                  memory=self.broyden_memory)
        return FIXED_POINT_SOLVERS["iteration"](T, start, tol=tol, max_iter=self.max_iter, damping=self.damping)

    def _ift(self, inputs, start, tol):
        parameters = _module_parameters(self.T, extra=self.extra_parameters)
        layer = self
        holder = {}

        def residual(*arguments):
            y = arguments[-1]
            return y - layer.T(y, *arguments[:-1])

        def solve(*arguments):
            explicit = arguments[: len(inputs)]
            result = layer._solve(explicit, start, tol)
            holder["result"] = result
            status = result.status_names()
            method = _pick_linear_solver(layer.linear_solver, start[0].numel(), layer.dense_threshold)
            info = FixedPointInfo(status=status, residual=result.residual, iterations=result.iterations,
                                  linear_solver=method)
            layer.info = info
            linearization = _AutogradLinearization(
                residual, explicit, (True,) * len(explicit), parameters, result.solution, result.converged,
                linear_solver=method,
                tol=layer.backward_tol if layer.backward_tol is not None else _default_backward_tol(start.dtype),
                max_iter=layer.backward_max_iter, restart=layer.gmres_restart, info=info,
                layer_name=type(layer).__name__)
            holder["linearization"] = linearization
            return (result.solution,), linearization

        (y,) = implicit_solution(solve, *inputs, *parameters)
        _prepare_backward(holder["linearization"], y, inputs, parameters)
        return y, holder["result"]

    def _unroll(self, inputs, start, tol):
        steps = self.unroll_steps if self.unroll_steps is not None else self.max_iter
        y = start
        for _ in range(steps):
            ty = self.T(y, *inputs)
            if ty.shape != y.shape:
                raise ValueError(f"T returned shape {tuple(ty.shape)} for a state of shape {tuple(y.shape)}; "
                                 "it must return a tensor of the same shape as its input")
            y = (1 - self.damping) * y + self.damping * ty if self.damping < 1 else ty
        with torch.no_grad():
            batch = y.shape[0]
            flat = y.detach().reshape(batch, -1)
            after = self.T(y.detach(), *(t.detach() for t in inputs)).reshape(batch, -1)
            residual = torch.linalg.vector_norm(after - flat, dim=1) / (1 + torch.linalg.vector_norm(flat, dim=1))
        finite = torch.isfinite(residual)
        codes = torch.where(residual <= tol, 0, 1)
        codes = torch.where(finite, codes, 2).long()
        result = SolverResult(solution=y.detach(), status=codes,
                              iterations=torch.full((batch,), steps, dtype=torch.long, device=y.device),
                              residual=residual)
        return y, result
