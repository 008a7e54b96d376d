"""The accuracy survey of issue 23: generated kernels against mpmath across the whole range of a dtype.

    .venv/bin/python tests/accuracy.py --report build/accuracy.json          (the full grid)
    .venv/bin/python tests/accuracy.py --quick --only LogCosh,Softplus       (the test's grid)

For each subject (every element-wise catalog operation and the DECLARED list of realistic user
expressions), the NumPy kernels, the fused ones where they exist (run interpreted, with math as numba
compiles it, as codegen verifies them) and the naive PyTorch form of the same expression (torch's
functions as written, autograd for the derivative) are evaluated at a grid in float32 and float64:
log-spaced magnitudes up to the overflow threshold, denser from 1e-3 to 1e4, 0, subnormals, the
thresholds where exp, a square or cosh overflow, and the kinks, both signs. The truth is SymPy's
expression and its derivative in x (sympy.diff) by sympy.lambdify(..., "mpmath") at 50 digits, and
at 400 where a cancellation leaves fewer than 25 of them (1 - tanh(300)^2 is 0 at 50 digits) or |x|
is beyond 100 (log(1 + exp(-133)) is 0 at 40 and 50 digits alike, and the two agree).

The contract, per quantity (forward, backward) and point:
  bad       the truth is finite and representable, the kernel gives inf, NaN or 0 (a false 0: the
            truth is at least the smallest normal number)
  overflow  the truth overflows, the kernel does not give the infinity of its sign (NaN, say)
  inexact   the error exceeds BOUND ulps (of the truth, rounded to the dtype) plus the conditioning
            allowance eps (|x dq/dx| + |t dq/dt|): what rounding the inputs by one machine epsilon
            would change the exact value by (large only near a zero of q or where q is steep), plus
            the smallest normal number where the truth is below it (a kernel may flush subnormals,
            as fastmath does). Elsewhere the bound is the whole tolerance: 8 ulps is at most 9.5e-7
            relative in float32 and 1.8e-15 in float64, within issue 23's 1e-6 and 1e-12.
A kernel meets the contract where all three counts are 0."""
import argparse
import functools
import json
import math
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mpmath
import numpy as np
import sympy as sp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from derive.functions import sigmoid  # noqa: E402

DIGITS, MORE_DIGITS = 50, 400       # 400: float64's 324 decades of subnormals and 50 digits more
AGREE = 1e-25                       # 50-digit and 40-digit values this close: no cancellation ate them
TINY_EXP = 100                      # beyond, exp(-|x|) < 1e-43 is lost beside 1 at 40 and 50 digits alike
                                    # (log(1 + exp(-133)) is 0 at both): the truth there is taken at 400 alone
BOUND = 8                           # ulps, the default; BOUNDS below raises it where it is not reachable
EPS = {np.float32: 2.0 ** -23, np.float64: 2.0 ** -52}
DTYPES = (np.float32, np.float64)
QUANTITIES = ("forward", "backward")
BACKENDS = ("numpy", "fused", "torch")

# ---- the subjects ---------------------------------------------------------------------------------

