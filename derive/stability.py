"""Numerically stable rewrites, each an identity (tests check every one preserves the value).

erf and erfc are no rewrites: each backend calls the functions printed once from derive.special's erf_numpy
and erfc_numpy.

The kernels evaluate what these return; the derivations differentiate the plain forms."""
import functools

import mpmath
import sympy as sp
from sympy.codegen.cfunctions import expm1, hypot, log1p

from derive.functions import as_sigmoid, sigmoid
from derive.special import Clip, Erfc, ExpToInf, Expm1
from derive.symbols import ClassMax


def split_logs(expr):
    """log(a/b) = log a - log b and log(exp u) = u: log p never forms p, which underflows. Only where
    SymPy proves a and b positive (exponentials, their sums): log((x + 5)(x + 4)) is not
    log(x + 5) + log(x + 4) for x < -5, where the left side is real and the right one NaN."""
    return sp.expand_log(expr, force=False)


def log_of_sigmoid(expr):
    """log sigmoid(u) = -log(1 + exp(-u)) and log(1 - sigmoid(u)) = -log(1 + exp(u)): no log of 0."""
    u = sp.Wild("u")
    expr = expr.replace(sp.log(sigmoid(u)), lambda u: -sp.log(1 + sp.exp(-u)))
    return expr.replace(sp.log(1 - sigmoid(u)), lambda u: -sp.log(1 + sp.exp(u)))


def one_softplus(expr):
    """log(1 + exp(u)) = log(1 + exp(-u)) + u where both appear (BCE's t log(sigma) + (1 - t)
    log(1 - sigma)): one softplus instead of two, and (1 - t) x collected as PyTorch writes it, so
    that x = +-inf gives inf, not inf - inf."""
    u = sp.Wild("u")
    found = sorted(expr.atoms(sp.log), key=sp.default_sort_key)   # collect's result depends on the order
    logs = [m[u] for m in (e.match(sp.log(1 + sp.exp(u))) for e in found) if m]
    both = [v for v in logs if not v.could_extract_minus_sign() and expr.has(sp.log(1 + sp.exp(-v)))]
    if not both:
        return expr
    return sp.collect(sp.expand(expr.xreplace({sp.log(1 + sp.exp(v)): sp.log(1 + sp.exp(-v)) + v for v in both})), both)


def max_over_its_factor(expr):
    """max(0, c u)/c = max(0, u) where c > 0 and min(0, u) where c < 0, for a c that is no number and reads none of
    u's inputs (an option): the softplus form of PyTorch's Softplus(beta), log(1 + exp(beta x))/beta, is
    (max(0, beta x) + log1p(exp(-|beta x|)))/beta, inf where beta x overflows (from x = 1.7e38 in float32 at
    beta = 2) though its value is x. The branch is on c's sign, a scalar; neither branch overflows, and c = 0
    is no value of the quotient."""
    def unscaled(term, c):
        """(k, u) of a term k max(0, c u), else None."""
        k, m = term.as_independent(sp.Max, as_Add=False)
        if isinstance(m, sp.Max) and len(m.args) == 2 and 0 in m.args:
            u = sp.Add(*m.args) / c
            return (k, u) if not u.has(c) and not c.has(*inputs_of(u)) else None
        return None

    def split(mul):
        for power in mul.args:
            c, exponent = power.as_base_exp()
            if exponent != -1 or c.is_number:
                continue
            others = [f for f in mul.args if f is not power]
            for factor in others:
                terms = sp.Add.make_args(factor)
                found = [(term, scaled) for term in terms if (scaled := unscaled(term, c)) is not None]
                if found:
                    (term, (k, u)), rest = found[0], [f for f in others if f is not factor]
                    branches = sp.Piecewise((sp.Max(0, u), c > 0), (sp.Min(0, u), True))
                    return sp.Mul(*rest) * (sp.Add(*(t for t in terms if t is not term)) / c + k * branches)
        return mul
    return expr.replace(lambda e: isinstance(e, sp.Mul) and e.has(sp.Max), split)


def log_cosh(expr):
    """log(cosh(u)) = |u| + log1p(exp(-2|u|)) - log 2 for |u| > 1: cosh(u) overflows from |u| = 89 in float32
    (710 in float64) where log cosh u is about |u|; here no exponential exceeds 1. Below, where that sum
    cancels to 0 (log cosh 1e-8 = 5e-17), log1p(cosh(u) - 1) with cosh(u) - 1 = expm1(|u|)^2 / (2 (1 +
    expm1(|u|))), exact near 0."""
    u = sp.Wild("u")

    def branches(u):
        a = sp.Abs(u)
        small = Expm1(a)
        return sp.Piecewise((a + log1p(sp.exp(-2 * a)) - sp.log(2), a > 1), (log1p(small ** 2 / (2 * (1 + small))), True))
    return expr.replace(sp.log(sp.cosh(u)), branches)


def tanh_quotients(expr):
    """sinh(u)/cosh(u) = tanh(u) (log cosh's derivative, as SymPy writes it): both overflow from |u| = 89 in
    float32, to inf/inf = NaN, where tanh is +-1."""
    def merged(mul):
        factors = list(mul.args)
        for factor in mul.args:
            quotient = sp.cosh(factor.args[0]) ** -1 if isinstance(factor, sp.sinh) else None
            if quotient is not None and quotient in factors and factor in factors:
                factors.remove(factor)
                factors.remove(quotient)
                factors.append(sp.tanh(factor.args[0]))
        return sp.Mul(*factors) if len(factors) != len(mul.args) else mul
    return expr.replace(lambda e: isinstance(e, sp.Mul) and e.has(sp.sinh), merged)


def softplus(expr):
    """log(1 + exp(u)) = max(u, 0) + log1p(exp(-|u|)): the exponential never exceeds 1."""
    u = sp.Wild("u")
    return expr.replace(sp.log(1 + sp.exp(u)), lambda u: sp.Max(u, 0) + log1p(sp.exp(-sp.Abs(u))))


def hinge_as_step(expr):
    """c u + max(-u, 0) = u (H(u) + c - 1), H the step (0 at u = 0, where both sides are 0): BCE's
    (1 - t) x + max(-x, 0) = x (H(x) - t). The sum cancels where x is large and negative (-x + x,
    losing the softplus added to it: 1% of the loss at x = -10 in float32, as in PyTorch); the
    product is exact there, each of BCE's two terms is >= 0 for t in [0, 1] (a target outside,
    which PyTorch accepts too, may cancel), and it is one pass less."""
    def stepped(add):
        for hinge in [a for a in add.args if isinstance(a, sp.Max) and len(a.args) == 2 and 0 in a.args]:
            (negated,) = [a for a in hinge.args if a != 0]
            u = -negated
            partners = [t for t in add.args if t is not hinge and not (t / u).has(u)]
            if partners and isinstance(u, (sp.Symbol, sp.Indexed)):
                c = partners[0] / u
                rest = [t for t in add.args if t is not hinge and t is not partners[0]]
                return sp.Add(*rest, u * (sp.Heaviside(u, 0) + c - 1))
        return add
    return expr.replace(lambda e: isinstance(e, sp.Add), stepped)


def margin_outside_the_max(expr):
    """max(0, a - b + m) = max(-m, a - b) + m for entries a, b of one array and m free of arrays: a - b is
    exactly 0 where a = b, so the multiclass hinge's term at its own label is m to the last bit, which the
    loss then subtracts; as written, a + (m - b) rounds (x_c = 1e10 in float32: 0, and a loss of -m)."""
    def outside(hinge):
        if len(hinge.args) != 2 or 0 not in hinge.args:
            return hinge
        (add,) = [a for a in hinge.args if a != 0]
        entries = [term for term in sp.Add.make_args(add) if term.has(sp.Indexed)]
        margin = add - sp.Add(*entries)
        bases = {e.base for term in entries for e in term.atoms(sp.Indexed)}
        signs = sorted(term.as_coeff_Mul()[0] for term in entries)
        if len(entries) != 2 or len(bases) != 1 or signs != [-1, 1] or margin == 0 or margin.has(sp.Indexed):
            return hinge
        return sp.Max(-margin, add - margin) + margin
    return expr.replace(lambda e: isinstance(e, sp.Max), outside) if expr.has(sp.Max) else expr


