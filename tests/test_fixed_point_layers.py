"""FixedPointLayer and the batched fixed-point solvers.

References: closed-form fixed points of affine maps, finite differences
(``torch.autograd.gradcheck`` in float64 and central differences for module
parameters), the spectral norm from ``torch.linalg.matrix_norm``, and the torch
profiler's allocation events for memory.
"""
import importlib.util
import math
import pathlib
import warnings

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from declarative.implicit_layers import (
    ConvergenceWarning,
    FixedPointLayer,
    NonContractiveWarning,
)
from solvers.fixed_point import FIXED_POINT_SOLVERS, fixed_point_iteration, lipschitz_estimate

DOUBLE = torch.float64
SOLVERS = sorted(FIXED_POINT_SOLVERS)


def generator(seed):
    return torch.Generator().manual_seed(seed)


def matrix_with_singular_values(n, singular_values, seed):
    """(n, n) with the given leading singular values (the rest 0.1 of the last one)."""
    g = generator(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=DOUBLE, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=DOUBLE, generator=g))
    s = torch.full((n,), 0.1 * singular_values[-1], dtype=DOUBLE)
    s[: len(singular_values)] = torch.tensor(singular_values, dtype=DOUBLE)
    return U @ torch.diag(s) @ V.T


class TanhCell(nn.Module):
    """T(y, x) = tanh(W y + U x + b) with ||W||_2 = gamma: a contraction with factor gamma."""

    def __init__(self, n, d, gamma=0.7, seed=0):
        super().__init__()
        g = generator(seed)
        W = torch.randn(n, n, dtype=DOUBLE, generator=g)
        self.W = nn.Parameter(gamma * W / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(n, d, dtype=DOUBLE, generator=g) / math.sqrt(d))
        self.b = nn.Parameter(0.1 * torch.randn(n, dtype=DOUBLE, generator=g))

    def forward(self, y, x):
        return torch.tanh(y @ self.W.T + x @ self.U.T + self.b)


# --- forward solvers --------------------------------------------------------------------

@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_find_the_fixed_point_of_an_affine_map(solver):
    A = torch.stack([matrix_with_singular_values(12, [0.9, 0.5], seed=s) for s in range(3)])
    b = torch.randn(3, 12, dtype=DOUBLE, generator=generator(1))
    result = FIXED_POINT_SOLVERS[solver](lambda y: (A @ y.unsqueeze(-1)).squeeze(-1) + b,
                                         torch.zeros(3, 12, dtype=DOUBLE), tol=1e-12, max_iter=1000)
    assert result.status_names() == ["converged"] * 3
    expected = torch.linalg.solve(torch.eye(12, dtype=DOUBLE) - A, b)
    torch.testing.assert_close(result.solution, expected, rtol=1e-9, atol=1e-10)
    assert (result.residual <= 1e-12).all()


def test_acceleration_needs_far_fewer_evaluations_than_plain_iteration():
    """A slowly contracting map (factor 0.97): plain iteration needs ~ log(1e-10)/log(0.97)."""
    Q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=DOUBLE, generator=generator(2)))
    A = Q @ torch.diag(torch.linspace(-0.5, 0.97, 20, dtype=DOUBLE)) @ Q.T
    b = torch.randn(2, 20, dtype=DOUBLE, generator=generator(3))
    T = lambda y: y @ A.T + b
    iterations = {name: FIXED_POINT_SOLVERS[name](T, torch.zeros(2, 20, dtype=DOUBLE), tol=1e-10,
                                                  max_iter=2000).iterations.max().item() for name in SOLVERS}
    assert iterations["anderson"] * 4 < iterations["iteration"]
    assert iterations["broyden"] * 4 < iterations["iteration"]


def test_statuses_are_per_instance_and_failures_do_not_leak():
    """T(y) = c exp(y): c = 0.1 has an attracting fixed point, c = 1 has none (exp(y) > y)
    and blows up; a tiny max_iter leaves the third instance at 'max_iter'."""
    c = torch.tensor([[0.1], [1.0], [0.1]], dtype=DOUBLE)
    T = lambda y: c * torch.exp(y)
    for name in SOLVERS:
        result = FIXED_POINT_SOLVERS[name](T, torch.zeros(3, 1, dtype=DOUBLE), tol=1e-12, max_iter=400)
        assert result.status[0].item() == 0, name
        assert result.status_names()[1] in ("diverged", "max_iter"), name
        assert torch.isfinite(result.solution).all(), name
        # The fixed point of y = 0.1 e^y is -W(-0.1) (Lambert W): 0.111832559...
        torch.testing.assert_close(result.solution[0], torch.tensor([0.11183255915896297], dtype=DOUBLE))
    plain = fixed_point_iteration(T, torch.zeros(3, 1, dtype=DOUBLE), tol=1e-12, max_iter=2000)
    assert plain.status_names() == ["converged", "diverged", "converged"]
    short = fixed_point_iteration(T, torch.zeros(3, 1, dtype=DOUBLE), tol=1e-12, max_iter=3)
    assert short.status_names()[0] == "max_iter"