# (name, kind, expression, params, targets): realistic declarations a user writes, as written in papers
DECLARED = (
    ("Softplus", "activation", "log(1 + exp(x))", {}, None),
    ("SoftplusBeta", "activation", "log(1 + exp(beta*x))/beta", {"beta": 2.0}, None),
    ("LogSigmoid", "activation", "log(sigmoid(x))", {}, None),
    ("LogOneMinusSigmoid", "activation", "log(1 - sigmoid(x))", {}, None),
    ("Logistic", "activation", "1/(1 + exp(-x))", {}, None),
    ("Swish", "activation", "x/(1 + exp(-x))", {}, None),
    ("SwishBeta", "activation", "x*sigmoid(beta*x)", {"beta": 1.5}, None),
    ("Mish", "activation", "x*tanh(log(1 + exp(x)))", {}, None),
    ("GELU", "activation", "x*(1 + erf(x/sqrt(2)))/2", {}, None),
    ("GELUTanh", "activation", "x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x**3)))/2", {}, None),
    ("Gaussian", "activation", "exp(-x**2/2)", {}, None),
    ("Tanh", "activation", "tanh(x)", {}, None),
    ("LogCoshActivation", "activation", "log(cosh(x))", {}, None),
    ("LogSumExpPair", "activation", "log(exp(x) + exp(-x))", {}, None),
    ("ELU", "activation", "Piecewise((x, x > 0), (exp(x) - 1, True))", {}, None),
    ("Softsign", "activation", "x/(1 + Abs(x))", {}, None),
    ("ISRU", "activation", "x/sqrt(1 + x**2)", {}, None),
    ("BentIdentity", "activation", "(sqrt(x**2 + 1) - 1)/2 + x", {}, None),
    ("TanhExp", "activation", "x*tanh(exp(x))", {}, None),
    ("LiSHT", "activation", "x*tanh(x)", {}, None),
    ("Serf", "activation", "x*erf(log(1 + exp(x)))", {}, None),
    ("Sinh", "activation", "sinh(x)", {}, None),
    ("Cosh", "activation", "cosh(x)", {}, None),
    ("SiLUDerivative", "activation", "sigmoid(x)*(1 + x*(1 - sigmoid(x)))", {}, None),
    ("XLogX", "activation", "x*log(x)", {}, None),
    ("LogCosh", "loss", "log(cosh(x - t))", {}, (0.0, 0.5)),
    ("Cauchy", "loss", "log(1 + (x - t)**2)", {}, (0.0, 0.5)),
    ("Pinball", "loss", "Max(tau*(t - x), (tau - 1)*(t - x))", {"tau": 0.25}, (0.0, 0.5)),
    ("PseudoHuber", "loss", "sqrt(1 + (x - t)**2) - 1", {}, (0.0, 0.5)),
    ("Charbonnier", "loss", "sqrt((x - t)**2 + 0.001)", {}, (0.0, 0.5)),
    ("Welsch", "loss", "1 - exp(-(x - t)**2/2)", {}, (0.0, 0.5)),
    ("BCEWithLogits", "loss", "-(t*log(sigmoid(x)) + (1 - t)*log(1 - sigmoid(x)))", {}, (0.0, 0.25, 1.0)),
    ("LogisticMargin", "loss", "log(1 + exp(-t*x))", {}, (-1.0, 1.0)),
    ("ExponentialMargin", "loss", "exp(-t*x)", {}, (-1.0, 1.0)),
    ("SquaredHinge", "loss", "Max(0, 1 - t*x)**2", {}, (-1.0, 1.0)),
    ("PoissonLogInput", "loss", "exp(x) - t*x", {}, (0.0, 2.0)),
    ("PoissonRate", "loss", "x - t*log(x)", {}, (0.0, 2.0)),
    ("KLDivLogInput", "loss", "t*(log(t) - x)", {}, (0.0, 0.25)),
    ("FocalPositive", "loss", "-(1 - sigmoid(x))**2*log(sigmoid(x))*t", {}, (1.0,)),
    ("Huber", "loss", "Piecewise(((x - t)**2/2, Abs(x - t) < 1), (Abs(x - t) - 1/2, True))", {}, (0.0, 0.5)),
)

# ulps where BOUND is not reachable by any kernel we print, and why (both dtypes unless a dtype is named)
BOUNDS = {}


@dataclass(frozen=True)
class Subject:
    """One expression to survey: its Op (the catalog's or declared), its forward in real x and t with the
    options at their defaults, and the targets it is evaluated at."""

    name: str
    op: object
    forward: sp.Expr
    targets: tuple                  # (None,) for an activation
    source: str                     # "catalog" | "declared" | "fuzz"
    options: dict = field(default_factory=dict)  # {symbol: default} substituted in forward

    @property
    def loss(self):
        return self.op.kind == "loss"


X, T = sp.Symbol("x", real=True), sp.Symbol("t", real=True)


def exact(value):
    """A float as the exact binary rational the kernels hold."""
    return sp.Rational(*float(value).as_integer_ratio())


def declared_subjects(names=None):
    """Subjects of DECLARED (those named, if names)."""
    return [declared_subject(name, kind, text, params, targets)
            for name, kind, text, params, targets in DECLARED if not names or name in names]


