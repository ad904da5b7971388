"""Random smooth convex NLP generator: each problem is a list of components, each with
DSL source, CVXPY source (strings, eval'd) and batched parameter data.

A problem description is fully determined by its seed (gen_problem(seed))."""
import numpy as np

# ---------------------------------------------------------------------------------
# helpers


def logu(rng, lo, hi, size=None):
    return 10.0 ** rng.uniform(np.log10(lo), np.log10(hi), size)


class Comp:
    def __init__(self, kind, dl_src, cp_src, params, pos=False, bounded=False, tag=""):
        self.kind = kind  # 'obj' or 'con'
        self.dl_src = dl_src  # expression (obj) or list-of-constraints source
        self.cp_src = cp_src
        self.params = params  # name -> (shape, data array (B, *shape))
        self.pos = pos
        self.bounded = bounded  # makes the problem bounded below by itself
        self.tag = tag


# ---------------------------------------------------------------------------------
# objective components; each gets (rng, k, n, B, x0, w) with x0 (B, n) a reference point
# (positive when the problem needs a positive domain) and w a weight


def o_lin(rng, k, n, B, x0, w, S):
    c = f"c{k}"
    return Comp("obj", f"{c} @ x", f"{c} @ x", {c: ((n,), S * rng.standard_normal((B, n)))}, tag="lin")


def o_quad(rng, k, n, B, x0, w, S):
    q = f"q{k}"
    data = x0 + np.abs(x0).mean(-1, keepdims=True) * rng.standard_normal((B, n))
    return Comp("obj", f"{w!r} * dl.sum_squares(x - {q})", f"{w!r} * cp.sum_squares(x - {q})",
                {q: ((n,), data)}, bounded=True, tag="quad")


def o_expaff(rng, k, n, B, x0, w, S):
    m = int(rng.integers(1, max(2, n) + 1))
    A, d = f"A{k}", f"d{k}"
    Av = rng.standard_normal((B, m, n)) / np.sqrt(n) / np.maximum(np.abs(x0).mean(-1), 1e-3)[:, None, None]
    t = rng.uniform(-3, 1, (B, m))
    dv = t - np.einsum("bmn,bn->bm", Av, x0)
    return Comp("obj", f"{w!r} * dl.sum(dl.exp({A} @ x + {d}))", f"{w!r} * cp.sum(cp.exp({A} @ x + {d}))",
                {A: ((m, n), Av), d: ((m,), dv)}, tag="expaff")


def o_sumexp(rng, k, n, B, x0, w, S):
    s = float(np.abs(x0).mean())
    return Comp("obj", f"{w!r} * dl.sum(dl.exp(x / {s!r}))", f"{w!r} * cp.sum(cp.exp(x / {s!r}))", {}, tag="sumexp")


def o_negent(rng, k, n, B, x0, w, S):
    return Comp("obj", f"-{w!r} * dl.sum(dl.entropy(x))", f"-{w!r} * cp.sum(cp.entr(x))", {}, pos=True,
                bounded=True, tag="negent")


def o_neglog(rng, k, n, B, x0, w, S):
    return Comp("obj", f"-{w!r} * dl.sum(dl.log(x))", f"-{w!r} * cp.sum(cp.log(x))", {}, pos=True, tag="neglog")


def o_neglogaff(rng, k, n, B, x0, w, S):
    m = int(rng.integers(1, n + 2))
    G, h = f"G{k}", f"h{k}"
    Gv = rng.standard_normal((B, m, n))
    hv = np.einsum("bmn,bn->bm", Gv, x0) + logu(rng, 1e-2, 1e1, (B, m)) * (1 + np.abs(x0).mean(-1, keepdims=True))
    return Comp("obj", f"-{w!r} * dl.sum(dl.log({h} - {G} @ x))", f"-{w!r} * cp.sum(cp.log({h} - {G} @ x))",
                {G: ((m, n), Gv), h: ((m,), hv)}, tag="neglogaff")


