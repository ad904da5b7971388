"""Outside references: CVXPY with Clarabel at tight tolerance."""
import warnings

import cvxpy as cp

TIGHT = dict(tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, tol_ktratio=1e-9, max_iter=500)


LOOSER = dict(tol_gap_abs=1e-9, tol_gap_rel=1e-9, tol_feas=1e-9, tol_ktratio=1e-7, max_iter=500)


def solve(problem: cp.Problem):
    """Clarabel at tight tolerance; exponential-cone problems sometimes stop short of
    1e-11, so fall back to 1e-9 rather than accept an 'inaccurate' answer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "solution may be inaccurate": retried below
        problem.solve(solver=cp.CLARABEL, **TIGHT)
    if problem.status != cp.OPTIMAL:
        problem.solve(solver=cp.CLARABEL, **LOOSER)
    assert problem.status == cp.OPTIMAL, problem.status
    return problem


def qp_reference(Q, q, G, h, A, b):
    """Solve one QP instance (numpy arrays); returns x, lam, nu."""
    n = q.shape[0]
    x = cp.Variable(n)
    cons = [G @ x <= h, A @ x == b]
    solve(cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, cp.psd_wrap(Q)) + q @ x), cons))
    return x.value, cons[0].dual_value, cons[1].dual_value