def declared_subject(name, kind, text, params, targets, op=None, source="declared"):
    """The Subject of one declaration, kind "activation" or "loss" (op: its Op if it is declared already)."""
    from derive.declare import activation, elementwise_loss, parse
    if op is None:
        op = (activation if kind == "activation" else elementwise_loss)(name, text, params=params or None)
    symbols = {p: sp.Symbol(p, real=True) for p in params}
    variables = {"x": X, **({"t": T} if kind == "loss" else {}), **symbols}
    forward = parse(name, text, variables).xreplace({symbols[p]: exact(v) for p, v in params.items()})
    return Subject(name, op, forward, targets or (None,), source)


def element_wise(op):
    """Whether a catalog op is an activation or element-wise loss (derive.ops.Op, no sum over a row)."""
    from derive.ops import Op
    return type(op) is Op and not op.forward.has(sp.Sum) and (op.kind == "layer" or op.granularity == "element")


CATALOG_TARGETS = {"BinaryCrossEntropyWithLogits": (0.0, 0.25, 1.0)}


def catalog_subjects(names=None):
    """Subjects of every element-wise catalog op (those named, if names): x[i] read as x, weights as 1."""
    from derive.catalog import CATALOG
    subjects = []
    for name, op in CATALOG.items():
        if not element_wise(op) or names and name not in names:
            continue
        scalars = {p.symbol: exact(p.default) for p in op.params if p.kind == "scalar"}
        reads = {e: X if e.base.name == "x" else T if e.base.name == "t" else sp.Integer(1)
                 for e in op.forward.atoms(sp.Indexed)}
        forward = op.forward.xreplace(reads).xreplace(scalars)
        targets = CATALOG_TARGETS.get(name, (0.0, 0.5)) if op.kind == "loss" else (None,)
        subjects.append(Subject(name, op, forward, targets, "catalog"))
    return subjects


# ---- the grid -------------------------------------------------------------------------------------

def magnitudes(dtype, quick):
    """Positive magnitudes of dtype: subnormals, a log-spaced grid to the largest number, denser from
    1e-3 to 1e4, and the thresholds where exp, exp(2x), a square and a Gaussian overflow or underflow.
    float64's holds float32's (their truth is computed once) and adds its own beyond float32's range."""
    info = np.finfo(dtype)
    big, tiny = float(info.max), float(info.tiny)
    step, per_decade = (12, 1) if quick else (1, 8)
    low, high = math.floor(math.log10(tiny)), math.floor(math.log10(big))
    found = [float(info.smallest_subnormal), tiny / 1e3, tiny, big]
    found += [10.0 ** k for k in range(low, high + 1, step)]
    for threshold in (math.log(big), math.log(big) / 2, math.log(tiny), math.sqrt(big), math.sqrt(2 * math.log(big))):
        found += [abs(threshold) * (1 + d) for d in ((0.0, 1e-3) if quick else (-1e-3, 0.0, 1e-3))]
    if dtype == np.float64:
        narrow = magnitudes(np.float32, quick).astype(np.float64)
        found = [v for v in found if not narrow[0] <= v <= narrow[-1]] + list(narrow)
    else:
        found += list(np.logspace(-3, 4, 7 * per_decade + 1))
    return np.unique(np.array(found, dtype=np.float64).astype(dtype))


def switches(expr):
    """What changes sign at a kink of expr: the arguments of Abs, sign and steps, differences of Max's and Min's
    arguments, the sides of comparisons."""
    switches = set()
    for node in sp.preorder_traversal(expr):
        if isinstance(node, (sp.Abs, sp.sign, sp.Heaviside)):
            switches.add(node.args[0])
        elif isinstance(node, (sp.Max, sp.Min)):
            switches.update(a - b for a in node.args for b in node.args if a != b)
        elif isinstance(node, sp.core.relational.Relational):
            switches.add(node.lhs - node.rhs)
    return sorted((s for s in switches if s.has(X)), key=sp.default_sort_key)


def kinks(expr, t):
    """Real numbers where a switch of expr changes sign at target t, where it is at most quadratic in x."""
    found = set()
    for switch in switches(expr):
        switch = switch.subs(T, exact(t or 0))
        if switch.free_symbols == {X} and switch.is_polynomial(X) and sp.degree(switch, X) <= 2:
            found.update(float(r) for r in sp.solve(switch, X) if r.is_real)
    return sorted(found)


