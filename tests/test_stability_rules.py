"""The proofs of the rewrites derive/stability.py added for issue 23's accuracy contract: SymPy shows each identity
(on its branch's domain, where it has branches), and each rule, applied to an expression it matches, keeps the value
to 45 digits at points on both sides of every branch and far into the tails. A rule that does not apply leaves
its expression alone."""
import mpmath
import numpy as np
import pytest
import sympy as sp
from sympy.codegen.cfunctions import expm1, hypot, log1p

import derive.stability as stability
from derive.functions import sigmoid

u, t, g = (sp.Symbol(name, real=True) for name in ("u", "t", "g"))
positive, negative = sp.Symbol("p", positive=True), sp.Symbol("n", negative=True)
c, a = sp.Symbol("c", positive=True), sp.Symbol("a", positive=True)
k, r = sp.Symbol("k", real=True), sp.Symbol("r", real=True)
k_ = sp.Symbol("k_", integer=True)   # a sum's index


def s(v):
    """sigmoid(v) by its definition."""
    return 1 / (1 + sp.exp(-v))


# (rule, [(lhs, rhs)]): lhs = rhs is the identity the rule uses, each side written out, on the domain its
# symbols' assumptions state (p > 0, n < 0: a branch's side of 0)
IDENTITIES = {
    "sigmoid_minus_target": [(k * s(u) + r, (k + r) * s(u) + r * s(-u))],
    "sigmoid_differences": [(k * s(u) - k * s(-u), k * sp.tanh(u / 2)), (k * s(u) - k / 2, k / 2 * sp.tanh(u / 2))],
    # 1 - s and 1 - 2 s, the factors SiLU's second derivative has, are sigmoid(-u) and -tanh(u/2)
    "sigmoid_polynomials_factored": [(1 - s(u), s(-u)), (1 - 2 * s(u), -sp.tanh(u / 2)),
                                     (sp.diff(u * s(u), u, 2), s(u) * s(-u) * (2 - u * sp.tanh(u / 2)))],
    # |v| <= a: the quotient; v = p or v = n, any sign
    "root_less_constant": [(k * sp.sqrt(v ** 2 + a ** 2) - k * a, k * v ** 2 / (sp.sqrt(v ** 2 + a ** 2) + a))
                           for v in (u, positive, negative)],
    # |v| > sqrt(c): v = p, v = n
    "quotients_of_squares": [(k * v / (v ** 2 + c), k * sp.sign(v) / (sp.Abs(v) + c / sp.Abs(v)))
                             for v in (positive, negative)],
    "log_one_plus_square": [(sp.log(1 + c * v ** 2), 2 * sp.log(sp.sqrt(c) * sp.Abs(v)) + sp.log(1 + 1 / (c * v ** 2)))
                            for v in (positive, negative)],
    # u > 0: 1/(1 + exp(-u)); u <= 0: exp(-|u|) = exp(u) over 1 + exp(u)
    "scaled_sigmoid_branches": [(s(positive), 1 / (1 + sp.exp(-sp.Abs(positive)))),
                                (s(negative), sp.exp(-sp.Abs(negative)) / (1 + sp.exp(-sp.Abs(negative)))),
                                (s(0), sp.exp(0) / (1 + sp.exp(0)))],
    # c > 0: max(0, c u)/c = max(0, u); c < 0 (-c here): min(0, u); u = p, n or 0
    "max_over_its_factor": [(sp.Max(0, f * v) / f, (sp.Max if f == c else sp.Min)(0, v))
                            for f in (c, -c) for v in (positive, negative, sp.Integer(0))],
    # SymPy writes erfc(-u) as 2 - erfc(u) itself; rewritten as erf, each side is the other
    "one_plus_erf": [(k + k * sp.erf(u), k * sp.erfc(-u)), (k - k * sp.erf(u), k * sp.erfc(u))],
    "one_plus_tanh": [(k + k * sp.tanh(u), 2 * k * s(2 * u)), (k * sp.tanh(u) - k, -2 * k * s(-2 * u))],
    "exponentials_over_a_sigmoid": [(sp.exp(r) * s(u), sp.exp(r + u) * s(-u))],
    "sigmoid_pairs": [(k * s(u) + k * s(-u), k)],
    # a margin m = c > 0 or -c < 0, the difference v of two entries on either side of -m and 0
    "margin_outside_the_max": [(sp.Max(0, v + m), sp.Max(-m, v) + m) for m in (c, -c)
                               for v in (2 * c, c / 2, -c / 2, -2 * c, c + positive, -c - positive, sp.Integer(0))],
    # k e/(1 + T) - k: a softmax entry e/S at its label, less one, S = 1 + T > 0 (T = p, or T = 0)
    "softmax_entry_less_one": [(k * u / (1 + T) - k, k * (u - 1) / (1 + T) - k * T / (1 + T)) for T in (positive, 0)],
}


@pytest.mark.parametrize("rule", IDENTITIES)
def test_sympy_proves_each_identity_on_its_domain(rule):
    for lhs, rhs in IDENTITIES[rule]:
        difference = (lhs - rhs).rewrite(sp.exp).rewrite(sp.erf)
        assert sp.simplify(sp.expand_log(difference, force=False)) == 0, (rule, lhs, rhs)