def test_lipschitz_estimate_is_the_spectral_norm():
    A = torch.stack([matrix_with_singular_values(10, [s, 0.3], seed=4) for s in (0.8, 1.4)])
    estimate = lipschitz_estimate(lambda y: (A @ y.unsqueeze(-1)).squeeze(-1), torch.zeros(2, 10, dtype=DOUBLE),
                                  iterations=30)
    torch.testing.assert_close(estimate, torch.linalg.matrix_norm(A, 2), rtol=1e-6, atol=0)


# --- gradients --------------------------------------------------------------------------

@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("linear_solver", ["dense", "gmres"])
def test_ift_gradient_matches_finite_differences(solver, linear_solver):
    cell = TanhCell(6, 4, seed=5)
    layer = FixedPointLayer(cell, solver=solver, tol=1e-13, max_iter=500, state_shape=(6,),
                            linear_solver=linear_solver)
    x = torch.randn(3, 4, dtype=DOUBLE, generator=generator(6), requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert layer.info.status == ["converged"] * 3


def directional_derivative(layer, cell, x, loss, seed):
    """(autograd, central finite difference) of loss(layer(x)) along a random direction in
    the parameters of ``cell``."""
    params = list(cell.parameters())
    grads = torch.autograd.grad(loss(layer(x)), params)
    g = generator(seed)
    directions = [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params]
    step = 1e-6

    def shifted(t):
        with torch.no_grad():
            for p, d in zip(params, directions):
                p.add_(t * d)
            value = loss(layer(x))
            for p, d in zip(params, directions):
                p.sub_(t * d)
        return value

    analytic = sum((gr * d).sum() for gr, d in zip(grads, directions))
    return analytic, (shifted(step) - shifted(-step)) / (2 * step)


def test_an_output_edited_in_place_keeps_its_gradient():
    # relu_ on the state raised "Output 0 of _ImplicitFunction is a view ... modified
    # inplace"; the gradient is that of relu(y), against a central difference
    cell = TanhCell(6, 4, seed=3)
    layer = FixedPointLayer(cell, tol=1e-13, max_iter=500, state_shape=(6,))
    x = torch.randn(2, 4, dtype=DOUBLE, generator=generator(4), requires_grad=True)
    (grad,) = torch.autograd.grad(torch.relu_(layer(x)).sum(), x)
    direction = torch.randn(x.shape, dtype=DOUBLE, generator=generator(5))
    with torch.no_grad():
        step = 1e-6
        difference = (torch.relu(layer(x + step * direction)).sum()
                      - torch.relu(layer(x - step * direction)).sum()) / (2 * step)
    torch.testing.assert_close((grad * direction).sum(), difference, atol=1e-7, rtol=1e-6)


def test_weights_swapped_in_by_functional_call_get_their_gradients():
    # Hypernetworks and MAML's fast weights: torch.func.functional_call swaps tensors in
    # for the module's parameters during the call. The backward rebuilt T afterwards,
    # with the module's own: the swapped-in weights got zero gradients and the input's
    # was wrong. Reference: autograd through the plain iteration with the same weights.
    from torch.func import functional_call

    cell = TanhCell(5, 4, seed=8)
    layer = FixedPointLayer(cell, tol=1e-13, max_iter=500, state_shape=(5,))
    g = generator(9)
    x = torch.randn(3, 4, dtype=DOUBLE, generator=g, requires_grad=True)
    weights = {name: (p.detach() + 0.1 * torch.randn(p.shape, dtype=DOUBLE, generator=g)).requires_grad_()
               for name, p in cell.named_parameters()}
    w = torch.randn(3, 5, dtype=DOUBLE, generator=g)
    y = functional_call(layer, {"T." + name: t for name, t in weights.items()}, (x,))
    first = torch.autograd.grad((w * y).sum(), [x, *weights.values()], retain_graph=True)
    # a second backward, after functional_call put the module's weights back
    grads = torch.autograd.grad((w * y).sum(), [x, *weights.values()])
    for a, b in zip(first, grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    z = torch.zeros(3, 5, dtype=DOUBLE)
    for _ in range(300):
        z = functional_call(cell, weights, (z, x))
    expected = torch.autograd.grad((w * z).sum(), [x, *weights.values()])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


def test_ift_gradient_of_module_parameters_matches_finite_differences():
    cell = TanhCell(8, 5, seed=7)
    layer = FixedPointLayer(cell, tol=1e-13, max_iter=500, state_shape=(8,))
    x = torch.randn(4, 5, dtype=DOUBLE, generator=generator(8))
    analytic, numeric = directional_derivative(layer, cell, x, lambda y: (y ** 2).sum(), seed=9)
    torch.testing.assert_close(analytic, numeric, rtol=1e-7, atol=1e-9)


def parameter_gradient(mode, cell, x, target, **options):
    layer = FixedPointLayer(cell, backward=mode, tol=1e-13, max_iter=500, state_shape=(8,), **options)
    loss = (layer(x) - target).square().sum()
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(cell.parameters()))]), layer