def steps_as_branches(expr):
    """An expression f(H) in a step H = H(u) (0 at u = 0, the kinks' convention) is H f(1) + H'(-u) f(0),
    with H'(v) = 1 - H(-v) the step that is 1 at v = 0: exact, as H is 0 or 1. The derivative of max(a, b)
    is H a' + (1 - H) b', which differentiation expands to b' + H (a' - b'); where H is 1 that is
    b' - b' + a', and a small a' is lost beside a large b' (tanh(max(e^u, x))' was 0 for 5e-19). In f(1)
    and f(0) SymPy cancels b' - b' exactly, and H' keeps them apart (1 - H would be expanded again).
    Steps, not np.where, so that a NaN u still gives NaN. Applied where a sum holds the step and the
    result is shorter than f."""
    steps = sorted((h for h in expr.atoms(sp.Heaviside) if len(h.args) == 2 and h.args[1] == 0
                    and any(a.is_Add and a.has(h) for a in sp.preorder_traversal(expr))), key=sp.default_sort_key)
    if not steps:
        return expr
    step = steps[0]
    above, below = (steps_as_branches(expr.xreplace({step: value})) for value in (1, 0))
    branches = step * above + sp.Heaviside(-step.args[0], 1) * below
    return branches if sp.count_ops(branches) < sp.count_ops(expr) else expr


def index_steps(expr):
    """The steps H(u) of indices alone in expr (u an integer, never NaN), in a fixed order."""
    return sorted((h for h in expr.atoms(sp.Heaviside) if not h.args[0].has(sp.Indexed)
                   and all(s.is_integer for s in h.args[0].free_symbols)), key=sp.default_sort_key)


def sums_merged(add):
    """c1 Sum(f1, V) + c2 Sum(f2, V) = Sum(c1 f1 + c2 f2, V), the c free of V, where a summand holds a step
    of indices: the masked terms of the sums cancel only inside one."""
    groups = {}
    for term in add.args:
        sums = [f for f in sp.Mul.make_args(term) if isinstance(f, sp.Sum)]
        if len(sums) == 1 and not (term / sums[0]).free_symbols & {v for v, *_ in sums[0].limits}:
            groups.setdefault(sums[0].limits, []).append((term, term / sums[0] * sums[0].function, type(sums[0])))
    merged = [members for members in groups.values()
              if len(members) > 1 and any(index_steps(summand) for _, summand, _ in members)]
    if not merged:
        return add
    taken = {term for members in merged for term, _, _ in members}
    return sp.Add(*(term for term in add.args if term not in taken),
                  *(members[0][2](sp.Add(*(summand for _, summand, _ in members)), *limits)
                    for limits, members in groups.items() if members in merged))


def index_steps_as_masks(expr):
    """A sum f(H) in a step H(u) of indices alone (a causal mask's derivative, H(s - t)) is f(1) where u > 0
    and f(0) elsewhere: exact, and a mask, since u is an integer and never NaN. The masked entries' terms,
    which cancel to 0, are then not evaluated: exp(A - m) there may overflow (m the max over the entries
    the mask keeps), and inf - inf is NaN. Sums over the same range are first merged (sums_merged)."""
    def split(add):
        steps = [h for h in index_steps(add) if h.args[0].free_symbols <= add.free_symbols]
        if not steps:
            return add
        above, below = (split_all(add.xreplace({steps[0]: value})) for value in (1, 0))
        terms = sp.Add.make_args(steps[0].args[0])  # s - t > 0 as s > t, the form a mask of indices is read in
        positive = sp.Add(*(u for u in terms if not u.could_extract_minus_sign()))
        return sp.Piecewise((above, positive > positive - steps[0].args[0]), (below, True))

    def split_all(e):
        e = e.replace(lambda a: a.is_Add and any(isinstance(f, sp.Sum) for t in a.args for f in sp.Mul.make_args(t)),
                      sums_merged)
        return e.replace(lambda a: a.is_Add and index_steps(a), split)
    return split_all(expr) if index_steps(expr) else expr


def shift_by_max(expr):
    """sum_k exp(x_k) = exp(M) sum_k exp(x_k - M) with M = max_k x_k: no exp overflows."""
    def shifted(total):
        (index, lower, upper), = total.limits
        exponent = total.function.args[0]
        shift = ClassMax(_indexed_base(exponent, index))
        return sp.exp(shift) * sp.Sum(sp.exp(exponent - shift), (index, lower, upper))
    return expr.replace(lambda e: isinstance(e, sp.Sum) and isinstance(e.function, sp.exp), shifted)


class ClassArgmax(sp.Function):
    """The class index a of a row's max (the first, where several entries are the max): x_a - ClassMax(x) is 0
    exactly, so exp of it is 1 to the last bit, and a sum of shifted exponentials is 1 plus the others' share."""

    nargs = 1
    is_integer = True


def shifted_sum_as_one_plus_the_rest(expr):
    """sum_m exp(x_m - M) = 1 + T, T = sum_m (1 - delta(m, a)) exp(x_m - M), a the row's argmax (x_a = M, so its
    term is exp(0) = 1 exactly): summed whole, 1 + T rounds T to few digits, and away below an ulp of 1 (a margin
    of 17 in float32, 37 in float64), where log S = log1p(T) (log-softmax's largest entry, cross-entropy at it)
    and p_a - 1 = -T/S need it. One sum, T, then serves the log and the denominator S."""
    def split(total):
        (index, low, high), = total.limits
        shifts = total.function.atoms(ClassMax)
        (shift,) = shifts if len(shifts) == 1 else (None,)
        if shift is None or total.function.args[0] != shift.args[0][index] - shift:
            return total
        return 1 + sp.Sum((1 - sp.KroneckerDelta(index, ClassArgmax(shift.args[0]))) * total.function, total.limits[0])
    return expr.replace(lambda e: isinstance(e, sp.Sum) and len(e.limits) == 1 and isinstance(e.function, sp.exp)
                        and e.function.has(ClassMax), split)


def shift_in_halves(expr):
    """sum_k c_k (x_k - M - l) = sum_k (2 c_k) (x_k/2 - M/2 - l/2), M = max_k x_k: a dense target's t_k (x_k - M) in
    cross-entropy, whose x_k - M overflows where x_k and M are of opposite signs and |x| near the largest number
    (-inf, and L inf or NaN) though the product is finite for t_k < 1. Halves never overflow (|x_k/2 - M/2| is at most
    the largest number), and are exact: x/2 is, and fl(x/2 - M/2) = fl(x - M)/2, 2 c_k too, so (2 c_k) h_k is
    c_k (x_k - M) rounded once, and overflows only where that does (to a rounding where x/2 is subnormal). Not in
    REWRITES: it costs two passes of the row, which the kernels pay only on rows whose loss is not finite
    (codegen.kernels' Kernel.redo)."""
    def halved(total):
        factors = sp.Mul.make_args(total.function)
        shifts = [f for f in factors if f.is_Add and f.has(ClassMax) and any(
            isinstance(t, sp.Indexed) and t.indices == (total.limits[0][0],) for t in f.args)]
        if len(shifts) != 1:
            return total
        rest = sp.Mul(*(f for f in factors if f is not shifts[0]))
        # 2 c_k one factor: SymPy would distribute 2 over the halves, which then round as x - M
        return sp.Sum(sp.Mul(2 * rest, sp.Add(*(t / 2 for t in shifts[0].args)), evaluate=False), *total.limits)
    return expr.replace(lambda e: isinstance(e, sp.Sum) and len(e.limits) == 1 and not isinstance(e.function, sp.exp)
                        and e.function.has(ClassMax), halved)