# (rule, an expression it rewrites): terms it matches beside terms it leaves, at two or more places
EXAMPLES = {
    "sigmoid_minus_target": g * sigmoid(u) - g * t + u * sigmoid(u + 1),
    "sigmoid_differences": 2 * sigmoid(u + 1) - 2 * sigmoid(-u - 1) + sigmoid(u) * 3 - sp.Rational(3, 2),
    "sigmoid_polynomials_factored": sp.expand(sp.diff(u * sigmoid(u), u, 2).xreplace(
        {1 - sigmoid(u): sigmoid(-u)})) * g,
    "root_less_constant": 3 * hypot(u - t, 2) - 6 + u,
    "quotients_of_squares": 2 * g * u / ((u - t) ** 2 + 1) - 2 * g * t / ((u - t) ** 2 + 1) + u / (u ** 2 + 4),
    "log_one_plus_square": log1p(3 * (u - t) ** 2) + log1p(u ** 2),
    "scaled_sigmoid_branches": u * sigmoid(u) + (u + 1) ** 2 * sigmoid(2 * u),
    # t - 1 < 0, t > 0: both branches; a term beside the max, and a factor in front of it
    "max_over_its_factor": sp.Max(0, (t - 1) * u) / (t - 1) + 2 * (sp.Max(0, t * u) + u) / t + log1p(
        sp.exp(-sp.Abs(g * u))) / g + sp.Max(0, g * u) / g,
    # not an identity: equal where u <= 1000, within 1e-430 relatively above (test_an_exponential_beyond_...)
    "exp_beyond_overflow": (sp.exp(u) - 3 * t * u + g) * (sp.exp(2 * u) + 4 * t * u),
    "one_plus_erf": (1 + sp.erf(u / sp.sqrt(2))) * u / 2 + 3 - 3 * sp.erf(u - t) + sp.erf(u) ** 2 + 1,
    # not an identity: equal where |u - t| <= V, both below e^-790 beyond (test_a_gaussian_tail_...)
    "gaussian_tails": 3 * (u - t) * sp.exp(-(u - t) ** 2 / 2) + u * sp.exp(-u ** 2),
    "one_minus_softmax": 3 - 3 * sp.exp(u) / sp.Sum(sp.exp(k_ * u), (k_, 0, 2)) + t,
    # away from u = t, where the left side is 0 * 0^(t - 1) and the right one its limit
    "over_expm1": g * (u - t) * (-expm1(u - t)) ** (t - 1) + (u - t) / expm1(u - t),
    # never holds over the reals (e^u > 0): the value everywhere, and u e^u's limit 0 at u = -inf in floats
    "x_exp_x": 3 * g * u * sp.exp(u) + t * (u - t) * sp.exp(u - t) + u * sp.exp(t) + sp.exp(2 * u) * u,
    "one_plus_tanh": (1 + sp.tanh(u - t)) * u / 2 + 3 - 3 * sp.tanh(2 * u) + sp.tanh(u) ** 2,
    # Serf's derivative over one denominator: e^u erf(t) sigma(-u) is erf(t) sigma(u)
    "exponentials_over_a_sigmoid": (sp.exp(u) * sp.erf(t) + sp.erf(t) + g * u * sp.exp(u - u ** 2)) * sigmoid(-u) + sp.exp(
        t) * sigmoid(u),
    "sigmoid_pairs": 3 * sigmoid(u - t) + 3 * sigmoid(t - u) + sigmoid(2 * u) + sigmoid(-u),
    # not an identity: equal where the branch keeps the product, both below 2^-1075 beyond (test_a_product_beyond_...)
    "products_beyond_underflow": 3 * t * u * sigmoid(-t * u) + 2 * u ** 3 * sp.exp(-u ** 2) * g + u * sigmoid(u),
}
# both sides of every branch (|u - t| = 2, 1, 1/sqrt 3, t = 3/7), 0, and the tails
POINTS = (-10 ** 30, -300, -20, -2, sp.Rational(-11, 7), -1, sp.Rational(-1, 3), 0, sp.Rational(1, 3), 1,
          sp.Rational(3, 7) + 1 / sp.sqrt(3), sp.Rational(17, 7), 5, 300, 1200, 10 ** 30)


def value(expr, point):
    """expr at u = point (t = 3/7, g = 5/3) to 50 digits, or None where an exponential is too large to evaluate."""
    at = expr.subs({u: point, t: sp.Rational(3, 7), g: sp.Rational(5, 3)}).rewrite(sp.exp)
    if any(abs(e.args[0]) > 10 ** 6 for e in at.atoms(sp.exp) if e.args[0].is_number):
        return None
    return sp.N(at, 50)


@pytest.mark.parametrize("rule", EXAMPLES)
def test_each_rule_keeps_the_value_to_45_digits_on_both_sides_of_its_branches(rule):
    expr = EXAMPLES[rule]
    rewritten = getattr(stability, rule)(expr)
    assert rewritten != expr
    for point in POINTS:
        before, after = value(expr, point), value(rewritten, point)
        if before is None:
            continue
        assert abs(before - after) <= sp.Float(10) ** -45 * max(1, abs(before)), (point, before, after)


def test_an_exponential_beyond_its_overflow_outgrows_any_float64_terms():
    # e^u/u grows for u > 1, so for u > 1000 and |k|, |r| <= M (the largest float64 number):
    # e^u + k u + r >= u (e^u/u - M) - M >= e^1000 - 1001 M, which is more than M: the sum rounds to inf, as e^u
    assert sp.simplify(sp.diff(sp.exp(u) / u, u).subs(u, 1 + positive)).is_positive
    largest = sp.Rational(*float(np.finfo(np.float64).max).as_integer_ratio())
    assert sp.N(sp.exp(stability.EXP_OVERFLOWS) - (stability.EXP_OVERFLOWS + 2) * largest, 50) > 0
    # a bound 300 would not do: e^300 is a float64 number, and k u beside it is not negligible
    assert sp.N(sp.exp(300) - 302 * largest, 50) < 0


def test_one_plus_erf_keeps_what_erf_rounds_away():
    from derive.special import Erfc
    rewritten = stability.one_plus_erf(sp.expand((1 + sp.erf(u)) * g + 1 - sp.erf(t)))
    assert not rewritten.has(sp.erf) and rewritten.count(Erfc) == 2
    assert sp.N(stability.one_plus_erf(1 + sp.erf(u)).subs(u, -30), 20) > 1e-393   # 1 + erf(-30) is 0 in float64


