"""Issue 23's accuracy survey: generated kernels against mpmath across the whole range of float32 and float64.

make codegen prints each class's worst error in ulps (figures); tests/accuracy.py holds the element-wise
catalog and a list of declared expressions to the contract below, beside their naive PyTorch forms.

A subject is an operation at its default options as SymPy expressions of one point: an element-wise op's value
in x (and t), a row op's outputs of a row x0, x1, x2 (and t0, t1, t2, one-hot for a label), the backward the
gradient of sum(g * outputs) with g = ROW_UPSTREAM for a row layer, 1 otherwise. The grid, per dtype: 0,
subnormals, log-spaced magnitudes to the largest number (denser from 1e-3 to 1e4), the thresholds where exp,
exp(2x), a square or a Gaussian overflow, both signs; an element-wise op also at its kinks, a row op at each
of them times ROW. The truth is SymPy's expression (sympy.diff for the backward) by sympy.lambdify(...,
"mpmath") at 50 digits, and at 400 where a cancellation leaves fewer than 25 of them (1 - tanh(300)^2 is 0 at
50 digits) or an input is beyond 100 (log(1 + exp(-133)) is 0 at 40 and 50 digits alike).

The contract, per quantity (forward, backward) and point:
  bad       the truth is finite and representable, the kernel gives inf, NaN or 0 (a false 0: the
            truth is at least the smallest normal number)
  overflow  the truth overflows, the kernel does not give the infinity of its sign (NaN, say)
  inexact   the error exceeds BOUND ulps (of the truth, rounded to the dtype) plus the conditioning
            allowance eps sum_v |v dq/dv| over the inputs and real targets: what rounding them by one
            machine epsilon would change the exact value by (large only near a zero of q or where q is
            steep), plus the smallest normal number where the truth is below it (a kernel may flush
            subnormals, as fastmath does). Elsewhere the bound is the whole tolerance: 8 ulps is at most
            9.5e-7 relative in float32 and 1.8e-15 in float64, within issue 23's 1e-6 and 1e-12.
The figure (Tally.worst_ulps): the largest error in ulps where the truth is a normal number, inf where a
kernel breaks the contract with NaN or an infinity."""
import functools
import math
import warnings
from dataclasses import dataclass

import mpmath
import numpy as np
import sympy as sp

from derive.functions import sigmoid

DIGITS, MORE_DIGITS = 50, 400       # 400: float64's 324 decades of subnormals and 50 digits more
AGREE = 1e-25                       # 50-digit and 40-digit values this close: no cancellation ate them
TINY_EXP = 100                      # beyond, exp(-|x|) < 1e-43 is lost beside 1 at 40 and 50 digits alike
                                    # (log(1 + exp(-133)) is 0 at both): the truth there is taken at 400 alone
BOUND = 8                           # ulps, the default; BOUNDS below raises it where it is not reachable
BOUNDS = {}                         # {subject: {"all" or dtype name: (ulps, why)}}: none needed so far
EPS = {np.float32: 2.0 ** -23, np.float64: 2.0 ** -52}
DTYPES = (np.float32, np.float64)
QUANTITIES = ("forward", "backward")

X, T = sp.Symbol("x", real=True), sp.Symbol("t", real=True)
# a row op's point: a row of three entries, each magnitude of the grid times ROW (the largest entry first, a
# second 0 and a third of the other sign); a row layer's upstream gradient; a loss's dense target row, labels
ROW, ROW_UPSTREAM, DENSE_ROW, LABELS = (1.0, 0.0, -0.5), (1.0, -2.0, 0.5), (0.25, 0.5, 0.25), (0, 2)
ROW_X, ROW_T = (sp.symbols(f"{name}0:{len(ROW)}", real=True) for name in "xt")
# an element-wise loss's targets, by default and where an op's are others
LOSS_TARGETS, CATALOG_TARGETS = (0.0, 0.5), {"BinaryCrossEntropyWithLogits": (0.0, 0.25, 1.0)}
INDEX_NOTATION = "index notation: its steps have no mpmath truth yet (its finite differences stand)"


