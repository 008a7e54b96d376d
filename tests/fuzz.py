"""A fuzzer of the declaration path (issue 20): random element-wise activations and losses built from
derive.declare.FUNCTIONS go through what `symgrad codegen --ops FILE --out DIR` runs, and every
class it publishes is checked against mpmath at 50 digits and against its own finite differences.

    .venv/bin/python tests/fuzz.py --count 2000 --seed 1 --report build/fuzz.json      (make fuzz)
    .venv/bin/python tests/fuzz.py --count 200 --no-survey    (correctness alone, without the accuracy survey)

Each declaration ends in one outcome:
  accepted        published, and every class agrees with the reference
  refused         a one-line DeclarationError (or ValueError) naming the operation, or a verification
                  failure of an expression that is not finite and real on its domain
and the defects, any of which makes main() exit 1:
  crash           any other exception, or a refusal message that is not one line naming the operation
  internal_error  a refusal that wraps the generator's own failure (a TypeError, a RecursionError...)
  hang            no result within the time budget
  wrong_kernel    published, but a class disagrees with the reference or its own differences, or raises
  unverified      published although a check failed, or a published module that no check covered
  false_refusal   verification refused kernels that agree with the reference
  caught_bug      verification refused kernels that are wrong: the generator's bug, caught before publishing
  fuzzer_error    the fuzzer itself failed (its reference cannot evaluate something): fix tests/fuzz.py

The command also surveys each accepted declaration against issue 23's accuracy contract over the whole float32
and float64 range (tests/accuracy.py's quick grid against mpmath), unless --no-survey (run_case and run_all
survey only with survey=True; about 13% of the fuzzer's time): the summary counts those that meet it, those
that break it (not a defect: the rewrites do not cover every expression) and those with no verdict.

The grammar is written once, over a chooser: hypothesis draws from it (cases()), and so does a seeded
random.Random (sample()). The reference is SymPy's expression evaluated by mpmath with a first-order
bound on the rounding of evaluating it as written in float64, so that an ill-conditioned point is
given the tolerance its conditioning needs and a wrong kernel is not."""
import argparse
import functools
import itertools
import json
import math
import operator
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import mpmath
import numpy as np
import sympy as sp
from hypothesis import strategies as st

from derive.functions import sigmoid

NAME = "Fuzz"
DEFECTS = ("crash", "internal_error", "hang", "wrong_kernel", "unverified", "false_refusal", "caught_bug",
           "fuzzer_error")

# ---- the grammar: depth 2 to 4 compositions of the declaration language ----------------------------

PARAM_NAMES = ("alpha", "beta")
DEFAULTS = (0.7, 1.5, 2.0, 0.25, -0.5)
CONSTANTS = ("2", "3", "1/2", "pi", "E")
THRESHOLDS = ("0", "1/2", "-1", "1")
UNARY = ("exp", "tanh", "sinh", "cosh", "atan", "erf", "sigmoid", "Abs", "sign")
# positive for any real argument: what log, sqrt, a denominator or a fractional power is given; the
# bare "{}" (one time in thirteen) lets an expression that is not real everywhere through too
GUARDS = ("({})**2 + 1", "exp({})", "1 + Abs({})", "cosh({})", "sigmoid({})", "({})**2 + 1/4") * 2 + ("{}",)
POWERS = ("2", "3", "-1", "-2", "1/2", "3/2", "-1/2", "1/3")


class RandomChooser:
    """Choices from a seeded random.Random (make fuzz)."""

    def __init__(self, rng):
        self.rng = rng

    def pick(self, options):
        return options[self.rng.randrange(len(options))]


class DataChooser:
    """Choices drawn by hypothesis, which can then shrink them."""

    def __init__(self, draw):
        self.draw = draw

    def pick(self, options):
        return self.draw(st.sampled_from(options))


def expression(choose, depth, principal, variables, params):
    """Source text of an expression nesting depth rules, whose deepest leaf is principal; its other
    subexpressions are shallower, their leaves mostly variables, else parameters or constants."""
    if depth == 0:
        return principal
    a = expression(choose, depth - 1, principal, variables, params)
    numbers = CONSTANTS + params

    def other():
        group = choose.pick(("variable", "variable", "variable", "number"))
        leaf = choose.pick(variables if group == "variable" else numbers)
        return expression(choose, choose.pick(range(depth)), leaf, variables, params)

    def guard(text):
        return choose.pick(GUARDS).format(text)

    rule = choose.pick(("unary", "unary", "domain", "binary", "binary", "branch", "power", "scaled"))
    if rule == "unary":
        return f"{choose.pick(UNARY)}({a})"
    if rule == "domain":
        return f"{choose.pick(('log', 'sqrt'))}({guard(a)})"
    if rule == "binary":
        b = other()
        a, b = choose.pick(((a, b), (b, a)))
        op = choose.pick(("+", "-", "*", "/", "Max", "Min"))
        if op in ("Max", "Min"):
            return f"{op}({a}, {b})"
        return f"({a})/({guard(b)})" if op == "/" else f"({a}) {op} ({b})"
    if rule == "branch":
        b = other()
        a, b = choose.pick(((a, b), (b, a)))
        condition = expression(choose, choose.pick(range(depth)), choose.pick(variables), variables, params)
        return f"Piecewise(({a}, {condition} > {choose.pick(THRESHOLDS + params)}), ({b}, True))"
    if rule == "power":
        power = choose.pick(POWERS)
        return f"({a})**{power}" if power in ("2", "3") else f"({guard(a)})**({power})"
    number = choose.pick(numbers)
    return choose.pick((f"{number}*({a})", f"({a}) + {number}", f"({a})/({number})"))