def test_jfb_gives_a_descent_direction():
    cell = TanhCell(8, 5, gamma=0.5, seed=10)
    x = torch.randn(16, 5, dtype=DOUBLE, generator=generator(11))
    target = torch.randn(16, 8, dtype=DOUBLE, generator=generator(12)).tanh()
    exact, _ = parameter_gradient("ift", cell, x, target)
    jfb, _ = parameter_gradient("jfb", cell, x, target)
    assert torch.dot(jfb, exact) > 0.5 * jfb.norm() * exact.norm()      # within 60 degrees

    def loss_after_step(step):
        params = list(cell.parameters())
        with torch.no_grad():
            offset = 0
            saved = [p.clone() for p in params]
            for p in params:
                p -= step * jfb[offset: offset + p.numel()].reshape(p.shape)
                offset += p.numel()
            layer = FixedPointLayer(cell, tol=1e-13, max_iter=500, state_shape=(8,))
            value = (layer(x) - target).square().sum()
            for p, s in zip(params, saved):
                p.copy_(s)
        return value

    assert loss_after_step(1e-3) < loss_after_step(0.0)


@pytest.mark.filterwarnings("ignore::declarative.implicit_layers.ConvergenceWarning")
def test_unrolling_many_steps_approaches_the_ift_gradient():
    cell = TanhCell(8, 5, gamma=0.6, seed=13)
    x = torch.randn(4, 5, dtype=DOUBLE, generator=generator(14))
    target = torch.zeros(4, 8, dtype=DOUBLE)
    exact, _ = parameter_gradient("ift", cell, x, target)
    errors = []
    for steps in (3, 10, 60):
        unrolled, layer = parameter_gradient("unroll", cell, x, target, unroll_steps=steps)
        assert layer.info.iterations.tolist() == [steps] * 4
        errors.append((unrolled - exact).norm().item() / exact.norm().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-9


# --- memory -----------------------------------------------------------------------------

def peak_memory(fn):
    """Peak bytes allocated while running ``fn``: the running sum of the profiler's
    allocation (+) and release (-) events in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


class LinearTanh(nn.Module):
    def __init__(self, n, seed):
        super().__init__()
        g = generator(seed)
        W = torch.randn(n, n, dtype=DOUBLE, generator=g)
        self.W = nn.Parameter(0.9 * W / torch.linalg.matrix_norm(W, 2))

    def forward(self, y, x):
        return torch.tanh(y @ self.W.T + x)


@pytest.mark.filterwarnings("ignore::declarative.implicit_layers.ConvergenceWarning")
def test_ift_and_jfb_memory_do_not_grow_with_iterations_but_unroll_does():
    """Forward iterations are raised by tightening tol (IFT, JFB) or by K (unroll)."""
    n, batch = 200, 16
    cell = LinearTanh(n, seed=15)
    x = torch.randn(batch, n, dtype=DOUBLE, generator=generator(16))
    measured = {}
    for mode in ("ift", "jfb", "unroll"):
        for tol, steps in ((1e-2, 5), (1e-10, 40)):
            layer = FixedPointLayer(cell, solver="iteration", backward=mode, tol=tol, max_iter=500,
                                    unroll_steps=steps, contraction_iterations=0, linear_solver="gmres",
                                    backward_tol=1e-8)

            def step():
                layer(x).square().sum().backward()

            step()                      # warm up: first-call allocations are not the point
            cell.zero_grad(set_to_none=True)
            layer.info = None
            measured[mode, tol] = (peak_memory(step), int(layer.info.iterations.max()))
            cell.zero_grad(set_to_none=True)
    for mode in ("ift", "jfb", "unroll"):
        (few_bytes, few_iterations), (many_bytes, many_iterations) = measured[mode, 1e-2], measured[mode, 1e-10]
        assert many_iterations >= 3 * few_iterations, (mode, measured)
        if mode == "unroll":
            # Every recorded step keeps at least one (B, n) float64 activation.
            assert many_bytes - few_bytes >= (many_iterations - few_iterations) * batch * n * 8, measured
        else:
            assert many_bytes <= few_bytes * 1.05 + 4096, (mode, measured)
    assert measured["unroll", 1e-10][0] > 4 * measured["ift", 1e-10][0]


# --- diagnostics and bad input -----------------------------------------------------------

def test_non_contractive_T_warns_with_the_estimate():
    """T(y, x) = A y + x with ||A||_2 = 1.3 but I - A invertible: Anderson still finds the
    fixed point, and the report says T is not a contraction there."""
    A = matrix_with_singular_values(4, [1.3, 0.2], seed=17)

    class Affine(nn.Module):
        def forward(self, y, x):
            return y @ A.T + x

    layer = FixedPointLayer(Affine(), solver="anderson", tol=1e-12, max_iter=100, contraction_iterations=30)
    x = torch.randn(2, 4, dtype=DOUBLE, generator=generator(18))
    with pytest.warns(NonContractiveWarning, match=r"1\.3"):
        y = layer(x)
    torch.testing.assert_close(layer.info.contraction_factor, torch.full((2,), 1.3, dtype=DOUBLE), rtol=1e-6, atol=0)
    torch.testing.assert_close(y, torch.linalg.solve(torch.eye(4, dtype=DOUBLE) - A, x.T).T)


def test_contractive_T_does_not_warn_and_reports_its_factor():
    cell = TanhCell(6, 3, gamma=0.7, seed=19)
    layer = FixedPointLayer(cell, tol=1e-12, state_shape=(6,), contraction_iterations=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(5, 3, dtype=DOUBLE, generator=generator(20)))
    factor = layer.info.contraction_factor
    assert factor.shape == (5,)
    assert (factor > 0).all() and (factor <= 0.7 + 1e-9).all()   # tanh' <= 1 scales ||W|| = 0.7 down


def test_a_non_converged_instance_gets_nan_gradient_and_others_are_exact():
    """y = c tanh(w y) + d: c = 0.5 contracts; for c = -3 the fixed point has slope -3 and
    plain iteration falls into a 2-cycle, so instance 1 never converges."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.tensor(1.0, dtype=DOUBLE))

        def forward(self, y, x):
            return x[:, :1] * torch.tanh(self.weight * y) + x[:, 1:]

    T = Scaled()
    x = torch.tensor([[0.5, 0.3], [-3.0, 0.01], [0.4, -0.2]], dtype=DOUBLE, requires_grad=True)
    layer = FixedPointLayer(T, solver="iteration", tol=1e-12, max_iter=60, state_shape=(1,),
                            contraction_iterations=0)
    with pytest.warns(ConvergenceWarning, match=r"instances \[1\]"):
        y = layer(x)
    assert layer.info.status == ["converged", "max_iter", "converged"]
    grad_x, grad_w = torch.autograd.grad(y.sum(), (x, T.weight))
    assert torch.isnan(grad_x[1]).all() and torch.isfinite(grad_x[[0, 2]]).all()
    good = torch.tensor([0, 2])
    x_good = x.detach()[good].requires_grad_(True)
    ref_x, ref_w = torch.autograd.grad(layer(x_good).sum(), (x_good, T.weight))
    torch.testing.assert_close(grad_x[good], ref_x)
    torch.testing.assert_close(grad_w, ref_w)


def test_bad_T_and_bad_options_raise():
    x = torch.randn(2, 3, dtype=DOUBLE)
    with pytest.raises(ValueError, match="T returned shape"):
        FixedPointLayer(lambda y, x: y[:, :2], solver="iteration")(x)
    with pytest.raises(ValueError, match="T returned shape"):
        FixedPointLayer(lambda y, x: y[:, :2], backward="unroll", unroll_steps=2)(x)
    with pytest.raises(ValueError, match="'iteration', 'anderson', 'broyden'"):
        FixedPointLayer(lambda y, x: y, solver="newton")
    with pytest.raises(ValueError, match="'ift', 'jfb', 'unroll'"):
        FixedPointLayer(lambda y, x: y, backward="adjoint")
    with pytest.raises(TypeError):
        FixedPointLayer(lambda y, x: y, "anderson")        # options are keyword-only
    with pytest.raises(ValueError, match="every input must be batched"):
        FixedPointLayer(lambda y, x, z: y)(x, torch.ones(3))


# --- the digits example ------------------------------------------------------------------

def test_deq_digits_example_learns(tmp_path):
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "deq_digits.py"
    spec = importlib.util.spec_from_file_location("deq_digits_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    plot = tmp_path / "curves.png"
    results = example.main(["--epochs", "5", "--train-subset", "1000", "--hidden", "64", "--no-progress",
                            "--device", "cpu", "--plot", str(plot)])
    assert plot.stat().st_size > 0  # the figure is saved as PNG
    for mode in ("jfb", "ift"):
        assert results[mode]["accuracy"] > 0.85, results   # chance is 0.1
        assert results[mode]["peak_memory_bytes"] > 0


@pytest.mark.parametrize("backward", ["ift", "jfb", "unroll"])
def test_an_empty_batch_gives_an_empty_state_and_gradients(backward):
    # A batch of no instances: the empty state, an empty report, zero-size gradients for
    # the input and zeros for the cell's parameters; then a real batch as before.
    torch.manual_seed(0)
    cell = nn.Sequential(nn.Linear(5, 5), nn.Tanh()).double()
    layer = FixedPointLayer(lambda y, x: 0.5 * cell(y) + x, backward=backward, extra_parameters=list(cell.parameters()))
    x = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 5) and layer.info.status == [] and layer.info.iterations.shape == (0,)
    y.sum().backward()
    assert x.grad.shape == (0, 5)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in cell.parameters())
    assert layer(torch.randn(3, 5, dtype=torch.float64)).shape == (3, 5) and layer.info.status == ["converged"] * 3