@dataclass(frozen=True)
class Subject:
    """One operation to survey: SymPy expressions of one point's outputs (forward) in inputs and target, at the
    targets it is evaluated at; backward, the gradient of sum(upstream * forward) in inputs."""

    name: str
    op: object
    forward: tuple                  # (y,) of an element-wise op; a row layer's outputs; a loss's (L,)
    targets: tuple                  # (None,) for a layer; numbers, rows or integer labels for a loss
    source: str                     # "catalog" | "declared" | "fuzz"
    inputs: tuple = (X,)            # one point's entries
    target: tuple = ()              # a loss's target symbols: (T,), or a row's (a label's one-hot row)
    upstream: tuple = (1,)

    @property
    def loss(self):
        return self.op.kind == "loss"

    @functools.cached_property
    def backward(self):
        objective = sum(g * y for g, y in zip(self.upstream, self.forward))
        return tuple(sp.diff(objective, v) for v in self.inputs)

    def variables(self, target):
        """The truth's arguments after a point's entries: the target's values (a label's one-hot row)."""
        if target is None:
            return ()
        if isinstance(target, int):
            return tuple(float(k == target) for k in range(len(self.target)))
        return tuple(target) if isinstance(target, tuple) else (target,)


def exact(value):
    """A float as the exact binary rational the kernels hold."""
    return sp.Rational(*float(value).as_integer_ratio())


def element_wise(op):
    """Whether op is an activation or element-wise loss (derive.ops.Op, no sum over a row)."""
    from derive.ops import Op
    return type(op) is Op and not op.forward.has(sp.Sum) and (op.kind == "layer" or op.granularity == "element")


def subject(op, source="catalog"):
    """The Subject of op at its default options (weights 1, no label ignored), or why it has none."""
    from derive.gradients import neutralize
    from derive.ops import Op
    from derive.symbols import i
    if type(op) is not Op:
        return INDEX_NOTATION
    values = {p.symbol: exact(p.default) if p.kind == "scalar" else sp.S(p.default) if p.kind == "flag" else p.neutral
              for p in op.params}
    if any(value is None for value in values.values()):
        return "an option without a default"
    expr = neutralize(op.forward, values)
    if element_wise(op):
        reads = {e: {"x": X, "t": T}.get(e.base.name, sp.Integer(1)) for e in expr.atoms(sp.Indexed)}
        targets = CATALOG_TARGETS.get(op.name, LOSS_TARGETS) if op.kind == "loss" else (None,)
        return Subject(op.name, op, (expr.xreplace(reads),), targets, source, target=(T,) if op.kind == "loss" else ())
    if op.kind == "layer":
        return Subject(op.name, op, tuple(in_row(expr.subs(i, k)) for k in range(len(ROW))), (None,), source, ROW_X,
                       (), ROW_UPSTREAM)
    targets = ((DENSE_ROW,) if "dense" in op.targets else ()) + (LABELS if "labels" in op.targets else ())
    return Subject(op.name, op, (in_row(expr),), targets, source, ROW_X, ROW_T)


def in_row(expr):
    """A row op's expression over the row ROW_X: its sums written out, x[k] and t[k] read from ROW_X and
    ROW_T, the label c's x[c] and delta(k, c) from the one-hot target ROW_T."""
    from derive.symbols import K

    def label(index):
        return getattr(index, "name", None) == "c"

    def read(e):
        (index,), name = e.indices, e.base.name
        if name == "x" and label(index):
            return sum(t * x for t, x in zip(ROW_T, ROW_X))
        return {"x": ROW_X, "t": ROW_T}[name][index] if name in ("x", "t") else sp.Integer(1)
    expr = expr.subs(K, len(ROW)).replace(lambda e: isinstance(e, sp.Sum), lambda s: sp.Add(*(
        s.function.subs(s.limits[0][0], k) for k in range(s.limits[0][1], s.limits[0][2] + 1))))
    expr = expr.replace(sp.KroneckerDelta, lambda a, b: ROW_T[a] if label(b) else ROW_T[b] if label(a) else
                        sp.KroneckerDelta(a, b))
    return expr.xreplace({e: read(e) for e in expr.atoms(sp.Indexed)})


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


