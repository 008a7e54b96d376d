"""Functions SymPy lacks, declared the SymPy way (like its tanh): a definition and a derivative rule
that tests check against differentiating the definition."""
import sympy as sp


class sigmoid(sp.Function):
    """The logistic function 1 / (1 + exp(-u))."""

    nargs = 1

    def fdiff(self, argindex=1):
        # d/du 1/(1 + e^-u) = e^-u/(1 + e^-u)^2 = sigmoid(u) (1 - sigmoid(u)); tests check it
        return self * (1 - self)

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return True if self.args[0].is_real else None

    def _eval_rewrite_as_exp(self, u, **kwargs):
        return 1 / (1 + sp.exp(-u))

    def _latex(self, printer, exp=None):
        base = r"\sigma\left(%s\right)" % printer._print(self.args[0])
        return base if exp is None else r"%s^{%s}" % (base, exp)


def as_sigmoid(expr):
    """expr with every product holding e^u/(1 + e^u), or 1/(1 + e^-u), written with sigmoid(u)."""
    # products first, so that e^u/(1 + e^u) is seen whole before its denominator alone is
    expr = expr.replace(lambda e: isinstance(e, sp.Mul), _named)
    return expr.replace(lambda e: _logistic_denominator(e) is not None, _named)


def _logistic_denominator(factor):
    """u if factor is 1/(1 + e^u), else None."""
    if isinstance(factor, sp.Pow) and factor.exp == -1 and isinstance(factor.base, sp.Add):
        rest = factor.base - 1
        if isinstance(rest, sp.exp):
            return rest.args[0]
    return None


def _exponents_of_two(factor):
    """(a, b) if factor is 1/(e^a + e^b), else None."""
    if isinstance(factor, sp.Pow) and factor.exp == -1 and isinstance(factor.base, sp.Add) and len(factor.base.args) == 2:
        a, b = factor.base.args
        if isinstance(a, sp.exp) and isinstance(b, sp.exp):
            return a.args[0], b.args[0]
    return None


def _named(expr):
    factors = list(sp.Mul.make_args(expr))
    for position, factor in enumerate(factors):
        pair = _exponents_of_two(factor)
        others = factors[:position] + factors[position + 1:]
        for a, b in [pair, pair[::-1]] if pair else []:
            if sp.exp(a) in others:  # e^a/(e^a + e^b) = sigmoid(a - b)
                others.remove(sp.exp(a))
                return sp.Mul(*others) * sigmoid(a - b)
        u = _logistic_denominator(factor)
        if u is None:
            continue
        others = factors[:position] + factors[position + 1:]
        if sp.exp(u) in others:  # e^u/(1 + e^u) = sigmoid(u)
            others.remove(sp.exp(u))
            return sp.Mul(*others) * sigmoid(u)
        return sp.Mul(*others) * sigmoid(-u)  # 1/(1 + e^u) = sigmoid(-u)
    return expr