def o_pow(rng, k, n, B, x0, w, S):
    p = float(rng.choice([1.5, 2.5, 3.0, 4.0]))
    s = float(np.abs(x0).mean() * logu(rng, 0.1, 10))
    if p == 4.0:
        return Comp("obj", f"{w!r} * dl.sum(dl.power(x / {s!r}, 4))", f"{w!r} * cp.sum(cp.power(x / {s!r}, 4))", {},
                    bounded=True, tag="pow4")
    # non-integer / odd: positive domain (x >= 0 explicit for p = 3)
    return Comp("obj", f"{w!r} * dl.sum(dl.power(x / {s!r}, {p!r}))", f"{w!r} * cp.sum(cp.power(x / {s!r}, {p!r}))",
                {}, pos=True, tag=f"pow{p:g}")


def o_negsqrt(rng, k, n, B, x0, w, S):
    return Comp("obj", f"-{w!r} * dl.sum(dl.sqrt(x))", f"-{w!r} * cp.sum(cp.sqrt(x))", {}, pos=True, tag="negsqrt")


def o_softplus(rng, k, n, B, x0, w, S):
    m = int(rng.integers(1, n + 2))
    A, b = f"A{k}", f"b{k}"
    Av = rng.standard_normal((B, m, n)) / np.maximum(np.abs(x0).mean(-1), 1e-3)[:, None, None]
    bv = np.einsum("bmn,bn->bm", Av, x0) + rng.standard_normal((B, m))
    return Comp("obj", f"{w!r} * dl.sum(dl.softplus({A} @ x - {b}))", f"{w!r} * cp.sum(cp.logistic({A} @ x - {b}))",
                {A: ((m, n), Av), b: ((m,), bv)}, tag="softplus")


def o_sqaff(rng, k, n, B, x0, w, S):
    m = int(rng.integers(1, n + 3))
    A, b = f"A{k}", f"b{k}"
    Av = rng.standard_normal((B, m, n))
    bv = np.einsum("bmn,bn->bm", Av, x0) + S * rng.standard_normal((B, m))
    return Comp("obj", f"{w!r} * dl.sum_squares({A} @ x - {b})", f"{w!r} * cp.sum_squares({A} @ x - {b})",
                {A: ((m, n), Av), b: ((m,), bv)}, bounded=m >= n, tag="sqaff")


OBJ = [o_lin, o_quad, o_expaff, o_sumexp, o_negent, o_neglog, o_neglogaff, o_pow, o_negsqrt, o_softplus, o_sqaff]

# ---------------------------------------------------------------------------------
# constraint components. margin > 0 keeps x0 strictly feasible; some instances get a
# negative margin (maybe infeasible: Clarabel decides)


def margins(rng, B, shape=()):
    m = logu(rng, 1e-3, 1e1, (B,) + shape)
    flip = rng.random(B) < 0.08
    m[flip] = -m[flip]
    return m


def c_expaff(rng, k, n, B, x0, S, far):
    a, b = f"a{k}", f"b{k}"
    av = rng.standard_normal((B, n)) / np.maximum(np.abs(x0).mean(-1), 1e-3)[:, None] / np.sqrt(n)
    if far:  # a'x0 around -25 or +15: exp(a'0) = 1 far from the bound
        target = rng.choice([-25.0, 15.0], B)[:, None]
        ax0 = (av * x0).sum(-1, keepdims=True)
        av = av * target / np.where(np.abs(ax0) < 1e-3, 1e-3, ax0)
    bv = np.exp((av * x0).sum(-1) + margins(rng, B))[:, None]
    return Comp("con", f"[dl.exp({a} @ x) <= {b}]", f"[cp.exp({a} @ x) <= {b}[0]]",
                {a: ((n,), av), b: ((1,), bv)}, tag="c_expaff" + ("_far" if far else ""))


def c_sumexp(rng, k, n, B, x0, S, far):
    b = f"b{k}"
    s = float(np.abs(x0).mean())
    bv = np.exp(x0 / s).sum(-1) * np.exp(margins(rng, B))
    return Comp("con", f"[dl.sum(dl.exp(x / {s!r})) <= {b}]", f"[cp.sum(cp.exp(x / {s!r})) <= {b}[0]]",
                {b: ((1,), bv[:, None])},
                tag="c_sumexp")