def test_a_gaussian_tail_is_below_every_float_beyond_its_clip():
    # beyond V = sqrt(1500/a), |c v| exp(-a v^2) <= c e^709.8 e^-1500 for |v| <= the largest float64 number,
    # and |c| < 1e19: below half the smallest subnormal (2^-1075), so both sides round to 0
    largest = sp.Rational(*float(np.finfo(np.float64).max).as_integer_ratio())
    assert sp.N(10 ** 19 * largest * sp.exp(-stability.GAUSSIAN_UNDERFLOWS), 50) < sp.Integer(2) ** -1075
    # and within V nothing changes: the clip is the identity there
    from derive.special import Clip
    assert Clip(sp.Rational(-54), -sp.sqrt(3000), sp.sqrt(3000)) == -54


def test_a_product_beyond_underflow_is_below_every_float():
    # the branch's product is at most B e^u, B = magnitude(rest) over all float64 inputs, and u < -(log B + 750):
    # below e^-750 < 2^-1075, half the smallest subnormal, so it rounds to 0 in float64 and float32
    assert sp.exp(-stability.UNDERFLOWS + 4) < sp.Integer(2) ** -1075
    largest = sp.Rational(*float(np.finfo(np.float64).max).as_integer_ratio())
    assert stability.LARGEST == sp.N(largest, 40)
    # a rest overflows from half an ulp above the largest number: 1 + M rounds to M, 2 M to inf
    assert float(stability.ROUNDS_TO_INF) == np.inf and float(stability.ROUNDS_TO_INF - 2 ** 960) == float(largest)
    x = sp.IndexedBase("x", real=True)[k_]
    product = 2 * x ** 3 * sp.exp(-sp.Abs(x) * (x ** 2 + 1)) / (1 + sp.exp(-sp.Abs(x))) ** 2
    (gaussian,) = [f for f in product.args if isinstance(f, sp.exp)]
    assert stability.magnitude(product / gaussian) == 2 * stability.LARGEST ** 3
    (zero, condition), _ = stability.products_beyond_underflow(product).args
    threshold = -condition.rhs if condition.rhs.is_negative else condition.rhs   # u < -Z, or -u > Z
    assert zero == 0 and sp.N(2 * largest ** 3 * sp.exp(-threshold), 50) < sp.Integer(2) ** -1075
    # a bound is known only where each factor has one: e^x may be anything
    assert stability.magnitude(sp.exp(x) * x) is None and stability.magnitude(sigmoid(x) * sp.tanh(x)) == 1


def test_a_threshold_that_drops_a_float_is_caught(monkeypatch):
    # 3 t u sigmoid(-t u) at u = 300 (t = 3/7) is 6e-54, a float64 number: the branch keeps it, and one 2100 lower,
    # which gives 0 from t u = 70, does not
    expr = 3 * t * u * sigmoid(-t * u)
    assert value(stability.products_beyond_underflow(expr), 300) == value(expr, 300) > 2.0 ** -1022
    monkeypatch.setattr(stability, "UNDERFLOWS", stability.UNDERFLOWS - 2100)
    assert value(stability.products_beyond_underflow(expr), 300) == 0


def test_the_margin_outside_the_max_keeps_the_hinges_own_term_exact_in_floats():
    x = sp.IndexedBase("x", real=True)
    hinge = sp.Sum(sp.Max(0, x[k_] - x[3] + t), (k_, 0, 2)) - sp.Max(0, t)
    rewritten = stability.margin_outside_the_max(hinge)
    assert rewritten != hinge
    for row in ((1, -2, 0.5, 1), (1e10, 0, -5e9, 1e10), (-3, 0.25, 7, 0.5)):
        at = {x[v]: sp.Rational(value) for v, value in enumerate(row)} | {t: sp.Rational(3, 7)}
        assert sp.N(hinge.doit().xreplace(at), 50) == sp.N(rewritten.doit().xreplace(at), 50)
    # the label's term in float32 at x_c = 1e10: as written a + (m - b) is 0, outside the max m to the last bit
    xc, margin = np.float32(1e10), np.float32(1)
    assert max(0, xc + (margin - xc)) == 0 and max(-margin, xc - xc) + margin == margin


def test_over_expm1_gives_u_e_to_the_u_its_limit_0_where_u_is_minus_infinity():
    # the focal loss's gamma lp_c e^(lp_c + lp_j) (1 - p_c)^(gamma - 1) where lp_c = x_c - max - log S overflowed
    lp = sp.IndexedBase("lp", real=True)
    expr = g * t * lp[1] * sp.exp(lp[1] + lp[2]) * (-expm1(lp[1])) ** (t - 1)
    rewritten = stability.over_expm1(expr)
    assert rewritten != expr
    for point in (-300, -1, sp.Rational(-1, 3)):   # an identity: the branch never holds over the reals
        at = {lp[1]: point, lp[2]: -2, t: sp.Rational(3, 7), g: sp.Rational(5, 3)}
        assert abs(sp.N(expr.xreplace(at), 50) - sp.N(rewritten.xreplace(at).doit(), 50)) < sp.Float(10) ** -45
    from derive.special import Expm1, ExpToInf
    f = sp.lambdify([lp[1], lp[2], t, g], rewritten, [{"ExpToInf": np.exp, "Expm1": np.expm1}, "numpy"])
    plain = sp.lambdify([lp[1], lp[2], t, g], expr, "numpy")
    with np.errstate(all="ignore"):
        assert np.isnan(plain(-np.inf, -2.0, 3 / 7, 1.0)) and f(-np.inf, -2.0, 3 / 7, 1.0) == 0
    assert rewritten.has(ExpToInf) and rewritten.has(Expm1)


def test_a_wrong_identity_is_caught():
    # sigmoid_differences' second form once gave c tanh(u/2) for c sigmoid(u) - c/2 (twice the value)
    wrong = sp.simplify((k * s(u) - k / 2 - k * sp.tanh(u / 2)).rewrite(sp.exp))
    assert wrong != 0
    before, after = (value(e, 1) for e in (3 * sigmoid(u) - sp.Rational(3, 2), 3 * sp.tanh(u / 2)))
    assert abs(before - after) > 0.1