@dataclass(frozen=True)
class Case:
    """One declaration: activation (in x) or loss (in x and t), its expression and parameters."""

    kind: str
    expr: str
    params: tuple = ()             # ((name, default), ...)
    seed: int = 0                  # of the points it is checked at

    def declaration(self):
        function = "activation" if self.kind == "activation" else "elementwise_loss"
        params = f", params={dict(self.params)!r}" if self.params else ""
        return f"{function}({NAME!r}, {self.expr!r}{params})"


def declaration(choose, seed=0):
    """A random Case: depth 2 to 4, with no, one or two parameters."""
    kind = choose.pick(("activation", "loss"))
    names = PARAM_NAMES[:choose.pick((0, 0, 1, 2))]
    params = tuple((name, choose.pick(DEFAULTS)) for name in names)
    variables = ("x",) if kind == "activation" else ("x", "t", "x - t")
    principal = "x" if kind == "activation" else choose.pick(("x", "x", "x - t", "t - x"))
    return Case(kind, expression(choose, choose.pick((2, 3, 4)), principal, variables, names), params, seed)


@st.composite
def cases(draw):
    """The hypothesis strategy of Cases."""
    return declaration(DataChooser(draw), draw(st.integers(0, 2**32 - 1)))


def sample(seed, count):
    """count Cases from a random.Random(seed): the same list for the same arguments."""
    rng = random.Random(seed)
    return [declaration(RandomChooser(rng), seed=rng.randrange(2**32)) for _ in range(count)]


# ---- the reference: mpmath at 50 digits, with a bound on float64's rounding ------------------------

DIGITS = 50
EPS = 2.0 ** -53
RANGE = (1e-300, 1e300)        # nonzero magnitudes float64 holds without overflow or subnormals
RTOL = 1e-9                    # relative tolerance against the reference
SLACK = 1e4                    # times the rounding bound of the declared form (the kernel's form differs)
DELTA = 1e-3                   # points this close to a kink, jump or singularity are not checked
H = 1e-6                       # central differences' step
FD_TOL = 1e-5                  # relative to the largest gradient of the sample


class Undefined(Exception):
    """No finite real value here: not real, infinite, or an intermediate outside float64's range."""


def _log(u):
    if u <= 0:
        raise Undefined(f"log of {mpmath.nstr(u, 5)}")
    return mpmath.log(u)


def _step(u):
    if u == 0:
        raise Undefined("at a step")
    return mpmath.mpf(1 if u > 0 else 0)


def _delta(u):
    if u == 0:
        raise Undefined("at a delta")
    return mpmath.mpf(0)


# function: (value, derivative from (u, value), ulps of its float64 evaluation)
FUNCTIONS = {
    sp.exp: (mpmath.exp, lambda u, v: v, 2),
    sp.log: (_log, lambda u, v: 1 / u, 2),
    sp.tanh: (mpmath.tanh, lambda u, v: 1 - v * v, 2),
    sp.sinh: (mpmath.sinh, lambda u, v: mpmath.cosh(u), 2),
    sp.cosh: (mpmath.cosh, lambda u, v: mpmath.sinh(u), 2),
    sp.atan: (mpmath.atan, lambda u, v: 1 / (1 + u * u), 2),
    sp.erf: (mpmath.erf, lambda u, v: 2 / mpmath.sqrt(mpmath.pi) * mpmath.exp(-u * u), 2),
    sigmoid: (lambda u: 1 / (1 + mpmath.exp(-u)), lambda u, v: v * (1 - v), 2),
    sp.Abs: (abs, lambda u, v: 1, 0),
    sp.sign: (mpmath.sign, lambda u, v: 0, 0),
    sp.Heaviside: (_step, lambda u, v: 0, 0),
    sp.DiracDelta: (_delta, lambda u, v: 0, 0),
}
CONNECTIVES = {sp.And: all, sp.Or: any, sp.Not: lambda args: not args[0], sp.Xor: lambda args: sum(args) % 2 == 1,
               sp.Implies: lambda args: not args[0] or args[1], sp.Equivalent: lambda args: len(set(args)) == 1}
RELATIONS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
             "!=": operator.ne}


def constant(expr):
    """A number's value (it is printed rounded once)."""
    value = sp.N(expr, DIGITS + 10)
    if not value.is_real or not value.is_finite:
        raise Undefined(f"{expr} is not a finite real number")
    return mpmath.mpf(value)