def switches(expr, inputs=(X,)):
    """What changes sign at a kink of expr and reads an input: the arguments of Abs, sign and steps,
    differences of Max's and Min's arguments, the sides of comparisons."""
    switches = set()
    for node in sp.preorder_traversal(expr):
        if isinstance(node, (sp.Abs, sp.sign, sp.Heaviside)):
            switches.add(node.args[0])
        elif isinstance(node, (sp.Max, sp.Min)):
            switches.update(a - b for a in node.args for b in node.args if a != b)
        elif isinstance(node, sp.core.relational.Relational):
            switches.add(node.lhs - node.rhs)
    return sorted((s for s in switches if s.free_symbols & set(inputs)), key=sp.default_sort_key)


def kinks(expr, t):
    """Real numbers where a switch of expr (in x) changes sign at target t, where it is at most quadratic in x."""
    found = set()
    for switch in switches(expr):
        switch = switch.subs(T, exact(t or 0))
        if switch.free_symbols == {X} and switch.is_polynomial(X) and sp.degree(switch, X) <= 2:
            found.update(float(r) for r in sp.solve(switch, X) if r.is_real)
    return sorted(found)


def grid(subject, dtype, quick):
    """{target: points (n, entries) of dtype}: 0 and +-magnitudes, an element-wise op's kinks with their two
    neighbours either side, a row op's each times ROW."""
    positive = magnitudes(dtype, quick)
    xs = [np.zeros(1, dtype), positive, -positive]
    if len(subject.inputs) > 1:
        rows = np.unique((np.concatenate(xs)[:, None] * np.array(ROW)).astype(dtype), axis=0)
        return {t: rows for t in subject.targets}
    points = {}
    for t in subject.targets:
        near = []
        for kink in kinks(sum(subject.forward + subject.backward), t):
            at = dtype(kink)
            near.append(np.array([at, *np.nextafter(at, [-np.inf, np.inf], dtype=dtype)], dtype))
        points[t] = np.unique(np.concatenate(xs + near))[:, None]
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


def _no_delta(expr):
    """expr with each delta (the derivative of a step or a sign) 0: the contract is checked away from kinks."""
    return expr.replace(sp.DiracDelta, lambda *a: sp.S.Zero)


class Truth:
    """Expressions by mpmath, one function of variables computing their common subexpressions once, and the
    partial derivatives of each for the conditioning allowance (lambdified the first time they are needed)."""

    def __init__(self, exprs, variables):
        self.plain = [_no_delta(e.replace(sigmoid, lambda u: 1 / (1 + sp.exp(-u)))) for e in exprs]
        self.variables, self.partials = variables, {}
        self.values = sp.lambdify(variables, self.plain, MPMATH, cse=True)

    @functools.cached_property
    def each(self):
        """One function per expression: where one raises (1/0), the others still have a value."""
        return [sp.lambdify(self.variables, e, MPMATH) for e in self.plain]

    def at(self, args):
        """[value at args to 25 digits or more (mpf), or None where it is not a real number] of each expression."""
        found = evaluated(self.values, args)
        return found if found is not None else [value for f in self.each for value in evaluated(f, args) or [None]]

    def scale(self, entry, args, counted):
        """sum |v dq/dv| of expression entry at args over its first counted variables (the inputs, and a target
        that is a number)."""
        if entry not in self.partials:
            self.partials[entry] = sp.lambdify(self.variables, [_no_delta(sp.diff(self.plain[entry], v))
                                                                for v in self.variables], MPMATH, cse=True)
        slopes = evaluated(self.partials[entry], args) or [None] * len(args)
        return sum(float(abs(mpmath.mpf(float(v)) * slope)) for v, slope in zip(args[:counted], slopes)
                   if v and slope is not None)


def evaluated(function, args):
    """[value, ...] of function (of one expression or a list of them) at args, each to 25 digits or more (mpf),
    None where it is not a real number; None where the function raises."""
    levels = []                     # each precision's values, None once an entry is not a real number
    large = max((abs(float(v)) for v in args), default=0.0) > TINY_EXP
    for digits in (MORE_DIGITS,) if large else (DIGITS - 10, DIGITS, MORE_DIGITS):
        with mpmath.workdps(digits):
            try:
                values = function(*(mpmath.mpf(float(v)) for v in args))
            except (ZeroDivisionError, ValueError, TypeError, OverflowError):
                return None
            values = [real(value) for value in (values if isinstance(values, list) else [values])]
        # mpmath's exponents have no bound: an infinity is a log of a 0 that a cancellation left
        # (1 - sigmoid(1e38)), or a pole, not an overflow; the truth is then unknown at every precision
        levels.append(values if not levels else [v if f is not None else None for f, v in zip(levels[-1], values)])
        if digits == DIGITS and all(v is None or v and abs(v - f) <= AGREE * abs(v) for f, v in zip(*levels)):
            return levels[-1]
    return levels[-1]


