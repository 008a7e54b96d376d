"""Interval bounds of an element-wise expression over every input, infinities included: the proof a selection needs before it
is printed as arithmetic. a c + b (not c) equals np.where(c, a, b) wherever both a and b are finite, but a branch
that overflows where the other is chosen gives inf * 0 = NaN; `finite_where_unselected` says when neither can.

Every argument and option ranges over [-inf, inf]: a kernel is given infinities too, and must give what np.where
gives there (ELU's x at x = -inf, unselected, is -inf * 0 = NaN as a product); a cse temporary ranges over its
definition's bound. An expression the rules here do not know has no bound (the selection keeps np.where)."""
import math

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from derive.functions import sigmoid
from derive.special import Clip, ExpToInf

# the largest finite number of each dtype a kernel runs in: a branch must stay within both
LARGEST = tuple(float(np.finfo(dtype).max) for dtype in (np.float32, np.float64))
# a sum rounds up by half an ulp at most: its bound is widened by more, so that a bound of exactly the largest
# number is one that only a product by a factor of at most 1, a clip or a branch passes on
ROUNDING = 2.0 ** -20

# {function: (its value at a number, the range its computed values keep to)}; erfc decreases, the others increase
MONOTONE = {sp.exp: (math.exp, (0, math.inf)), ExpToInf: (math.exp, (0, math.inf)), expm1: (math.expm1, (-1, math.inf)),
            sp.tanh: (math.tanh, (-1, 1)), sp.erf: (math.erf, (-1, 1)), sp.erfc: (math.erfc, (0, 2)),
            sigmoid: (lambda u: 0.5 * (1 + math.tanh(u / 2)), (0, 1))}

# where a comparison fails, at a finite number
NEGATED = {"==": "!=", "!=": "==", ">": "<=", ">=": "<", "<": ">=", "<=": ">"}


class Unbounded(Exception):
    """The expression may be inf or NaN (or its bound is unknown) for some input."""


def call(function, u):
    """function(u), inf where it overflows a float."""
    try:
        return function(u)
    except OverflowError:
        return math.inf