def softmax_entry_less_one(expr):
    """k e/(1 + T) - k = k (e - 1)/(1 + T) - k T/(1 + T), with 0 <= e <= 1 (a saved softmax numerator exp(x_c - M))
    and T >= 0: p_c - 1 at a label, which as written rounds e/(1 + T) first and so is 0 where T is below an ulp of
    1 (the label the row's largest, e = 1) and keeps few digits of T before; e - 1 and -T have one sign, and e - 1
    is exact near e = 1 (Sterbenz)."""
    def parts(term):
        """(k, e, 1 + T) of a term k e/(1 + T), e an array's entry, else None."""
        factors = sp.Mul.make_args(term)
        powers = [f for f in factors if f.is_Pow and f.exp == -1 and f.base.is_Add and len(f.base.args) == 2
                  and 1 in f.base.args]
        entries = [f for f in factors if isinstance(f, sp.Indexed)]
        if len(powers) != 1 or len(entries) != 1:
            return None
        return term / (powers[0] * entries[0]), entries[0], powers[0].base

    def combined(add):
        for term in add.args:
            found = parts(term)
            if found and -found[0] in add.args:
                scale, entry, denominator = found
                others = [t for t in add.args if t not in (term, -scale)]
                # two terms, not k (e - 1 - T)/(1 + T): an Add of three is summed in any order, and (e - T) - 1 rounds
                return sp.Add(*others, scale * (entry - 1) / denominator, -scale * (denominator - 1) / denominator)
        return add
    return expr.replace(lambda e: isinstance(e, sp.Add), combined)


def _indexed_base(exponent, index):
    """The base of the one array the exponent indexes with index (the row to take the max of)."""
    bases = {e.base for e in exponent.atoms(sp.Indexed) if index in e.indices}
    if len(bases) != 1:
        raise ValueError(f"shift_by_max: cannot tell which row to take the max of in exp({exponent})")
    return bases.pop()


def exp_sums_shifted(expr):
    """sum_i c_i exp(a_i) = exp(M) sum_i c_i exp(a_i - M), M = max_i a_i, for two or more exponentials
    and nothing else: no exp of the sum overflows where the sum itself is finite, and in a quotient of
    two such sums over the same exponents (log(e^x + e^-x)'s derivative, (e^x - e^-x)/(e^x + e^-x)) the
    factors exp(M) cancel, where the plain quotient is inf/inf = NaN from x = 89 in float32."""
    def shifted(add):
        terms = [term.as_independent(sp.exp, as_Add=False) for term in add.args]
        if len(terms) < 2 or not all(isinstance(e, sp.exp) and not c.has(sp.exp) for c, e in terms):
            return add
        top = sp.Max(*[e.args[0] for _, e in terms])
        return sp.exp(top) * sp.Add(*[c * sp.exp(e.args[0] - top) for c, e in terms])
    return expr.replace(lambda e: isinstance(e, sp.Add), shifted)


def exp_quotients_shifted(expr):
    """num / sum_i c_i exp(a_i) = (num exp(-M)) / sum_i c_i exp(a_i - M), M the largest exponent (0 for a
    constant term, c exp(0)), with exp(-M) taken into num's exponentials: the denominator is then at
    least one term's c and at most a sum of c's, and (e^2x - 1)/(e^2x + 1), log-cosh's derivative as
    SymPy cancels it, is 1 at x = 50 in float32, not inf/inf = NaN."""
    def terms(add):
        """[(c, a)] of add = sum c exp(a), a constant c as c exp(0); None for any other add."""
        found = [(term, sp.S.Zero) if term.is_number else term.as_independent(sp.exp, as_Add=False)
                 for term in sp.Add.make_args(add)]
        found = [(c, e if e == 0 else e.args[0] if isinstance(e, sp.exp) else None) for c, e in found]
        exps = sum(1 for _, a in found if a != 0)
        return found if exps and len(found) > 1 and all(a is not None and not c.has(sp.exp) for c, a in found) else None

    def shifted(mul):
        for factor in mul.args:
            if factor.is_Pow and factor.exp.is_Integer and factor.exp < 0 and factor.base.is_Add:
                found = terms(factor.base)
                if found:
                    break
        else:
            return mul
        top = sp.Max(*{a for _, a in found})
        scale = sp.exp(top * factor.exp)
        denominator = sp.Add(*[c * sp.exp(a - top) for c, a in found]) ** factor.exp
        rest = [f for f in mul.args if f is not factor]
        sums = [f for f in rest if f.is_Add and terms(f)]
        if sums and factor.exp == -1:  # exp(-M) into the numerator's own sum of exponentials
            rest.remove(sums[0])
            scaled = sp.Add(*[c * sp.exp(a - top) for c, a in terms(sums[0])])
            return sp.Mul(*rest, scaled, denominator)
        return sp.Mul(*rest, scale, denominator)
    return expr.replace(lambda e: isinstance(e, sp.Mul), shifted)


def logistic(expr):
    """sigmoid(u) = 1/(1 + exp(-u)), exact in floating point at both ends: where exp(-u) overflows
    to inf, 1/(1 + inf) = 0 is the sigmoid's value to the last bit (ExpToInf says that overflow is
    meant). Four passes over the array and no branch: a stable form by branches costs twice that."""
    u = sp.Wild("u")
    return expr.replace(sigmoid(u), lambda u: 1 / (1 + ExpToInf(-u)))


def inputs_of(u):
    """The array entries u reads, or its symbols where it reads none: what a target or option does not read."""
    return u.atoms(sp.Indexed) or u.free_symbols


def sigmoid_polynomials_factored(expr):
    """A sum that is a polynomial of degree 2 or more in one s = sigmoid(u) (sigmoid(-u) read as 1 - s), factored:
    x - 3 x s + 2 x s^2 = x (1 - s)(1 - 2 s), SiLU's second derivative as differentiation expands it. Its factors
    are then exact (1 - s = sigmoid(-u), 1 - 2 s = -tanh(u/2): 1 - sigmoid, sigmoid differences), where the
    expanded sum cancels, to inf - inf where x is the largest number and to a few correct digits near the
    zeros of the factors. Kept only where the sum factors."""
    def factored(add):
        arguments = {f.args[0] for f in add.atoms(sigmoid)}
        u = min(arguments, key=sp.default_sort_key)
        if len(arguments) > 2 or any(a not in (u, -u) for a in arguments):
            return add
        s = sp.Dummy("s")
        polynomial = sp.expand(add.xreplace({sigmoid(u): s, sigmoid(-u): 1 - s}))
        if polynomial.has(sigmoid) or not polynomial.is_polynomial(s) or sp.degree(polynomial, s) < 2:
            return add
        result = sp.factor(polynomial, s)
        if not (isinstance(result, sp.Mul) and sum(1 for f in result.args if f.has(s)) > 1):
            return add
        return result.xreplace({s: sigmoid(u)})
    return expr.replace(lambda e: isinstance(e, sp.Add) and e.has(sigmoid), factored)


def sigmoid_minus_target(expr):
    """c sigmoid(u) + r = (c + r) sigmoid(u) + r sigmoid(-u), as sigmoid(u) + sigmoid(-u) = 1, for c and r that read
    none of u's inputs (a target, an option, the upstream gradient; r the sum's terms that hold no sigmoid):
    BCE's gradient sigmoid(x) - t is (1 - t) sigmoid(x) - t sigmoid(-x), -sigmoid(-x) at t = 1, where
    sigmoid(x) - 1 is 0 from x = 17 in float32 (37 in float64) and the truth -exp(-x). Each sigmoid is
    accurate to a few ulps at both ends; the two terms cancel only where c sigmoid(u) and r do, and then by
    no more than rounding c and r changes the value, as the difference's condition allows."""
    def split(add):
        for term in add.args:
            c, s = term.as_independent(sigmoid, as_Add=False)
            if not isinstance(s, sigmoid) or c.has(*inputs_of(s.args[0])):
                continue
            rest = [t for t in add.args if not t.has(sigmoid, sp.Sum, *inputs_of(s.args[0]))]
            if rest:
                r = sp.Add(*rest)
                others = [t for t in add.args if t is not term and t not in rest]
                return sp.Add(*others, sp.factor_terms(c + r) * s, r * sigmoid(-s.args[0]))
        return add
    return expr.replace(lambda e: isinstance(e, sp.Add) and e.has(sigmoid), split)