@pytest.mark.parametrize("rule, expr", [
    ("sigmoid_minus_target", sigmoid(u) - u),                     # the rest reads u: no target
    ("sigmoid_minus_target", u * sigmoid(u) - t),                 # nor does the scale
    ("sigmoid_differences", sigmoid(u) - sigmoid(-2 * u)),
    ("sigmoid_polynomials_factored", sigmoid(u) + u),             # degree 1
    ("root_less_constant", hypot(u, t) - t),                      # t's sign is not known
    ("quotients_of_squares", u ** 2 / (u ** 2 + 1)),              # not k v/(v^2 + c)
    ("log_one_plus_square", log1p(t * u ** 2)),                   # t may be negative
    ("scaled_sigmoid_branches", t * sigmoid(u)),                  # no factor that grows with u
    ("max_over_its_factor", sp.Max(0, u * t) / (u + t)),           # the divisor is not the max's factor
    ("max_over_its_factor", sp.Max(0, 2 * u) / 2),                # a number: no branch to choose
    ("exp_beyond_overflow", sp.exp(u) - u ** 2),                   # not linear in u
    ("exp_beyond_overflow", sp.exp(u) - u * sp.exp(t)),            # e^t is no float64 bound
    ("one_minus_softmax", 1 - sp.exp(u) / (1 + sp.exp(u))),       # no sum of exponentials
    ("one_plus_erf", 2 + sp.erf(u) + t * sp.erf(u)),              # no c + c erf
    ("gaussian_tails", u * sp.exp(u ** 2)),                       # grows: no tail
    ("gaussian_tails", u ** 2 * sp.exp(-u ** 2)),                 # not linear in u
    ("over_expm1", u * (-expm1(u)) ** t),                         # a power that may be positive
    ("x_exp_x", u * sp.exp(2 * u) + t * sp.exp(u)),               # no factor that is the exponent itself
    ("one_plus_tanh", 2 + sp.tanh(u) + t * sp.tanh(u)),            # no c + c tanh
    ("exponentials_over_a_sigmoid", sp.exp(t + 2 * u) * sigmoid(u)),  # the exponent holds no -u
    ("sigmoid_pairs", sigmoid(u) + 2 * sigmoid(-u)),
    ("products_beyond_underflow", u * sigmoid(-u) + 2 * sp.exp(u) * t),   # u, 2 t: neither overflows alone
    ("products_beyond_underflow", g * t * sp.exp(u)),              # g t reads none of u's inputs
    ("products_beyond_underflow", (t - u) * sp.exp(t)),            # t - u overflows only with u at its extreme too
    ("products_beyond_underflow", u ** 2 * sp.exp(u) * sigmoid(-u) * sp.exp(u ** 2)),  # no bound of the rest
    ("margin_outside_the_max", sp.Max(0, sp.IndexedBase("x")[k_] + t)),                  # one entry: no difference
    ("margin_outside_the_max", sp.Max(0, sp.IndexedBase("x")[k_] - sp.IndexedBase("y")[k_] + t)),  # two arrays
])
def test_a_rule_leaves_what_it_does_not_prove(rule, expr):
    assert getattr(stability, rule)(expr) == expr


def test_each_rule_is_in_the_driver_and_documented():
    from pathlib import Path
    names = {function.__name__: name for name, function, _ in stability.REWRITES}
    headings = (Path(__file__).resolve().parent.parent / "docs" / "stability.md").read_text()
    for rule in EXAMPLES:
        assert rule in names and f"### {names[rule]}\n" in headings, rule


# ---- a softmax's scores in units of a power of two (codegen.tensor_lower.rescaled_scores) ----------------------

def test_sympy_proves_a_softmax_unchanged_by_its_scores_in_units_of_c():
    # on the branch where score j is the largest (a_i = a_j - p_i, p_i >= 0), for any c > 0: max(c a) = c max(a), and
    # exp((c a_s - max(c a))/c) = exp(a_s - max(a)) for every s; a masked score is -oo on both sides
    x, p = sp.Symbol("x", real=True), sp.symbols("p0:3", nonnegative=True)
    for j in range(3):
        scores = [x if i == j else x - p[i] for i in range(3)]
        largest, scaled = sp.Max(*scores), sp.Max(*(c * v for v in scores))
        assert (largest, scaled) == (x, c * x)
        for v in scores:
            assert sp.simplify(sp.exp((c * v - scaled) / c) - sp.exp(v - largest)) == 0


def test_the_declared_scores_are_linear_in_what_is_scaled_and_a_false_one_is_refused():
    from derive.catalog import CATALOG
    from derive.declare import DeclarationError
    from derive.tensor import linear_in, tensor_op
    declared = {name: op for name, op in CATALOG.items() if getattr(op, "rescaled", None)}
    assert set(declared) == {"ScaledDotProductAttention", "MultiheadAttention"}
    for op in declared.values():
        for step, array in op.rescaled.items():
            assert linear_in(next(s for s in op.steps if s.name == step).expr, array)
    with pytest.raises(DeclarationError, match="rescaled"):     # Q^2: c^2 times itself, not c
        tensor_op("Squared", inputs={"Q": "n t d", "K": "n s d"}, rescaled={"A": "Q"},
                  steps=["A[n, t, s] = Sum(Q[n, t, d]**2 * K[n, s, d], d)", "y[n, t] = Sum(exp(A[n, t, s]), s)"])


def softmax_at(digits, q, keys, scale=None):
    """softmax(q.k / sqrt(D)) over keys at digits, from the scores, or (scale given) from the rule's: the scores of
    c q, c = 2^-scale, shifted by their max, over c."""
    with mpmath.workdps(digits):
        root = mpmath.sqrt(len(q))
        if scale is None:
            scores = [mpmath.fsum(mpmath.mpf(a) * b for a, b in zip(q, k)) / root for k in keys]
        else:
            c = mpmath.ldexp(1, -scale)
            scaled = [mpmath.fsum(c * mpmath.mpf(a) * b for a, b in zip(q, k)) / root for k in keys]
            scores = [(v - max(scaled)) / c for v in scaled]
        shifted = [mpmath.exp(v - max(scores)) for v in scores]
        return [v / mpmath.fsum(shifted) for v in shifted]


