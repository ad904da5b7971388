"""One implicit-differentiation mechanism for every layer kind.

A layer computes ``y(theta)`` with ``F(theta, y(theta)) = 0`` by any forward solver.
The implicit function theorem gives ``dy/dtheta = -[dF/dy]^-1 dF/dtheta``, so for an
output cotangent ``ybar`` the parameter cotangent is

    u        = solve((dF/dy)^T u = ybar)
    thetabar = -(dF/dtheta)^T u

Each layer kind only supplies a :class:`Linearization` of its residual at the solution:

* optimization layers: F is the KKT residual, the transposed solve reuses the reduced
  KKT system of the interior-point method and ``(dF/dtheta)^T u`` is compiled code;
* ``ImplicitLayer``: F is user torch code, both products come from autograd;
* ``FixedPointLayer``: F = y - T(y, x), likewise from autograd.

Nothing of the forward solver is kept, so the memory of the backward pass does not
depend on how many iterations the forward pass took.
"""
from __future__ import annotations

import abc
import contextlib
import functools
import os
import sys
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["Linearization", "EmptyBatch", "implicit_solution", "full_precision_forward"]

# this package, the compiler and the solvers (siblings of this one) and torch: frames a
# warning about a layer call looks past, as it does past the code the compiler generates
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIBRARY_DIRS = tuple(os.path.join(_ROOT, name) + os.sep for name in ("declarative", "compiler", "solvers")) + (
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,)


