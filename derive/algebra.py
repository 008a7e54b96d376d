"""The simplification passes SymPy lacks for index notation: contracting Kronecker deltas in sums,
a convention for derivatives at kinks, and writing a result in terms of a saved quantity."""
from functools import reduce

import sympy as sp


def contract(expr):
    """Contract every sum_k f(k) delta(k, e) to f(e), pulling k-free factors out of sums.

    Valid because every index lies in the summation range (see derive.symbols)."""
    if not isinstance(expr, sp.Basic) or expr.is_Atom:
        return expr
    expr = expr.func(*[contract(arg) for arg in expr.args]) if expr.args else expr
    if not isinstance(expr, sp.Sum):
        return expr
    if len(expr.limits) > 1:
        # SymPy merges nested sums; contract them one index at a time, innermost first
        inner, *outer = expr.limits
        return contract(sp.Sum(contract(sp.Sum(expr.function, inner)), *outer))
    index, lower, upper = expr.limits[0]
    summand = sp.expand_mul(deltas_out_of_piecewise(expr.function))
    return sp.Add(*[_sum_term(term, index, lower, upper) for term in sp.Add.make_args(summand)])


def _sum_term(term, index, lower, upper):
    """sum over index of one product term."""
    factors = sp.Mul.make_args(term)
    for factor in factors:
        partner = _delta_partner(factor, index)
        if partner is not None:
            return contract(sp.Mul(*[f for f in factors if f is not factor]).subs(index, partner))
    constant = sp.Mul(*[f for f in factors if not f.has(index)])
    varying = sp.Mul(*[f for f in factors if f.has(index)])
    if varying == 1:
        return constant * (upper - lower + 1)
    return constant * sp.Sum(varying, (index, lower, upper))


def _delta_partner(factor, index):
    """e if factor is delta(index, e) with e free of index, else None."""
    if not isinstance(factor, sp.KroneckerDelta):
        return None
    a, b = factor.args
    if a == index and not b.has(index):
        return b
    if b == index and not a.has(index):
        return a
    return None


def deltas_out_of_piecewise(expr):
    """Piecewise((d a, c), (d b, True)) = d Piecewise((a, c), (b, True)) for a factor d common to all
    branches, so that a Kronecker delta inside a piecewise derivative can contract."""
    def pulled(piecewise):
        common = reduce(sp.gcd, [value for value, _ in piecewise.args])
        if common in (0, 1):
            return piecewise
        return common * sp.Piecewise(*[(sp.cancel(value / common), cond) for value, cond in piecewise.args])
    return expr.replace(lambda e: isinstance(e, sp.Piecewise), pulled)


def at_kinks(expr):
    """Derivatives of kinked functions as steps H(u) = Heaviside(u, 0): 1 for u > 0, 0 for u <= 0.

    H(u) of max(0, u) is 0 at its kink, PyTorch's convention for relu and the subgradient the seeds'
    hinge loss uses; a piecewise constant Piecewise((a, u > 0), (b, True)) (a leaky relu's derivative)
    is b + (a - b) H(u) when a and b do not read u's arrays (an infinite u then cannot make 0 * inf).
    As a step, not a choice between branches, a NaN u gives NaN (the printer's H), where
    np.where(u > 0, a, b) would silently pick b."""
    expr = expr.replace(lambda e: isinstance(e, sp.Heaviside), lambda e: sp.Heaviside(e.args[0], 0))
    return expr.replace(lambda e: _step(e) is not None, lambda e: _step(e))


def _step(piecewise):
    """b + (a - b) H(u) for Piecewise((a, u > 0), (b, True)) with a, b free of u's arrays, else None."""
    if not isinstance(piecewise, sp.Piecewise) or len(piecewise.args) != 2:
        return None
    (a, condition), (b, otherwise) = piecewise.args
    if otherwise is not sp.true or not isinstance(condition, (sp.StrictGreaterThan, sp.StrictLessThan)):
        return None
    if (a.atoms(sp.Indexed) | b.atoms(sp.Indexed)) & condition.atoms(sp.Indexed):
        return None
    u = condition.gts - condition.lts
    return b + (a - b) * sp.Heaviside(u, 0)


def in_terms_of(expr, saved, definition, index):
    """Rewrite expr using saved[e] wherever definition (over index) appears at any index e.

    Three forms of definition: element-wise f(x_index), replaced where it stands; a quotient
    num(index)/den whose denominator is the same for every index (softmax); the log of such a
    quotient (log softmax), whose quotient is exp(saved)."""
    if not definition.has(sp.Sum):
        at = sp.Wild("at")
        return expr.replace(definition.subs(index, at), lambda at: saved[at])
    if isinstance(definition, sp.log):
        return _in_terms_of_quotient(expr, lambda at: sp.exp(saved[at]), definition.args[0], index)
    return _in_terms_of_quotient(expr, lambda at: saved[at], definition, index)


def _in_terms_of_quotient(expr, replacement, quotient, index):
    numerator, denominator = sp.fraction(quotient)
    if denominator.has(index):
        raise ValueError(f"in_terms_of: the denominator of {quotient} depends on {index}")
    scale = sp.Dummy("scale")
    at = sp.Wild("at")
    rewritten = contract(sp.expand_mul(expr).subs(denominator, scale).replace(
        numerator.subs(index, at), lambda at: replacement(at) * scale))
    rewritten = contract(sp.expand(sp.powsimp(rewritten)))
    if rewritten.has(scale):
        raise ValueError(f"in_terms_of: {expr} is not a function of the saved quantity alone")
    return rewritten


def tidy(expr, leading):
    """expr with the factor leading pulled in front, the form a reader expects: p_i (delta_ij - p_j);
    expr itself where leading does not divide it."""
    rest = sp.cancel(expr / leading)
    return expr if sp.denom(rest).has(leading) else leading * sp.factor_terms(sp.expand(rest))
