"""Smooth nonlinear problems: closed forms (softmax, sparsemax), CVXPY, gradcheck."""
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import declarative as dl
from references import solve


def softmax_layer(n, **options):
    z = dl.Variable(n, name="z")
    theta = dl.Parameter(n, name="theta")
    prob = dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))), [dl.sum(z) == 1, z >= 0])
    assert prob.problem_class == "NLP"
    return prob.to_torch(**options)


def assert_solves_softmax(theta, atol, max_iterations, **options):
    """A softmax layer solves every instance of ``theta`` (B, n) to ``atol`` of
    torch.softmax, in at most ``max_iterations``."""
    layer = softmax_layer(theta.shape[-1], **options)
    z = layer(theta)
    assert layer.info.status == ["optimal"] * theta.shape[0]
    torch.testing.assert_close(z, torch.softmax(theta.double(), -1).to(theta.dtype), atol=atol, rtol=0)
    assert int(layer.info.iterations.max()) <= max_iterations


def sparsemax_layer(n, **options):
    z = dl.Variable(n, name="z")
    theta = dl.Parameter(n, name="theta")
    prob = dl.Problem(dl.Minimize(dl.sum_squares(z - theta)), [dl.sum(z) == 1, z >= 0])
    assert prob.problem_class == "QP"
    return prob.to_torch(**options)


def sparsemax_closed_form(theta):
    """Martins & Astudillo (2016): threshold tau from the sorted input."""
    srt, _ = torch.sort(theta, dim=-1, descending=True)
    k = torch.arange(1, theta.shape[-1] + 1, dtype=theta.dtype)
    cumsum = srt.cumsum(-1)
    support = 1 + k * srt > cumsum
    k_z = support.sum(-1, keepdim=True)
    tau = (cumsum.gather(-1, k_z - 1) - 1) / k_z.to(theta.dtype)
    return torch.clamp(theta - tau, min=0)


@pytest.mark.parametrize("dtype,tol,atol", [(torch.float64, 1e-10, 1e-8), (torch.float32, None, 1e-4)])
def test_softmax_as_optimization(dtype, tol, atol):
    n, B = 6, 16
    layer = softmax_layer(n, tol=tol)
    theta = 2 * torch.randn(B, n, dtype=dtype, generator=torch.Generator().manual_seed(0))
    z = layer(theta)
    assert z.dtype == dtype
    assert layer.info.status == ["optimal"] * B
    torch.testing.assert_close(z, torch.softmax(theta, -1), atol=atol, rtol=0)


def test_softmax_of_widely_spread_logits():
    # logits spread over 15-50: Mehrotra's corrector can point uphill on the merit far
    # from the solution (this first row stalled at its second iteration), and entries
    # of z* down to 1e-20 need the full Newton tail
    first = torch.tensor([[2.62, -11.11, -5.44, -5.53, -3.55, 1.64, 3.16, -0.47, -6.3, 4.74]], dtype=torch.float64)
    theta = torch.cat([first, 5 * torch.randn(63, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))])
    layer = softmax_layer(10, tol=1e-11)
    z = layer(theta)
    assert layer.info.status == ["optimal"] * 64
    torch.testing.assert_close(z, torch.softmax(theta, -1), atol=1e-9, rtol=0)


def test_softmax_of_widely_spread_logits_in_float32():
    theta = 10 * torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    layer = softmax_layer(100)
    z = layer(theta)
    assert z.dtype == torch.float32
    assert layer.info.status == ["optimal"] * 64
    torch.testing.assert_close(z, torch.softmax(theta, -1), atol=1e-5, rtol=0)


def test_float32_softmax_beyond_float32s_range_is_solved_again_in_float64(monkeypatch):
    # Logits 20 x randn need entries of z* near 1e-52, below float32's range; float32
    # finishes them at its default tolerance. At one near float32's precision (1e-7)
    # some instances stop short (here one, whose iterate turned NaN) and are solved
    # again in float64, their backward there too (rounded to float32, an entry of 1e-52
    # is 0, outside the entropy's domain). Half the batch is ordinary (logits 1 x randn);
    # a shared shift w sums its gradient over both kinds. Reference: softmax in float64
    # and autograd.
    import declarative.layer as layer_module

    handed_over = []
    in_float64 = layer_module.OptimizationLayer._in_float64_for_failures
    monkeypatch.setattr(layer_module.OptimizationLayer, "_in_float64_for_failures",
                        lambda self, result, *rest: handed_over.append(result) or in_float64(self, result, *rest))
    n, B = 100, 16
    z = dl.Variable(n, name="z")
    theta, w = dl.Parameter(n, name="theta"), dl.Parameter(n, name="w")
    layer = dl.Problem(dl.Maximize((theta - w) @ z + dl.sum(dl.entropy(z))), [dl.sum(z) == 1, z >= 0]).to_torch(
        tol=1e-7)
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([20.0, 1.0]).repeat(B // 2)[:, None]
    theta_t = (scale * torch.randn(B, n, generator=gen)).requires_grad_()
    w_t = torch.randn(n, generator=gen).requires_grad_()
    out = layer(theta_t, w_t)
    assert out.dtype == torch.float32 and layer.info.status == ["optimal"] * B
    assert len(handed_over) == 1 and 0 < int((handed_over[0].status != 0).sum()) < B
    weights = torch.randn(B, n, generator=gen)
    (out * weights).sum().backward()
    theta_64, w_64 = theta_t.detach().double().requires_grad_(), w_t.detach().double().requires_grad_()
    ref = torch.softmax(theta_64 - w_64, -1)
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-6, rtol=0)
    torch.testing.assert_close(theta_t.grad.double(), theta_64.grad, atol=2e-6, rtol=0)
    torch.testing.assert_close(w_t.grad.double(), w_64.grad, atol=1e-5, rtol=0)


def test_float32_instances_that_float32_can_finish_stay_in_float32(monkeypatch):
    # Weighted entropy with 5 rows of G z <= h at logits 10 x randn: the slacks of
    # active rows fall below float32's smallest normal number as the iterates converge;
    # taken for want of precision, some instances were handed to float64 (115
    # iterations in all, not 69). Every instance finishes in float32.
    layer, (theta, w, G, h), _ = weighted_entropy_with_rows(10, 5, 64)
    theta = theta * (10 / 3)  # (the helper's are 3 x randn)
    import declarative.layer as layer_module

    handed_over = []
    monkeypatch.setattr(layer_module.OptimizationLayer, "_in_float64_for_failures",
                        lambda self, result, *rest: handed_over.append(result) or None)
    layer(*(t.float() for t in (theta, w, G, h)))
    assert layer.info.status == ["optimal"] * 64 and not handed_over