def sigmoid_differences(expr):
    """c sigmoid(u) - c sigmoid(-u) = c tanh(u/2): both sigmoids are near 1/2 where u is near 0, and their
    difference, u/2 there, lost every digit below |u| = 1e-8 in float64 (log(e^x + e^-x)'s derivative, which
    as_sigmoid names sigmoid(2x) - sigmoid(-2x)); tanh is exact to an ulp at any u."""
    def merged(add):
        terms = list(add.args)
        for term in add.args:
            c, s = term.as_independent(sigmoid, as_Add=False)
            if isinstance(s, sigmoid) and not s.args[0].could_extract_minus_sign() and term in terms:
                # c sigmoid(u) - c/2 = c/2 (sigmoid(u) - sigmoid(-u)): 2 sigmoid(u) - 1 = sigmoid(u) - sigmoid(-u)
                for partner, scale in ((-c * sigmoid(-s.args[0]), c), (-c / 2, c / 2)):
                    if partner in terms and term in terms:
                        terms.remove(term)
                        terms.remove(partner)
                        terms.append(scale * sp.tanh(s.args[0] / 2))
        return sp.Add(*terms) if len(terms) != len(add.args) else add
    return expr.replace(lambda e: isinstance(e, sp.Add) and e.has(sigmoid), merged)


def root_less_constant(expr):
    """k hypot(v, a) - k a = k v^2 / (hypot(v, a) + a) for a constant a > 0, where |v| <= a (the pseudo-Huber
    loss sqrt(1 + v^2) - 1): the difference cancels near v = 0 (it was 0 below |v| = 1e-4 in float32, where it
    is v^2/2), the quotient is exact there. Above, where hypot(v, a) >= a sqrt 2, the difference loses under 2
    bits and v^2 may overflow, so it is kept; the quotient reads v clipped to [-a, a], so that np.where, which
    evaluates both branches, squares no large number."""
    def rooted(add):
        for term in add.args:
            k, root = term.as_independent(hypot, as_Add=False)
            if not isinstance(root, hypot) or k.has(hypot):
                continue
            v, a = root.args
            if a.is_number and a.is_positive and -k * a in add.args:
                rest = [t for t in add.args if t not in (term, -k * a)]
                small = k * Clip(v, -a, a) ** 2 / (root + a)
                return sp.Add(*rest, sp.Piecewise((k * (root - a), sp.Abs(v) > a), (small, True)))
        return add
    return expr.replace(lambda e: isinstance(e, sp.Add) and e.has(hypot), rooted)


def _square_plus(base):
    """(v, c) if base is v^2 + c with c a number > 0, else None."""
    squares = [t for t in sp.Add.make_args(base) if t.is_Pow and t.exp == 2 and not t.base.is_number]
    if base.is_Add and len(squares) == 1:
        c = base - squares[0]
        if c.is_number and c.is_positive:
            return squares[0].base, c
    return None


def quotients_of_squares(expr):
    """k v/(v^2 + c) = k sign(v)/(|v| + c/|v|) where |v| > sqrt(c), for a number c > 0 (the derivative of
    log(1 + v^2), Cauchy's loss): v^2 overflows from |v| = 1.8e19 in float32 (1.3e154 in float64), and the
    quotient with it to 0 or NaN, where it is 1/v. Each branch reads v clipped to its own range, so that
    np.where, which evaluates both, divides by no 0 and squares no large number. Terms over the same v^2 + c
    are added first (-2 t/(v^2 + 1) + 2 x/(v^2 + 1) is 2 (x - t)/(v^2 + 1))."""
    def over_squares(add):
        groups = {}
        for term in add.args:
            for factor in sp.Mul.make_args(term):
                if factor.is_Pow and factor.exp == -1 and _square_plus(factor.base):
                    groups.setdefault(factor.base, []).append(term)
                    break
        merged = [(base, terms) for base, terms in groups.items() if len(terms) > 1]
        if not merged:
            return add
        base, terms = merged[0]
        rest = [t for t in add.args if t not in terms]
        return sp.Add(*rest, sp.factor_terms(sp.Add(*(t * base for t in terms))) / base)

    def branches(mul):
        for factor in mul.args:
            found = _square_plus(factor.base) if factor.is_Pow and factor.exp == -1 else None
            if found:
                v, c = found
                k = mul / factor / v
                if not k.has(*inputs_of(v)):
                    break
        else:
            return mul
        a = sp.sqrt(c)
        large, small = Clip(sp.Abs(v), a, sp.oo), Clip(v, -a, a)
        return sp.Piecewise((k * sp.sign(v) / (large + c / large), sp.Abs(v) > a), (k * small / (small ** 2 + c), True))
    expr = expr.replace(lambda e: isinstance(e, sp.Add) and e.has(sp.Pow), over_squares)
    return expr.replace(lambda e: isinstance(e, sp.Mul) and e.has(sp.Pow), branches)


def log_one_plus_square(expr):
    """log1p(c v^2) = 2 log(a |v|) + log1p(1/(a |v|)^2) where a |v| > 1, a = sqrt(c), for a number c > 0
    (Cauchy's loss log(1 + v^2)): v^2 overflows from |v| = 1.8e19 in float32 (1.3e154 in float64), and the
    log with it to inf, where it is about 2 log|v|. Each branch reads v clipped to its own range, so that
    np.where, which evaluates both, takes no log of 0 and squares no large number."""
    def branches(log):
        c, square = log.args[0].as_coeff_Mul()
        if not (square.is_Pow and square.exp == 2 and not square.base.is_number and c.is_positive):
            return log
        v, bound = square.base, 1 / sp.sqrt(c)
        large, small = sp.sqrt(c) * Clip(sp.Abs(v), bound, sp.oo), Clip(v, -bound, bound)
        return sp.Piecewise((2 * sp.log(large) + log1p(large ** -2), sp.Abs(v) > bound), (log1p(c * small ** 2), True))
    return expr.replace(lambda e: isinstance(e, log1p), branches)


def scaled_sigmoid_branches(expr):
    """sigmoid(u) = (exp(u) where u <= 0, else 1)/(1 + exp(-|u|)) where a factor that reads u's inputs scales it
    (x sigmoid(x), SiLU): 1/(1 + exp(-u)) is 0 where exp(-u) overflows, from u = -88.7 in float32 (-709.8 in
    float64), where sigmoid(u) is subnormal but x sigmoid(x) still a normal number (-2.6e-37 at x = -88.7 in
    float32); exp(u) keeps it. The exponential, exp(-|u|), never overflows and is shared with sigmoid(-u)."""
    def branches(mul):
        factors = list(mul.args)
        for position, factor in enumerate(mul.args):
            if isinstance(factor, sigmoid):
                u = factor.args[0]
                if any(f is not factor and not isinstance(f, sigmoid) and f.has(*inputs_of(u)) for f in mul.args):
                    small = sp.exp(-sp.Abs(u))
                    factors[position] = sp.Piecewise((small, u <= 0), (1, True)) / (1 + small)
        return sp.Mul(*factors) if factors != list(mul.args) else mul
    return expr.replace(lambda e: isinstance(e, sp.Mul) and e.has(sigmoid), branches)


def exp_minus_one(expr):
    """c exp(u) - c = c expm1(u): exact near u = 0, where exp(u) - 1 cancels."""
    def combined(add):
        terms = list(add.args)
        for term in terms:
            scale, rest = term.as_independent(sp.exp, as_Add=False)
            if isinstance(rest, sp.exp) and -scale in terms:
                others = [t for t in terms if t is not term]
                others.remove(-scale)
                return sp.Add(*others, scale * expm1(rest.args[0]))
        return add
    return expr.replace(lambda e: isinstance(e, sp.Add), combined)


# beyond, e^u/u exceeds 1.9e431: e^u + k u + r is past the largest float64 number for any float64 k and r
EXP_OVERFLOWS = 1000


def one_value(k):
    """Whether k is one value a kernel reads (an option, a target's entry) or a number, times a number of at most
    1e100: its magnitude is then below 1e100 times the largest float64 number (a product of two values is not)."""
    scale, rest = k.as_coeff_Mul()
    return abs(scale) <= 10 ** 100 and (rest == 1 or isinstance(rest, (sp.Symbol, sp.Indexed)))


