"""The simplification passes SymPy lacks for index notation: contracting Kronecker deltas in sums,
a convention for derivatives at kinks, and writing a result in terms of a saved quantity."""

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
    """Piecewise((d a, c), (d b, True)) = d Piecewise((a, c), (b, True)) for a Kronecker delta d that every
    term of every branch holds once (a derivative by x_j of a function of x_i: each term has one
    delta(i, j)), or a branch is 0, so that the delta can contract. The branches are not expanded: a gcd
    would expand their polynomials, and (x - t)^5 expanded cancels to 1e-8 of its value."""
    def pulled(piecewise):
        values = [value for value, _ in piecewise.args if value != 0]
        common = [d for d in sorted(piecewise.atoms(sp.KroneckerDelta), key=sp.default_sort_key)
                  if values and all(value.has(d) and value.xreplace({d: 0}) == 0 for value in values)]
        if not common:
            return piecewise
        delta = common[0]
        return delta * sp.Piecewise(*[(value.xreplace({delta: 1}), cond) for value, cond in piecewise.args])
    return expr.replace(lambda e: isinstance(e, sp.Piecewise), pulled)


def at_kinks(expr):
    """Derivatives of kinked functions as steps H(u) = Heaviside(u, 0): 1 for u > 0, 0 for u <= 0.

    H(u) of max(0, u) is 0 at its kink, PyTorch's convention for relu and the subgradient the seeds'
    hinge loss uses; a piecewise constant Piecewise((a, u > 0), (b, True)) (a leaky relu's derivative)
    is b + (a - b) H(u) when a and b do not read u's arrays (an infinite u then cannot make 0 * inf).
    As a step, not a choice between branches, a NaN u gives NaN (the printer's H), where
    np.where(u > 0, a, b) would silently pick b. A Dirac delta (the derivative of sign or of a step)
    is 0: the derivative away from its point, and PyTorch's at it."""
    expr = expr.replace(lambda e: isinstance(e, sp.Heaviside), lambda e: sp.Heaviside(e.args[0], 0))
    expr = expr.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.S.Zero)
    return expr.replace(lambda e: _step(e) is not None, lambda e: _step(e))


def _step(piecewise):
    """The step form of Piecewise((a, u > v), (b, True)), a + (b - a) H(...) for u >= v, with a and b
    free of u's and v's arrays, else None."""
    if not isinstance(piecewise, sp.Piecewise) or len(piecewise.args) != 2:
        return None
    (a, condition), (b, otherwise) = piecewise.args
    if otherwise is not sp.true or not isinstance(condition, sp.core.relational.Relational) or isinstance(
            condition, (sp.Eq, sp.Ne)):
        return None
    if (a.atoms(sp.Indexed) | b.atoms(sp.Indexed)) & condition.atoms(sp.Indexed):
        return None
    if isinstance(condition, (sp.StrictGreaterThan, sp.StrictLessThan)):
        return b + (a - b) * sp.Heaviside(condition.gts - condition.lts, 0)
    # u >= v holds where v - u > 0 does not (NaN aside, which H propagates)
    return a + (b - a) * sp.Heaviside(condition.lts - condition.gts, 0)


class _RealAbs(sp.Function):
    """|u| of a real u, to differentiate: sign(u) u' (SymPy's Abs goes through re and im when it
    cannot prove u real, as for |sigmoid(x) - 1/2| or |log x|)."""

    def fdiff(self, argindex=1):
        return _RealSign(self.args[0])


class _RealSign(sp.Function):
    """sign(u), to differentiate: 0, away from u = 0 and by PyTorch's convention at it."""

    def fdiff(self, argindex=1):
        return sp.S.Zero


class _Max(sp.Function):
    """max(a, b), to differentiate: a tie goes to a, a' + (b' - a') H(b - a). SymPy's derivative,
    a' H(a - b) + b' H(b - a), gives 0 on a tie (0 for max(|x|, x) at x > 0, where it is 1)."""

    nargs = 2

    def fdiff(self, argindex=1):
        a, b = self.args
        step = sp.Heaviside(b - a)
        return 1 - step if argindex == 1 else step


class _Min(sp.Function):
    """min(a, b), to differentiate: a tie goes to a, a' + (b' - a') H(a - b)."""

    nargs = 2

    def fdiff(self, argindex=1):
        a, b = self.args
        step = sp.Heaviside(a - b)
        return 1 - step if argindex == 1 else step


def first_wins_ties(extremum):
    """Max(a, b, ...) as _Max(a, _Max(b, ...)), Min alike, with the arguments that read no array first:
    a tie goes to the first, so the weights of the two sides' derivatives add up to 1 on a tie, and a
    kink takes the flat side (0 for ReLU at 0, and for HardTanh at its bounds, as PyTorch)."""
    first, *rest = sorted(extremum.args, key=lambda a: bool(a.atoms(sp.Indexed)))
    binary = _Max if isinstance(extremum, sp.Max) else _Min
    return binary(first, first_wins_ties(type(extremum)(*rest)) if len(rest) > 1 else rest[0])


def for_differentiation(expr):
    """expr with |u|, sign(u), max and min in the forms whose derivatives are the kernels' conventions."""
    expr = expr.replace(lambda e: isinstance(e, (sp.Max, sp.Min)), first_wins_ties)
    return expr.replace(sp.Abs, _RealAbs).replace(sp.sign, _RealSign)


def differentiated(expr, wrt):
    """d expr / d wrt with the conventions of for_differentiation, in SymPy's own functions."""
    derivative = sp.diff(for_differentiation(expr), wrt)
    return derivative.replace(_RealAbs, sp.Abs).replace(_RealSign, sp.sign).replace(_Max, sp.Max).replace(_Min, sp.Min)


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
        # a quotient whose denominator holds the scale in every term (1/(scale^2 - scale^2 exp(lp)), from a
        # non-integer power of 1 - p that expand leaves whole) loses it once that common factor is taken out
        rewritten = contract(sp.expand(sp.powsimp(sp.factor_terms(rewritten))))
    if rewritten.has(scale):
        raise ValueError(f"in_terms_of: {expr} is not a function of the saved quantity alone")
    return rewritten


def tidy(expr, leading):
    """expr with the factor leading pulled in front, the form a reader expects: p_i (delta_ij - p_j);
    expr itself where leading does not divide it."""
    rest = sp.cancel(expr / leading)
    return expr if sp.denom(rest).has(leading) else leading * sp.factor_terms(sp.expand(rest))