def grid(subject, dtype, quick):
    """{t: x values} of dtype: 0, +-magnitudes, each kink with its two neighbours either side."""
    positive = magnitudes(dtype, quick)
    points = {}
    derivative = sp.diff(subject.forward, X)
    for t in subject.targets:
        xs = [np.zeros(1, dtype), positive, -positive]
        for kink in kinks(subject.forward + derivative, t):
            at = dtype(kink)
            xs.append(np.array([at, *np.nextafter(at, [-np.inf, np.inf], dtype=dtype)], dtype))
        points[t] = np.unique(np.concatenate(xs))
    return points


# ---- the truth ------------------------------------------------------------------------------------

def _saturated(function, tail):
    """function, but tail(u) for |u| > 1e5, where mpmath's hyperbolic functions and erf allocate a number of
    u's size (tanh(exp(1e38)) runs out of memory) and tail is exact to 40,000 digits."""
    return lambda u: tail(u) if abs(u) > 1e5 else function(u)


def _exp(u):
    """exp(u), as 2^n exp(r) with r = u - n log 2 beyond |u| = 1e4 (mpmath's own takes seconds at 1e38)."""
    if abs(u) < 1e4:
        return mpmath.exp(u)
    with mpmath.extradps(int(mpmath.log10(abs(u))) + 5):
        n = int(mpmath.floor(u / mpmath.ln2))
        return mpmath.ldexp(mpmath.exp(u - n * mpmath.ln2), n)


# lambdify's "mpmath" module with the tails of these functions written out
MPMATH = [{"exp": _exp, "tanh": _saturated(mpmath.tanh, mpmath.sign), "erf": _saturated(mpmath.erf, mpmath.sign),
           "sinh": _saturated(mpmath.sinh, lambda u: mpmath.sign(u) * _exp(abs(u)) / 2),
           "cosh": _saturated(mpmath.cosh, lambda u: _exp(abs(u)) / 2)}, "mpmath"]


class Truth:
    """A quantity of a subject by mpmath, with its partial derivatives for the conditioning allowance."""

    def __init__(self, expr, loss):
        # a delta (the derivative of a step or a sign) is 0 away from its kink, where the contract is checked
        def no_delta(e):
            return e.replace(sp.DiracDelta, lambda *a: sp.S.Zero)
        plain = no_delta(expr.replace(sigmoid, lambda u: 1 / (1 + sp.exp(-u))))
        inputs = (X, T)
        self.value = sp.lambdify(inputs, plain, MPMATH)
        self.partials = [sp.lambdify(inputs, no_delta(sp.diff(plain, v)), MPMATH) for v in ((X, T) if loss else (X,))]

    @staticmethod
    def at(function, x, t):
        """function at (x, t) to 25 digits or more (mpf), or None where it is not a real number."""
        values = []
        large = max(abs(float(x)), abs(float(t or 0))) > TINY_EXP
        for digits in (MORE_DIGITS,) if large else (DIGITS - 10, DIGITS, MORE_DIGITS):
            with mpmath.workdps(digits):
                try:
                    value = function(mpmath.mpf(float(x)), mpmath.mpf(float(t or 0)))
                except (ZeroDivisionError, ValueError, TypeError, OverflowError):
                    return None
                if isinstance(value, mpmath.mpc):
                    if value.imag:
                        return None
                    value = value.real
                value = mpmath.mpf(value)
                # mpmath's exponents have no bound: an infinity is a log of a 0 that a cancellation left
                # (1 - sigmoid(1e38)), or a pole, not an overflow; the truth is then unknown
                if not mpmath.isfinite(value):
                    return None
                values.append(value)
            if len(values) == 2 and values[1] and abs(values[1] - values[0]) <= AGREE * abs(values[1]):
                return values[1]
        return values[-1]


def rounded(value, dtype):
    """An mpf rounded to dtype (inf beyond its largest number)."""
    if mpmath.isinf(value):
        return dtype(math.copysign(math.inf, value))
    with mpmath.workdps(60):
        try:
            as_float = float(value)
        except OverflowError:
            as_float = math.copysign(math.inf, value)
    with np.errstate(over="ignore"):
        return dtype(as_float)


# ---- the kernels ----------------------------------------------------------------------------------

GENERATED = Path(__file__).resolve().parent.parent / "generated"


def rendered(ops, folder):
    """The package of ops rendered into folder (no verification: the survey measures what it prints) and
    imported, its fused kernels interpreted with math as numba compiles it."""
    from codegen.render import render_package
    from codegen.write import stage
    from derive.ops import build_catalog
    staged = stage(render_package(build_catalog(*ops), True), Path(folder))
    return imported(staged)