def test_scores_in_units_of_a_power_of_two_keep_the_softmax_to_45_digits():
    # scores of 6e319 (past float64's largest number) 0.3 and 0.6 apart (at 400 digits, where 1e320 + 0.3 is exact),
    # and two far below them
    q = [1e200, 3.0, 2.5]
    keys = [[1e120, 0, 1], [1e120, 1, 0], [1e120, 0.5, 1.5], [-1e100, 5, 7], [9.999999e119, 0, 1]]
    for scale in (0, 330, 1027):
        for plain, rescaled in zip(softmax_at(400, q, keys), softmax_at(400, q, keys, scale)):
            assert abs(plain - rescaled) <= mpmath.mpf(10) ** -45 * max(abs(plain), mpmath.mpf(10) ** -300)


def test_the_generated_attention_is_finite_where_its_scores_overflow():
    # q.k = 1.6e308 beyond the largest float64 number: the unguarded kernel's inf - inf gave NaN; the truth is P's
    # one-hot row, y = V's first row, and gradients of 0 but dV; float32 likewise at its largest number
    from codegen.pipeline import imported
    from codegen.render import ROOT
    generated = imported(ROOT / "generated", fused=False)
    for dtype in (np.float32, np.float64):
        big = np.finfo(dtype).max
        Q = np.array([[[big, big / 2]]], dtype)
        K = np.array([[[big, big / 2], [-big, big], [1.0, 0.0]]], dtype)
        V = np.arange(6, dtype=dtype).reshape(1, 3, 2)
        for causal in (False, True):
            layer = generated.ScaledDotProductAttention(is_causal=causal)
            y = layer.forward(Q, K, V)
            dQ, dK, dV = layer.backward(np.ones_like(y))
            assert np.array_equal(y, V[:, :1]), (dtype, causal, y)
            assert not np.any(dQ) and not np.any(dK) and np.array_equal(dV, [[[1, 1], [0, 0], [0, 0]]])


def test_the_accuracy_checker_catches_the_unguarded_scores(tmp_path):
    # the kernels printed without the declaration (rescaled={}): NaN where the scores overflow in float64, which
    # the contract's survey finds; the generated ones meet it in float64's forward
    import dataclasses
    import shutil

    from codegen import accuracy
    from codegen.pipeline import imported
    from codegen.render import ROOT, operation_files
    from codegen.write import import_package
    from derive.catalog import CATALOG
    op = CATALOG["ScaledDotProductAttention"]
    shutil.copytree(ROOT / "generated", tmp_path / "generated", ignore=shutil.ignore_patterns("fast", "__pycache__"))
    for name, text in operation_files(dataclasses.replace(op, rescaled={}), fused=False).items():
        (tmp_path / "generated" / name).write_text(text)
    unguarded = import_package(tmp_path / "generated")
    key = (op.name, "numpy", "float64", "forward")
    subject = accuracy.subject(op)
    assert accuracy.Survey([subject], unguarded, quick=True, dtypes=(np.float64,)).run()[key].bad > 0
    generated = imported(ROOT / "generated", fused=False)
    assert not accuracy.Survey([subject], generated, quick=True, dtypes=(np.float64,)).run()[key].failures


# ---- a row's shifted sum as 1 + T, T without its largest entry (issue 23's row operations) -------------------------

X = sp.IndexedBase("x", real=True)
M_ = sp.Symbol("m", integer=True)
ClassMax = stability.ClassMax


def shifted_sums(row, top=None):
    """(sum_m exp(x_m - max) as written, shifted_sum_as_one_plus_the_rest's 1 + T) over the row of three entries,
    the max and argmax substituted by their values (top's, or the first of ties), summed out."""
    plain = sp.Sum(sp.exp(X[M_] - ClassMax(X)), (M_, 0, 2))
    rewritten = stability.shifted_sum_as_one_plus_the_rest(plain)
    top = max(range(3), key=lambda v: (row[v], -v)) if top is None else top
    at = {ClassMax(X): X[top], stability.ClassArgmax(X): top}
    return tuple(e.xreplace(at).doit().xreplace({X[v]: value for v, value in enumerate(row)})
                 for e in (plain, rewritten))


def test_sympy_proves_the_shifted_sum_is_one_plus_the_rest_given_x_a_is_the_max():
    for top in range(3):   # x_top the max: its term exp(x_top - x_top) is 1
        plain, rewritten = shifted_sums([X[0], X[1], X[2]], top)
        assert sp.simplify(plain - rewritten) == 0
    written = sp.Sum(sp.exp(X[M_] - ClassMax(X)), (M_, 0, 2))
    assert stability.shifted_sum_as_one_plus_the_rest(written).has(stability.ClassArgmax)


def test_the_shifted_sum_keeps_t_to_45_digits_and_its_log1p_keeps_it_in_floats():
    for row in ((sp.Rational(444, 10), 0, sp.Rational(-222, 10)), (1, 1, -2), (-3, sp.Rational(1, 4), 7), (0, 0, 0)):
        plain, rewritten = shifted_sums(row)
        assert abs(sp.N(plain, 50) - sp.N(rewritten, 50)) < sp.Float(10) ** -45 * sp.N(plain, 50)
    # the row (44.4, 0, -22.2) in float64: log S rounds to 0, log1p(T) is T = 5.2e-20 to the last bits
    x = np.array([44.4, 0, -22.2])
    e = np.exp(x - x.max())
    rest = np.sum(np.where(np.arange(3) == np.argmax(x), 0, e))
    truth = float(sp.N(sp.log(shifted_sums([sp.Rational(v) for v in x])[0]), 30))   # of the floats' exact values
    assert np.log(np.sum(e)) == 0 and abs(np.log1p(rest) - truth) <= 2 * np.spacing(truth)