def c_neglog(rng, k, n, B, x0, S, far):
    c = f"c{k}"
    cv = -np.log(x0) + margins(rng, B, (n,))
    return Comp("con", f"[-dl.log(x) <= {c}]", f"[-cp.log(x) <= {c}]", {c: ((n,), cv)}, pos=True,
                tag="c_neglog" + ("_far" if far else ""))


def c_sumsq(rng, k, n, B, x0, S, far):
    ctr, r = f"ctr{k}", f"r{k}"
    sc = np.abs(x0).mean(-1, keepdims=True)
    cv = x0 + sc * rng.standard_normal((B, n)) * (1.0 if not far else 0.1)
    rv = ((x0 - cv) ** 2).sum(-1) + sc[:, 0] ** 2 * logu(rng, 1e-3, 1e1, B)
    neg = rng.random(B) < 0.05
    rv[neg] = -rv[neg] * 0.01 - 1e-3  # infeasible: r < 0
    return Comp("con", f"[dl.sum_squares(x - {ctr}) <= {r}]", f"[cp.sum_squares(x - {ctr}) <= {r}[0]]",
                {ctr: ((n,), cv), r: ((1,), rv[:, None])}, bounded=True, tag="c_sumsq" + ("_far" if far else ""))


def c_pow(rng, k, n, B, x0, S, far):
    u = f"u{k}"
    p = float(rng.choice([1.5, 2.0, 4.0]))
    s = float(np.abs(x0).mean() * logu(rng, 0.1, 10))
    x0 = x0 / s
    if p == 1.5:
        uv = x0 ** 1.5 * np.exp(margins(rng, B, (n,)))
        return Comp("con", f"[dl.power(x / {s!r}, 1.5) <= {u}]", f"[cp.power(x / {s!r}, 1.5) <= {u}]", {u: ((n,), uv)}, pos=True,
                    bounded=True, tag="c_pow1.5")
    uv = np.array([((x0[i] ** p).sum()) for i in range(B)]) * np.exp(margins(rng, B))
    return Comp("con", f"[dl.sum(dl.power(x / {s!r}, {p!r})) <= {u}]", f"[cp.sum(cp.power(x / {s!r}, {p!r})) <= {u}[0]]",
                {u: ((1,), uv[:, None])}, bounded=True, tag=f"c_pow{p:g}")


def c_sqrt(rng, k, n, B, x0, S, far):
    l_ = f"l{k}"
    lv = np.sqrt(x0) * np.exp(-margins(rng, B, (n,)))
    return Comp("con", f"[dl.sqrt(x) >= {l_}]", f"[cp.sqrt(x) >= {l_}]", {l_: ((n,), lv)}, pos=True, tag="c_sqrt")


def c_entropy(rng, k, n, B, x0, S, far):
    e = f"e{k}"
    ent = -(x0 * np.log(x0)).sum(-1)
    ev = ent - margins(rng, B) * (1 + np.abs(ent))
    return Comp("con", f"[dl.sum(dl.entropy(x)) >= {e}]", f"[cp.sum(cp.entr(x)) >= {e}[0]]", {e: ((1,), ev[:, None])},
                pos=True, tag="c_entropy")


def c_sumlog(rng, k, n, B, x0, S, far):
    e = f"e{k}"
    ev = np.log(x0).sum(-1) - margins(rng, B)
    return Comp("con", f"[dl.sum(dl.log(x)) >= {e}]", f"[cp.sum(cp.log(x)) >= {e}[0]]", {e: ((1,), ev[:, None])},
                pos=True, tag="c_sumlog")


def c_softplus(rng, k, n, B, x0, S, far):
    a, b = f"a{k}", f"b{k}"
    av = rng.standard_normal((B, n)) / np.maximum(np.abs(x0).mean(-1), 1e-3)[:, None] / np.sqrt(n)
    t = (av * x0).sum(-1)
    bv = np.logaddexp(0, t) * np.exp(margins(rng, B))
    return Comp("con", f"[dl.softplus({a} @ x) <= {b}]", f"[cp.logistic({a} @ x) <= {b}[0]]",
                {a: ((n,), av), b: ((1,), bv[:, None])}, tag="c_softplus")