def evaluate(expr, env, memo):
    """(value, bound) of expr at env {symbol: mpf}: its value to DIGITS digits and a first-order
    bound on the error of evaluating it as written in float64 (each operation rounding once, each
    libm call within 2 ulps). Call within mpmath.workdps(DIGITS)."""
    if expr not in memo:
        value, bound = _evaluate(expr, env, memo)
        if value and not RANGE[0] < abs(value) < RANGE[1]:
            raise Undefined(f"{expr} is {mpmath.nstr(value, 5)}, beyond float64")
        memo[expr] = value, bound
    return memo[expr]


def _evaluate(expr, env, memo):
    if expr in env:
        return env[expr], 0
    if expr.is_number:
        value = constant(expr)
        return value, 0 if expr.is_Integer else EPS * abs(value)
    args = [evaluate(a, env, memo) for a in expr.args] if isinstance(expr, (sp.Add, sp.Mul)) else None
    if isinstance(expr, sp.Add):
        value = mpmath.fsum(v for v, _ in args)
        return value, sum(b for _, b in args) + EPS * (len(args) - 1) * sum(abs(v) for v, _ in args)
    if isinstance(expr, sp.Mul):
        value = mpmath.fprod(v for v, _ in args)
        spread = sum(b * abs(mpmath.fprod(w for j, (w, _) in enumerate(args) if j != k))
                     for k, (_, b) in enumerate(args))
        return value, spread + EPS * (len(args) - 1) * abs(value)
    if isinstance(expr, sp.Pow):
        return _power(expr, env, memo)
    if isinstance(expr, (sp.Max, sp.Min)):
        args = [evaluate(a, env, memo) for a in expr.args]
        value = (max if isinstance(expr, sp.Max) else min)(v for v, _ in args)
        return value, max(b for v, b in args if v == value)
    if isinstance(expr, sp.Piecewise):
        for value, condition in expr.args:
            if holds(condition, env, memo):
                return evaluate(value, env, memo)
        raise Undefined(f"no branch of {expr} holds")
    if type(expr) in FUNCTIONS:
        function, derivative, ulps = FUNCTIONS[type(expr)]
        u, bound = evaluate(expr.args[0], env, memo)
        value = function(u)
        return value, abs(derivative(u, value)) * bound + ulps * EPS * abs(value)
    if isinstance(expr, sp.Function):
        return _applied(expr, env, memo)
    raise NotImplementedError(f"the reference does not evaluate {type(expr).__name__}: {expr}")


@functools.lru_cache
def mpmath_function(function, arity):
    arguments = sp.symbols(f"a:{arity}")
    return sp.lambdify(arguments, function(*arguments), "mpmath")


def _applied(expr, env, memo):
    """Any other function (cos, atan2, re of a derivative): its value from mpmath, each argument's
    error carried by a numerical partial derivative."""
    args = [evaluate(a, env, memo) for a in expr.args]
    values, function = [v for v, _ in args], mpmath_function(expr.func, len(args))

    def real(*point):
        try:
            value = function(*point)
        except (ValueError, ZeroDivisionError) as error:
            raise Undefined(f"{expr}: {error}") from None
        if isinstance(value, mpmath.mpc) and value.imag:
            raise Undefined(f"{expr} is not real")
        return mpmath.re(value)

    value = real(*values)
    spread = sum(abs(mpmath.diff(lambda u, k=k: real(*values[:k], u, *values[k + 1:]), values[k])) * bound
                 for k, (_, bound) in enumerate(args) if bound)
    return value, spread + 2 * EPS * abs(value)


def _power(expr, env, memo):
    base, bound = evaluate(expr.base, env, memo)
    if expr.exp.is_number:
        p = constant(expr.exp)
        integer = expr.exp.is_Integer
        if base < 0 and not integer or base == 0 and p <= 0:
            raise Undefined(f"{expr} at base {mpmath.nstr(base, 5)}")
        value = base ** int(p) if integer else base ** p
        if bound and base == 0 and p < 1:
            raise Undefined(f"{expr} at base 0")
        spread = abs(p) * abs(base) ** (p - 1) * bound if bound else 0
        rounded = 0 if integer else EPS * abs(p) * abs(value * mpmath.log(abs(base))) if base else 0
        return value, spread + rounded + 2 * EPS * abs(value)
    p, p_bound = evaluate(expr.exp, env, memo)
    if base <= 0:
        raise Undefined(f"{expr} at base {mpmath.nstr(base, 5)}")
    value = base ** p
    return value, abs(value) * (abs(p / base) * bound + abs(mpmath.log(base)) * p_bound) + 2 * EPS * abs(value)


def holds(condition, env, memo):
    """Whether a Piecewise condition holds at env, decided at DIGITS digits."""
    if condition in (sp.true, sp.false):
        return bool(condition)
    if isinstance(condition, sp.core.relational.Relational):
        left, right = (evaluate(side, env, memo)[0] for side in condition.args)
        return RELATIONS[condition.rel_op](left, right)
    if isinstance(condition, sp.ITE):  # a Piecewise inside a condition
        test, then, otherwise = condition.args
        return holds(then if holds(test, env, memo) else otherwise, env, memo)
    if type(condition) in CONNECTIVES:
        return CONNECTIVES[type(condition)]([holds(c, env, memo) for c in condition.args])
    raise NotImplementedError(f"the reference does not decide {condition}")