@pytest.mark.parametrize("expr", [
    sp.Sum(sp.exp(X[M_]), (M_, 0, 2)),                                          # no max shift: no term is 1
    sp.Sum(sp.exp(2 * X[M_] - ClassMax(X)), (M_, 0, 2)),                        # 2 x_a - max is not 0
    sp.Sum(sp.exp(X[M_] - ClassMax(sp.IndexedBase("y"))), (M_, 0, 2)),   # another row's max
])
def test_the_shifted_sum_leaves_a_sum_it_does_not_prove(expr):
    assert stability.shifted_sum_as_one_plus_the_rest(expr) == expr


def test_a_softmax_entry_less_one_keeps_t_where_the_quotient_rounds_it_away():
    e, rest = sp.IndexedBase("e", real=True)[0], sp.Symbol("rest", nonnegative=True)
    expr = g * e / (1 + rest) - g + t
    rewritten = stability.softmax_entry_less_one(expr)
    assert rewritten != expr and sp.simplify(expr - rewritten) == 0
    f = sp.lambdify([e, rest, g, t], rewritten - t, "numpy")
    plain = sp.lambdify([e, rest, g, t], expr - t, "numpy")
    for dtype in (np.float32, np.float64):   # the label the row's largest (e = 1), T below an ulp of 1
        one, tail = dtype(1), dtype(5.2e-20)
        assert plain(one, tail, one, 0) == 0 and f(one, tail, one, 0) == -tail
    # not a softmax entry: a number or an exponential over 1 + T (a sigmoid's form), or k e/(1 + T) - 2k
    for other in (g / (1 + rest) - g, g * sp.exp(u) / (1 + rest) - g, g * e / (1 + rest) - 2 * g):
        assert stability.softmax_entry_less_one(other) == other


def test_the_row_rules_are_in_the_driver_and_documented():
    from pathlib import Path
    names = {rewrite.__name__: name for name, rewrite, _ in stability.REWRITES}
    headings = (Path(__file__).resolve().parent.parent / "docs" / "stability.md").read_text()
    for rule in ("shifted_sum_as_one_plus_the_rest", "softmax_entry_less_one"):
        assert rule in names and f"### {names[rule]}\n" in headings, rule


def test_the_generated_row_sum_but_its_argmax_keeps_t_excludes_one_entry_of_a_tie_and_a_wrong_index_is_caught():
    from generated._special import argmax_positions, row_sum_but
    x = np.array([[3.0, 1.0, 3.0], [2.0, 62.0, 2.0]])
    at = argmax_positions(x)
    assert at.tolist() == [[0], [4]] and x.take(at).tolist() == [[3.0], [62.0]]
    e = np.exp(x - x.take(at))
    before = e.copy()
    assert row_sum_but(e, at).tolist() == [[1 + np.exp(-2.0)], [2 * np.exp(-60.0)]] and (e == before).all()
    # another index: the max's 1 is summed, and rounds T away where it is below an ulp of 1
    assert row_sum_but(e, at + 1)[1, 0] == 1
    # an infinite max: exp(inf - inf) is NaN at the argmax, and the sum NaN as the whole row's
    with np.errstate(invalid="ignore"):
        infinite = np.exp(np.array([[np.inf, 1.0]]) - np.inf)
    assert np.isnan(row_sum_but(infinite, argmax_positions(np.array([[np.inf, 1.0]])))).all()


def test_the_generated_kernels_keep_t_at_the_rows_largest_entry():
    # the row: log-softmax's largest entry -log1p(T), cross-entropy's loss log1p(T) and dx_c = -T/(1 + T)
    # at a label that is the row's largest, where 1 + T rounds to 1; NumPy and fused alike
    import generated
    pytest.importorskip("numba")
    import generated.fast
    for package in (generated, generated.fast):
        for dtype in (np.float32, np.float64):
            x = np.array([[44.4, 0, -22.2]], dtype)
            tail = np.exp(np.float64(x[0, 1]) - x[0, 0]) + np.exp(np.float64(x[0, 2]) - x[0, 0])
            assert np.isclose(package.LogSoftmax().forward(x)[0, 0], -tail, rtol=1e-5)
            loss = package.SoftmaxCrossEntropy(reduction="sum")
            assert np.isclose(loss.forward(x, np.array([0])), tail, rtol=1e-5)
            assert np.isclose(loss.backward()[0, 0], -tail, rtol=1e-5)


def test_x_exp_x_gives_the_focal_losss_gamma_lp_p_at_its_label_its_limit_where_lp_is_minus_infinity():
    # the branch never holds over the reals, so the rule is an identity; in floats e^u rounds to 0 from u = -746
    # (float64), where u e^u as written is 0 for a finite u (the branch's value) and NaN at u = -inf
    assert sp.exp(u).is_positive
    from derive.special import ExpToInf
    lp = sp.IndexedBase("lp", real=True)
    expr = g * (-expm1(lp[1])) ** t * (t * lp[1] * sp.exp(lp[1]) + expm1(lp[1]))
    rewritten = stability.x_exp_x(expr)
    assert rewritten.has(ExpToInf) and rewritten != expr
    f = sp.lambdify([lp[1], t, g], rewritten, [{"ExpToInf": np.exp}, "numpy"])
    plain = sp.lambdify([lp[1], t, g], expr, "numpy")
    with np.errstate(all="ignore"):
        assert np.isnan(plain(-np.inf, 2.0, 1.0)) and f(-np.inf, 2.0, 1.0) == -1.0
        for point in (-800.0, -746.0, -30.0, -1.0, 0.0):
            assert f(point, 2.0, 1.0) == plain(point, 2.0, 1.0)


