"""The simplification pass SymPy lacks for index notation: contracting Kronecker deltas in
sums, and writing a result in terms of a saved quantity such as p = softmax(x)."""
import sympy as sp


def contract(expr):
    """Contract every sum_k f(k) delta(k, e) to f(e), pulling k-free factors out of sums.

    Valid because every index lies in the summation range (see derive.symbols)."""
    if not isinstance(expr, sp.Basic) or expr.is_Atom:
        return expr
    expr = expr.func(*[contract(arg) for arg in expr.args]) if expr.args else expr
    if not isinstance(expr, sp.Sum):
        return expr
    if len(expr.limits) != 1:
        raise ValueError(f"contract: one summation index per Sum expected, got {expr.limits}")
    index, lower, upper = expr.limits[0]
    return sp.Add(*[_sum_term(term, index, lower, upper)
                    for term in sp.Add.make_args(sp.expand_mul(expr.function))])


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


def in_terms_of(expr, saved, definition, index):
    """Rewrite expr using saved[e] wherever definition (a quotient num(index)/den whose
    denominator is the same for every index, as softmax's is) appears at any index e."""
    numerator, denominator = sp.fraction(definition)
    if denominator.has(index):
        raise ValueError(f"in_terms_of: the denominator of {definition} depends on {index}")
    scale = sp.Dummy("scale")
    at = sp.Wild("at")
    rewritten = contract(sp.expand_mul(expr).subs(denominator, scale).replace(
        numerator.subs(index, at), lambda at: saved[at] * scale))
    rewritten = contract(sp.expand(sp.powsimp(rewritten)))
    if rewritten.has(scale):
        raise ValueError(f"in_terms_of: {expr} is not a function of {saved} alone")
    return rewritten


def tidy(expr, leading):
    """expr with the factor leading pulled in front, the form a reader expects: p_i (delta_ij - p_j)."""
    return leading * sp.expand(sp.cancel(expr / leading))