def exp_beyond_overflow(expr):
    """e^u + k u + r = e^u where u > 1000, once rounded, for k and r that read none of u's inputs and are each one
    value (one_value: a target, an option): there e^u/u > 1.9e431 exceeds |k| + |r| for any float64 numbers by far (e^u/u grows for u > 1), so
    the sum is past the largest float64 number and rounds to inf, as e^u does. As written it is inf - inf = NaN
    where k u overflows too (PoissonNLLLoss's log-input form e^x - t x at x = 3.4e38 in float32, t = 2), where
    its value is +inf. Not an identity: equal once rounded to float64 or float32."""
    def split(add):
        for e in add.args:
            if not isinstance(e, sp.exp) or e.args[0].is_number:
                continue
            u, reads = e.args[0], inputs_of(e.args[0])
            # each other term k u (linear) or r (constant in u's inputs)
            rest = [(term / u, True) if term.has(*reads) else (term, False) for term in add.args if term is not e]
            if any(linear for _, linear in rest) and all(one_value(k) and not k.has(*reads) for k, _ in rest):
                return sp.Piecewise((e, u > EXP_OVERFLOWS), (add, True))
        return add
    return expr.replace(lambda e: isinstance(e, sp.Add) and e.has(sp.exp), split)


GAUSSIAN_UNDERFLOWS = 1500    # a v^2 beyond this: e^-(a v^2) |v| < e^(709.8 - 1500) for any float64 v, below e^-745


def gaussian_tails(expr):
    """c v exp(-a v^2) = c clip(v, -V, V) exp(-a v^2) with V = sqrt(1500/a), once rounded, for numbers a > 0 and
    |c| < 1e19: beyond V both sides are below |c| e^-790 (|v| is at most e^709.8), 0 in float64 and float32.
    As written, c v overflows where exp(-a v^2) is 0 (GELU's derivative sqrt(2) x exp(-x^2/2)/sqrt(pi) at
    x = 1.3e38 in float32), and inf * 0 is NaN. Not an identity: equal once rounded."""
    def clipped(mul):
        for e in mul.args:
            if not isinstance(e, sp.exp):
                continue
            a, square = e.args[0].as_coeff_Mul()
            if not (a.is_number and a.is_negative and square.is_Pow and square.exp == 2):
                continue
            v, c = square.base, mul / e / square.base
            if c.is_number and not c.is_zero and abs(c) < 10 ** 19 and not v.is_number:
                bound = sp.sqrt(GAUSSIAN_UNDERFLOWS / -a)
                return c * Clip(v, -bound, bound) * e
        return mul
    return expr.replace(lambda e: isinstance(e, sp.Mul) and e.has(sp.exp), clipped) if expr.has(sp.exp) else expr


def one_minus_softmax(expr):
    """c - c exp(u)/S = -c expm1(u - log S) for S a sum of exponentials (S > 0): 1 - p of a softmax entry p
    (the focal loss's 1 - p_t) from the log-probability u - log S, which the row max then shifts. 1 - p
    cancels where p is near 1 (to 0 from a margin of 17 in float32, where it is 4e-8); expm1 keeps it, and
    no exp(u) overflows."""
    def softmax_entry(term):
        """(c, u, S) of a term c exp(u)/S, else None."""
        scale, rest = term.as_independent(sp.exp, sp.Sum, as_Add=False)
        factors = sp.Mul.make_args(rest)
        sums = [f for f in factors if f.is_Pow and f.exp == -1 and isinstance(f.base, sp.Sum)
                and isinstance(f.base.function, sp.exp)]
        exps = [f for f in factors if isinstance(f, sp.exp)]
        return (scale, exps[0].args[0], sums[0].base) if len(factors) == 2 and sums and exps else None

    def combined(add):
        for term in add.args:
            found = softmax_entry(term)
            if found and -found[0] in add.args:
                scale, u, total = found
                others = list(add.args)
                others.remove(term)
                others.remove(-scale)
                return sp.Add(*others, scale * Expm1(u - sp.log(total)))
        return add
    return expr.replace(lambda e: isinstance(e, sp.Add) and e.has(sp.Sum), combined)


def over_expm1(expr):
    """u (-expm1(u))^a = (-expm1(u))^(a + 1) u/(-expm1(u)), and so for expm1(u), with the quotient's limit at
    u = 0 (-1, or 1), where the left side is 0 times 0^a, NaN for a < 0; for a power a whose constant term is
    negative, as differentiation leaves it (a power that may be positive is left alone): the focal loss's derivative
    gamma lp (1 - p)^(gamma - 1) at p = 1 (lp = 0), finite for every gamma >= 0 (0 for gamma > 0, as its
    limit). The quotient reads u, not 0, in its division where u = 0, so that np.where's other branch is
    not 0/0. A product that also holds e^(u + w) is 0 where e^u is: never over the reals, and in floats where
    the product as written is 0, or NaN at u = -inf (the focal loss's log p_c where x_c - max overflows), whose
    limit u e^u -> 0 it then gives."""
    def ratio(u, sign):
        safe = sp.Piecewise((1, sp.Eq(u, 0)), (u, True))
        return sp.Piecewise((sign, sp.Eq(u, 0)), (sign * u / Expm1(safe), True))

    def split(mul):
        for power in mul.args:
            base, exponent = power.as_base_exp()
            sign, rest = (-1, -base) if base.could_extract_minus_sign() else (1, base)
            # a power that differentiation lowered (gamma - 1, -1): its constant term is negative
            if not (isinstance(rest, expm1) and rest.args[0] in mul.args and exponent.as_coeff_Add()[0] < 0):
                continue
            u = rest.args[0]
            others = list(mul.args)
            others.remove(power)
            others.remove(u)
            decays = [f for f in others if isinstance(f, sp.exp) and u in sp.Add.make_args(f.args[0])]
            if not decays:
                return sp.Mul(*others, base ** (exponent + 1), ratio(u, sign))
            # e^(u + w) = e^w e^u, e^w and a delta (for split_at_label) outside the branch, which then reads
            # what u reads alone; its condition on ExpToInf, which SymPy leaves alone (exp(u) = 0 it calls False)
            others.remove(decays[0])
            outside = [f for f in others if isinstance(f, sp.KroneckerDelta) or not f.has(u)]
            inside = [f for f in others if f not in outside]
            return sp.Mul(*outside, sp.exp(decays[0].args[0] - u), sp.Piecewise(
                (0, sp.Eq(ExpToInf(u), 0)), (sp.Mul(*inside, sp.exp(u), base ** (exponent + 1), ratio(u, sign)), True)))
        return mul
    return expr.replace(lambda e: isinstance(e, sp.Mul) and e.has(expm1), split)


def root_of_squares(expr):
    """sqrt(u^2 + c) = hypot(u, sqrt(c)) for a constant c >= 0 (and its reciprocal 1/hypot): u^2 overflows
    from |u| = 1.3e154 in float64 (1.8e19 in float32) where the root is still |u|; hypot scales before it
    squares. The derivative u / sqrt(u^2 + c) becomes u / hypot(u, sqrt(c)) the same way."""
    def rooted(power):
        if power.exp not in (sp.S.Half, -sp.S.Half) or not power.base.is_Add:
            return power
        squares = [t for t in power.base.args if t.is_Pow and t.exp == 2 and not t.base.is_number]
        rest = power.base - squares[0] if len(squares) == 1 else None
        if rest is None or rest.has(sp.Indexed) or not rest.is_nonnegative:
            return power
        return hypot(squares[0].base, sp.sqrt(rest)) ** (1 if power.exp > 0 else -1)
    return expr.replace(lambda e: isinstance(e, sp.Pow), rooted)


def _cancelled(add, function, power, replaced):
    """add with each pair of terms c and -c f(u)^power (f = function) written replaced(c, u): the pair whose
    difference differentiation makes (1 - tanh(u)^2, sigmoid(u) - sigmoid(u)^2) taken as one term."""
    terms = list(add.args)
    for term in add.args:
        # a term may pair with two partners (c - c f(u), f inside c), and the set's order, the hash seed's, chose
        # between them: the innermost f first (the smallest tree). Of the fuzzer's sqrt(sigmoid(1/sigmoid(x))),
        # whose derivative pairs either way, that form's backward breaks the contract at 4 of its 20 tail points in
        # tests/tails_count.py's grid (NumPy, float32 and float64), the other's at 10
        for f in sorted((f for f in term.atoms(function) if term.has(f ** power if power != 1 else f)),
                        key=lambda f: (sp.count_ops(f), sp.default_sort_key(f))):
            partner = -term / f ** power
            if term in terms and partner in terms:
                terms.remove(term)
                terms.remove(partner)
                terms.append(replaced(partner, f.args[0]))
    return sp.Add(*terms) if len(terms) != len(add.args) else add