def test_the_generated_focal_loss_gives_minus_g_at_a_label_whose_log_probability_overflows():
    # x = (M, 0, -M/2), label 2: x_c - max overflows to -inf, p_c = 0, dx_c = -g (it was NaN: gamma lp_c p_c = -inf * 0)
    import generated
    packages = [generated]
    try:
        import generated.fast
        packages.append(generated.fast)
    except ImportError:   # no numba: the NumPy kernels alone
        pass
    for package in packages:
        for dtype in (np.float32, np.float64):
            largest = np.finfo(dtype).max
            loss = package.SoftmaxFocalLoss(reduction="sum")
            with np.errstate(all="ignore"):
                loss.forward(np.array([[largest, 0, -largest / 2]], dtype), np.array([2]))
                assert loss.backward().tolist() == [[1.0, 0.0, -1.0]], (package.__name__, dtype)


# ---- a softmax layer's backward at the row's argmax (derive.softmax.vjp_at_argmax) ----------------------------------

def softmax_vjps(row, upstream, top, one_less):
    """(the derived vjp y_j (g_j - sum_i g_i y_i) at j = top, vjp_at_argmax's form there, and the derived vjp with its
    sum split at top by sums_split_at) over a row of three entries, y = softmax(row) written e_i/(1 + T) with T the
    others' share, the argmax taken as top, summed out. one_less: "rest" (T/(1 + T)) or "share" (sum_{i != a} y_i)."""
    from derive.catalog import CATALOG
    from derive.gradients import layer_backward
    from derive.softmax import others_share, sums_split_at, vjp_at_argmax
    from derive.symbols import K, c, j
    op = CATALOG["Softmax"]
    vjp, y = layer_backward(op), op.saved[0][0]
    argmax, rest = stability.ClassArgmax(X), sp.Symbol("rest", nonnegative=True)
    share = rest / (1 + rest) if one_less == "rest" else others_share(y, argmax)
    written = vjp_at_argmax(vjp, y, share, c, argmax)
    split = sums_split_at(vjp, c, argmax)
    exps = [sp.exp(v - row[top]) for v in row]
    others = sum(e for v, e in enumerate(exps) if v != top)
    values = {y[v]: e / (1 + others) for v, e in enumerate(exps)} | {
        sp.IndexedBase("g", real=True)[v]: value for v, value in enumerate(upstream)}
    def out(e):  # noqa: E306
        e = e.xreplace({K: 3, argmax: top, c: top, j: top, rest: others}).doit()
        return e.xreplace(values)
    return out(vjp), out(written), out(split)


def test_sympy_proves_the_softmax_vjp_at_its_argmax_and_the_split_sum():
    x, gs = [X[0], X[1], X[2]], [sp.Symbol(f"g{v}", real=True) for v in range(3)]
    for top in range(3):
        for one_less in ("rest", "share"):
            derived, written, split = softmax_vjps(x, gs, top, one_less)
            assert written != derived and sp.simplify(derived - written) == 0, (top, one_less)
            assert sp.simplify(derived - split) == 0
    # the form is the vjp only at the argmax: 1 - y_a = T/(1 + T) holds there alone
    derived, written, _ = softmax_vjps(x, gs, 0, "rest")
    assert sp.simplify(derived.xreplace({X[0]: X[1], X[1]: X[0]}) - written) != 0


def test_the_softmax_vjp_at_its_argmax_keeps_its_value_to_45_digits():
    for row, upstream in (((sp.Rational(444, 10), 0, sp.Rational(-222, 10)), (1, 2, -3)),
                          ((1, 1, -2), (sp.Rational(1, 3), -1, 5)), ((-3, sp.Rational(1, 4), 7), (2, 2, 1))):
        top = max(range(3), key=lambda v: (row[v], -v))
        for one_less in ("rest", "share"):
            derived, written, _ = (sp.N(e, 60) for e in softmax_vjps(row, upstream, top, one_less))
            assert abs(derived - written) <= sp.Float(10) ** -45 * abs(derived)


def softmax_vjps_above_half(row, upstream, at, big):
    """(the derived vjp y_j (g_j - sum_i g_i y_i) at j = at, and the fused kernels' form there: vjp_above_half's if at
    is big, else the vjp) over a row of three entries y = softmax(row), big the entry taken as above 1/2 (None: no
    entry is), summed out."""
    from derive.catalog import CATALOG
    from derive.gradients import layer_backward
    from derive.softmax import vjp_above_half
    from derive.symbols import K, j
    op = CATALOG["Softmax"]
    vjp, y = layer_backward(op), op.saved[0][0]
    written = vjp_above_half(vjp, y) if at == big else vjp
    exps = [sp.exp(v) for v in row]
    values = {y[v]: e / sum(exps) for v, e in enumerate(exps)} | {
        sp.IndexedBase("g", real=True)[v]: value for v, value in enumerate(upstream)}
    def out(e):  # noqa: E306
        e = e.xreplace({K: 3, j: at}).doit()
        e = e.xreplace({y[v] > sp.S.Half: sp.true if v == big else sp.false for v in range(3)})
        assert not e.has(sp.Piecewise), e
        return e.xreplace(values)
    return out(vjp), out(written)


def test_sympy_proves_the_softmax_vjp_at_an_entry_above_half_for_each_argmax():
    x, gs = [X[0], X[1], X[2]], [sp.Symbol(f"g{v}", real=True) for v in range(3)]
    for big in range(3):
        derived, written = softmax_vjps_above_half(x, gs, big, big)
        assert written != derived and sp.simplify(derived - written) == 0, big
    # the form holds at the entry above 1/2, the others' sums skipping it: not where another entry is skipped
    derived, written = softmax_vjps_above_half(x, gs, 0, 0)
    assert sp.simplify(derived.xreplace({X[0]: X[1], X[1]: X[0]}) - written) != 0