def real(value):
    """value (mpf or mpc) as a finite mpf, or None."""
    if isinstance(value, mpmath.mpc):
        if value.imag:
            return None
        value = value.real
    value = mpmath.mpf(value)
    return value if mpmath.isfinite(value) else None


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

def kernel_classes(subject, package):
    """{backend: class} of the subject in package: "numpy", and "fused" where package.fast has it."""
    found = {"numpy": getattr(package, subject.op.name)}
    if hasattr(getattr(package, "fast", None), subject.op.name):
        found["fused"] = getattr(package.fast, subject.op.name)
    return found


def target_array(target, x):
    """A loss's target for input x (n,) or (n, K): t everywhere, a target row in each row, or each row's label."""
    if isinstance(target, int):
        return np.full(len(x), target)
    return np.broadcast_to(np.asarray(target, x.dtype), x.shape).copy()


def run_class(cls, subject, points, target):
    """(forward, backward) of a generated class at points (n, entries) and target, each (n, outputs or entries)."""
    x = points[:, 0].copy() if points.shape[1] == 1 else points.copy()
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if subject.loss:
            instance = cls(reduction="none")
            y = instance.forward(x, target_array(target, x))
            dx = instance.backward(np.ones(len(x), x.dtype))
        else:
            instance = cls()
            y = instance.forward(x)
            dx = instance.backward(np.broadcast_to(np.asarray(subject.upstream, x.dtype), x.shape).copy())
    return np.asarray(y, x.dtype).reshape(len(x), -1), np.asarray(dx, x.dtype).reshape(len(x), -1)


# ---- the contract ---------------------------------------------------------------------------------

@dataclass
class Tally:
    """One (subject, backend, dtype, quantity): the counts of the contract and the worst error."""

    cases: int = 0                  # points whose truth is finite and representable
    bad: int = 0                    # of those, inf, NaN or a false 0
    overflow: int = 0               # truth overflows, kernel not the infinity of its sign
    inexact: int = 0                # error beyond the bound plus the conditioning allowance
    worst_ulps: float = 0.0         # the largest error in ulps where the truth is normal; inf: NaN or inf
    worst_excess: float = 0.0       # the largest error over the tolerance (above 1 fails; below, over the
                                    # bound alone: the allowance is computed only where the bound is passed)
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
    """Add one point to tally: got (dtype) against truth (mpf); scale() the conditioning sum |v dq/dv| (None: no
    inexact verdict, the figure alone)."""
    info = np.finfo(dtype)
    expected = rounded(truth, dtype)
    if np.isinf(expected):
        if not (np.isinf(got) and np.sign(got) == np.sign(expected)):
            tally.overflow += 1
            tally.worst_ulps = math.inf
            tally.note(f"{where}: {got!r} where the truth overflows ({mpmath.nstr(truth, 5)})", math.inf)
        return
    tally.cases += 1
    normal = abs(truth) >= info.tiny
    if not np.isfinite(got):
        tally.bad, tally.worst_ulps, tally.worst_excess = tally.bad + 1, math.inf, math.inf
        tally.example = f"{where}: {got!r}, truth {mpmath.nstr(truth, 8)}"
        return
    with np.errstate(over="ignore"):  # the spacing at the largest number is inf's distance
        ulp = float(np.spacing(np.abs(expected))) if expected else float(info.smallest_subnormal)
    ulp = ulp if math.isfinite(ulp) else float(np.spacing(info.max / 2) * 2)
    with mpmath.workdps(DIGITS):
        error = float(abs(mpmath.mpf(float(got)) - truth))
    ulps = error / ulp
    if normal:  # below the smallest normal number a result may be flushed (fastmath, FTZ)
        tally.worst_ulps = max(tally.worst_ulps, ulps)
    if got == 0 and normal:
        tally.bad, tally.worst_excess = tally.bad + 1, math.inf
        tally.example = f"{where}: {got!r}, truth {mpmath.nstr(truth, 8)}"
        return
    allowed = ulps_bound * ulp + (0.0 if normal else float(info.tiny))
    if scale is None:  # the figures alone
        return
    if error <= allowed:
        tally.worst_excess = max(tally.worst_excess, error / allowed)
        return
    excess = error / (allowed + EPS[dtype] * scale())
    if excess > 1:
        tally.inexact += 1
        tally.note(f"{where}: {got!r}, truth {mpmath.nstr(truth, 10)} ({ulps:.3g} ulps, {excess:.3g} tolerances)",
                   excess)
    tally.worst_excess = max(tally.worst_excess, excess)