def one_minus_sigmoid(expr):
    """c - c sigmoid(u) = c sigmoid(-u), (1 - sigmoid(u)) among them: the sigmoid's derivative sigmoid(u)(1 -
    sigmoid(u)) is then sigmoid(u) sigmoid(-u), a product of two accurate numbers, where 1 - sigmoid(u) was 0
    from u = 17 in float32 (37 in float64) and the derivative with it, although it is 4e-8 there."""
    return expr.replace(lambda e: isinstance(e, sp.Add) and e.has(sigmoid),
                        lambda add: _cancelled(add, sigmoid, 1, lambda c, u: c * sigmoid(-u)))


def one_minus_tanh_squared(expr):
    """c - c tanh(u)^2 = c 4 exp(-2|u|) / (1 + exp(-2|u|))^2 (= c / cosh(u)^2): tanh's derivative. tanh(u)^2
    rounds to 1 from |u| = 9 in float32 (19 in float64), where 1 - tanh(20)^2 is 1.7e-17; the quotient is
    exact to a few ulps at any u, and no exponential exceeds 1."""
    def sech_squared(c, u):
        small = sp.exp(-2 * sp.Abs(u))
        return c * 4 * small / (1 + small) ** 2
    return expr.replace(lambda e: isinstance(e, sp.Add) and e.has(sp.tanh),
                        lambda add: _cancelled(add, sp.tanh, 2, sech_squared))


def x_log_y(expr):
    """c log(v) = 0 where c = 0 (xlogy's convention, torch.special.xlogy): a target t = 0 weighs out log(x) even
    where x is 0 or negative (PoissonNLL's x - t log x at t = 0 is x; t log x was NaN). For a factor c that
    is a target or option alone (a symbol, not x, whose log x log x handles); elsewhere unchanged."""
    def weight(f):
        return isinstance(f, sp.Indexed) and f.base.name != "x" or isinstance(f, sp.Symbol) and f.name != "x"

    def extended(product):
        logs = [f for f in product.args if isinstance(f, sp.log)]
        weights = [f for f in product.args if weight(f) and not any(lg.has(f) for lg in logs)]
        if not logs or not weights:
            return product
        return sp.Piecewise((0, sp.Eq(weights[0], 0)), (product, True))
    return expr.replace(lambda e: isinstance(e, sp.Mul), extended)


def log_one_minus_exp(expr):
    """log(1 - exp(u)), defined for u < 0, in Maechler's two branches (R's log1mexp): log(-expm1(u)) where
    u > -log 2 and log1p(-exp(u)) below. 1 - exp(u) cancels near u = 0 (log(1 - exp(-1e-10)) lost every
    digit), and -expm1(u) rounds to 1 far below 0, where log1p keeps exp(u). Before expm1 and log1p, which
    would each take one branch everywhere."""
    def branches(log):
        argument = log.args[0]
        terms = sp.Add.make_args(argument)
        if not (argument.is_Add and 1 in terms and len(terms) == 2):
            return log
        scale, power = (-next(t for t in terms if t != 1)).as_independent(sp.exp, as_Add=False)
        if not (isinstance(power, sp.exp) and scale.is_number and scale.is_positive):
            return log
        u = power.args[0] + sp.log(scale)   # c exp(u) = exp(u + log c): SymPy takes exp(-1/1000) out as a factor
        return sp.Piecewise((sp.log(-Expm1(u)), u > -sp.log(2)), (log1p(-sp.exp(u)), True))
    return expr.replace(lambda e: isinstance(e, sp.log), branches)


def one_plus_erf(expr):
    """c + c erf(u) = c erfc(-u) and c - c erf(u) = c erfc(u), c a term of the same sum: erf(u) rounds to -1 from
    u = -6 in float64 (-4 in float32), and the sum to 0 where erfc(-u) is still a normal number (GELU's
    x (1 + erf(x/sqrt 2))/2 was 0 at x = -10, where it is -7.6e-23); erfc is relatively accurate there."""
    def merged(add):
        for term in add.args if add.is_Add else ():
            c, e = term.as_independent(sp.erf, as_Add=False)
            if isinstance(e, sp.erf) and (c in add.args or -c in add.args):
                r = c if c in add.args else -c
                rest = list(add.args)
                rest.remove(term)
                rest.remove(r)
                return merged(sp.Add(*rest)) + r * Erfc(-e.args[0] if r == c else e.args[0])
        return add
    return expr.replace(lambda e: isinstance(e, sp.Add) and e.has(sp.erf), merged) if expr.has(sp.erf) else expr


def x_log_x(expr):
    """u log u = 0 where u = 0, its limit from above (xlogy's convention, as torch.special.xlogy): the
    product is 0 * -inf, NaN, at the one point where the value is known. Elsewhere unchanged."""
    def extended(product):
        factors = sp.Mul.make_args(product)
        logs = [f for f in factors if isinstance(f, sp.log) and not f.args[0].is_number and f.args[0] in factors]
        if not logs:
            return product
        return sp.Piecewise((0, sp.Eq(logs[0].args[0], 0)), (product, True))
    return expr.replace(lambda e: isinstance(e, sp.Mul), extended)


def x_exp_x(expr):
    """u e^u = 0 where e^u rounds to 0 (ExpToInf(u) = 0): never over the reals, so an identity; in floats the
    product as written is 0 there for a finite u, and NaN, -inf * 0, at u = -inf, whose limit u e^u -> 0 this
    gives. The focal loss's gamma log p_c p_c at its label, p_c = e^(log p_c), where log p_c = x_c - max - log1p(T)
    overflows to -inf at |x| near the largest number (over expm1's branch does the same for the other entries)."""
    def extended(product):
        factors = sp.Mul.make_args(product)
        powers = [f for f in factors if isinstance(f, sp.exp) and not f.args[0].is_number and f.args[0] in factors]
        if not powers:
            return product
        u = powers[0].args[0]
        # a delta (for split_at_label) and what does not read u outside the branch, as over expm1 does
        outside = [f for f in factors if isinstance(f, sp.KroneckerDelta) or not f.has(u)]
        inside = [f for f in factors if f not in outside]
        return sp.Mul(*outside, sp.Piecewise((0, sp.Eq(ExpToInf(u), 0)), (sp.Mul(*inside), True)))
    return expr.replace(lambda e: isinstance(e, sp.Mul) and e.has(sp.exp), extended) if expr.has(sp.exp) else expr


def log_one_plus(expr):
    """log(1 + u) = log1p(u): exact near u = 0, where 1 + u rounds u away (log(1 + x^2) at x = 1e-10 was 0,
    not 1e-20). A log of 1 plus an exponential is softplus's, rewritten before this."""
    def one_plus(log):
        argument = log.args[0]
        if not (argument.is_Add and 1 in argument.args):
            return log
        return log1p(argument - 1)
    return expr.replace(lambda e: isinstance(e, sp.log), one_plus)


def clip_branches(expr):
    """In Piecewise((a(u), u > c), (b(u), True)), b is used only where u <= c, so b(u) = b(min(u, c))
    there, and a(u) = a(max(u, c)): then np.where, which evaluates both, never overflows an exp."""
    def clipped(piecewise):
        if len(piecewise.args) != 2 or not isinstance(piecewise.args[0][1], (sp.StrictGreaterThan, sp.GreaterThan)):
            return piecewise
        (above, condition), (below, _) = piecewise.args
        u, c = condition.args
        grows = lambda e: e.has(sp.exp, expm1)  # noqa: E731
        above = above.xreplace({u: Clip(u, c, sp.oo)}) if grows(above) else above
        below = below.xreplace({u: Clip(u, -sp.oo, c)}) if grows(below) else below
        return sp.Piecewise((above, condition), (below, True))
    return expr.replace(lambda e: isinstance(e, sp.Piecewise), clipped)