def test_the_softmax_vjp_above_half_keeps_its_value_to_45_digits():
    half = sp.Rational(1, 2)
    for row, upstream in (((sp.Rational(444, 10), 0, sp.Rational(-222, 10)), (1, 2, -3)),
                          ((1, sp.Rational(1, 10 ** 20), -2), (sp.Rational(1, 3), -1, 5)),
                          ((-3, sp.Rational(1, 4), 7), (2, 2, 1)), ((90, -half, -half), (1, 1 + sp.Rational(1, 10 ** 30), 7))):
        big = max(range(3), key=lambda v: row[v])
        derived, written = (sp.N(e, 60) for e in softmax_vjps_above_half(row, upstream, big, big))
        assert abs(derived - written) <= sp.Float(10) ** -45 * abs(derived), row


def test_the_generated_softmax_backward_keeps_the_others_share_at_the_rows_largest_entry():
    # the row: dx_a = y_a (g_a T/(1 + T) - sum_{i != a} g_i y_i), where g_a - sum_i g_i y_i rounds to 0
    import generated
    pytest.importorskip("numba")
    import generated.fast
    for dtype in (np.float32, np.float64):
        x, g = np.array([[44.4, 0, -22.2]], dtype), np.array([[1, 2, -3]], dtype)
        with mpmath.workdps(50):
            e = [mpmath.exp(mpmath.mpf(float(v)) - float(x[0, 0])) for v in x[0]]
            p = [v / mpmath.fsum(e) for v in e]
            truth = float(p[0] * (float(g[0, 0]) - mpmath.fsum(float(a) * b for a, b in zip(g[0], p))))
        y = generated.Softmax().forward(x)
        assert g[0, 0] - np.sum(g * y) == 0   # the plain form's cancellation, which the checks below would catch
        for package in (generated, generated.fast):
            layer = package.Softmax()
            layer.forward(x)
            assert abs(layer.backward(g)[0, 0] - truth) <= 4 * np.spacing(abs(dtype(truth))), (package, dtype)


def test_the_generated_row_sum_but_of_a_product_skips_the_argmax_and_restores_it():
    from generated._special import argmax_positions, row_sum_but
    y, g = np.array([[0.25, 0.5, 0.25], [1.0, 0.0, np.nan]]), np.array([[1.0, 2.0, 4.0], [3.0, 5.0, 7.0]])
    at, before = argmax_positions(y[:1]), y.copy()
    assert row_sum_but(y[:1], at, g[:1]).tolist() == [[1.25]] and at.tolist() == [[1]]
    assert np.isnan(row_sum_but(y, argmax_positions(y), g)[1, 0])   # a NaN row's argmax is the NaN: kept
    assert np.array_equal(y, before, equal_nan=True)


# ---- a dense target's shift in halves (derive.stability.shift_in_halves, codegen.kernels' Kernel.redo) ----------

def test_sympy_proves_the_shift_in_halves_and_it_keeps_a_finite_loss_at_45_digits():
    from derive.symbols import ClassMax
    x, t_ = sp.IndexedBase("x", real=True), sp.IndexedBase("t", real=True)
    loss = -sp.Sum(t_[k_] * (x[k_] - ClassMax(x) - log1p(u)), (k_, 0, 2))
    halves = stability.shift_in_halves(loss)
    assert halves != loss and halves.has(ClassMax)
    assert sp.simplify((halves - loss).doit()) == 0
    # the row x = (M, 0, -M/2), M the largest float64, t = (1/4, 1/2, 1/4): finite, 7/8 M + log1p's term
    largest = sp.Rational(*float(np.finfo(np.float64).max).as_integer_ratio())
    at = {x[0]: largest, x[1]: 0, x[2]: -largest / 2, t_[0]: sp.Rational(1, 4), t_[1]: sp.Rational(1, 2),
          t_[2]: sp.Rational(1, 4), ClassMax(x): largest, u: sp.Rational(1, 10 ** 300)}
    exact = sp.N(loss.doit().xreplace(at), 50)
    assert sp.N(halves.doit().xreplace(at), 50) == exact and exact < largest
    # in floats the halves are finite where x - max overflows, and t (x - M) was inf
    with np.errstate(over="ignore"):
        row, weights = np.array([np.finfo(np.float64).max, 0, -np.finfo(np.float64).max / 2]), np.array([.25, .5, .25])
        assert np.isinf(-(weights * (row - row.max())).sum())
        assert float(-(2 * weights * (row / 2 - row.max() / 2)).sum()) == float(exact)


def test_shift_in_halves_leaves_a_sum_with_no_shift_and_an_exponential_alone():
    from derive.symbols import ClassMax
    x = sp.IndexedBase("x", real=True)
    for expr in (sp.Sum(x[k_] * t, (k_, 0, 2)), sp.Sum(sp.exp(x[k_] - ClassMax(x)), (k_, 0, 2))):
        assert stability.shift_in_halves(expr) == expr


def test_the_halves_equal_the_plain_kernel_bit_for_bit_where_it_is_finite_and_the_guard_is_needed():
    # fl(x/2 - M/2) = fl(x - M)/2 and (2 t) h = t (x - M) rounded once: the same numbers summed, where x is normal
    import generated.softmax_cross_entropy as kernels
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        x = (rng.standard_normal((64, 7)) * 10.0 ** rng.integers(-3, 30, (64, 1))).astype(dtype)
        t_ = rng.random((64, 7)).astype(dtype)
        plain = kernels.forward_dense_plain(x, t_)[0]
        assert np.isfinite(plain).all()
        assert (kernels.forward_dense_plain_in_halves(x, t_) == plain).all(), dtype
        # where x - max overflows: the plain steps alone give inf; the kernel, which redoes that row, the truth
        largest = np.finfo(dtype).max
        row, weights = np.array([[largest, 0, -largest / 2]], dtype), np.array([[.25, .5, .25]], dtype)
        with np.errstate(over="ignore"):
            plain_steps = -(weights * ((row - row.max()) - np.log1p(np.float64(0)))).sum()
            assert np.isinf(plain_steps)
            assert kernels.forward_dense_plain(row, weights)[0][0] == np.float32(0.875) * largest