def switches(expr):
    """What changes sign at a kink, jump or singularity of expr: Abs, sign and step arguments, the
    sides of Max, Min and Piecewise comparisons, log arguments and the bases of negative or
    fractional powers. Near their zeros neither differences nor float64 comparisons are trusted."""
    found = set()
    for node in sp.preorder_traversal(expr):
        if isinstance(node, (sp.Abs, sp.sign, sp.Heaviside, sp.DiracDelta, sp.log)):
            found.add(node.args[0])
        elif isinstance(node, (sp.Max, sp.Min)):
            found.update(a - b for a, b in itertools.combinations(node.args, 2))
        elif isinstance(node, sp.core.relational.Relational):
            found.add(node.lhs - node.rhs)
        elif isinstance(node, sp.Pow) and not (node.exp.is_Integer and node.exp > 0):
            found.add(node.base)
    return tuple(s for s in found if not s.is_number)


@dataclass
class Reference:
    """The declared expression over real x, t and parameters, its derivative in x (sp.diff of it as
    written), and what its kinks are."""

    forward: sp.Expr
    derivative: sp.Expr
    switches: tuple
    x: sp.Symbol
    t: sp.Symbol
    params: dict                   # {name: symbol}
    loss: bool

    @classmethod
    def of(cls, case):
        from derive.declare import parse
        x, t = sp.Symbol("x", real=True), sp.Symbol("t", real=True)
        params = {name: sp.Symbol(name, real=True) for name, _ in case.params}
        variables = {"x": x, **({"t": t} if case.kind == "loss" else {}), **params}
        forward = parse(NAME, case.expr, variables)
        derivative = sp.diff(forward, x)
        return cls(forward, derivative, switches(forward) + switches(derivative), x, t, params, case.kind == "loss")

    def env(self, x, t, options):
        return {self.x: mpmath.mpf(x), self.t: mpmath.mpf(t),
                **{symbol: mpmath.mpf(options[name]) for name, symbol in self.params.items()}}

    def at(self, x, t, options):
        """(value, its bound, derivative, its bound) at a point, or Undefined."""
        with mpmath.workdps(DIGITS):
            env, memo = self.env(x, t, options), {}
            return (*evaluate(self.forward, env, memo), *evaluate(self.derivative, env, memo))

    def smooth_at(self, x, t, options):
        """Whether no switch changes sign within DELTA of x (or is undefined there)."""
        with mpmath.workdps(DIGITS):
            try:
                for switch in self.switches:
                    values = [evaluate(switch, self.env(x + d, t, options), {})[0] for d in (-DELTA, 0, DELTA)]
                    if len({mpmath.sign(v) for v in values}) > 1 or abs(values[1]) < DELTA:
                        return False
            except Undefined:
                return False
        return True

    def checkable(self, x, t, options):
        """(value, bound, derivative, bound) at a point the kernels are checked at, else None."""
        try:
            found = self.at(x, t, options)
        except Undefined:
            return None
        return found if self.smooth_at(x, t, options) else None

    def finite_on(self, domain, options, count=41):
        """Whether the expression is finite and real on a grid of domain (targets in [0, 1], as
        codegen's verification draws them), and its derivative wherever it is smooth."""
        for x, t in itertools.product(np.linspace(*domain, count), (0.0, 0.5, 1.0) if self.loss else (0.0,)):
            try:
                with mpmath.workdps(DIGITS):
                    evaluate(self.forward, self.env(x, t, options), {})
                if self.smooth_at(x, t, options):
                    self.at(x, t, options)
            except Undefined:
                return False
        return True


# ---- checking a generated class against the reference -------------------------------------------

@dataclass
class Finding:
    """The worst disagreement of one quantity of one class: in tolerances (above 1 fails)."""

    quantity: str                  # forward | backward | fd | shape | raises
    excess: float
    message: str


@dataclass
class Points:
    """Checkable points of one option set, in float64, with the reference's values and tolerances."""

    x: np.ndarray
    t: np.ndarray                  # None for an activation
    value: np.ndarray
    value_tol: np.ndarray
    slope: np.ndarray
    slope_tol: np.ndarray


def tolerance(value, bound):
    return float(RTOL * abs(value) + SLACK * bound) + 1e-300