def imported(folder):
    """The package in folder, its fused kernels interpreted with math as numba compiles it."""
    from codegen.pipeline import interpreted, with_compiled_math
    from codegen.write import import_package
    with interpreted():
        package = import_package(Path(folder), ["fast"])
    with_compiled_math(package.fast)
    return package


def kernel_classes(subject, package):
    """{backend: class} of the subject in package."""
    found = {"numpy": getattr(package, subject.op.name)}
    if hasattr(package.fast, subject.op.name):
        found["fused"] = getattr(package.fast, subject.op.name)
    return found


def run_class(cls, loss, x, t):
    """(forward, backward) of a generated class at x (and target t), upstream gradient 1."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if loss:
            instance = cls(reduction="none")
            y = instance.forward(x.copy(), np.full_like(x, t))
        else:
            instance = cls()
            y = instance.forward(x.copy())
        dx = instance.backward(np.ones_like(x))
    return np.asarray(y, x.dtype), np.asarray(dx, x.dtype)


def torch_function(expr):
    """A function (x, t) of torch tensors evaluating expr as written with torch's functions: the naive form."""
    import torch
    unary = {sp.exp: torch.exp, sp.log: torch.log, sp.tanh: torch.tanh, sp.sinh: torch.sinh, sp.cosh: torch.cosh,
             sp.erf: torch.erf, sp.atan: torch.atan, sp.Abs: torch.abs, sp.sign: torch.sign, sigmoid: torch.sigmoid}

    def build(e):
        if e == X:
            return lambda x, t: x
        if e == T:
            return lambda x, t: t
        if e.is_number:
            value = float(e)
            return lambda x, t: torch.full_like(x, value)
        if isinstance(e, sp.Piecewise):
            pieces = [(build(value), build(condition) if condition is not sp.true else None) for value, condition in e.args]

            def chosen(x, t):
                result = pieces[-1][0](x, t)
                for value, condition in reversed(pieces[:-1]):
                    result = torch.where(condition(x, t), value(x, t), result)
                return result
            return chosen
        args = [build(a) for a in e.args]
        if e.func in unary:
            f, (a,) = unary[e.func], args
            return lambda x, t: f(a(x, t))
        if isinstance(e, sp.Add):
            return lambda x, t: functools.reduce(lambda p, q: p + q, (a(x, t) for a in args))
        if isinstance(e, sp.Mul):
            return lambda x, t: functools.reduce(lambda p, q: p * q, (a(x, t) for a in args))
        if isinstance(e, sp.Pow):
            base, exponent = args[0], float(e.exp) if e.exp.is_number else None
            if exponent == 0.5:
                return lambda x, t: torch.sqrt(base(x, t))
            if exponent is not None and exponent == int(exponent):
                return lambda x, t: base(x, t) ** int(exponent)
            return lambda x, t: base(x, t) ** (exponent if exponent is not None else args[1](x, t))
        if isinstance(e, (sp.Max, sp.Min)):
            f = torch.maximum if isinstance(e, sp.Max) else torch.minimum
            return lambda x, t: functools.reduce(f, (a(x, t) for a in args))
        if isinstance(e, sp.core.relational.Relational):
            import operator
            compare = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}[e.rel_op]
            return lambda x, t: compare(args[0](x, t), args[1](x, t))
        raise NotImplementedError(f"no torch form of {e.func.__name__}: {e}")
    return build(expr)


def run_torch(function, x, t):
    """(forward, backward) of the naive torch form at x (and t), by autograd with upstream gradient 1."""
    import torch
    inputs = torch.tensor(x, requires_grad=True)
    target = torch.full_like(inputs, 0.0 if t is None else t).detach()
    y = function(inputs, target)
    (dx,) = torch.autograd.grad(y, inputs, torch.ones_like(y), allow_unused=True)
    dx = torch.zeros_like(inputs) if dx is None else dx
    return y.detach().numpy().astype(x.dtype), dx.numpy().astype(x.dtype)


# ---- the contract ---------------------------------------------------------------------------------