class Survey:
    """The tallies of subjects' classes in package, the truth evaluated once per point and shared by every
    backend (runners: more backends than the package's classes)."""

    def __init__(self, subjects, package, quick=False, dtypes=DTYPES, verdict=True):
        self.subjects, self.package, self.quick, self.dtypes = subjects, package, quick, dtypes
        self.verdict = verdict      # False: worst_ulps alone, no conditioning allowance (inexact is not counted)

    def run(self):
        """{(subject name, backend, dtype name, quantity): Tally}."""
        tallies = {}
        for subject in self.subjects:
            tallies.update(self.of(subject))
        return tallies

    def runners(self, subject):
        """{backend: function(points, target) -> (forward, backward)} of subject."""
        classes = kernel_classes(subject, self.package) if self.package else {}
        return {backend: functools.partial(run_class, cls, subject) for backend, cls in classes.items()}

    def of(self, subject):
        variables = (*subject.inputs, *subject.target)
        truth = Truth(subject.forward + subject.backward, variables)
        entries = {"forward": range(len(subject.forward)),
                   "backward": range(len(subject.forward), len(subject.forward) + len(subject.backward))}
        kinked = switches(sum(subject.forward + subject.backward), subject.inputs)
        switch_values = sp.lambdify(variables, kinked, MPMATH) if kinked else None
        memo = {}

        def at(args):
            key = tuple(float(v) for v in args)
            if key not in memo:
                with mpmath.workdps(DIGITS):  # the derivative at a kink is a convention (ReLU's 0 at 0), not a limit
                    kink = switch_values is not None and 0 in (evaluated(switch_values, args) or [])
                memo[key] = truth.at(args), kink
            return memo[key]

        runners = self.runners(subject)
        tallies = {}
        for dtype in self.dtypes:
            for target, points in grid(subject, dtype, self.quick).items():
                given = subject.variables(target)
                # a label is exact: only a target that is a number is rounded like the inputs
                counted = len(subject.inputs) + (0 if isinstance(target, int) else len(given))
                results = {backend: run(points, target) for backend, run in runners.items()}
                for k, point in enumerate(points):
                    args = (*point, *given)
                    values, kink = at(args)
                    for q, quantity in enumerate(QUANTITIES):
                        for column, entry in enumerate(entries[quantity]):
                            if values[entry] is None or quantity == "backward" and kink:
                                continue
                            where = f"x={where_text(point)}" + (f", t={target!r}" if subject.loss else "") + (
                                f" [{column}]" if len(entries[quantity]) > 1 else "")
                            scale = functools.partial(truth.scale, entry, args, counted) if self.verdict else None
                            for backend, outputs in results.items():
                                tally = tallies.setdefault((subject.name, backend, dtype.__name__, quantity), Tally())
                                judge(tally, outputs[q][k, column], values[entry], scale, dtype,
                                      bound(subject.name, dtype), where)
        return tallies


def where_text(point):
    """A point as the report names it: x's value, or its row."""
    return repr(float(point[0])) if len(point) == 1 else f"({', '.join(repr(float(v)) for v in point)})"


# ---- make codegen's figures -------------------------------------------------------------------------

def figures(op, package, quick=True):
    """{backend: (float32 forward, float32 backward, float64 forward, float64 backward)} of op's classes in
    package, each the worst error in ulps over the quick grid (None: no point with a finite truth), or the
    reason op has none."""
    found = subject(op)
    if isinstance(found, str):
        return found
    survey = Survey([found], package, quick, verdict=False)
    tallies = survey.run()
    return {backend: tuple(tallies[key].worst_ulps if (key := (op.name, backend, dtype.__name__, quantity)) in tallies
                           else None for dtype in DTYPES for quantity in QUANTITIES)
            for backend in survey.runners(found)}