@pytest.mark.parametrize("backward", [True, False])
def test_calls_leave_no_tensors_behind(backward):
    # F's graph, built as the forward ends, was saved as it is: tanh's saved output held
    # its own grad_fn, and the pair was never freed (four (B, n) tensors a call)
    import gc

    cell = TanhCell(6, 4, seed=2)
    layer = FixedPointLayer(cell, tol=1e-12, state_shape=(6,))

    def live():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    counts = []
    for _ in range(6):
        x = torch.randn(3, 4, dtype=DOUBLE, requires_grad=True)
        y = layer(x)
        if backward:
            y.square().sum().backward()
        del x, y
        counts.append(live())
    assert counts[-1] <= counts[1]


def test_a_map_differentiable_once_gets_its_contraction_estimate():
    # T through an autograd.Function whose backward is once_differentiable (fused
    # kernels' are): the contraction estimate's second derivative raised inside the
    # forward. It falls back to J' alone (the spectral radius); the gradient is that of
    # the unrolled iteration with torch.tanh
    from torch.autograd.function import once_differentiable

    class Tanh(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u):
            out = torch.tanh(u)
            ctx.save_for_backward(out)
            return out

        @staticmethod
        @once_differentiable
        def backward(ctx, g):
            (out,) = ctx.saved_tensors
            return g * (1 - out * out)

    W = 0.5 * torch.eye(4, dtype=torch.float64) + 0.1
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    layer = FixedPointLayer(lambda z, u: Tanh.apply(z @ W.T + u), tol=1e-12)
    y = layer(x)
    assert layer.info.status == ["converged"] * 2
    assert bool(((layer.info.contraction_factor > 0) & (layer.info.contraction_factor < 1)).all())
    (g,) = torch.autograd.grad(y.sum(), x)
    z = torch.zeros_like(x)
    for _ in range(200):
        z = torch.tanh(z @ W.T + x)
    (expected,) = torch.autograd.grad(z.sum(), x)
    torch.testing.assert_close(g, expected)