@dataclass
class Tally:
    """One (subject, backend, dtype, quantity): the counts of the contract and the worst error."""

    cases: int = 0                  # points whose truth is finite and representable
    bad: int = 0                    # of those, inf, NaN or a false 0
    overflow: int = 0               # truth overflows, kernel not the infinity of its sign
    inexact: int = 0                # error beyond the bound plus the conditioning allowance
    worst_ulps: float = 0.0         # the largest error in ulps where both are finite
    worst_excess: float = 0.0       # the largest error over the tolerance (above 1 fails)
    example: str = ""               # the worst failing point

    @property
    def failures(self):
        return self.bad + self.overflow + self.inexact

    def note(self, message, excess):
        if excess > self.worst_excess or not self.example:
            self.example = message


def bound(name, dtype):
    """The ulps subject name's kernels are held to in dtype."""
    entry = BOUNDS.get(name, {})
    return entry.get(dtype.__name__, entry.get("all", (BOUND, "")))[0]


def judge(tally, got, truth, scale, dtype, ulps_bound, where):
    """Add one point to tally: got (dtype) against truth (mpf), scale the conditioning |x dq/dx| + |t dq/dt|."""
    info = np.finfo(dtype)
    expected = rounded(truth, dtype)
    if np.isinf(expected):
        if not (np.isinf(got) and np.sign(got) == np.sign(expected)):
            tally.overflow += 1
            tally.note(f"{where}: {got!r} where the truth overflows ({mpmath.nstr(truth, 5)})", math.inf)
        return
    tally.cases += 1
    if not np.isfinite(got) or (got == 0 and abs(truth) >= info.tiny):
        tally.bad += 1
        tally.example = f"{where}: {got!r}, truth {mpmath.nstr(truth, 8)}"
        tally.worst_excess = math.inf
        return
    with np.errstate(over="ignore"):  # the spacing at the largest number is inf's distance
        ulp = float(np.spacing(np.abs(expected))) if expected else float(info.smallest_subnormal)
    ulp = ulp if math.isfinite(ulp) else float(np.spacing(info.max / 2) * 2)
    with mpmath.workdps(DIGITS):
        error = float(abs(mpmath.mpf(float(got)) - truth))
    ulps = error / ulp
    tally.worst_ulps = max(tally.worst_ulps, ulps)
    # below the smallest normal number a result may be flushed (fastmath, FTZ): tiny is the absolute bound there
    tolerance = ulps_bound * ulp + EPS[dtype] * scale + (float(info.tiny) if abs(truth) < info.tiny else 0.0)
    excess = error / tolerance
    if excess > 1:
        tally.inexact += 1
        tally.note(f"{where}: {got!r}, truth {mpmath.nstr(truth, 10)} ({ulps:.3g} ulps, {excess:.3g} tolerances)",
                   excess)
    tally.worst_excess = max(tally.worst_excess, excess)


class Survey:
    """The tallies of subjects, their truth evaluated once per point and shared by every backend."""

    def __init__(self, subjects, package, quick=False, torch=True, dtypes=DTYPES):
        self.subjects, self.package, self.quick, self.torch, self.dtypes = subjects, package, quick, torch, dtypes

    def run(self):
        """{(subject name, backend, dtype name, quantity): Tally}."""
        tallies = {}
        for subject in self.subjects:
            tallies.update(self.of(subject))
        return tallies

    def of(self, subject):
        derivative = sp.diff(subject.forward, X)
        truths = {"forward": Truth(subject.forward, subject.loss), "backward": Truth(derivative, subject.loss)}
        memo = {}
        switch_values = [sp.lambdify((X, T), s, MPMATH) for s in switches(subject.forward + derivative)]

        def at_kink(x, t):
            with mpmath.workdps(DIGITS):
                return any(Truth.at(f, x, t) == 0 for f in switch_values)

        def truth_at(quantity, x, t):
            key = (quantity, float(x), t)
            if key not in memo:
                truth = truths[quantity]
                value = Truth.at(truth.value, x, t)
                scale = 0.0
                if value is not None and mpmath.isfinite(value):
                    for partial, v in zip(truth.partials, (x, t or 0)):
                        slope = Truth.at(partial, x, t) if v else 0
                        scale += float(abs(mpmath.mpf(float(v)) * slope)) if slope is not None else 0.0
                memo[key] = value, scale
            return memo[key]

        classes = kernel_classes(subject, self.package) if self.package else {}
        naive = torch_function(subject.forward) if self.torch else None
        tallies = {}
        for dtype in self.dtypes:
            for t, xs in grid(subject, dtype, self.quick).items():
                results = {backend: run_class(cls, subject.loss, xs, t) for backend, cls in classes.items()}
                if naive is not None:
                    results["torch"] = run_torch(naive, xs, t)
                for q, quantity in enumerate(QUANTITIES):
                    for k, x in enumerate(xs):
                        if quantity == "backward" and at_kink(x, t):
                            continue  # the derivative at a kink is a convention (ReLU's 0 at 0), not a limit
                        truth, scale = truth_at(quantity, x, t)
                        if truth is None:
                            continue
                        for backend, (forward, backward) in results.items():
                            tally = tallies.setdefault((subject.name, backend, dtype.__name__, quantity), Tally())
                            where = f"x={float(x)!r}" + (f", t={t!r}" if subject.loss else "")
                            judge(tally, (forward, backward)[q][k], truth, scale, dtype, bound(subject.name, dtype),
                                  where)
        return tallies