def sigmoid_by_branches(expr):
    """1/(1 + exp(u)) = (1 where u <= 0, exp(-|u|) where u > 0)/(1 + exp(-|u|)): exact, and its
    exponential is softplus's exp(-|u|), which a fused kernel computes once for both (BCE's loss and
    p). The branch is the numerator alone, so the kernel divides once, not once per branch (a select
    evaluates both). For the fused kernels alone, whose branches are selects; NumPy's np.where would
    evaluate both sides, so the NumPy kernels keep logistic's form."""
    def is_sigmoid(e):
        # not of a piecewise u: SymPy folds u <= 0 into the branches' conditions, and after cse, whose
        # condition is a symbol, it kept one branch's (a wrong sigmoid, found by the fuzzer)
        return (e.is_Pow and e.exp == -1 and e.base.is_Add and len(e.base.args) == 2 and 1 in e.base.args
                and any(isinstance(a, ExpToInf) and not a.has(sp.Piecewise) for a in e.base.args))

    def branches(e):
        u = next(a for a in e.base.args if isinstance(a, ExpToInf)).args[0]
        small = sp.exp(-sp.Abs(u))
        return sp.Piecewise((1, u <= 0), (small, True)) / (1 + small)
    # a Wild pattern over every node is slow on the long expressions (erf's continued fraction)
    return expr.replace(is_sigmoid, branches) if expr.has(ExpToInf) else expr


def combined_powers(expr):
    """f**a * f**b = f**(a + b) for one base f (not e): the focal loss's gamma (1 - p)**gamma / (1 - p) is
    gamma (1 - p)**(gamma - 1), 0 rather than 0/0 where p = 1. Equal wherever the left side is defined."""
    def combined(mul):
        powers = {}
        for factor in mul.args:
            base, exponent = factor.as_base_exp()
            powers.setdefault(base, []).append(exponent)
        if all(len(e) == 1 for base, e in powers.items() if base != sp.E):
            return mul
        return sp.Mul(*(sp.Pow(base, sp.Add(*e)) if base != sp.E else sp.Mul(*(sp.exp(x) for x in e))
                        for base, e in powers.items()))
    return expr.replace(lambda e: isinstance(e, sp.Mul), combined)


# a point inside and one outside each comparison u <op> c, for guarded_branches
INSIDE = {sp.StrictGreaterThan: (1, 0), sp.GreaterThan: (0, -1), sp.StrictLessThan: (-1, 0),
          sp.LessThan: (0, 1), sp.Unequality: (1, 0), sp.Equality: (0, 1)}


def unsafe(expr):
    """Whether expr may be undefined for a finite argument: a log, a division or a fractional power."""
    return isinstance(expr, sp.log) or expr.is_Pow and not (expr.exp.is_Integer and expr.exp >= 0)


def guarded_branches(expr):
    """Piecewise((a, u > c), (b, True)) with u an array read: where a takes a log, a quotient or a root of
    u, u is read there as np.where(u > c, u, c + 1), and likewise in b; the chosen branch reads u itself,
    so the value is the same, and np.where, which evaluates both branches, never takes log(0) (KLDiv's
    t log t at t = 0)."""
    def guarded(piecewise):
        if len(piecewise.args) != 2 or piecewise.args[1][1] is not sp.true:
            return piecewise
        (a, condition), (b, _) = piecewise.args
        if type(condition) not in INSIDE or not isinstance(condition.lhs, sp.Indexed) or not condition.rhs.is_number:
            return piecewise
        u, c = condition.lhs, condition.rhs
        inside, outside = (c + d for d in INSIDE[type(condition)])
        a = a.replace(lambda e: unsafe(e) and e.has(u), lambda e: e.xreplace({u: sp.Piecewise((u, condition),
                                                                                              (inside, True))}))
        b = b.replace(lambda e: unsafe(e) and e.has(u), lambda e: e.xreplace({u: sp.Piecewise((outside, condition),
                                                                                              (u, True))}))
        return sp.Piecewise((a, condition), (b, True))
    return expr.replace(lambda e: isinstance(e, sp.Piecewise), guarded)


def one_plus_tanh(expr):
    """c + c tanh(u) = 2c sigmoid(2u) and c - c tanh(u) = 2c sigmoid(-2u), c a term of the same sum: tanh(u) rounds
    to -1 from u = -9 in float32 (-19 in float64), and the sum to 0 where its value is still a normal number
    (GELU's tanh form x (1 + tanh(.))/2 was 0 at x = -10, where it is -1.2e-37); the sigmoid keeps it, and
    x sigmoid(2u) does not double x, which overflowed at the largest number."""
    def merged(add):
        for term in add.args:
            k, tanh = term.as_independent(sp.tanh, as_Add=False)
            for r in (k, -k):
                if isinstance(tanh, sp.tanh) and r in add.args:
                    rest = list(add.args)
                    rest.remove(term)
                    rest.remove(r)
                    u = tanh.args[0] if r == k else -tanh.args[0]
                    return merged(sp.Add(*rest)) + 2 * r * sigmoid(2 * u)
        return add
    return expr.replace(lambda e: isinstance(e, sp.Add) and e.has(sp.tanh), merged)


def _over_sigmoid(term, v):
    """term sigmoid(v) as exp(a + v) sigmoid(-v) (term/exp(a)) where term has a factor exp(a) whose exponent holds
    -v's terms (e^a sigmoid(v) = e^a/(1 + e^-v) = e^(a + v)/(e^v + 1)), else None."""
    for e in sp.Mul.make_args(term):
        if isinstance(e, sp.exp) and set(sp.Add.make_args(-v)) <= set(sp.Add.make_args(e.args[0])):
            return term / e * sp.exp(e.args[0] + v) * sigmoid(-v)
    return None


def exponentials_over_a_sigmoid(expr):
    """e^a sigmoid(v) = e^(a + v) sigmoid(-v) where a holds -v's terms, in a product and in each term of a sum it
    multiplies: (e^x erf(s) + erf(s)) sigmoid(-x), Serf's derivative as SymPy puts it over one denominator, is
    erf(s) sigmoid(x) + erf(s) sigmoid(-x), where e^x overflowed from x = 89 in float32 (710 in float64) and
    multiplied a sigmoid of 0, inf * 0. The exponent a + v is the shorter; the two sigmoids are then one (sigmoid
    pairs)."""
    def moved(mul):
        for s in [f for f in mul.args if isinstance(f, sigmoid)]:
            v, rest = s.args[0], mul / s
            direct = _over_sigmoid(rest, v)
            if direct is not None:
                return direct
            for add in [f for f in sp.Mul.make_args(rest) if f.is_Add]:
                terms = [_over_sigmoid(term, v) for term in add.args]
                if any(t is not None for t in terms):
                    others = rest / add
                    return others * sp.Add(*(t if t is not None else term * s for t, term in zip(terms, add.args)))
        return mul
    return expr.replace(lambda e: isinstance(e, sp.Mul) and e.has(sigmoid) and e.has(sp.exp), moved)


def sigmoid_pairs(expr):
    """c sigmoid(u) + c sigmoid(-u) = c: sigmoid(u) + sigmoid(-u) = 1."""
    def merged(add):
        terms = list(add.args)
        for term in add.args:
            c, s = term.as_independent(sigmoid, as_Add=False)
            partner = c * sigmoid(-s.args[0]) if isinstance(s, sigmoid) else None
            if partner is not None and term in terms and partner in terms and partner != term:
                terms.remove(term)
                terms.remove(partner)
                terms.append(c)
        return sp.Add(*terms) if len(terms) != len(add.args) else add
    return expr.replace(lambda e: isinstance(e, sp.Add) and e.has(sigmoid), merged)


LARGEST = (2 - mpmath.mpf(2) ** -52) * mpmath.mpf(2) ** 1023     # the largest float64 number, exactly
with mpmath.workdps(40):                                        # 54 bits: one more than float64's
    ROUNDS_TO_INF = LARGEST + mpmath.mpf(2) ** 970              # half an ulp above it: from here a value is inf
# a product below e^-746 (< 2^-1075, half the smallest float64 subnormal) rounds to 0; 4 more for the rounding
# of the exponent that the branch compares (even in float32 that is below 1e-3 relatively at |u| of a few thousands)
UNDERFLOWS = 750