class Bounds:
    """bound(expr) -> (low, high): every value expr takes with its symbols in ranges, all within [-largest, largest];
    ranges: {Symbol: (low, high)}, definitions: {Symbol: expression} (cse temporaries and named masks)."""

    def __init__(self, largest, definitions, ranges=None):
        self.largest, self.definitions, self.ranges = largest, definitions, dict(ranges or {})
        self.known = {}            # {expr: its bound}: a temporary read by many lines is bounded once

    def refined(self, condition, holds=True):
        """These bounds where condition holds (or fails): a comparison of a symbol with a number narrows its range."""
        if isinstance(condition, sp.Symbol) and condition in self.definitions:
            return self.refined(self.definitions[condition], holds)
        if isinstance(condition, sp.Not):
            return self.refined(condition.args[0], not holds)
        if not (isinstance(condition, sp.core.relational.Relational) and condition.rhs.is_number
                and isinstance(condition.lhs, sp.Symbol)):
            return self
        u, c = condition.lhs, float(condition.rhs)
        op = condition.rel_op if holds else NEGATED[condition.rel_op]
        try:
            low, high = self.extent(u)
        except Unbounded:   # a temporary that may overflow: its range is not narrowed
            return self
        low, high = {">": (max(low, c), high), ">=": (max(low, c), high), "<": (low, min(high, c)),
                     "<=": (low, min(high, c)), "==": (c, c), "!=": (low, high)}[op]
        return Bounds(self.largest, self.definitions, {**self.ranges, u: (low, high) if low <= high else (c, c)})

    def holds(self, condition):
        """True or False where condition holds or fails for every value in these bounds, else None."""
        if isinstance(condition, sp.Symbol) and condition in self.definitions:
            return self.holds(self.definitions[condition])
        if isinstance(condition, sp.Not):
            inner = self.holds(condition.args[0])
            return None if inner is None else not inner
        if condition in (sp.true, sp.false):
            return bool(condition)
        if not isinstance(condition, sp.core.relational.Relational):
            return None
        try:
            (a, b), (c, d) = self.extent(condition.lhs), self.extent(condition.rhs)
        except Unbounded:
            return None
        decided = {">": (a > d, b <= c), ">=": (a >= d, b < c), "<": (b < c, a >= d), "<=": (b <= c, a > d),
                   "==": (a == b == c == d, b < c or a > d), "!=": (b < c or a > d, a == b == c == d)}
        true, false = decided[condition.rel_op]
        return True if true else False if false else None

    def extent(self, expr):
        """(low, high) of expr's values, infinite ends included (an argument at inf, exp of it); Unbounded where
        it may be NaN or has no rule."""
        if expr not in self.known:
            low, high = self._bound(expr)
            if math.isnan(low) or math.isnan(high):   # inf - inf or inf * 0 at an end
                raise Unbounded(expr)
            # beyond the dtype's largest number a kernel's value is inf, whatever the bound's arithmetic in float64
            self.known[expr] = (-math.inf if low < -self.largest else low), (math.inf if high > self.largest else high)
        return self.known[expr]

    def bound(self, expr):
        """(low, high) of expr's values, all finite numbers of the dtype; Unbounded where some may not be."""
        low, high = self.extent(expr)
        if not -self.largest <= low <= high <= self.largest:
            raise Unbounded(expr)
        return low, high

    def _bound(self, expr):
        if expr.is_number:
            value = float(expr)
            return value, value
        if isinstance(expr, sp.Symbol):
            if expr in self.ranges:
                return self.ranges[expr]
            if expr in self.definitions:
                return self.extent(self.definitions[expr])
            return -math.inf, math.inf
        if isinstance(expr, sp.Add):
            low = high = 0.0
            for term in expr.args:
                a, b = self.extent(term)
                low, high = low + a, high + b
            return low - abs(low) * ROUNDING, high + abs(high) * ROUNDING
        if isinstance(expr, sp.Mul):
            low = high = 1.0
            for factor in expr.args:
                a, b = self.extent(factor)
                ends = [p * q for p in (low, high) for q in (a, b)]
                if any(math.isnan(end) for end in ends):   # inf * 0: NaN, as the kernel's product would be
                    raise Unbounded(expr)
                low, high = min(ends), max(ends)
            return low, high
        if isinstance(expr, sp.Pow):
            return self.power(expr)
        if isinstance(expr, sp.Piecewise):
            return self.piecewise(expr)
        if isinstance(expr, Clip):  # min(max(u, lo), hi), a bound an infinity
            (u_low, u_high), (lo_low, lo_high), (hi_low, hi_high) = (
                self.extent(e) if e.is_finite is not False else (float(e),) * 2 for e in expr.args)
            return min(max(u_low, lo_low), hi_low), min(max(u_high, lo_high), hi_high)
        if isinstance(expr, (sp.Max, sp.Min)):
            ends = [self.extent(a) for a in expr.args]
            pick = max if isinstance(expr, sp.Max) else min
            return pick(e[0] for e in ends), pick(e[1] for e in ends)
        if isinstance(expr, sp.Abs):
            low, high = self.extent(expr.args[0])
            return (0.0 if low <= 0 <= high else min(abs(low), abs(high))), max(abs(low), abs(high))
        if isinstance(expr, sp.sign):
            low, high = self.extent(expr.args[0])
            return float(np.sign(low)), float(np.sign(high))
        if isinstance(expr, sp.Heaviside):
            return 0.0, 1.0
        function = type(expr)
        if function in MONOTONE:
            f, (least, most) = MONOTONE[function]
            # widened for the kernel's rounding, but at 0, where each of these is exact (exp(0) = 1)
            ends = sorted((call(f, u), 0.0 if u == 0 else abs(call(f, u)) * ROUNDING) for u in self.extent(expr.args[0]))
            (a, a_error), (b, b_error) = ends
            return max(a - a_error, least), min(b + b_error, most)
        if function in (sp.log, log1p):
            low, high = self.extent(expr.args[0])
            start = 0.0 if function is sp.log else -1.0
            if low <= start:
                raise Unbounded(expr)
            f = math.log if function is sp.log else math.log1p
            return f(low), f(high)
        raise Unbounded(expr)

    def power(self, expr):
        low, high = self.extent(expr.base)
        n = expr.exp
        if n.is_Integer and n > 0:
            ends = [call(lambda v: v ** int(n), v) for v in (low, high)]
            even_across_zero = n % 2 == 0 and low <= 0 <= high
            return (0.0 if even_across_zero else min(ends)), max(ends)
        if n.is_Integer and (low > 0 or high < 0):
            ends = [call(lambda v: v ** int(n), v) for v in (low, high)]
            return min(ends), max(ends)
        if n == sp.Rational(1, 2) and low >= 0:
            return math.sqrt(low), math.sqrt(high)
        raise Unbounded(expr)

    def piecewise(self, expr):
        """The union of the branches' bounds, each where it is chosen; a branch that never is adds nothing."""
        ends, rest = [], self
        for value, condition in expr.args:
            chosen = rest.holds(condition)
            if chosen is not False:
                ends.append(rest.refined(condition).bound(value))
            if chosen is True:
                break
            rest = rest.refined(condition, holds=False)
        if not ends:
            raise Unbounded(expr)
        return min(e[0] for e in ends), max(e[1] for e in ends)


def finite_where_unselected(value, other, condition, definitions):
    """Whether np.where(condition, value, other) equals value c + other (not c) at every input, infinities
    included, in float32 and float64: value is finite wherever condition fails, other wherever it holds (then each product with the
    mask that is 0 there is 0, never inf * 0 = NaN)."""
    try:
        for largest in LARGEST:
            everywhere = Bounds(largest, definitions)
            everywhere.refined(condition, holds=False).bound(value)
            everywhere.refined(condition).bound(other)
    except Unbounded:
        return False
    return True