# ---- the command ----------------------------------------------------------------------------------

def counts(tallies, backends=("numpy", "fused")):
    """(cases, failing) over the tallies of backends: points and points that break the contract."""
    chosen = [tally for key, tally in tallies.items() if key[1] in backends]
    return sum(t.cases for t in chosen), sum(t.failures for t in chosen)


def table(tallies):
    """One line per subject and backend: failures by dtype and quantity, worst ulps."""
    rows = {}
    for (name, backend, dtype, quantity), tally in tallies.items():
        rows.setdefault((name, backend), {})[(dtype, quantity)] = tally
    header = f"{'subject':<34}{'backend':<8}" + "".join(
        f"{d[5:]}/{q[:3]:<10}" for d in ("float32", "float64") for q in QUANTITIES) + "  worst ulps (f32, f64)"
    lines = [header, "  (bad+overflow+inexact failures of finite-truth points / the points)"]
    for (name, backend), cells in rows.items():
        text = "".join(f"{(f'{c.failures}/{c.cases}' if c else '-'):<13}"
                       for c in (cells.get((d, q)) for d in ("float32", "float64") for q in QUANTITIES))
        worst = [max((c.worst_ulps for (d, _), c in cells.items() if d == dtype), default=0.0)
                 for dtype in ("float32", "float64")]
        lines.append(f"{name:<34}{backend:<8}{text}  {worst[0]:.3g}, {worst[1]:.3g}")
    for backends in (("numpy", "fused"), ("torch",)):
        cases, failing = counts(tallies, backends)
        lines.append(f"{' and '.join(backends)}: {failing} of {cases} points break the contract")
    return "\n".join(lines)


def survey(names=None, quick=False, torch=True):
    """{(subject, backend, dtype, quantity): Tally} of the catalog's element-wise ops and DECLARED."""
    catalog = catalog_subjects(names)
    declared = declared_subjects(names)
    tallies = {}
    if catalog:
        tallies.update(Survey([replace_name(s, "catalog") for s in catalog], imported(GENERATED),
                              quick, torch).run())
    if declared:
        with tempfile.TemporaryDirectory(prefix="symgrad-accuracy-") as folder:
            package = rendered([s.op for s in declared], folder)
            tallies.update(Survey(declared, package, quick, torch).run())
    return tallies


def replace_name(subject, prefix):
    """subject named prefix:name in the report (a declared subject may share a catalog name)."""
    from dataclasses import replace
    return replace(subject, name=f"{prefix}:{subject.name}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="The accuracy survey of issue 23: kernels against mpmath.")
    parser.add_argument("--report", help="write every tally as JSON here")
    parser.add_argument("--only", help="comma-separated subject names (catalog or declared)")
    parser.add_argument("--quick", action="store_true", help="the sparser grid tests/test_accuracy.py uses")
    parser.add_argument("--no-torch", action="store_true", help="leave out the naive PyTorch forms")
    args = parser.parse_args(argv)
    names = set(args.only.split(",")) if args.only else None
    tallies = survey(names, args.quick, not args.no_torch)
    print(table(tallies))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(
            [dict(subject=k[0], backend=k[1], dtype=k[2], quantity=k[3], **vars(v)) for k, v in tallies.items()],
            indent=1))
        print(f"report written in {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