def magnitude(e):
    """An upper bound of |e| (an mpf) over every float64 value of its inputs, or None where none is known: a value
    (an array entry, an option) is at most the largest float64 number, and each function bounds its own."""
    if e.is_number:
        return abs(mpmath.mpf(sp.N(e, 30))) if e.is_finite else None
    if isinstance(e, (sp.Symbol, sp.Indexed)):
        return LARGEST
    if isinstance(e, (sigmoid, sp.tanh, sp.erf, sp.Heaviside, sp.sign)):
        return mpmath.mpf(1)
    if isinstance(e, Erfc):
        return mpmath.mpf(2)
    if isinstance(e, (sp.exp, ExpToInf)):
        return mpmath.mpf(1) if e.args[0].is_nonpositive else None
    if isinstance(e, log1p):
        return magnitude(e.args[0]) if e.args[0].is_nonnegative else None
    if isinstance(e, Clip):
        bounds = [magnitude(a) for a in e.args[1:]]
        return max(bounds) if None not in bounds else magnitude(e.args[0])
    if isinstance(e, sp.Piecewise):
        parts = [magnitude(value) for value, _ in e.args]
    elif isinstance(e, (sp.Abs, sp.Max, sp.Min, sp.Add, sp.Mul, hypot)):
        parts = [magnitude(a) for a in e.args]
    elif isinstance(e, sp.Pow) and e.exp.is_number and e.exp.is_positive:
        base = magnitude(e.base)
        return None if base is None else base ** mpmath.mpf(sp.N(e.exp, 30))
    elif isinstance(e, sp.Pow) and e.exp.is_Integer and e.base.is_Add:
        least = sum((a for a in e.base.args if a.is_number), sp.S.Zero)   # 1/(c + nonnegative terms)^n <= 1/c^n
        others = all(a.is_nonnegative for a in e.base.args if not a.is_number)
        return mpmath.mpf(sp.N(least ** e.exp, 30)) if least.is_positive and others else None
    else:
        return None
    if None in parts:
        return None
    return (mpmath.fsum(parts) if isinstance(e, (sp.Add, hypot)) else mpmath.fprod(parts) if isinstance(e, sp.Mul)
            else max(parts))


def decay(factor):
    """u where factor <= e^u (an exponential, a sigmoid, a positive integer power of either), else None."""
    base, n = factor.as_base_exp() if not isinstance(factor, sp.exp) else (factor, sp.S.One)
    if isinstance(base, (sp.exp, sigmoid)) and n.is_Integer and n > 0:
        return n * base.args[0]
    return None


def products_beyond_underflow(expr):
    """c P e^u = 0 where u < -(log B + 750), once rounded, B a bound of |c P| over all float64 inputs (magnitude):
    the product is then below e^-746 < 2^-1075, which rounds to 0 in float64 and float32; likewise for a sigmoid,
    sigmoid(u) < e^u. Applied where the factors that read what u reads (and numbers) may overflow by themselves,
    where u is far below 0: as written the product is inf * 0 = NaN there. GELU's tanh form's derivative
    x^3 e^(-2|w|)... at x = 1e112 in float64 (x^3 overflows, w too), SwishBeta's beta x sigmoid(-beta x) at the
    largest number (beta x overflows). A factor that reads none of u's inputs (the upstream gradient, a target)
    only enters the bound, and other inputs count as 1 in the factors that do: a NaN that needs a second input at
    its extreme too (KLDivLoss's (t - x) e^t at t = -max, x = max) is not worth a branch in every call. Not an
    identity: equal once rounded."""
    def branched(mul):
        with mpmath.workdps(40):   # 1 + x is below ROUNDS_TO_INF, 2 x is not: more digits than float64 has
            conditions = beyond(mul)
        return sp.Piecewise((0, sp.Or(*conditions)), (mul, True)) if conditions else mul

    def beyond(mul):
        """The conditions u < -(log B + 750) of mul's factors e^u that may meet an overflowing rest."""
        conditions = []
        for factor in mul.args:
            u = decay(factor)
            rest = mul / factor if u is not None and not u.is_nonnegative else None   # e^u >= 1: no underflow
            bound = magnitude(rest) if rest is not None else None
            if bound is None or not bound:
                continue
            reads = {s for s in u.free_symbols if not s.is_integer}   # its entries and options, not an index
            near = sp.Mul(*(f for f in sp.Mul.make_args(rest) if f.is_number or f.has(*reads)))
            growing = magnitude(near.xreplace({s: 1 for s in near.free_symbols - reads if not s.is_integer}))
            if growing is not None and growing >= ROUNDS_TO_INF:
                conditions.append(u < -sp.Integer(int(mpmath.ceil(mpmath.log(bound) + UNDERFLOWS))))
        return conditions
    return expr.replace(lambda e: isinstance(e, sp.Mul) and e.has(sp.exp, sigmoid), branched)


# (name, rewrite, exact): exact rewrites are identities; the others agree to a few float64 ulps
REWRITES = (("steps as branches", steps_as_branches, True), ("logistic quotients named", as_sigmoid, True), ("exponential sums shifted", exp_sums_shifted, True),
            ("split logs", split_logs, True), ("log of a sigmoid", log_of_sigmoid, True),
            ("one softplus", one_softplus, True), ("softplus", softplus, True),
            ("max over its factor", max_over_its_factor, True), ("log cosh", log_cosh, True),
            ("tanh quotients", tanh_quotients, True), ("1 + tanh", one_plus_tanh, True),
            ("hinge as a step", hinge_as_step, True),
            ("1 - softmax", one_minus_softmax, True), ("shift by the row max", shift_by_max, True),
            ("shifted sum as 1 + the rest", shifted_sum_as_one_plus_the_rest, True),
            ("split logs", split_logs, True), ("combine exponentials", sp.powsimp, True),
            ("exponential quotients shifted", exp_quotients_shifted, True),
            ("exponentials over a sigmoid", exponentials_over_a_sigmoid, True), ("sigmoid pairs", sigmoid_pairs, True),
            ("sigmoid polynomials factored", sigmoid_polynomials_factored, True),
            ("1 - sigmoid", one_minus_sigmoid, True),
            ("sigmoid minus a target", sigmoid_minus_target, True), ("sigmoid differences", sigmoid_differences, True),
            ("1 - tanh squared", one_minus_tanh_squared, True), ("combine exponentials", sp.powsimp, True),
            ("log1mexp", log_one_minus_exp, True), ("expm1", exp_minus_one, True), ("1 + erf", one_plus_erf, True),
            ("exponential beyond its overflow", exp_beyond_overflow, False), ("Gaussian tails", gaussian_tails, False),
            ("root of squares", root_of_squares, True), ("root less its constant", root_less_constant, True),
            ("quotients of squares", quotients_of_squares, True),
            ("x log x", x_log_x, True), ("x log y", x_log_y, True), ("branches guarded", guarded_branches, True),
            ("over expm1", over_expm1, True), ("u e^u where e^u is 0", x_exp_x, True),
            ("log1p", log_one_plus, True), ("log1p of a square", log_one_plus_square, True),
            ("clip branches", clip_branches, True),
            ("products beyond underflow", products_beyond_underflow, False),
            ("scaled sigmoid by branches", scaled_sigmoid_branches, True),
            ("margin outside the max", margin_outside_the_max, True),
            ("a softmax entry less one", softmax_entry_less_one, True), ("logistic", logistic, True))


# the rewrites of an index-notation operation's steps and adjoints (codegen.tensor_lower, after its max shift)
INDEX_REWRITES = (("masks of indices", index_steps_as_masks, True), ("powers of one base combined", combined_powers, True),
                  ("branches guarded", guarded_branches, True), ("logistic", logistic, True))


def rewritten_by(expr, rewrites):
    """(expr with every rewrite of rewrites applied in order, the names of those that changed it): the one driver."""
    names = []
    for name, rewrite, _ in rewrites:
        expr, before = rewrite(expr), expr
        names += [name] if expr != before else []
    return expr, tuple(names)


@functools.lru_cache(maxsize=None)  # pure, and asked for the same forms by every backend and kernel
def stable(expr):
    """expr with every rewrite of REWRITES applied in order."""
    return rewritten_by(expr, REWRITES)[0]