def test_softmax_with_entries_spanning_25_decades():
    # 1/z, the Hessian's diagonal, then spans 1 to 1e25: the structured Newton step is
    # exact there, where a dense one regularized by its largest entry stalls
    theta = 10 * torch.randn(16, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                             requires_grad=True)
    layer = softmax_layer(100, tol=1e-11)
    z = layer(theta)
    assert layer.info.status == ["optimal"] * 16
    expected = torch.softmax(theta, -1)
    torch.testing.assert_close(z, expected, atol=1e-12, rtol=1e-6)
    w = torch.randn(16, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((w * z).sum(), theta)
    (grad_expected,) = torch.autograd.grad((w * expected).sum(), theta)
    torch.testing.assert_close(grad, grad_expected, atol=1e-9, rtol=1e-6)


def test_softmax_converges_superlinearly_at_the_end():
    # Once z* is found, the multipliers of z >= 0 (all inactive) must go to zero faster
    # than the 100-fold per iteration that a fixed 0.99 fraction to the boundary allows
    # (13 iterations here with it)
    theta = 2 * torch.randn(32, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert_solves_softmax(theta, 1e-10, 11, tol=1e-11)


@pytest.mark.parametrize("decades", [16, 24])
def test_exp_objective_with_data_over_many_decades(decades):
    # minimize sum(exp(y)) - theta'y, sum(y) = 0, |y| <= 60: inside the box
    # theta - exp(y) is the equality's multiplier, the same for every entry. exp(y) then
    # spans as many decades as theta; early steps are ~1e-13 along directions of ~1e14
    y = dl.Variable(20, name="y")
    theta = dl.Parameter(20, name="theta")
    layer = dl.Problem(dl.Minimize(dl.sum(dl.exp(y)) - theta @ y), [dl.sum(y) == 0, y >= -60, y <= 60]).to_torch(
        tol=1e-11)
    gen = torch.Generator().manual_seed(0)
    th = 10.0 ** ((torch.rand(64, 20, dtype=torch.float64, generator=gen) - 0.5) * decades)
    out = layer(th)
    assert layer.info.status == ["optimal"] * 64
    inside = out.abs() < 60 - 1e-6
    multiplier = th - out.exp()
    spread = multiplier.masked_fill(~inside, -float("inf")).amax(-1) - multiplier.masked_fill(~inside, float("inf")).amin(-1)
    assert float((spread / th.amax(-1)).max()) < 1e-9
    assert float(out.sum(-1).abs().max()) < 1e-8


@pytest.mark.parametrize("s", [0.05, 0.02])
def test_a_start_where_an_exp_is_huge_sets_no_stopping_scale(s):
    # the log's domain starts x at 1, where exp(x / s) is 1e9 to 1e22: the stopping test,
    # relative to the gradient there, came out absolute at 1e2 to 1e15, and the loop
    # stopped 'optimal' at x = 0.053 and 0.62 where the solution is 5e-4 and 2e-4
    x, q = dl.Variable(3, name="x"), dl.Parameter(3, name="q")
    layer = dl.Problem(dl.Minimize(dl.sum(dl.exp(x / s)) + dl.sum_squares(x - q) - 0.01 * dl.sum(dl.log(x)))).to_torch()
    q_v = np.array([0.02, 0.01, 0.03])
    out = layer(q=torch.tensor(q_v[None], dtype=torch.float64))
    assert layer.info.status == ["optimal"]
    # separable: each entry is the root of its derivative (Clarabel's exponential cone
    # stops 1e-4 short of it, a derivative of 2e-3 where this one has 2e-6)
    from scipy.optimize import brentq
    expected = [brentq(lambda v: np.exp(v / s) / s + 2 * (v - qj) - 0.01 / v, 1e-12, 1.0, xtol=1e-16) for qj in q_v]
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-6)


def test_a_start_the_domain_forces_far_out_sets_no_stopping_scale():
    # log(x0 + x1 - 15) starts x at 10, where exp(2 x1) is 5e8: 'optimal' at x1 = 0.43
    # where the solution is -0.37
    x, q = dl.Variable(2, name="x"), dl.Parameter(2, name="q")
    layer = dl.Problem(dl.Minimize(dl.sum_squares(x - q) + dl.sum(dl.exp(2 * x[1:])) - dl.log(x[0] + x[1] - 15))
                       ).to_torch()
    out = layer(q=torch.tensor([[20.0, 0.0]], dtype=torch.float64))
    assert layer.info.status == ["optimal"]
    xv = cp.Variable(2)
    solve(cp.Problem(cp.Minimize(cp.sum_squares(xv - np.array([20.0, 0.0])) + cp.sum(cp.exp(2 * xv[1:]))
                                 - cp.log(xv[0] + xv[1] - 15))))
    np.testing.assert_allclose(out[0].numpy(), xv.value, atol=1e-5)


def test_going_on_at_the_solutions_scale_keeps_each_instances_own_iteration_limit():
    # the instances that go on after their stopping scale was found too large shared the
    # batch's fewest used iterations as their limit: one took 25 of max_iter 24 and
    # ended optimal in a batch, max_iter alone
    x, q, a = dl.Variable(3, name="x"), dl.Parameter(3, name="q"), dl.Parameter(3, name="a")
    layer = dl.Problem(dl.Minimize(dl.sum(dl.exp(x / 0.02 + a)) + dl.sum_squares(x - q)
                                   - 0.01 * dl.sum(dl.log(x)))).to_torch(max_iter=24, warn=False)
    q_t = torch.tensor([[0.02, 0.01, 0.03]] * 2, dtype=torch.float64)
    a_t = torch.tensor([[-35.0] * 3, [-42.0] * 3], dtype=torch.float64)
    together = layer(q=q_t, a=a_t)
    statuses, iterations = list(layer.info.status), layer.info.iterations.tolist()
    alone = layer(q=q_t[:1], a=a_t[:1])
    assert statuses[0] == layer.info.status[0] and iterations[0] == int(layer.info.iterations[0])
    assert max(iterations) <= 24
    assert torch.equal(together[0], alone[0])


def test_softmax_jacobian_is_diag_minus_outer():
    n = 5
    layer = softmax_layer(n, tol=1e-12)
    theta = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    J = torch.autograd.functional.jacobian(layer, theta)
    s = torch.softmax(theta, -1)
    torch.testing.assert_close(J, torch.diag(s) - torch.outer(s, s), atol=1e-8, rtol=0)


def test_softmax_gradcheck():
    layer = softmax_layer(4, tol=1e-13)
    theta = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    assert torch.autograd.gradcheck(layer, (theta,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_sparsemax_closed_form_and_jacobian():
    n, B = 7, 12
    layer = sparsemax_layer(n, tol=1e-12)
    theta = torch.randn(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z = layer(theta)
    ref = sparsemax_closed_form(theta)
    torch.testing.assert_close(z, ref, atol=1e-8, rtol=0)
    # Jacobian of sparsemax: diag(s) - s s'/|S| with s the support indicator
    for i in range(3):
        J = torch.autograd.functional.jacobian(layer, theta[i])
        support = (ref[i] > 0).to(torch.float64)
        expected = torch.diag(support) - torch.outer(support, support) / support.sum()
        torch.testing.assert_close(J, expected, atol=1e-6, rtol=0)


def test_parameter_entering_nonlinearly():
    # min ||x - exp(theta)||^2 s.t. sum(x) <= 1: projection of exp(theta) onto a halfspace
    n = 4
    x = dl.Variable(n, name="x")
    theta = dl.Parameter(n, name="theta")
    prob = dl.Problem(dl.Minimize(dl.sum_squares(x - dl.exp(theta))), [dl.sum(x) <= 1])
    assert prob.problem_class == "QP"  # quadratic in x even though exp(theta) is not linear
    layer = prob.to_torch(tol=1e-12)
    t = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    e = torch.exp(t)
    excess = (e.sum(-1, keepdim=True) - 1).clamp(min=0)
    torch.testing.assert_close(layer(t), e - excess / n, atol=1e-8, rtol=0)
    assert torch.autograd.gradcheck(layer, (t.clone().requires_grad_(),), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_nonlinear_parameter_in_nlp_matches_cvxpy():
    # max theta'x + sum(entropy(x)) - ||x||^2 s.t. A x <= b with theta = log(w) (w a parameter)
    n, m = 5, 3
    x = dl.Variable(n, name="x")
    w = dl.Parameter(n, name="w")
    A = dl.Parameter((m, n), name="A")
    b = dl.Parameter(m, name="b")
    prob = dl.Problem(dl.Maximize(dl.log(w) @ x + dl.sum(dl.entropy(x)) - dl.sum_squares(x)), [A @ x <= b])
    layer = prob.to_torch(tol=1e-11)
    gen = torch.Generator().manual_seed(5)
    w_t = torch.rand(2, n, generator=gen, dtype=torch.float64) + 0.5
    A_t = torch.rand(2, m, n, generator=gen, dtype=torch.float64)
    b_t = torch.rand(2, m, generator=gen, dtype=torch.float64) + 0.2
    xs = layer(w_t, A_t, b_t)
    for i in range(2):
        xv = cp.Variable(n)
        solve(cp.Problem(cp.Maximize(np.log(w_t[i].numpy()) @ xv + cp.sum(cp.entr(xv)) - cp.sum_squares(xv)),
                         [A_t[i].numpy() @ xv <= b_t[i].numpy()]))
        np.testing.assert_allclose(xs[i].numpy(), xv.value, atol=1e-6)
    inputs = tuple(t[:1].clone().requires_grad_() for t in (w_t, A_t, b_t))
    assert torch.autograd.gradcheck(layer, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("atom,cvx_atom", [
    ("exp", cp.exp), ("softplus", lambda v: cp.logistic(v)), ("square", cp.square),
])
def test_convex_atoms_match_cvxpy(atom, cvx_atom):
    n = 4
    x = dl.Variable(n, name="x")
    c = dl.Parameter(n, name="c")
    prob = dl.Problem(dl.Minimize(dl.sum(getattr(dl, atom)(x)) - c @ x), [x <= 2, x >= -2])
    c_t = torch.tensor([0.5, 1.5, -0.3, 3.0], dtype=torch.float64)
    x_t = prob.to_torch(tol=1e-11)(c_t)
    xv = cp.Variable(n)
    solve(cp.Problem(cp.Minimize(cp.sum(cvx_atom(xv)) - c_t.numpy() @ xv), [xv <= 2, xv >= -2]))
    np.testing.assert_allclose(x_t.numpy(), xv.value, atol=1e-6)


def test_concave_atoms_match_cvxpy():
    # max sum(log(x)) + sum(sqrt(y)) - ||x||^2 - ||y||^2 + c'x s.t. x + y <= 2
    n = 3
    x = dl.Variable(n, name="x")
    y = dl.Variable(n, name="y")
    c = dl.Parameter(n, name="c")
    prob = dl.Problem(
        dl.Maximize(dl.sum(dl.log(x)) + dl.sum(dl.sqrt(y)) - dl.sum_squares(x) - dl.sum_squares(y) + c @ x),
        [x + y <= 2, dl.power(x, 2) <= 4],
    )
    c_t = torch.tensor([0.1, -0.5, 1.0], dtype=torch.float64)
    x_t, y_t = prob.to_torch(tol=1e-11)(c_t)
    xv, yv = cp.Variable(n), cp.Variable(n)
    solve(cp.Problem(cp.Maximize(cp.sum(cp.log(xv)) + cp.sum(cp.sqrt(yv)) - cp.sum_squares(xv)
                                 - cp.sum_squares(yv) + c_t.numpy() @ xv), [xv + yv <= 2, cp.power(xv, 2) <= 4]))
    np.testing.assert_allclose(x_t.numpy(), xv.value, atol=1e-6)
    np.testing.assert_allclose(y_t.numpy(), yv.value, atol=1e-6)


# logits (float32, ~20 randn) of instances that fail or converge at different times; see
# the tests below
_LOGITS_A = [4.521238327026367, -27.865596771240234, 14.073016166687012, -26.738481521606445, -13.405044555664062,
             1.9524699449539185, 11.005794525146484, 2.6005072593688965, -40.38557052612305, -25.239721298217773,
             -16.794029235839844, -2.6218111515045166, -27.68893814086914, -17.532318115234375, 6.8466796875,
             1.076347827911377, 9.321364402770996, 6.574150562286377, -30.276105880737305, -21.763500213623047]
_LOGITS_FAILING = [-37.57145309448242, 1.379611849784851, 56.17470169067383, 3.3942558765411377, 41.26129913330078,
                   52.33330535888672, 18.448335647583008, 49.13341522216797, 4.048742294311523, -31.924190521240234,
                   -6.408524513244629, 32.72219467163086, 57.03858184814453, 15.236918449401855, -29.22054100036621,
                   3.442261219024658, -36.751953125, 5.081429481506348, 36.01534652709961, -15.165648460388184]
_LOGITS_B = [17.29305076599121, -7.476293087005615, -22.355268478393555, -30.994895935058594, -13.979802131652832,
             -44.61057662963867, 14.996397972106934, -12.600613594055176, 9.625873565673828, 37.36649703979492,
             23.45991325378418, -23.02269744873047, 17.384979248046875, 23.157140731811523, -14.927130699157715,
             -19.06593894958496, -2.193837881088257, -32.028465270996094, 29.41469955444336, -48.107276916503906]
_LOGITS_C = [37.115665435791016, 34.00880432128906, -39.084224700927734, -19.3773250579834, 13.28625774383545,
             15.797344207763672, 14.731284141540527, -1.4173065423965454, 9.102416038513184, 13.060428619384766,
             -1.5574253797531128, 20.546039581298828, -45.189945220947266, 12.675869941711426, -20.681053161621094,
             19.173555374145508, -4.573688507080078, -17.775745391845703, 7.478043079376221, -18.226669311523438]


@pytest.mark.parametrize("partner", ["failing", "converging later"])
def test_an_instance_does_not_notice_its_partner(partner):
    # float32 softmax layers. With a partner that fails (numerical_error at iteration
    # 46), the batch's Newton solver fell back from the structured one for all: the
    # other instance ended max_iter instead of optimal. With a partner that converges
    # later, the retired instance was stepped by 0 along a NaN direction: its output
    # became NaN under status 'optimal'.
    first, second = (_LOGITS_A, _LOGITS_FAILING) if partner == "failing" else (_LOGITS_B, _LOGITS_C)
    layer = softmax_layer(20, warn=False)
    theta = torch.tensor([first, second], dtype=torch.float32)
    alone = layer(theta[:1])
    status, iterations = layer.info.status[0], int(layer.info.iterations[0])
    both = layer(theta)
    assert status == "optimal" and layer.info.status[0] == "optimal"
    assert int(layer.info.iterations[0]) == iterations
    torch.testing.assert_close(both[:1], alone, atol=0, rtol=0)
    torch.testing.assert_close(alone.double(), torch.softmax(theta[:1].double(), -1), atol=1e-6, rtol=0)


def test_nlp_without_inequalities():
    # min -sum(log x) + theta'x s.t. sum(x) = 1: the domain x > 0 is the line search's
    # business, and m = 0 (a step-length computation on no constraints used to raise).
    n, B = 5, 4
    x = dl.Variable(n, name="x")
    th = dl.Parameter(n, name="theta")
    layer = dl.Problem(dl.Minimize(-dl.sum(dl.log(x)) + th @ x), [dl.sum(x) == 1]).to_torch()
    theta = torch.rand(B, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    out = layer(theta)
    assert layer.info.status == ["optimal"] * B
    # closed form: x_i = 1 / (theta_i + nu), nu the root of sum_i x_i = 1 (bisection)
    low, high = -theta.amin(-1, keepdim=True), n - theta.amin(-1, keepdim=True)
    for _ in range(200):
        nu = 0.5 * (low + high)
        above = (1.0 / (theta + nu)).sum(-1, keepdim=True) > 1.0
        low, high = torch.where(above, nu, low), torch.where(above, high, nu)
    torch.testing.assert_close(out, 1.0 / (theta + 0.5 * (low + high)), atol=1e-9, rtol=0)


def test_log_of_an_affine_expression_stays_in_its_domain():
    # min c'x - sum(log(h - G x)) with no explicit constraint: d/du log(u) = 1/u is finite
    # for u < 0, and the solver used to leave the domain ('optimal' at G x - h = 17, or
    # 'unbounded'); the derivative is NaN outside it now, which the line search rejects.
    rng = np.random.default_rng(1)
    B, n, m = 6, 5, 6
    G0 = rng.standard_normal((B, m, n))
    G_v, h_v, c_v = np.concatenate([G0, -G0], 1), rng.uniform(0.5, 1.5, (B, 2 * m)), rng.standard_normal((B, n))
    x = dl.Variable(n, name="x")
    c, G, h = dl.Parameter(n, name="c"), dl.Parameter((2 * m, n), name="G"), dl.Parameter(2 * m, name="h")
    layer = dl.Problem(dl.Minimize(c @ x - dl.sum(dl.log(h - G @ x)))).to_torch()
    out = layer(c=torch.tensor(c_v), G=torch.tensor(G_v), h=torch.tensor(h_v))
    assert layer.info.status == ["optimal"] * B
    for i in range(B):
        xv = cp.Variable(n)
        solve(cp.Problem(cp.Minimize(c_v[i] @ xv - cp.sum(cp.log(h_v[i] - G_v[i] @ xv)))))
        np.testing.assert_allclose(out[i].numpy(), xv.value, atol=1e-6)


def test_start_inside_the_domain_of_every_atom():
    # theta x - log(x) - log(1 - x): the entries under a log start at 1, on the edge of
    # log(1 - x); they now try 1/2 there. Closed form: the root in (0, 1) of
    # theta x^2 - (theta + 2) x + 1 = 0 (x = 1/2 at theta = 0).
    x = dl.Variable(4, name="x")
    th = dl.Parameter(4, name="theta")
    layer = dl.Problem(dl.Minimize(th @ x - dl.sum(dl.log(x)) - dl.sum(dl.log(1 - x)))).to_torch()
    theta = torch.tensor([[0.5, -1.0, 2.0, 0.0]], dtype=torch.float64)
    out = layer(theta)
    assert layer.info.status == ["optimal"]
    t = theta[0, :3]
    roots = ((t + 2) - torch.sqrt((t + 2) ** 2 - 4 * t)) / (2 * t)
    torch.testing.assert_close(out[0], torch.cat([roots, torch.tensor([0.5], dtype=torch.float64)]), atol=1e-8, rtol=0)


def test_start_inside_the_domain_of_an_atom_of_an_expression():
    # log(2 x), log(x / 2) and entropy(P') take an expression of the variables, so the
    # first start left them at 0, outside the domain: 'numerical_error' at once, bounds
    # or not. Every entry now tries the starts too. Closed forms: x = 1/a; P = 1/4.
    x = dl.Variable(3, name="x")
    a = dl.Parameter(3, name="a")
    a_t = torch.tensor([[0.5, 2.0, 4.0], [1.0, 3.0, 0.25]], dtype=torch.float64)
    for objective, constraints in ((a @ x - dl.sum(dl.log(2 * x)), []),
                                   (a @ x - dl.sum(dl.log(x / 2)), [x >= 0.1])):
        layer = dl.Problem(dl.Minimize(objective), constraints).to_torch()
        out = layer(a_t)
        assert layer.info.status == ["optimal"] * 2
        torch.testing.assert_close(out, 1 / a_t, atol=1e-8, rtol=0)
    P = dl.Variable((2, 2), name="P")
    w = dl.Parameter((2, 2), name="w")
    layer = dl.Problem(dl.Maximize(dl.sum(dl.entropy(P.T)) + dl.sum(w * P)), [dl.sum(P) == 1]).to_torch()
    w_t = torch.tensor([[0.0, 1.0], [-2.0, 0.5]], dtype=torch.float64)
    out = layer(w_t)
    assert layer.info.status == ["optimal"]
    torch.testing.assert_close(out.flatten(), torch.softmax(w_t.flatten(), 0), atol=1e-8, rtol=0)


def test_a_hessian_zero_at_the_start_is_not_a_dead_end():
    # At z = 0 nothing curves (x**4, x**6, |x|^4): the Newton step was the gradient over
    # the static shift, 1e13 too long, no halving of it was taken, and the instance
    # ended numerical_error at iteration 0. Closed forms: x = (c/4)^(1/3), (c/6)^(1/5),
    # and c / (4 |x|^2) with |x| = (|c| / 4)^(1/3).
    x, c = dl.Variable(3, name="x"), dl.Parameter(3, name="c")
    c_t = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]], dtype=torch.float64)
    norm = (c_t.norm(dim=-1, keepdim=True) / 4) ** (1 / 3)
    for objective, expected in ((dl.sum(x ** 4) - c @ x, torch.sign(c_t) * (c_t.abs() / 4) ** (1 / 3)),
                                (dl.sum(x ** 6) - c @ x, torch.sign(c_t) * (c_t.abs() / 6) ** (1 / 5)),
                                (dl.square(dl.sum_squares(x)) - c @ x, c_t / (4 * norm ** 2))):
        layer = dl.Problem(dl.Minimize(objective)).to_torch()
        out = layer(c_t)
        assert layer.info.status == ["optimal"] * 2
        torch.testing.assert_close(out, expected, atol=1e-7, rtol=0)


def test_entropy_without_its_bound_solves_as_with_it():
    # z >= 0 is implied by the entropy's domain, and users leave it out; the line search
    # alone then crawled (max_iter at sum(z) = 1.05 on one such instance, and not optimal
    # after 1000 iterations). The compiler adds the domain's bound: CVXPY's solution.
    n, k, B = 8, 3, 6
    g = torch.Generator().manual_seed(4)
    theta = 20 * torch.randn(B, n, generator=g, dtype=torch.float64)
    G = torch.rand(B, k, n, generator=g, dtype=torch.float64)
    h = torch.ones(B, k, dtype=torch.float64)
    z = dl.Variable(n, name="z")
    th, Gp, hp = dl.Parameter(n, name="theta"), dl.Parameter((k, n), name="G"), dl.Parameter(k, name="h")
    layer = dl.Problem(dl.Maximize(th @ z + dl.sum(dl.entropy(z))), [dl.sum(z) == 1, Gp @ z <= hp]).to_torch()
    out = layer(theta, G, h)
    assert layer.info.status == ["optimal"] * B
    for i in range(B):
        zr = cp.Variable(n)
        solve(cp.Problem(cp.Maximize(theta[i].numpy() @ zr + cp.sum(cp.entr(zr))),
                         [cp.sum(zr) == 1, G[i].numpy() @ zr <= h[i].numpy()]))
        # (Clarabel stops about 1e-6 from the solution on exponential cones here)
        np.testing.assert_allclose(out[i].numpy(), zr.value, atol=1e-5)


def scaled_softmax_layer(scale, n=10, B=8):
    """Softmax as optimization with its objective times ``scale`` (the same minimizer),
    and a batch of logits."""
    z = dl.Variable(n, name="z")
    th = dl.Parameter(n, name="theta")
    layer = dl.Problem(dl.Maximize(scale * (th @ z + dl.sum(dl.entropy(z)))), [dl.sum(z) == 1, z >= 0]).to_torch()
    return layer, 3 * torch.randn(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scale", [1e-6, 1e-8])
def test_a_small_objective_is_solved_to_the_same_relative_accuracy(scale):
    # The stopping test's 1 + |grad f| is absolute for such an objective, and at 1e-8
    # the start passed it: 'optimal', 0.86 off.
    layer, theta = scaled_softmax_layer(scale)
    B = theta.shape[0]
    out = layer(theta)
    assert layer.info.status == ["optimal"] * B
    torch.testing.assert_close(out, torch.softmax(theta, -1), atol=1e-10, rtol=0)


@pytest.mark.parametrize("scale", [1e4, 1e8])
def test_a_large_objective_has_the_same_gradient(scale):
    # The equality's Schur complement sum(z / scale) is ~1/scale, and the static shift
    # of its factorization, at least 1e-13, put the gradient 1.8e-5 off at 1e8 (2e-9 at
    # 1e4).
    layer, theta = scaled_softmax_layer(scale)
    B = theta.shape[0]
    w = torch.randn(theta.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaf = theta.clone().requires_grad_()
    (grad,) = torch.autograd.grad((w * layer(leaf)).sum(), leaf)
    assert layer.info.status == ["optimal"] * B
    leaf = theta.clone().requires_grad_()
    (expected,) = torch.autograd.grad((w * torch.softmax(leaf, -1)).sum(), leaf)
    torch.testing.assert_close(grad, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 1e-8])
def test_a_large_batch_goes_on_without_its_finished_instances(kept_batches, scale):
    # 128 softmax instances, every eighth with logits spread wide (several times the
    # others' iterations): once most are finished the loop goes on with the rest alone.
    # Every instance comes out as the closed form says, and as it does alone (output,
    # iterations and gradient); an objective scaled to 1e-8 (divided by its size inside
    # the solver) drops its instances the same way.
    kept = kept_batches
    layer, _ = scaled_softmax_layer(scale, n=20)
    theta = torch.randn(128, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    theta[::8] *= 12
    w = torch.randn(theta.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    leaf = theta.clone().requires_grad_()
    out = layer(leaf)
    (grad,) = torch.autograd.grad((w * out).sum(), leaf)
    iterations = layer.info.iterations.clone()
    assert layer.info.status == ["optimal"] * 128
    assert kept and all(len(rows) <= 64 for rows in kept)
    assert iterations.max() > iterations.median() + 3  # (what there is to drop)
    expected = torch.softmax(theta, -1)
    torch.testing.assert_close(out.detach(), expected, atol=1e-9, rtol=0)
    ref = theta.clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad((w * torch.softmax(ref, -1)).sum(), ref)
    torch.testing.assert_close(grad, expected_grad, atol=1e-7, rtol=0)
    slow = int(iterations.argmax())
    for i in (0, 1, slow):
        alone = theta[i:i + 1].clone().requires_grad_()
        z = layer(alone)
        assert torch.equal(z.detach(), out[i:i + 1].detach())
        assert int(layer.info.iterations[0]) == int(iterations[i])
        (g,) = torch.autograd.grad((w[i:i + 1] * z).sum(), alone)
        torch.testing.assert_close(g, grad[i:i + 1], atol=1e-12, rtol=0)


def weighted_entropy_with_rows(n, k, B):
    """Weighted entropy with linear inequalities G z <= h (G a batched parameter; duals
    returned) and B random instances in float64 (h keeps z = 1/n strictly feasible):
    (layer, [theta, w, G, h], the generator, for further draws)."""
    z, theta, w = dl.Variable(n, name="z"), dl.Parameter(n, name="theta"), dl.Parameter(n, name="w")
    G, h = dl.Parameter((k, n), name="G"), dl.Parameter(k, name="h")
    layer = dl.Problem(dl.Maximize(theta @ z + w @ dl.entropy(z)),
                       [dl.sum(z) == 1, z >= 0, G @ z <= h]).to_torch(return_duals=True, warn=False)
    g = torch.Generator().manual_seed(2)
    G_t = torch.randn(B, k, n, generator=g, dtype=torch.float64)
    args = [3 * torch.randn(B, n, generator=g, dtype=torch.float64),
            torch.rand(B, n, generator=g, dtype=torch.float64) + 0.5, G_t, G_t.sum(-1) / n + 0.1]
    return layer, args, g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_instance_with_matrix_parameters_comes_out_alone_as_in_its_batch(kept_batches, dtype):
    # Weighted entropy with linear inequalities G z <= h, G a batched parameter, duals
    # returned. Alone (B = 1) the generated code took one matrix product for G'lam where
    # a batch takes a batched one, and float64 and float32 rounded differently; and the
    # batch of 96 goes on without its finished instances (once: the 42 left are too few
    # to drop more).
    B = 96
    layer, args, _ = weighted_entropy_with_rows(10, 5, B)
    args = [a.to(dtype) for a in args]
    together = layer(*args)
    iterations = layer.info.iterations.clone()
    assert layer.info.status == ["optimal"] * B
    assert kept_batches and len(kept_batches[0]) <= B // 2
    for i in (0, int(iterations.argmax()), B - 1):
        alone = layer(*(a[i:i + 1] for a in args))
        assert int(layer.info.iterations[0]) == int(iterations[i])
        for x, y in zip(together, alone):
            assert torch.equal(x[i:i + 1], y)


def test_a_row_far_from_binding_at_the_start():
    # G z <= h with h_0 = 1e20 (as "no limit"): with every multiplier starting at 1, that
    # row's s * lam started at 1e20 and the loop spent its iterations bringing mu down
    # (54 instead of 14); one instance of these 32 ended numerical_error. Reference:
    # Clarabel on the problem without that row
    layer, (theta, w, G, h), _ = weighted_entropy_with_rows(10, 5, 32)
    h = h.clone()
    h[:, 0] = 1e20
    z = layer(theta, w, G, h)[0]
    assert layer.info.status == ["optimal"] * 32
    for i in range(32):
        zr = cp.Variable(10)
        solve(cp.Problem(cp.Maximize(theta[i].numpy() @ zr + w[i].numpy() @ cp.entr(zr)),
                         [cp.sum(zr) == 1, G[i, 1:].numpy() @ zr <= h[i, 1:].numpy()]))
        np.testing.assert_allclose(z[i].numpy(), zr.value, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_small_batch_with_large_dense_blocks_goes_on_without_its_finished_instances(kept_batches, monkeypatch,
                                                                                     dtype):
    # 16 instances are few, but their (50, 100) inequality blocks make every product and
    # factorization of the iteration cost per instance: once half are finished the rest
    # go on alone (every fourth has its logits spread twice as wide and takes more
    # iterations). The results are those of the batch that keeps every instance, to the
    # last bits of their largest entries: bitwise on one CPU, but on another (AMD EPYC)
    # the multipliers' entries of 1e-21 came out a few ulps apart, the rounding of a
    # batched product depending on the batch it runs in.
    import solvers.interior_point as ipm

    n, B = 100, 16
    layer, args, g = weighted_entropy_with_rows(n, 50, B)
    args[0][::4] *= 2  # (theta)
    args = [a.to(dtype) for a in args]
    u = torch.randn(B, n, generator=g, dtype=torch.float64).to(dtype)

    def solved():
        leaves = [a.clone().requires_grad_() for a in args]
        out = layer(*leaves)
        grads = torch.autograd.grad((u * out[0]).sum(), leaves)
        return [o.detach() for o in out], grads, layer.info.iterations.clone(), list(layer.info.status)

    out, grads, iterations, status = solved()
    assert status == ["optimal"] * B
    assert kept_batches and len(kept_batches[0]) <= B // 2
    monkeypatch.setattr(ipm, "_DROP_FRACTION", 0.0)  # (never: some instance is unfinished)
    kept_batches.clear()
    whole_out, whole_grads, whole_iterations, _ = solved()
    assert not kept_batches
    assert torch.equal(iterations, whole_iterations)
    for x, y in zip(out + list(grads), whole_out + list(whole_grads)):
        size = float(y.abs().max())
        torch.testing.assert_close(x, y, rtol=0, atol=1e3 * torch.finfo(dtype).eps * size)


def test_a_float32_row_beyond_its_range_keeps_its_start():
    # min sum(exp(x)) + (x - q)^2 s.t. x <= 1e20, x >= -1 in float32: 1e20 is beyond
    # 1 / sqrt(float32's smallest normal number), so that row starts at lam = 1 as before
    # the centered start; centered with the other row, 15-16 of 16 instances ended
    # max_iter (the start of lam = 1 solved 8). Optimal ones match scipy's bounded solve
    from scipy.optimize import minimize

    x, q = dl.Variable(1, name="x"), dl.Parameter(1, name="q")
    layer = dl.Problem(dl.Minimize(dl.sum(dl.exp(x)) + dl.sum_squares(x - q)), [dl.sum(x) <= 1e20, x >= -1]).to_torch(
        warn=False)
    q_t = 3 * torch.randn(16, 1, generator=torch.Generator().manual_seed(0))
    out = layer(q_t)
    optimal = [i for i, s in enumerate(layer.info.status) if s == "optimal"]
    assert len(optimal) >= 8
    for i in optimal:
        ref = minimize(lambda v: np.exp(v).sum() + ((v - float(q_t[i, 0])) ** 2).sum(), [0.0], bounds=[(-1, None)],
                       tol=1e-12).x[0]
        assert abs(float(out[i, 0]) - ref) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_objective_unbounded_below_is_not_reported_optimal(dtype):
    # minimize theta'x - sum(log(x)): x = 1 / theta where theta > 0; where an entry of
    # theta is 0, -log of that entry falls without bound as it grows. The gradient
    # vanishes far out, so the relative stopping test passed there: 'optimal' at x ~ 6e7
    # (float64), 7.5e4 (float32). (Clarabel through CVXPY says 'optimal' too, at 5.5e13;
    # SCS at 4.7e4.)
    x, theta = dl.Variable(3, name="x"), dl.Parameter(3, name="theta")
    layer = dl.Problem(dl.Minimize(theta @ x - dl.sum(dl.log(x)))).to_torch(warn=False)
    theta_t = torch.tensor([[1.0, 2.0, 0.5], [1.0, 0.0, 0.5], [0.3, 4.0, 1.0]], dtype=dtype)
    out = layer(theta_t)
    assert layer.info.status == ["optimal", "unbounded", "optimal"]
    torch.testing.assert_close(out[[0, 2]], 1.0 / theta_t[[0, 2]])


def test_a_solution_far_out_is_not_taken_for_one_on_the_way():
    # minimize -log(x) + 1e-16 (x - 1e8)^2: the gradient falls below the tolerance on the
    # way out, as for -log(x) alone, and the loop stopped at x = 7.8e7, 43 % short of the
    # root of 2e-16 x^2 - 2e-8 x - 1 (the stationarity condition), 1.366e8
    x, q = dl.Variable(1, name="x"), dl.Parameter(1, name="q")
    layer = dl.Problem(dl.Minimize(q @ x - dl.sum(dl.log(x)) + 1e-16 * dl.sum_squares(x - 1e8))).to_torch()
    out = layer(torch.zeros(1, 1, dtype=torch.float64))
    root = np.roots([2e-16, -2e-8, -1.0]).max()
    assert layer.info.status == ["optimal"]
    assert abs(float(out[0, 0]) / root - 1) <= 1e-2  # (within the relative dual tolerance: 1.6e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_infeasible_linear_constraints_are_reported_infeasible(dtype):
    # min sum(exp(x)) + a'x s.t. x <= 0, sum(x) >= c: infeasible for c > 0 (Clarabel
    # agrees), which the loop ended numerical_error or max_iter; and -entropy(x) + a'x
    # s.t. sum(x) == c, with no point in entropy's domain x >= 0 for c < 0 (it ended
    # max_iter). The feasible instances beside them keep their solutions
    x, a, c = dl.Variable(3, name="x"), dl.Parameter(3, name="a"), dl.Parameter(1, name="c")
    g = torch.Generator().manual_seed(0)
    a_t = torch.randn(4, 3, generator=g, dtype=torch.float64)
    c_t = torch.tensor([[1.0], [-1.0], [2.0], [-2.0]], dtype=torch.float64)
    cases = [(dl.sum(dl.exp(x)), lambda v: cp.sum(cp.exp(v)), [dl.sum(x) >= c, x <= 0],
              lambda v, ci: [cp.sum(v) >= ci, v <= 0]),
             (-dl.sum(dl.entropy(x)), lambda v: -cp.sum(cp.entr(v)), [dl.sum(x) == c],
              lambda v, ci: [cp.sum(v) == ci])]
    for objective, cvx_objective, constraints, cvx_constraints in cases:
        layer = dl.Problem(dl.Minimize(objective + a @ x), constraints).to_torch(warn=False)
        out = layer(a_t.to(dtype), c_t.to(dtype))
        for i in range(4):
            v = cp.Variable(3)
            ref = cp.Problem(cp.Minimize(cvx_objective(v) + a_t[i].numpy() @ v), cvx_constraints(v, float(c_t[i])))
            ref.solve(solver=cp.CLARABEL)
            if ref.status == cp.INFEASIBLE:
                assert layer.info.status[i] == "infeasible"
            else:
                solve(ref)
                assert layer.info.status[i] == "optimal"
                # (Clarabel's exponential cones end ~2e-6 off here: its gradient entries,
                # equal at the solution, differ by 2e-6, ours by 1e-15)
                atol = 1e-5 if dtype == torch.float64 else 1e-3
                np.testing.assert_allclose(out[i].double().numpy(), v.value, atol=atol)
        assert sorted(layer.info.status) == ["infeasible"] * 2 + ["optimal"] * 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_row_bounded_by_1e15_is_solved_as_without_it(dtype):
    # G z <= h with h_0 = 1e15: g + s carried the bound's rounding (0.125 in float64),
    # the line search's merit stopped falling at that size, and 2 of 32 instances ended
    # numerical_error (the others took 450 iterations where 314 do without the row).
    # Reference: Clarabel on the problem without that row; the gradients are those of
    # the layer without it, and none reaches the far row
    layer, (theta, w, G, h), _ = weighted_entropy_with_rows(10, 5, 32)
    h = h.clone()
    h[:, 0] = 1e15
    args = [t.clone().to(dtype).requires_grad_() for t in (theta, w, G, h)]
    z = layer(*args)[0]
    assert layer.info.status == ["optimal"] * 32
    atol = 1e-6 if dtype == torch.float64 else 1e-4
    for i in range(32):
        zr = cp.Variable(10)
        solve(cp.Problem(cp.Maximize(theta[i].numpy() @ zr + w[i].numpy() @ cp.entr(zr)),
                         [cp.sum(zr) == 1, G[i, 1:].numpy() @ zr <= h[i, 1:].numpy()]))
        np.testing.assert_allclose(z[i].double().detach().numpy(), zr.value, atol=atol)
    u = torch.randn(32, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad((u * z).sum(), args)
    without, _, _ = weighted_entropy_with_rows(10, 4, 32)
    args_without = [t.clone().to(dtype).requires_grad_() for t in (theta, w, G[:, 1:], h[:, 1:])]
    grads_without = torch.autograd.grad((u * without(*args_without)[0]).sum(), args_without)
    # (each solve within its tolerance: 7e-11 apart in float64)
    atol = 1e-8 if dtype == torch.float64 else 1e-3
    for mine, theirs in zip(grads[:2], grads_without[:2]):
        torch.testing.assert_close(mine, theirs, atol=atol, rtol=0)
    torch.testing.assert_close(grads[2][:, 1:], grads_without[2], atol=atol, rtol=0)
    torch.testing.assert_close(grads[3][:, 1:], grads_without[3], atol=atol, rtol=0)
    assert float(grads[2][:, 0].abs().max()) <= 1e-20 and float(grads[3][:, 0].abs().max()) <= 1e-20


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_unbounded_direction_beside_a_row_is_not_reported_optimal(dtype):
    # theta'x - sum(log(x)) with theta_1 = 0 falls without bound in x_1; a row that x_1
    # is not in (or one that never binds) let the line search cut the step that met the
    # tolerance, and the loop said 'optimal' at x_1 = 4e8, 2.2e12 (beyond the divergence
    # limit) and 2.3e8 (float32: 1.3e5, 2.2e12, 1.0e5). The instances with theta > 0
    # beside it are solved: x = 1 / theta, within the rows
    x, theta = dl.Variable(3, name="x"), dl.Parameter(3, name="theta")
    theta_t = torch.tensor([[1.0, 0.0, 0.5], [1.0, 2.0, 0.5]], dtype=dtype)
    for rows in ([dl.sum(x) >= 0.1], [x >= 0.01], [x[0] + x[2] <= 100]):
        layer = dl.Problem(dl.Minimize(theta @ x - dl.sum(dl.log(x))), rows).to_torch(warn=False)
        out = layer(theta_t)
        assert layer.info.status[0] != "optimal" and layer.info.status[1] == "optimal"
        torch.testing.assert_close(out[1], 1.0 / theta_t[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_far_row_the_solution_reaches_is_held_to(dtype):
    # min -sum(x) + sum(exp(-x)) s.t. sum(x) <= h: the row binds, sum(x) = h (exp(-x)
    # vanishes there, and the entries within the sum are nearly free). Divided by
    # its starting slack, the row's multiplier had to grow from 1 to h: from h = 1e9 on
    # the loop ended max_iter, at 1e14 'unbounded'. Such instances are solved again with
    # the row as it is
    x, h = dl.Variable(3, name="x"), dl.Parameter(1, name="h")
    layer = dl.Problem(dl.Minimize(-dl.sum(x) + dl.sum(dl.exp(-x))), [dl.sum(x) <= dl.sum(h)]).to_torch(warn=False)
    h_t = torch.tensor([[1e3], [1e8], [1e9], [1e11], [1e14]], dtype=dtype)
    out = layer(h_t)
    assert layer.info.status == ["optimal"] * 5
    torch.testing.assert_close(out.sum(-1, keepdim=True), h_t, rtol=1e-6 if dtype == torch.float64 else 1e-4, atol=0)


def test_float32_instances_solved_again_in_float64_get_no_float32_lp(monkeypatch):
    # float32 softmax of logits 20 x randn at a tolerance float32 cannot always meet
    # (1e-7): the instances that stop short are solved again in float64. The
    # infeasibility LP (for NLPs with affine constraints that end unfinished) ran on
    # them in float32 first (40-50 % of the forward, when most of these instances went to
    # float64 at the default tolerance); it is left to the float64 solve, which needs
    # none here
    import solvers.interior_point as ipm

    calls = []
    solve_qp = ipm.solve_qp
    monkeypatch.setattr(ipm, "solve_qp", lambda *a, **k: calls.append(a[0].dtype) or solve_qp(*a, **k))
    z, theta = dl.Variable(100, name="z"), dl.Parameter(100, name="theta")
    layer = dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))), [dl.sum(z) == 1]).to_torch(tol=1e-7)
    theta_t = 20 * torch.randn(16, 100, generator=torch.Generator().manual_seed(0))
    out = layer(theta_t)
    ok = [s == "optimal" for s in layer.info.status]
    assert sum(ok) >= 15 and calls == []
    ref = torch.softmax(theta_t.double(), -1)
    assert float((out.double() - ref)[torch.tensor(ok)].abs().max()) <= 1e-6


def test_diverging_nlp_multipliers_are_not_called_infeasible():
    # min |x - 1| s.t. exp(c - 100 x) <= 100: x = 1 is feasible (and optimal) for every c
    # here (the row needs x >= (c - log 100) / 100 <= 1.2 - 0.046). Started far outside
    # the row, the loop's multipliers diverged and c = 60, 120 were called infeasible
    x, c = dl.Variable((), name="x"), dl.Parameter((), name="c")
    layer = dl.Problem(dl.Minimize(dl.abs(x - 1)), [dl.exp(c - 100 * x) <= 100]).to_torch(warn=False)
    out = layer(torch.tensor([5.0, 20.0, 60.0, 110.0], dtype=torch.float64))
    assert "infeasible" not in layer.info.status
    for i, s in enumerate(layer.info.status):
        if s == "optimal":
            assert abs(float(out[i]) - 1.0) <= 1e-6


def test_equalities_fix_what_a_singular_hessian_leaves_free():
    # min softplus(x_0 - x_1) (or exp) s.t. A x = b with A invertible: x = A^-1 b. The
    # Hessian is singular along (1, 1), which the equalities fix; the reduction
    # eliminated dz through the Hessian alone, regularized by 1e-13 there, and ended
    # numerical_error. Gradients by gradcheck
    x, A, b = dl.Variable(2, name="x"), dl.Parameter((2, 2), name="A"), dl.Parameter(2, name="b")
    A_t = torch.tensor([[[1.0, 2.0], [1.0, 2.1]], [[1.0, 0.0], [0.0, 1.0]], [[2.0, -1.0], [0.5, 3.0]]],
                       dtype=torch.float64, requires_grad=True)
    b_t = torch.tensor([[1.0, 1.0], [0.5, 2.0], [-1.0, 0.3]], dtype=torch.float64, requires_grad=True)
    for objective in (dl.softplus(x[0] - x[1]), dl.exp(x[0] - x[1])):
        layer = dl.Problem(dl.Minimize(objective), [A @ x == b]).to_torch(tol=1e-12)
        out = layer(A_t, b_t)
        assert layer.info.status == ["optimal"] * 3
        torch.testing.assert_close(out, torch.linalg.solve(A_t, b_t), atol=1e-10, rtol=0)
        assert torch.autograd.gradcheck(lambda A_, b_: layer(A_, b_), (A_t, b_t))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_unbounded_log_of_an_affine_expression_is_not_reported_optimal(dtype):
    # -log(a'x + 1) has no minimum; its Newton step is the dense one, whose flat
    # regularization (1e-13) outweighed the curvature 1 / (a'x + 1)^2 from a'x ~ 3e6 on:
    # the direction shrank to ~1e13 / x, the iterate crept, and the loop said 'optimal'
    # near 5e7 (Clarabel through CVXPY fails on such problems too). The same for a
    # scalar variable; beside them, -log(a'x + 1) + x'x / 2 is solved: its stationarity
    # condition x = a / (a'x + 1) gives x = t a with t (t |a|^2 + 1) = 1
    x, a = dl.Variable(2, name="x"), dl.Parameter(2, name="a")
    a_t = torch.tensor([[1.0, 2.0], [1.0, 0.0]], dtype=dtype)
    layer = dl.Problem(dl.Minimize(-dl.log(a @ x + 1))).to_torch(warn=False)
    layer(a_t)
    assert layer.info.status == ["unbounded", "unbounded"]
    y = dl.Variable((), name="y")
    alone = dl.Problem(dl.Minimize(-dl.log(y))).to_torch(warn=False)
    alone()
    assert alone.info.status == ["unbounded"]
    bounded = dl.Problem(dl.Minimize(-dl.log(a @ x + 1) + 0.5 * dl.sum_squares(x))).to_torch()
    out = bounded(a_t)
    sq = (a_t * a_t).sum(-1, keepdim=True)
    t = (-1 + torch.sqrt(1 + 4 * sq)) / (2 * sq)
    assert bounded.info.status == ["optimal", "optimal"]
    torch.testing.assert_close(out, t * a_t, atol=1e-8 if dtype == torch.float64 else 1e-4, rtol=0)


def test_entropy_and_log_of_a_negated_variable_start_inside_their_domain():
    # the starts tried only positive entries, where entropy(-y) and log(-y) are
    # undefined: 'numerical_error' at iteration 0 for every instance. Closed forms:
    # -y = softmax(theta); y = -1 / theta.
    n = 5
    y, theta = dl.Variable(n, name="y"), dl.Parameter(n, name="theta")
    theta_t = torch.rand(8, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    for constraints in ([dl.sum(y) == -1, y <= 0], [dl.sum(y) == -1]):
        layer = dl.Problem(dl.Maximize(-theta @ y + dl.sum(dl.entropy(-y))), constraints).to_torch(tol=1e-11)
        out = layer(theta_t)
        assert layer.info.status == ["optimal"] * 8
        torch.testing.assert_close(-out, torch.softmax(theta_t, -1), atol=1e-10, rtol=0)
    layer = dl.Problem(dl.Minimize(-theta @ y - dl.sum(dl.log(-y)))).to_torch(tol=1e-11)
    out = layer(theta_t)
    assert layer.info.status == ["optimal"] * 8
    torch.testing.assert_close(out, -1 / theta_t, atol=1e-10, rtol=0)


def test_variables_under_atoms_of_both_signs_start_inside_every_domain():
    # entropy(x) beside entropy(-y): the starts tried every entry positive, then every
    # entry negative, and no such point is inside both domains: 'numerical_error' at
    # iteration 0. Each variable now starts at the sign its atom takes it with. Closed
    # forms: x = softmax(a), -y = softmax(b), and u = 1 / c (c < 0), where the
    # derivative 1 / u - c of log(-3 u) - c u vanishes.
    n = 5
    x, y, u = dl.Variable(n, name="x"), dl.Variable(n, name="y"), dl.Variable(n, name="u")
    a, b, c = dl.Parameter(n, name="a"), dl.Parameter(n, name="b"), dl.Parameter(n, name="c")
    prob = dl.Problem(dl.Maximize(a @ x - b @ y + dl.sum(dl.entropy(x)) + dl.sum(dl.entropy(-y))
                                  - c @ u + dl.sum(dl.log(-3 * u))),
                      [dl.sum(x) == 1, dl.sum(y) == -1])
    layer = prob.to_torch(tol=1e-11)
    g = torch.Generator().manual_seed(0)
    a_t, b_t = torch.randn(8, n, dtype=torch.float64, generator=g), torch.randn(8, n, dtype=torch.float64, generator=g)
    c_t = -(torch.rand(8, n, dtype=torch.float64, generator=g) + 0.5)
    x_t, y_t, u_t = layer(a_t, b_t, c_t)
    assert layer.info.status == ["optimal"] * 8
    torch.testing.assert_close(x_t, torch.softmax(a_t, -1), atol=1e-10, rtol=0)
    torch.testing.assert_close(-y_t, torch.softmax(b_t, -1), atol=1e-10, rtol=0)
    torch.testing.assert_close(u_t, 1 / c_t, atol=1e-10, rtol=0)


def test_starts_take_each_entry_at_the_sign_its_atom_needs():
    # The signs were recorded per variable, the first atom found deciding: log(-x[2:])
    # beside log(x[:2]) started all of x on one side, and a negative power (either
    # sign allowed) could take the sign of a log written after it. Slices and
    # transposes now set the signs of their own entries (a constant vector factor sets
    # none: its entries start at -1 in a fallback that keeps the others' signs). Closed forms:
    # -log(+-x) + c x is least at x = 1 / c; softmax for the entropies.
    x = dl.Variable(4, name="x")
    c = torch.tensor([1.0, 2.0, -1.0, -2.0], dtype=torch.float64)
    layer = dl.Problem(dl.Minimize(-dl.sum(dl.log(x[:2])) - dl.sum(dl.log(-x[2:])) + c.numpy() @ x)).to_torch(
        tol=1e-11)
    out = layer()
    assert layer.info.status == ["optimal"]
    torch.testing.assert_close(out, 1 / c, atol=1e-10, rtol=0)

    X, Y = dl.Variable((2, 3), name="X"), dl.Variable((3, 2), name="Y")
    A, Bp = dl.Parameter((2, 3), name="A"), dl.Parameter((3, 2), name="B")
    prob = dl.Problem(dl.Maximize(dl.sum(A * X) + dl.sum(dl.entropy(X)) - dl.sum(Bp * Y)
                                  + dl.sum(dl.entropy(-Y.T))), [dl.sum(X) == 1, dl.sum(Y) == -1])
    g = torch.Generator().manual_seed(1)
    A_t, B_t = torch.randn(4, 2, 3, dtype=torch.float64, generator=g), torch.randn(4, 3, 2, dtype=torch.float64, generator=g)
    layer = prob.to_torch(tol=1e-11)
    X_t, Y_t = layer(A_t, B_t)
    assert layer.info.status == ["optimal"] * 4
    torch.testing.assert_close(X_t, torch.softmax(A_t.reshape(4, -1), -1).reshape(4, 2, 3), atol=1e-10, rtol=0)
    torch.testing.assert_close(-Y_t, torch.softmax(B_t.reshape(4, -1), -1).reshape(4, 3, 2), atol=1e-10, rtol=0)

    y, w = dl.Variable(2, name="y"), dl.Variable(3, name="w")
    layer = dl.Problem(dl.Maximize(dl.sum(dl.log(np.array([-1.0, -2.0]) * y)) + y @ np.array([1.0, 0.5])
                                   + dl.sum(dl.entropy(w))), [dl.sum(w) == 1]).to_torch(tol=1e-11)
    y_t, w_t = layer()
    assert layer.info.status == ["optimal"]
    torch.testing.assert_close(y_t, torch.tensor([-1.0, -2.0], dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(w_t, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-10, rtol=0)

    # min x^-2 - log(-x) - x, in either order: the real root of x^3 + x^2 + 2 (x < 0)
    root = torch.tensor(float(min(np.roots([1.0, 1.0, 0.0, 2.0]), key=lambda r: abs(r.imag)).real),
                        dtype=torch.float64)
    x = dl.Variable(2, name="x")
    for obj in (dl.sum(dl.power(x, -2)) - dl.sum(dl.log(-x)) - dl.sum(x),
                -dl.sum(dl.log(-x)) + dl.sum(dl.power(x, -2)) - dl.sum(x),
                dl.sum(dl.power(x, -2) - dl.log(-x)) - dl.sum(x)):
        layer = dl.Problem(dl.Minimize(obj)).to_torch(tol=1e-11)
        out = layer()
        assert layer.info.status == ["optimal"]
        torch.testing.assert_close(out, root.expand(2), atol=1e-9, rtol=0)


def test_a_variable_taken_directly_in_part_starts_whole_at_its_sign():
    # log(-u[0]) sets u[0]'s start at -1, log(-u[1] - 1.5) none of u[1]'s: the fallbacks
    # tried the signed entries at their sizes and every other entry at one number, never
    # u < -1.5 beside w > 1.5; a variable whose signed entries agree now also starts whole
    # at their sign. Closed forms: w the root > 1.5 of 2w^3 - 3w^2 - 2w + 1.5, u[0] = -w
    # (the same terms mirrored), u[1] = -(3 + sqrt(17)) / 4.
    u, w = dl.Variable(2, name="u"), dl.Variable(name="w")
    obj = (-dl.log(-u[0]) - dl.log(-u[0] - 1.5) - dl.log(-u[1] - 1.5) - dl.log(w) - dl.log(w - 1.5)
           + dl.sum_squares(u) + dl.square(w))
    layer = dl.Problem(dl.Minimize(obj)).to_torch(tol=1e-11)
    u_t, w_t = layer()
    assert layer.info.status == ["optimal"]
    root = max(r.real for r in np.roots([2.0, -3.0, -2.0, 1.5]) if abs(r.imag) < 1e-12)
    expected = torch.tensor([-root, -(3 + 17 ** 0.5) / 4], dtype=torch.float64)
    torch.testing.assert_close(u_t, expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(w_t, torch.tensor(root, dtype=torch.float64), atol=1e-9, rtol=0)


def test_each_domain_of_an_atom_guards_its_derivative():
    # x log x - log(1 - x) as one atom: its derivative log x + 1 + 1 / (1 - x) has a log
    # of x, which let the whole derivative go unguarded; finite for x > 1, it came back
    # 'optimal' at x = 149 (c = 6) and 8104 (c = 10). Closed form: the root in (0, 1) of
    # log x + 1 + 1 / (1 - x) = c (bisection). And sqrt(2 x), which sympy writes
    # sqrt(2) sqrt(x), failed in the generated code (torch.sqrt of a number): maximum of
    # sqrt(2 x) - x^2 at x = 1/2.
    x, c = dl.Variable(1, name="x"), dl.Parameter(1, name="c")
    layer = dl.Problem(dl.Minimize(dl.sum(-dl.entropy(x) - dl.log(1 - x)) - c @ x)).to_torch(tol=1e-11)
    c_t = torch.tensor([[5.0], [6.0], [10.0]], dtype=torch.float64)
    out = layer(c=c_t)
    assert layer.info.status == ["optimal"] * 3
    lo, hi = torch.full_like(c_t, 1e-12), torch.full_like(c_t, 1 - 1e-12)
    for _ in range(200):
        mid = (lo + hi) / 2
        above = torch.log(mid) + 1 + 1 / (1 - mid) > c_t
        lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
    torch.testing.assert_close(out, lo, atol=1e-9, rtol=0)
    for shape in (3, ()):
        y = dl.Variable(shape, name="y")
        layer = dl.Problem(dl.Maximize(dl.sum(dl.sqrt(2 * y)) - dl.sum_squares(y))).to_torch(tol=1e-11)
        out = layer()
        assert layer.info.status == ["optimal"]
        torch.testing.assert_close(out, torch.full_like(out, 0.5), atol=1e-9, rtol=0)


def test_an_empty_domain_inside_one_atom_is_not_solved():
    # x^-2 - log(x) - log(-x) as one atom: its derivative was left unguarded (the
    # negative power, met first, made the atom's domain "nonzero"), and a start outside
    # log(x)'s domain came back 'optimal' at x = [4.22, 2.36, 1.47]
    x, c = dl.Variable(3, name="x"), dl.Parameter(3, name="c")
    layer = dl.Problem(dl.Minimize(dl.sum(dl.power(x, -2) - dl.log(x) - dl.log(-x)) + c @ x)).to_torch(tol=1e-10)
    with pytest.warns(RuntimeWarning):
        out = layer(torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64))
    assert layer.info.status == ["numerical_error"]
    assert bool(out.isnan().all())


def test_bounds_held_only_by_a_logs_residual_are_released():
    # entries of softmax(20 x randn) far below the tolerance: the loop stopped with such
    # an entry e to e^4 times its value and the multiplier of z >= l (up to 70, where it
    # is 0) carrying the log's excess. Every derivative through it was wrong: the duals,
    # the gradient with respect to the floor l (about -2 where it is 0). Released, the
    # multiplier is 0 and the entry on its own value (softmax, to its relative accuracy).
    # The floor z >= l sits beside the domain's own z >= 0, the two rows sharing the force.
    n, B = 10, 16
    z, theta, floor = dl.Variable(n, name="z"), dl.Parameter(n, name="theta"), dl.Parameter(n, name="l")
    layer = dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))), [dl.sum(z) == 1, z >= floor]).to_torch(
        return_duals=True)
    g = torch.Generator().manual_seed(5)
    theta_t = 20 * torch.randn(B, n, dtype=torch.float64, generator=g)
    weights = torch.randn(B, n, dtype=torch.float64, generator=g)
    floor_t = torch.zeros(B, n, dtype=torch.float64, requires_grad=True)
    z_t, nu, lam = layer(theta_t, floor_t)
    assert layer.info.status == ["optimal"] * B
    p = torch.softmax(theta_t, -1)
    # (to the tolerance's scale: 1e-6 at most over 40 seeds, where they were O(1))
    torch.testing.assert_close(z_t, p, atol=1e-300, rtol=1e-5)
    assert float(lam.detach().abs().max()) <= 1e-5
    (grad,) = torch.autograd.grad((weights * z_t).sum(), floor_t)
    assert float(grad.abs().max()) <= 1e-5


def test_a_tiny_floor_is_not_released_past():
    # a floor of 1e-30 under an entry of 2e-13 reads as a bound at 0 in floating point
    # (l - z == -z): the entry was moved to 1.8e-35, below its floor, 'optimal', with the
    # floor's multiplier and derivative 0. Such a row stays as the loop left it: z >= l
    # holds and dz/dl stays near 1 (the floor active at the tolerance's scale).
    n = 3
    z, theta, floor = dl.Variable(n, name="z"), dl.Parameter(n, name="theta"), dl.Parameter(n, name="l")
    layer = dl.Problem(dl.Maximize(theta @ z + dl.sum(dl.entropy(z))), [dl.sum(z) == 1, z >= floor]).to_torch()
    floor_t = torch.tensor([[0.0, 0.0, 1e-30]], dtype=torch.float64, requires_grad=True)
    z_t = layer(theta=torch.tensor([[0.0, -40.0, -80.0]], dtype=torch.float64), l=floor_t)
    assert layer.info.status == ["optimal"]
    assert float(z_t[0, 2].detach()) >= 1e-30
    (grad,) = torch.autograd.grad(z_t[0, 2], floor_t)
    # (the floor and the entropy's own z >= 0 are one row at the tolerance's scale: how
    # the derivative splits between them is the KKT system's to choose, up to one half)
    assert 0.4 < float(grad[0, 2]) <= 1.0


def test_gradients_through_a_column_without_curvature():
    # a weight of 0 on entropy(z[0]) leaves that column linear, its bound inactive: the
    # backward's reduction divided by diag(H) + lam/s ~ 1e-12 there, and dz0/dtheta0 came
    # out 2031 where it is 0.0027, with no status to say so. Closed form (z[1] at its
    # bound, z[0] inside, so nu = theta0): z_j = exp((theta_j - theta0) / w_j - 1) for
    # j = 2, 3 and z0 = 1 - z2 - z3, whose derivatives follow.
    n, B = 4, 6
    z, theta, w = dl.Variable(n, name="z"), dl.Parameter(n, name="theta"), dl.Parameter(n, nonneg=True, name="w")
    layer = dl.Problem(dl.Maximize(theta @ z + w @ dl.entropy(z)), [dl.sum(z) == 1, z >= 0]).to_torch(tol=1e-10)
    g = torch.Generator().manual_seed(0)
    theta_t = torch.stack([torch.full((B,), 5.0, dtype=torch.float64), torch.full((B,), -10.0, dtype=torch.float64),
                           torch.rand(B, dtype=torch.float64, generator=g), 2 * torch.rand(B, dtype=torch.float64,
                                                                                          generator=g)], -1)
    w_t = torch.tensor([0.0, 0.0, 1.0, 0.5], dtype=torch.float64).expand(B, n)
    theta_t.requires_grad_(True)
    z_t = layer(theta=theta_t, w=w_t)
    assert layer.info.status == ["optimal"] * B
    t = theta_t.detach()
    z2, z3 = torch.exp((t[:, 2] - t[:, 0]) / 1.0 - 1), torch.exp((t[:, 3] - t[:, 0]) / 0.5 - 1)
    torch.testing.assert_close(z_t.detach(), torch.stack([1 - z2 - z3, 0 * z2, z2, z3], -1), atol=1e-9, rtol=0)
    (grad,) = torch.autograd.grad(z_t[:, 0].sum(), theta_t)
    expected = torch.stack([z2 + z3 / 0.5, 0 * z2, -z2, -z3 / 0.5], -1)
    torch.testing.assert_close(grad, expected, atol=1e-8, rtol=0)


@pytest.mark.parametrize("w0, theta2, dtype, scale", [
    (1e-14, 0.3, torch.float64, 1.0), (1e-12, 0.3, torch.float64, 1.0), (0.0, -40.05, torch.float64, 1.0),
    (1e-6, 0.3, torch.float32, 1.0), (1e-6, 0.3, torch.float64, 1e6), (1e-3, 0.3, torch.float32, 1.0),
    (1e-5, 0.3, torch.float32, 100.0)])
def test_gradients_through_a_nearly_flat_column(w0, theta2, dtype, scale):
    # a weight of 1e-14 on entropy(z[0]) leaves that column's curvature ~1e-14, and a
    # weight of 0 beside an entry of 1e-20 (curvature 1e20) puts 1e20 beside ~1e-11 in
    # the reduced system: its Cholesky factor lost the other rows, and dz0/dtheta0 came
    # out 9.96, 0.10 and 78970 where it is 0.0036, 0.0036 and 0.00025 (float32 at
    # w0 = 1e-6: 0.12), silently. The objective times `scale` leaves z and scale * dz/dtheta
    # as they are; a check with one norm over the whole answer passed 28 % errors there
    # (u_z at 1/scale of the duals), and float32 2.4 % and 5x at weights 1e-3 and 1e-5
    # (scale 1, 100). Closed form: z[1] sits at its bound and the interior entries j have
    # curvature w_j / z_j, so dz0/dtheta = d0 (e_0 - d / S) with d_j = z_j / w_j,
    # S = sum d (d0 infinite at w0 = 0: e_0 S' - d', S' = the others' sum)
    z, theta, w = dl.Variable(4, name="z"), dl.Parameter(4, name="theta"), dl.Parameter(4, nonneg=True, name="w")
    layer = dl.Problem(dl.Maximize(theta @ z + w @ dl.entropy(z)), [dl.sum(z) == 1, z >= 0]).to_torch(
        **({"tol": 1e-10} if dtype == torch.float64 else {}))
    theta_t = (scale * torch.tensor([[5.0, -10.0, theta2, 1.0]], dtype=dtype)).requires_grad_(True)
    w_t = scale * torch.tensor([[w0, 0.0, 1.0, 0.5]], dtype=dtype)
    z_t = layer(theta=theta_t, w=w_t)
    assert layer.info.status == ["optimal"]
    (grad,) = torch.autograd.grad(z_t[0, 0], theta_t)
    z_v = z_t.detach().double()[0]
    d = torch.stack([z_v[0] / w0 if w0 else z_v[0], 0 * z_v[0], z_v[2] / 1.0, z_v[3] / 0.5])
    others = d[2:].sum()
    if w0:
        expected = d[0] * (torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64) - d / d.sum())
        expected[0] = d[0] * others / d.sum()  # (without the cancellation)
    else:
        expected = torch.stack([others, 0 * others, -d[2], -d[3]])
    atol = 1e-9 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(scale * grad[0].double(), expected, atol=atol, rtol=0)


def test_a_gradient_whose_second_solve_fails_too_is_reported(monkeypatch):
    # the instance with the flat column is solved again whole; where that answer is no
    # better, the layer keeps the better one and warns, naming the instance
    import solvers.interior_point as ipm

    def no_better(H, Jg, Jh, s, lam, w_z, w_lam, w_nu):
        return torch.zeros_like(w_z), torch.zeros_like(lam), torch.zeros_like(w_nu), torch.zeros_like(s[:, 0],
                                                                                                    dtype=torch.bool)
    monkeypatch.setattr(ipm, "_equilibrated_kkt_adjoint", no_better)
    z, theta, w = dl.Variable(4, name="z"), dl.Parameter(4, name="theta"), dl.Parameter(4, nonneg=True, name="w")
    layer = dl.Problem(dl.Maximize(theta @ z + w @ dl.entropy(z)), [dl.sum(z) == 1, z >= 0]).to_torch(tol=1e-10)
    theta_t = torch.tensor([[5.0, -10.0, 0.3, 1.0]] * 3, dtype=torch.float64, requires_grad=True)
    w_t = torch.tensor([[1.0, 1.0, 1.0, 0.5], [1e-14, 0.0, 1.0, 0.5], [1.0, 1.0, 1.0, 0.5]], dtype=torch.float64)
    z_t = layer(theta=theta_t, w=w_t)
    with pytest.warns(RuntimeWarning, match=r"gradients of 1 of 3 instances \(rows \[1\]\) may be inaccurate"):
        (grad,) = torch.autograd.grad(z_t[:, 0].sum(), theta_t)
    assert bool(torch.isfinite(grad).all())  # (the reduction's answer kept: zeros were worse)
    monkeypatch.undo()
    (alone,) = torch.autograd.grad(layer(theta=theta_t, w=w_t)[:, 0].sum(), theta_t)
    assert torch.equal(grad[[0, 2]], alone[[0, 2]])


def test_an_infeasible_instance_leaves_the_others_gradients_as_alone():
    # the infeasible instance's state (with a weight of 0) made the backward's diagonal
    # reduction unusable for the whole batch, and every instance took the saddle system:
    # the other's gradient differed from its gradient alone (1.5e-13). The failed one now
    # takes it alone.
    z, theta = dl.Variable(3, name="z"), dl.Parameter(3, name="theta")
    w, G, h = dl.Parameter(3, nonneg=True, name="w"), dl.Parameter((1, 3), name="G"), dl.Parameter(1, name="h")
    layer = dl.Problem(dl.Maximize(theta @ z + w @ dl.entropy(z)), [dl.sum(z) == 1, z >= 0, G @ z <= h]).to_torch(
        tol=1e-10)
    theta_t = torch.tensor([[2.0, -1.0, 0.3]] * 2, dtype=torch.float64)
    w_t = torch.tensor([[0.0, 1.0, 0.5], [1.0, 1.0, 1.0]], dtype=torch.float64)
    G_t, h_t = torch.ones(2, 1, 3, dtype=torch.float64), torch.tensor([[0.5], [2.0]], dtype=torch.float64)

    def gradient(rows):
        leaf = theta_t[rows].clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the infeasible instance's)
            out = layer(theta=leaf, w=w_t[rows], G=G_t[rows], h=h_t[rows])
        statuses = list(layer.info.status)
        return statuses, torch.autograd.grad(out[-1].sum() + out[-1, 0], leaf)[0][-1]

    statuses, together = gradient(slice(0, 2))
    assert statuses == ["infeasible", "optimal"]
    alone_statuses, alone = gradient(slice(1, 2))
    assert alone_statuses == ["optimal"]
    assert torch.equal(together, alone)


def test_softmax_of_peaked_logits_takes_few_iterations():
    # entries of z* down to 1e-40. Along the line, once the log in their stationarity
    # rows overshot, their slacks halved per iteration: one instance here ran out of its
    # 100 iterations in float64, and float32 took up to 97. Slacks within the tolerance of
    # their bound now step along a curve (29 and 23 at most)
    theta = 20 * torch.randn(64, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert_solves_softmax(theta, 1e-12, 40, tol=1e-11)
    assert_solves_softmax(theta.float(), 1e-5, 40)


def test_a_bent_upper_bound_beside_a_free_variable():
    # y <= 0 under entropy(-y): upper bounds (slack -y) on some of the columns only, the
    # curve moving y up (68 iterations at most along the line, 28 with the curve)
    n = 50
    y, w = dl.Variable(n, name="y"), dl.Variable(3, name="w")
    theta, c = dl.Parameter(n, name="theta"), dl.Parameter(3, name="c")
    prob = dl.Problem(dl.Maximize(-theta @ y + dl.sum(dl.entropy(-y)) - dl.sum_squares(w - c)),
                      [dl.sum(y) == -1, y <= 0])
    layer = prob.to_torch(tol=1e-11)
    g = torch.Generator().manual_seed(4)
    theta_t = 20 * torch.randn(32, n, dtype=torch.float64, generator=g)
    c_t = torch.randn(32, 3, dtype=torch.float64, generator=g)
    y_t, w_t = layer(theta_t, c_t)
    assert layer.info.status == ["optimal"] * 32
    torch.testing.assert_close(-y_t, torch.softmax(theta_t, -1), atol=1e-12, rtol=0)
    torch.testing.assert_close(w_t, c_t, atol=1e-10, rtol=0)
    assert int(layer.info.iterations.max()) <= 40


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_bent_slacks_leave_the_equality_exact_at_large_n(dtype, atol):
    # each bent slack moves its entry of z off the line, and sum(z) == 1 adds the moves
    # up: with the slacks below 1e-2 of the primal tolerance bending (a tolerance that
    # grows with n here), softmax at n = 1000 came back 4e-7 off in sum (1.6e-3 in
    # float32), `optimal`. The bent slacks of an instance now sum to at most 1e-2 of
    # the tolerance.
    n = 1000
    theta = 5 * torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    layer = softmax_layer(n)
    z = layer(theta.to(dtype))
    assert layer.info.status == ["optimal"] * 4
    torch.testing.assert_close(z.sum(-1), torch.ones(4, dtype=dtype), atol=atol, rtol=0)
    torch.testing.assert_close(z, torch.softmax(theta, -1).to(dtype), atol=atol, rtol=0)


@pytest.mark.parametrize("extra", ["x[3] >= 0", "x >= 0 again", "x >= -1"])
def test_a_column_under_two_bounds_bends_with_both(extra):
    # entropy's domain bound x >= 0 beside a bound of the user's on the same column: a
    # bent slack moved z's entry, and the other row's slack stayed on the line, so the
    # two disagreed and the instances ran out of iterations (x >= 0 written twice: all
    # 16). Every bound row of a moved column now moves with it.
    n = 30
    x, theta = dl.Variable(n, name="x"), dl.Parameter(n, name="theta")
    rows = {"x[3] >= 0": x[3] >= 0, "x >= 0 again": x >= 0, "x >= -1": x >= -1}[extra]
    layer = dl.Problem(dl.Maximize(theta @ x + dl.sum(dl.entropy(x))), [dl.sum(x) == 1, x >= 0, rows]).to_torch(
        tol=1e-10)
    theta_t = 20 * torch.randn(16, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = layer(theta_t)
    assert layer.info.status == ["optimal"] * 16
    torch.testing.assert_close(out, torch.softmax(theta_t, -1), atol=1e-10, rtol=0)
    assert int(layer.info.iterations.max()) <= 40


def test_an_active_floor_near_zero_is_not_bent():
    # x >= 1e-16 under an entropy binds where softmax(theta) is smaller: an active
    # bound, whose slack the line takes to 0. Bent for its log-like curvature, it
    # shrank by a factor e per step and every instance ran out of iterations; only
    # bounds at 0 (the log's singularity) bend now. Closed form: max(softmax(theta),
    # 1e-16) up to a renormalization below 1e-14 (CVXPY's exponential cones are good
    # to ~1e-6 here).
    n = 30
    x, theta = dl.Variable(n, name="x"), dl.Parameter(n, name="theta")
    layer = dl.Problem(dl.Maximize(theta @ x + dl.sum(dl.entropy(x))), [dl.sum(x) == 1, x >= 1e-16]).to_torch()
    theta_t = 20 * torch.randn(16, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = layer(theta_t)
    assert layer.info.status == ["optimal"] * 16
    assert int(layer.info.iterations.max()) <= 40
    torch.testing.assert_close(out, torch.softmax(theta_t, -1).clamp(min=1e-16), atol=1e-13, rtol=0)


def test_the_other_side_of_a_narrow_box_keeps_its_slack():
    # 0 <= x <= 1e-14 on three entries whose softmax is larger: the upper rows bind.
    # Moving a column with its bent lower slack took the same amount off the upper
    # slack, which went negative where the rows and slacks disagreed: 5 of 16 instances
    # ended numerical_error, NaN. A column now moves at most so far that every slack
    # keeps half its value on the line. Closed form: min(u, exp(theta - tau)), tau the
    # root of its sum - 1 (bisection).
    n, B = 12, 16
    x, theta, u = dl.Variable(n, name="x"), dl.Parameter(n, name="theta"), dl.Parameter(n, name="u")
    layer = dl.Problem(dl.Maximize(theta @ x + dl.sum(dl.entropy(x))), [dl.sum(x) == 1, x >= 0, x <= u]).to_torch(
        tol=1e-10)
    theta_t = 20 * torch.randn(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    u_t = torch.ones(B, n, dtype=torch.float64)
    u_t[:, :3] = 1e-14
    out = layer(theta_t, u_t)
    assert layer.info.status == ["optimal"] * B
    lo, hi = theta_t.amax(-1, keepdim=True) - 50, theta_t.amax(-1, keepdim=True) + 50
    for _ in range(200):
        tau = (lo + hi) / 2
        over = torch.minimum(u_t, torch.exp(theta_t - tau)).sum(-1, keepdim=True) > 1
        lo, hi = torch.where(over, tau, lo), torch.where(over, hi, tau)
    torch.testing.assert_close(out, torch.minimum(u_t, torch.exp(theta_t - lo)), atol=1e-12, rtol=0)