def points(reference, op, options, rng, count=24, tries=400):
    """Up to count checkable points drawn uniformly from op's domain (targets from [-1, 2])."""
    found = []
    for _ in range(tries):
        x, t = float(rng.uniform(*op.domain)), float(rng.uniform(-1.0, 2.0))
        at = reference.checkable(x, t, options)
        if at is not None:
            found.append((x, t, float(at[0]), tolerance(at[0], at[1]), float(at[2]), tolerance(at[2], at[3])))
            if len(found) == count:
                break
    if not found:
        return None
    shape = (4, count // 4) if len(found) == count else (len(found),)
    columns = [np.array(column, dtype=np.float64).reshape(shape) for column in zip(*found)]
    return Points(columns[0], columns[1] if reference.loss else None, *columns[2:])


def compare(got, expected, tol, what, pts):
    """The Finding of got against expected (arrays of pts' shape, or numbers)."""
    got = np.asarray(got, dtype=np.float64)
    if got.shape != np.shape(expected):
        return Finding("shape", math.inf, f"{what} has shape {got.shape}, expected {np.shape(expected)}")
    with np.errstate(all="ignore"):
        excess = np.where(np.isfinite(got), np.abs(got - expected) / tol, np.inf)
    at = np.unravel_index(np.argmax(excess), excess.shape) if excess.ndim else ()
    where = f" at x={float(pts.x[at])!r}" + (f", t={float(pts.t[at])!r}" if pts.t is not None else "") if excess.ndim else ""
    return Finding(what.split(":")[0], float(excess[at]),
                   f"{what}{where}: {float(got[at])!r} against {float(np.asarray(expected)[at])!r}"
                   f" ({float(excess[at]):.3g} tolerances)")


def check_class(cls, kind, options, pts, rng):
    """[Finding] for one class at pts, with the given options: forward and backward against the
    reference, backward against central differences of forward, and (a loss) the mean too; shapes
    and dtypes of both in float64 and float32."""
    x, t = pts.x, pts.t
    upstream = rng.standard_normal(x.shape)
    findings = []
    with np.errstate(all="ignore"):
        if kind == "activation":
            make = lambda: cls(**options)  # noqa: E731
            layer = make()
            y = layer.forward(x.copy())
            dx = layer.backward(upstream.copy())
            above, below = make().forward(x + H), make().forward(x - H)
        else:
            make = lambda: cls(**options, reduction="none")  # noqa: E731
            loss = make()
            y = loss.forward(x.copy(), t.copy())
            dx = loss.backward(upstream.copy())
            above, below = make().forward(x + H, t.copy()), make().forward(x - H, t.copy())
            mean = cls(**options)
            findings.append(compare(mean.forward(x.copy(), t.copy()), pts.value.mean(), pts.value_tol.mean(),
                                    "forward (mean)", pts))
            findings.append(compare(mean.backward(), pts.slope / x.size, pts.slope_tol / x.size,
                                    "backward (mean)", pts))
        findings.append(compare(y, pts.value, pts.value_tol, "forward", pts))
        findings.append(compare(dx, upstream * pts.slope, np.abs(upstream) * pts.slope_tol, "backward", pts))
        differences = np.asarray(above - below, dtype=np.float64) / (2 * H) * upstream
        dx = np.asarray(dx, dtype=np.float64)
        scale = max(np.max(np.abs(dx), initial=0.0), np.max(np.abs(differences), initial=0.0), 1e-3)
        rounding = 8 * EPS * (np.abs(above) + np.abs(below)) / (2 * H) * np.abs(upstream)
        fd = compare(dx, differences, FD_TOL * scale + rounding, "fd: backward against differences of forward", pts)
        findings.append(fd)
        findings.extend(check_shapes(make, kind, x, t, upstream))
    return findings


def check_shapes(make, kind, x, t, upstream):
    """[Finding] for forward and backward not giving arrays of x's shape and dtype, in float64 and float32."""
    findings = []
    for dtype in (np.float64, np.float32):
        instance = make()
        y = instance.forward(x.astype(dtype)) if kind == "activation" else instance.forward(x.astype(dtype), t.astype(dtype))
        dx = instance.backward(upstream.astype(dtype))
        for what, array in (("forward", y), ("backward", dx)):
            if not isinstance(array, np.ndarray) or array.shape != x.shape or array.dtype != dtype:
                found = f"{type(array).__name__} {getattr(array, 'dtype', '')}{getattr(array, 'shape', '')}"
                findings.append(Finding("shape", math.inf, f"{what} of {np.dtype(dtype).name} x of shape {x.shape}"
                                                           f" gives {found}"))
    return findings


def check_package(package, op, reference, seed):
    """({quantity: worst excess, "points": fewest points checked, "classes": 1 or 2}, the worst failing
    Finding or None) of the NumPy class and the fused one where the package has it, with default and
    example options; a failing Finding's quantity names its backend too."""
    classes = [("NumPy", getattr(package, NAME))]
    fast = getattr(package, "fast", None)
    if fast is not None and hasattr(fast, NAME):
        classes.append(("fused", getattr(fast, NAME)))
    option_sets = [("defaults", {})] + ([("options", {p.name: p.example for p in op.params})] if op.params else [])
    worst, failing = {"points": math.inf, "classes": len(classes)}, None
    for label, options in option_sets:
        pts = points(reference, op, {p.name: p.default for p in op.params} | options, np.random.default_rng(seed))
        worst["points"] = min(worst["points"], 0 if pts is None else pts.x.size)
        for backend, cls in classes if pts is not None else ():
            try:
                findings = check_class(cls, "activation" if op.kind == "layer" else "loss", options, pts,
                                       np.random.default_rng(seed))
            except Exception as error:  # noqa: BLE001 - a published class that raises is what is looked for
                findings = [Finding("raises", math.inf, f"raises {one_line(error)}")]
            for finding in findings:
                worst[finding.quantity] = max(worst.get(finding.quantity, 0.0), finding.excess)
                if finding.excess > 1 and (failing is None or finding.excess > failing.excess):
                    failing = Finding(f"{backend} {finding.quantity}", finding.excess,
                                      f"{backend}, {label}: {finding.message}")
    return worst, failing


# ---- one declaration through codegen, classified -----------------------------------------------

@dataclass
class Result:
    """What became of one Case."""

    case: Case
    outcome: str
    reason: str = ""
    category: str = ""             # the reason without its specifics, for counting
    errors: dict = field(default_factory=dict)  # {quantity: worst error in tolerances}
    seconds: float = 0.0
    jit: bool = False              # whether the fused class ran compiled by numba
    tails: str = ""                # an accepted one's tails (accuracy contract): met, broken, unknown, "" unchecked
    tails_reason: str = ""         # where it is broken, or why unknown

    @property
    def defect(self):
        return self.outcome in DEFECTS

    def line(self):
        return f"{self.outcome:<15}{self.case.kind:<11}{self.case.declaration()}  # {self.reason}"


class Hang(BaseException):
    """The time budget ran out (a BaseException: the generator's stages catch every Exception)."""


@contextmanager
def budget(seconds):
    """Raise Hang in the main thread after seconds: a timer thread signals it (codegen's own stages
    take SIGALRM and cancel any timer on it, so the budget cannot use alarm)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    done = threading.Event()

    def expire(signum, frame):
        if not done.is_set():
            raise Hang

    previous = signal.signal(signal.SIGUSR1, expire)
    timer = threading.Timer(seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
    timer.start()
    try:
        yield
    finally:
        done.set()
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)


def one_line(error):
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0][:300]}" if message else type(error).__name__


KNOWN_REFUSALS = ("does not depend on", "finds no derivative", "cannot parse", "unknown symbol", "unknown function",
                  "declared twice", "nests too deeply", "took more than")


def category(message):
    """A refusal's or failure's kind: its known phrase, a stage's "... failed: ErrorType", else its
    first words, numbers and quoted text left out."""
    message = message.removeprefix(f"{NAME}: ")
    known = next((phrase for phrase in KNOWN_REFUSALS if phrase in message), None)
    if known:
        return known
    stage = re.match(r"(.*? failed: \w+)", message)
    if stage:
        return stage.group(1)
    return " ".join(re.sub(r"'[^']*'|\"[^\"]*\"|[-+]?\d[\d.e+-]*", "#", message).split()[:8])


def engine_error(error):
    """Whether error is one of the generator's own refusals (DeclarationError, LoweringError...)."""
    return isinstance(error, ValueError) and type(error).__module__.split(".")[0] in ("derive", "codegen")


def refusal(error):
    """(outcome, reason) of an exception raised while declaring or generating."""
    from derive.declare import DeclarationError
    message = str(error).strip()
    if not isinstance(error, (DeclarationError, ValueError)):
        return "crash", one_line(error)
    if "\n" in message or NAME not in message:
        return "crash", f"{type(error).__name__} not one line naming the operation: {one_line(error)}"
    cause = error.__cause__
    if "took more than" in message:
        return "hang", message
    if "nests too deeply" in message or cause is not None and not engine_error(cause):
        return "internal_error", message
    return "refused", message


@contextmanager
def observed_verification():
    """The packages codegen verifies, as it imported them: after a refusal they are still to be
    checked (was the refused code right?)."""
    from codegen import pipeline
    seen, verify = [], pipeline.verify_package

    def observing(package, catalog, *args, **kwargs):
        seen.append(package)
        return verify(package, catalog, *args, **kwargs)

    pipeline.verify_package = observing
    try:
        yield seen
    finally:
        pipeline.verify_package = verify


def imported(folder, jit):
    """The package published in folder, with its fast/ (run compiled only if jit)."""
    from codegen.pipeline import interpreted, with_compiled_math
    from codegen.write import import_package
    subpackages = ["fast"] if (folder / "fast" / "__init__.py").exists() else []
    if jit:
        return import_package(folder, subpackages)
    with interpreted():
        package = import_package(folder, subpackages)
    if subpackages:  # math as numba compiles it (log(-1) is NaN, not an exception), as codegen verifies it
        with_compiled_math(package.fast)
    return package


def unchecked_modules(out, op, reports):
    """Published modules of op no passing report covers, and reports that failed."""
    passed = {report.name for report in reports if report.ok}
    failed = [f"{report.name} failed" for report in reports if not report.ok]
    modules = {f"{op.module}.py": op.name, f"fast/{op.module}.py": f"{op.name} (fast)"}
    return failed + [f"{module} published with no passing check" for module, name in modules.items()
                     if (out / module).exists() and name not in passed]


TAIL_TARGETS = (0.0, 0.5)       # a loss's targets in the tail check
TAIL_SECONDS = 20               # the tail check's own budget: past it the verdict is unknown, not a hang
TAIL_LABELS = {"met": "meeting the accuracy contract in the tails", "broken": "breaking it (not a defect)",
               "unknown": "with no verdict on the tails"}


def tails(case, op, package):
    """(verdict, reason) of issue 23's accuracy contract (tests/accuracy.py) for an accepted case's classes:
    its quick grid over the whole float32 and float64 range against mpmath, NumPy and fused. "met",
    "broken" (reason: the first failing point) or "unknown" (the truth took too long, or failed)."""
    try:
        from tests import accuracy
    except ModuleNotFoundError:  # run as tests/fuzz.py: its own folder is on the path, the repository's is not
        import accuracy
    subject = accuracy.declared_subject(NAME, case.kind, case.expr, dict(case.params),
                                        TAIL_TARGETS if case.kind == "loss" else None, op=op, source="fuzz")
    try:
        with budget(TAIL_SECONDS):
            tallies = accuracy.Survey([subject], package, quick=True, torch=False).run()
    except Hang:
        return "unknown", f"no verdict within {TAIL_SECONDS} s"
    except Exception as error:  # noqa: BLE001 - the survey's own failure on an expression it cannot evaluate
        return "unknown", one_line(error)
    broken = [f"{backend} {dtype} {quantity}: {tally.example}"
              for (_, backend, dtype, quantity), tally in tallies.items() if tally.failures]
    return ("broken", broken[0]) if broken else ("met", "")


def classify(case, folder, jit=False, survey=False):
    """(outcome, reason, category, errors) of case, generated in folder as `symgrad codegen --ops` does; if
    survey, an accepted case's (tails verdict, reason) after them."""
    from codegen.pipeline import codegen
    from derive.catalog import CATALOG
    from derive.declare import load_ops
    from derive.ops import build_catalog
    ops_file, out = folder / "fuzz_ops.py", folder / "fuzz_generated"
    ops_file.write_text(f"from derive.declare import activation, elementwise_loss\n\nOPS = [{case.declaration()}]\n")
    try:
        with observed_verification() as verified:
            catalog = build_catalog(*load_ops(ops_file), taken=CATALOG)
            reports, changed, _ = codegen(catalog, out, cache=None)
    except Exception as error:  # noqa: BLE001 - sorting every exception is the point
        outcome, reason = refusal(error)
        return outcome, reason, category(reason), {}
    op = catalog[NAME]
    reference = Reference.of(case)
    if changed is None:
        failed = next(r for r in reports if not r.ok)
        failure = f"{failed.name}: {(failed.failures or ('failed',))[0]}"
        errors, wrong = check_package(verified[-1], op, reference, case.seed)
        if wrong is not None:
            return "caught_bug", f"{wrong.message}; codegen: {failure}", wrong.quantity, errors
        defaults = {p.name: p.default for p in op.params}
        examples = defaults | {p.name: p.example for p in op.params}
        if not all(reference.finite_on(op.domain, values) for values in (defaults, examples)):
            return "refused", f"verification failed: {failure}", "verification: not finite and real on its domain", {}
        backend = "fused" if failed.name.endswith("(fast)") else "NumPy"
        return "false_refusal", f"refused kernels that agree with the reference: {failure}", backend, errors
    unchecked = unchecked_modules(out, op, reports)
    if unchecked:
        return "unverified", "; ".join(unchecked), unchecked[0].split(" ", 1)[1], {}
    try:
        package = imported(out, jit)
    except Exception as error:  # noqa: BLE001
        return "unverified", f"the published package does not import: {one_line(error)}", "does not import", {}
    errors, wrong = check_package(package, op, reference, case.seed)
    if wrong is not None:
        return "wrong_kernel", wrong.message, wrong.quantity, errors
    return ("accepted", "", "", errors) + (tails(case, op, package) if survey else ())


def run_case(case, seconds=60, jit=False, survey=False):
    """The Result of case within a budget of seconds, generated in a temporary folder; with survey, an
    accepted case's accuracy contract in the tails checked too (within its own budget, TAIL_SECONDS)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="symgrad-fuzz-") as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the kernels' overflow in np.where's other branch, numba's notes
        try:
            with budget(seconds):
                outcome = classify(case, Path(folder), jit, survey)
        except Hang:
            outcome = "hang", f"no result within {seconds:g} s", "budget", {}
        except Exception as error:  # noqa: BLE001 - the fuzzer's own failure, kept with its case
            outcome = "fuzzer_error", one_line(error), type(error).__name__, {}
    return Result(case, *outcome[:4], time.perf_counter() - start, jit, *outcome[4:])


# ---- the command --------------------------------------------------------------------------------

def run_all(cases, jobs=1, seconds=60, jit_every=0, progress=None, survey=False):
    """[Result] of every case in order, jobs of them at a time (each job a process of its own), the
    fused classes of every jit_every-th one compiled by numba (0: none), the tails of each accepted one
    surveyed if survey."""
    jits = [bool(jit_every) and index % jit_every == 0 for index in range(len(cases))]
    # (no max_tasks_per_child: in 3.11 a pool whose workers retire can stop handing out work)
    pool = ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) if jobs > 1 else None
    results = []
    with pool or nullcontext():
        try:
            for result in (pool.map if pool else map)(run_case, cases, itertools.repeat(seconds), jits,
                                                      itertools.repeat(survey)):
                results.append(result)
                if progress:
                    progress(result, len(results))
        except BaseException:  # interrupted: the workers finish the declaration they are on, no other
            if pool:
                pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results


def summary(results):
    """The table make fuzz prints: counts by outcome, refusals by reason, and each defect by cause."""
    outcomes = Counter(result.outcome for result in results)
    unchecked = sum(1 for r in results if r.outcome == "accepted" and not r.errors.get("points"))
    fused = sum(1 for r in results if r.outcome == "accepted" and r.errors.get("classes") == 2)
    rows = [("accepted", outcomes["accepted"]), ("  with a fused class too", fused)]
    rows += [("  with no point where the reference is defined", unchecked)] if unchecked else []
    verdicts = Counter(r.tails for r in results if r.outcome == "accepted" and r.tails)
    # surveyed: the count meeting the contract always, 0 too
    rows += [(f"  {TAIL_LABELS[verdict]}", verdicts[verdict]) for verdict in TAIL_LABELS
             if verdicts[verdict] or verdicts and verdict == "met"]
    rows += [("refused", outcomes["refused"])]
    rows += [(f"  {reason[:46]}", count) for reason, count in
             Counter(r.category for r in results if r.outcome == "refused").most_common()]
    rows += [(defect, outcomes[defect]) for defect in DEFECTS if outcomes[defect]]
    lines = [f"{'outcome':<48}{'count':>7}"] + [f"{label:<48}{count:>7}" for label, count in rows]
    groups = defaultdict(list)
    for result in results:
        if result.defect:
            groups[(result.outcome, result.category)].append(result)
    if groups:
        lines.append(f"\n{sum(outcomes[d] for d in DEFECTS)} defect(s), by cause:")
    for (outcome, cause), members in sorted(groups.items(), key=lambda item: -len(item[1])):
        lines.append(f"{outcome}: {cause} ({len(members)})")
        lines.extend(f"    {m.case.declaration()}\n        {m.reason[:240]}" for m in members[:5])
        if len(members) > 5:
            lines.append(f"    ... and {len(members) - 5} more")
    broken = [r for r in results if r.tails == "broken"]
    if broken:
        lines.append(f"\n{len(broken)} accepted declaration(s) break the accuracy contract in the tails "
                     "(tests/accuracy.py; not a defect), for example:")
        lines.extend(f"    {r.case.declaration()}\n        {r.tails_reason[:240]}" for r in broken[:5])
    if verdicts:
        lines.append(f"\n{verdicts['met']} of {sum(verdicts.values())} surveyed declaration(s) meet issue 23's "
                     "accuracy contract in the tails")
    seconds = sum(result.seconds for result in results)
    compiled = sum(1 for result in results if result.jit and result.errors.get("classes") == 2)
    lines.append(f"\n{len(results)} declaration(s) ({compiled} with their fused class compiled by numba), "
                 f"{seconds:.0f} s of work")
    return "\n".join(lines)


def report(results, args):
    """The JSON of make fuzz's build/fuzz.json."""
    return {"seed": args.seed, "count": args.count, "jit": args.jit, "budget": args.budget, "survey": args.survey,
            "outcomes": dict(Counter(result.outcome for result in results)),
            "refusals": dict(Counter(r.category for r in results if r.outcome == "refused")),
            "tail_verdicts": dict(Counter(r.tails for r in results if r.tails)),
            "results": [dict(asdict(result), declaration=result.case.declaration()) for result in results]}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Fuzz symgrad codegen --ops with random declarations.")
    parser.add_argument("--count", type=int, default=300, help="how many declarations (default 300)")
    parser.add_argument("--seed", type=int, default=1, help="of the declarations and their points (default 1)")
    parser.add_argument("--report", help="write every result as JSON here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (default: one per CPU)")
    parser.add_argument("--budget", type=float, default=60, help="seconds each declaration may take (default 60)")
    parser.add_argument("--jit", type=int, default=20, metavar="EVERY",
                        help="compile the fused classes of every EVERY-th declaration with numba, some seconds each "
                             "(default 20; 1: all, 0: none); the others run interpreted, as codegen verifies them")
    parser.add_argument("--survey", action=argparse.BooleanOptionalAction, default=True,
                        help="check each accepted declaration against issue 23's accuracy contract over the whole "
                             "float32 and float64 range (tests/accuracy.py's quick grid, about a second each) and "
                             "count those that meet it (default; --no-survey: correctness alone)")
    parser.add_argument("--verbose", action="store_true", help="print every result, not only the defects")
    args = parser.parse_args(argv)

    def progress(result, done):
        if args.verbose or result.defect:
            print(f"[{done}/{args.count}] {result.line()}", file=sys.stderr, flush=True)
        elif done % 50 == 0:
            print(f"[{done}/{args.count}]", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so the pool shuts down
    results = run_all(sample(args.seed, args.count), args.jobs, args.budget, args.jit, progress, args.survey)
    print(summary(results))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report(results, args), indent=1, default=str))
        print(f"report written in {args.report}")
    return 1 if any(result.defect for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