def _in_library(filename: str) -> bool:
    return filename.startswith("<declarative-generated") or os.path.abspath(filename).startswith(_LIBRARY_DIRS)


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function that calls this one
    that names the first frame outside this library and torch: the user's line that
    called the layer, or its backward (a fixed count named torch's autograd internals
    there, or a frame of the layer where the same warning came by another path)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _in_library(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    # (none: a backward on a device's autograd thread, whose stack is torch's alone; the
    # warning then names its own line rather than none at all)
    return level if frame is not None else 1


def full_precision_forward(forward):
    """A layer's ``forward`` as ``torch.compile`` and autocast see it: run eagerly, in
    the inputs' dtype.

    * Inside a ``torch.compile``-d model the layer is a graph break. Dynamo cannot trace
      the solvers usefully (their loops end on data, and synchronize with the host to
      find out), and it failed outright on two layer kinds: the generated code's module
      is not importable, and a fixed-point layer's own autograd calls are a double
      backward to aot_autograd. ``torch.compiler.disable`` is applied only while dynamo
      traces: it imports dynamo, and with dynamo imported, 4 of 6 runs of two spawned
      DDP workers (gloo) hung.
    * Under autocast the layer runs with autocast off: an interior point whose batched
      products autocast made bfloat16 ended every instance of a QP ``numerical_error``
      (NaN outputs). A user function inside a layer may enable autocast itself.
    * Under ``torch.inference_mode()`` (Lightning validates, tests and predicts in it) the
      layer runs outside it, under ``no_grad``, on copies of inputs made there: autograd
      records nothing in inference mode, ``enable_grad`` included, and implicit and
      fixed-point layers record their own functions (Newton's Jacobians, the contraction
      estimate): Newton raised, and the contraction factor read 0.
    """
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", lambda: False)  # (torch >= 2.3)

    @functools.wraps(forward)
    def full_precision(*args, **kwargs):
        if is_compiling():
            return compiler.disable(forward)(*args, **kwargs)
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return full_precision(*map(_ordinary, args), **{k: _ordinary(v) for k, v in kwargs.items()})
        with _without_autocast((*args, *kwargs.values())):
            return forward(*args, **kwargs)
    return full_precision


def _ordinary(value):
    """An inference tensor copied into an ordinary one (which autograd may record
    functions of); anything else as it is."""
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


#: input dtypes a layer solves in float32 (autocast hands them on): an iterative solver
#: needs the digits, and some of its kernels (LU on the CPU) have no bfloat16 version
LOW_PRECISION = (torch.float16, torch.bfloat16)


def solvable(t):
    """``t`` in the dtype a layer solves it in: float16 and bfloat16 as float32
    (differentiably), anything else as it is."""
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION else t


def _without_autocast(values):
    """A context with autocast off for the device of the first tensor among ``values``
    (the CPU if none), where it is on; else one that does nothing (the common case)."""
    device_type = next((v.device.type for v in values if isinstance(v, torch.Tensor)), "cpu")
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # (torch < 2.4: no device argument)
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # (a device type autocast does not know)
        enabled = False
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


class Linearization(abc.ABC):
    """What the backward pass needs of ``F`` at the solution.

    Attributes
    ----------
    valid : torch.Tensor or None
        ``(B,)`` bool: instances whose solution may be differentiated. Invalid instances
        (failed solves, NaN inputs) get NaN gradients for their own batched parameters
        (zeros where the loss reads none of their outputs) and contribute nothing to the
        gradients of shared parameters. ``transposed_solve`` may clear more entries
        (e.g. a singular dF/dy found only in the backward); the mechanism reads
        ``valid`` again after ``parameter_vjp``.
    parameter_batched : sequence of bool
        For each parameter, whether it carries the leading batch dimension.
    """

    valid: Optional[torch.Tensor] = None
    parameter_batched: Sequence[bool] = ()

    @abc.abstractmethod
    def transposed_solve(self, output_cotangents: Tuple[Optional[torch.Tensor], ...]):
        """Solve ``(dF/dy)^T u = ybar`` for the cotangents of the layer outputs.

        ``output_cotangents`` holds one tensor (or None for an unused output) per output.
        Returns ``u`` in whatever layout :meth:`parameter_vjp` expects.
        """

    @abc.abstractmethod
    def parameter_vjp(self, u) -> Tuple[Optional[torch.Tensor], ...]:
        """Return ``-(dF/dtheta)^T u`` for every parameter (None where not needed),
        reduced to each parameter's own shape (batch dimension summed for shared ones)."""


class EmptyBatch(Linearization):
    """The linearization of a batch of no instances: no equations, so no cotangent
    reaches a parameter (zeros of its shape; a shared parameter's gradient sums over no
    instances). Every layer kind answers an empty batch with empty outputs and this."""

    def __init__(self, parameters: Sequence[torch.Tensor], parameter_batched: Sequence[bool]):
        self.parameters = tuple(parameters)
        self.parameter_batched = tuple(parameter_batched)

    def transposed_solve(self, output_cotangents):
        return None

    def parameter_vjp(self, u):
        return tuple(torch.zeros_like(p) for p in self.parameters)


class _ImplicitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, solve, *parameters):
        outputs, linearization = solve(*parameters)
        ctx.linearization = linearization
        # the inputs and their versions, as references, not saved tensors: the backward
        # reads none of them but to check that none changed in place since (an optimizer
        # step taken with a backward still pending got a gradient mixing the old solution
        # with the new values), and to tie its gradients to them when asked for a graph
        # (see _NotTwice). (Saved, under a checkpoint, unpacking them ran the checkpointed
        # forward again, solve and all.)
        ctx.versions = tuple((p, p._version) for p in parameters if isinstance(p, torch.Tensor))
        # the caller gets copies it owns: an output edited in place (y += b, a ReLU with
        # inplace=True) must not move the point the backward linearizes at (an implicit
        # layer's backward silently differentiated at the edited point), nor be a view
        # of the solver's state or an inference tensor of its solve
        return tuple(o.clone() for o in outputs)

    @staticmethod
    def backward(ctx, *output_cotangents):
        for k, (p, version) in enumerate(ctx.versions):
            if p._version != version:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: input {k} of a declarative layer ({tuple(p.shape)}) is at version "
                    f"{p._version}; expected version {version} (it was changed after the layer's forward)")
        create_graph = torch.is_grad_enabled()
        # (a backward called inside an autocast region runs with it: off here, as in
        # the forward, see full_precision_forward)
        with torch.no_grad(), _without_autocast(output_cotangents):
            grads = _ImplicitFunction._backward(ctx, output_cotangents)
        if create_graph:
            anchors = tuple(p for p, _ in ctx.versions if p.requires_grad)
            anchors += tuple(g for g in output_cotangents if g is not None and g.requires_grad)
            grads = tuple(g if g is None else _NotTwice.apply(g, *anchors) for g in grads)
        return grads

    @staticmethod
    def _backward(ctx, output_cotangents):
        lin: Linearization = ctx.linearization
        given = output_cotangents
        if lin.valid is not None:
            # A failed instance must not leak NaN into shared parameters' gradients.
            keep = lin.valid
            output_cotangents = tuple(
                None if g is None else torch.where(_expand_mask(keep, g), g, torch.zeros_like(g))
                for g in output_cotangents
            )
        u = lin.transposed_solve(output_cotangents)
        grads = list(lin.parameter_vjp(u))
        if lin.valid is not None and not bool(lin.valid.all()):
            # a failed instance's own batched inputs get NaN gradients where the loss
            # reads its outputs; where it does not, zeros, as any input the loss does not
            # depend on: NaN there spread through a shared encoder upstream into every one
            # of its weights' gradients, the loss itself finite (a loss that leaves failed
            # instances out is how a training loop copes with them)
            read = torch.zeros_like(lin.valid)  # (a cotangent not zero)
            for g in given:
                if g is not None:
                    read |= (g != 0).reshape(g.shape[0], -1).any(-1)
            failed = ~lin.valid & read
            for k, (g, batched) in enumerate(zip(grads, lin.parameter_batched)):
                if g is not None and batched:
                    grads[k] = torch.where(_expand_mask(failed, g), torch.full_like(g, float("nan")), g)
        return (None, *grads)


class _NotTwice(torch.autograd.Function):
    """A layer's gradient, as a function of the layer's inputs that cannot be
    differentiated: the backward pass is not itself recorded, so a second derivative
    through a layer (``create_graph=True``: gradient penalties, MAML) would otherwise
    treat the gradient as a constant, a silently wrong answer where the second-order
    loss also depends on something else. Differentiating it raises instead."""

    @staticmethod
    def forward(ctx, gradient, *anchors):
        return gradient.clone()

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "a declarative layer is differentiable once: its gradients (implicit function theorem) "
            "are not themselves differentiable, so second derivatives through it (create_graph=True: "
            "gradient penalties, MAML's outer loop) are not supported")


def _expand_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape + (1,) * (like.dim() - mask.dim()))


def implicit_solution(solve, *parameters: torch.Tensor):
    """Run ``solve(*parameters) -> (outputs, linearization)`` without recording the
    solver in the autograd graph, and attach the implicit-function-theorem backward.

    ``outputs`` is a tuple of tensors; gradients flow to every parameter that requires
    grad through ``linearization`` (a :class:`Linearization`). ``solve`` runs with
    gradient recording off; a solver that needs autograd inside (e.g. Newton on a torch
    residual) turns it on locally with ``torch.enable_grad()``.
    """
    return _ImplicitFunction.apply(solve, *parameters)