def c_lin(rng, k, n, B, x0, S, far):
    m = int(rng.integers(1, 2 * n + 1))
    G, h = f"G{k}", f"h{k}"
    Gv = S * rng.standard_normal((B, m, n))
    hv = np.einsum("bmn,bn->bm", Gv, x0) + S * np.abs(x0).mean(-1, keepdims=True) * margins(rng, B, (m,))
    return Comp("con", f"[{G} @ x <= {h}]", f"[{G} @ x <= {h}]", {G: ((m, n), Gv), h: ((m,), hv)}, tag="c_lin")


def c_eq(rng, k, n, B, x0, S, far):
    m = int(rng.integers(1, max(1, n // 2) + 1))
    A, b = f"A{k}", f"b{k}"
    Av = S * rng.standard_normal((B, m, n))
    if rng.random() < 0.3:
        Av = np.abs(Av)  # simplex-like
    bv = np.einsum("bmn,bn->bm", Av, x0)
    return Comp("con", f"[{A} @ x == {b}]", f"[{A} @ x == {b}]", {A: ((m, n), Av), b: ((m,), bv)}, tag="c_eq")


def c_box(rng, k, n, B, x0, S, far):
    lo, hi = f"lo{k}", f"hi{k}"
    sc = np.abs(x0).mean(-1, keepdims=True)
    lov = x0 - sc * logu(rng, 1e-2, 1e1, (B, n))
    hiv = x0 + sc * logu(rng, 1e-2, 1e1, (B, n))
    return Comp("con", f"[x >= {lo}, x <= {hi}]", f"[x >= {lo}, x <= {hi}]", {lo: ((n,), lov), hi: ((n,), hiv)},
                bounded=True, tag="c_box")


def c_nonneg(rng, k, n, B, x0, S, far):
    return Comp("con", "[x >= 0]", "[x >= 0]", {}, tag="c_nonneg")


CON = [c_expaff, c_sumexp, c_neglog, c_sumsq, c_pow, c_sqrt, c_entropy, c_sumlog, c_softplus, c_lin, c_eq, c_box]
CON_W = np.array([3, 1, 2, 2, 1.5, 1, 1, 1, 1, 2, 2, 1.5])


class ProblemDesc:
    pass


def gen_problem(seed):
    rng = np.random.default_rng(seed)
    P = ProblemDesc()
    P.seed = seed
    n = int(rng.choice([2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 30]))
    B = int(rng.integers(4, 9))
    P.n, P.B = n, B
    S = float(logu(rng, 1e-2, 1e2))  # data scale
    xs = float(logu(rng, 1e-2, 1e2))  # solution scale
    far = rng.random() < 0.25
    P.S, P.xs, P.far = S, xs, far
    nobj = int(rng.integers(1, 4))
    ncon = int(rng.integers(0, 4))
    objs = list(rng.choice(len(OBJ), nobj, replace=False))
    cons = list(rng.choice(len(CON), ncon, replace=False, p=CON_W / CON_W.sum()))
    if far and not any(CON[i] in (c_expaff, c_neglog, c_sumsq) for i in cons):
        cons.append(CON.index(rng.choice([c_expaff, c_neglog, c_sumsq])))
    # x0: positive reference point
    x0 = xs * rng.uniform(0.2, 2.0, (B, n))
    if far:
        x0 = x0 * 30 + 30 * xs  # far from 0 and 1
    comps = []
    for k, i in enumerate(objs):
        w = float(logu(rng, 1e-2, 1e2))
        comps.append(OBJ[i](rng, k, n, B, x0, w, S))
    for k, i in enumerate(cons):
        comps.append(CON[i](rng, 10 + k, n, B, x0, S, far))
    if not any(c.bounded for c in comps):
        if rng.random() < 0.6:
            comps.append(o_quad(rng, 90, n, B, x0, float(logu(rng, 1e-2, 1e2)), S))
        else:
            comps.append(c_box(rng, 91, n, B, x0, S, far))
    if any(c.tag in ("pow3",) for c in comps):
        comps.append(c_nonneg(rng, 92, n, B, x0, S, far))
    P.comps = comps
    P.float32 = rng.random() < 0.25
    return P


def dl_problem(P):
    import declarative as dl
    ns = {"dl": dl, "x": dl.Variable(P.n, name="x")}
    for c in P.comps:
        for name, (shape, _) in c.params.items():
            ns[name] = dl.Parameter(shape, name=name)
    obj = sum((eval(c.dl_src, ns) for c in P.comps if c.kind == "obj"), 0)
    cons = [con for c in P.comps if c.kind == "con" for con in eval(c.dl_src, ns)]
    prob = dl.Problem(dl.Minimize(obj), cons)
    names = [p.name for p in prob.parameters()]
    return prob, names


def data_of(P):
    return {name: data for c in P.comps for name, (shape, data) in c.params.items()}


def cp_problem(P, i):
    import cvxpy as cp
    x = cp.Variable(P.n)
    ns = {"cp": cp, "x": x}
    for name, data in data_of(P).items():
        ns[name] = data[i]
    obj = sum((eval(c.cp_src, ns) for c in P.comps if c.kind == "obj"), 0)
    cons = [con for c in P.comps if c.kind == "con" for con in eval(c.cp_src, ns)]
    return cp.Problem(cp.Minimize(obj), cons), x


def describe(P):
    return (f"seed={P.seed} n={P.n} B={P.B} S={P.S:.3g} xs={P.xs:.3g} far={P.far} f32={P.float32} "
            f"comps={[c.tag for c in P.comps]}")


def repro_script(P, i, dtype="float64", options="tol=None"):
    """A standalone script for instance i of P."""
    np.set_printoptions(precision=17, threshold=10**6, linewidth=200)
    lines = ["import numpy as np, torch, cvxpy as cp", "import declarative as dl", "torch.set_num_threads(1)",
             f"n = {P.n}", "x = dl.Variable(n, name='x')"]
    data = data_of(P)
    for c in P.comps:
        for name, (shape, _) in c.params.items():
            lines.append(f"{name} = dl.Parameter({shape!r}, name={name!r})")
    obj = " + ".join(c.dl_src for c in P.comps if c.kind == "obj")
    cons = " + ".join(c.dl_src for c in P.comps if c.kind == "con") or "[]"
    lines.append(f"prob = dl.Problem(dl.Minimize({obj}), {cons})")
    lines.append(f"layer = prob.to_torch({options}, warn=False)")
    lines.append("D = {")
    for name, d in data.items():
        lines.append(f"  {name!r}: np.array({np.array2string(d[i], separator=', ', floatmode='unique')}),")
    lines.append("}")
    lines.append(f"out = layer(**{{k: torch.tensor(v[None], dtype=torch.{dtype}) for k, v in D.items()}})")
    lines.append("print('ours:', layer.info.status, 'iters', layer.info.iterations.tolist(), "
                 "'res', layer.info.primal_residual.tolist(), layer.info.dual_residual.tolist(), "
                 "layer.info.complementarity.tolist())")
    lines.append("print('x ours', out[0].double().numpy())")
    lines.append("cx = cp.Variable(n); g = dict(D, x=cx, cp=cp)")
    cobj = " + ".join(c.cp_src for c in P.comps if c.kind == "obj")
    ccons = " + ".join(c.cp_src for c in P.comps if c.kind == "con") or "[]"
    lines.append(f"ref = cp.Problem(cp.Minimize(eval({cobj!r}, g)), eval({ccons!r}, g))")
    lines.append("ref.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, max_iter=500)")
    lines.append("print('clarabel:', ref.status, ref.value); print('x ref ', cx.value)")
    lines.append("if ref.status == 'optimal' and layer.info.status[0] == 'optimal':")
    lines.append("    xr = cx.value.copy(); cx.value = out[0].double().numpy()")
    lines.append("    print('obj ours', ref.objective.value, 'max viol ours', max([c.violation().max() for c in ref.constraints], default=0))")
    return "\n".join(lines)
