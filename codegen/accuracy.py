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
kernel breaks the contract with NaN or an infinity.

A row op's point is judged as an index-notation op's entry (judge_scaled, below), its scale counting the row, a
dense target and a row layer's upstream gradient (ROW_G): a false 0 is no verdict of its own there, but it is far
from a truth whose scale is of the truth's own size (a well-conditioned one), and so fails.

An index-notation op (TensorSubject) is surveyed at small sizes (check_sizes from 2 to 3), on samples whose
inputs hold the grid's magnitudes, every S-th from the j-th, with random signs and one 0 (each row spans tiny to
large); params from the op's domain, g from (-1, 1). The truth is its declared steps and the derivation its
kernels are printed from (derive.tensor.derivation), each entry by mpmath (lambdify per step), at 400 digits
where an input exceeds TINY_EXP or 40 and 50 disagree. Its contract is the element-wise one's, error <= BOUND
ulps + eps kappa, kappa = sum_v |v dq/dv| over every real input entry (inputs, params, g: by differences at 50
digits, computed only where the error exceeds BOUND ulps of the truth), which is what the small entries of its
outputs need, often a cancellation; its figure counts an entry's error in units u = ulp(truth) + eps kappa / BOUND
(ulps of the truth where within BOUND), so that it is at most BOUND exactly where the contract holds."""
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
ROW_X, ROW_T, ROW_G = (sp.symbols(f"{name}0:{len(ROW)}", real=True) for name in "xtg")
# an element-wise loss's targets, by default and where an op's are others
LOSS_TARGETS, CATALOG_TARGETS = (0.0, 0.5), {"BinaryCrossEntropyWithLogits": (0.0, 0.25, 1.0)}
SEED = 0                            # an index-notation op's samples: params, signs, order, labels, noise
SCALE_DIGITS = 20                   # an entry's scale by differences at v (1 + 10^-20), at the truth's precision


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

    @property
    def row(self):
        """Whether a point is a row (a row op's), judged in units of its scale (judge_scaled)."""
        return len(self.inputs) > 1

    @property
    def gradient(self):
        """The upstream gradient's symbols, a row layer's (ROW_G, whose rounding its scale counts), else ()."""
        return ROW_G[:len(self.upstream)] if self.row and len(self.upstream) > 1 else ()

    @functools.cached_property
    def backward(self):
        objective = sum(g * y for g, y in zip(self.gradient or self.upstream, self.forward))
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
    """The Subject of op at its default options (weights 1, no label ignored), or why it has none; a
    TensorSubject of an op in index notation."""
    from derive.gradients import neutralize
    from derive.ops import Op
    from derive.symbols import i
    if type(op) is not Op:
        return tensor_subject(op)
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
    if subject.row:
        rows = np.unique((np.concatenate(xs)[:, None] * np.array(ROW)).astype(dtype), axis=0)
        return {t: rows for t in subject.targets}
    points = {}
    for t in subject.targets:
        near = []
        for kink in kinks(sum(subject.forward + subject.backward), t):
            at = dtype(kink)
            near.append(np.array([at, *np.nextafter(at, [-np.inf, np.inf], dtype=dtype)], dtype))
        for zero in zeros(subject, t):
            at = dtype(zero)
            near.append(np.array([at, *np.nextafter(at, [-np.inf, np.inf], dtype=dtype),
                                  *(zero + np.array(around_zeros(quick))).astype(dtype)], dtype))
        points[t] = np.unique(np.concatenate(xs + near))[:, None]
    return points


# distances from a zero of a quantity at which the grid also looks: where a sum that vanishes there loses most
# (its terms' rounding in ulps of the value grows as 1/distance), out to where such a form is accurate again
def around_zeros(quick):
    """Distances from a zero, either side: 12 from 1e-4 to 0.7 on the quick grid, 24 on the full one."""
    return tuple(sign * float(d) for d in (2.0 ** -30, 1e-6, *np.geomspace(1e-4, 0.7, 12 if quick else 24))
                 for sign in (-1, 1))


def zeros(subject, t):
    """The real zeros in [-64, 64] of an element-wise subject's forward and derivative at target t (a loss's at each
    of its targets, an op with options at their values), where each changes sign or touches 0 (derive.zeros' scan
    and bisection, 60 digits)."""
    return [] if subject.row else zeros_of(subject.forward + subject.backward, t)


@functools.lru_cache(maxsize=512)   # each dtype's grid asks again
def zeros_of(exprs, t):
    """The real zeros of exprs (in X, and T at t) where one changes sign (real_zeros) or touches 0 without changing
    sign (even_zeros: Welsch's loss 1 - exp(-(x - t)^2/2) at x = t), each once. An even zero of an expression whose
    derivative is among exprs (a forward's) is a sign change of that derivative: its own scan is left out."""
    from derive.zeros import even_zeros, mpmath_function, real_zeros
    exprs = [_no_delta(expr.subs(T, exact(t or 0))) for expr in exprs]
    found = []
    for expr in exprs:
        if expr.free_symbols != {X}:
            continue
        terms = [mpmath_function(term, X) for term in sp.Add.make_args(sp.expand(expr))]
        f = mpmath_function(expr, X)
        found += real_zeros(expr, X, f, terms)
        found += [] if _no_delta(sp.diff(expr, X)) in exprs else even_zeros(expr, X, f, terms)
    return sorted({float(zero) for zero in found})


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
        """sum |v dq/dv| of expression entry at args over the variables whose positions counted holds (the inputs,
        a target that is a number, a row layer's upstream gradient)."""
        if entry not in self.partials:
            self.partials[entry] = sp.lambdify(self.variables, [_no_delta(sp.diff(self.plain[entry], v))
                                                                for v in self.variables], MPMATH, cse=True)
        slopes = evaluated(self.partials[entry], args) or [None] * len(args)
        return sum(float(abs(mpmath.mpf(float(args[k])) * slopes[k])) for k in counted
                   if args[k] and slopes[k] is not None)


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
    unsettled: int = 0              # entries whose truth no precision settles (settled_values): no verdict

    @property
    def failures(self):
        return self.bad + self.overflow + self.inexact

    def add(self, other):
        """Add other's counts to this tally, its example where it is the worse."""
        if other.worst_excess > self.worst_excess and other.example or not self.example:
            self.example = other.example
        for count in ("cases", "bad", "overflow", "inexact", "unsettled"):
            setattr(self, count, getattr(self, count) + getattr(other, count))
        self.worst_ulps, self.worst_excess = (max(self.worst_ulps, other.worst_ulps),
                                              max(self.worst_excess, other.worst_excess))

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
    if not finite_verdict(tally, got, truth, dtype, where):
        return
    info = np.finfo(dtype)
    normal = abs(truth) >= info.tiny
    ulp = unit_in_last_place(rounded(truth, dtype), dtype)
    with mpmath.workdps(DIGITS):
        error = float(abs(mpmath.mpf(float(got)) - truth))
    ulps = error / ulp
    if normal:  # below the smallest normal number a result may be flushed (fastmath, FTZ)
        tally.worst_ulps = max(tally.worst_ulps, ulps)
    allowed = ulps_bound * ulp + (0.0 if normal else float(info.tiny))
    # a false 0 where the truth is normal is every bit wrong (an underflow: 1 - tanh(20)^2), unless the truth is
    # within what rounding the inputs changes it by (at a zero of the function: sigmoid(x) - 1/4 at x = -log 3
    # rounded to float32, whose sigmoid rounds to 1/4 exactly), where 0 is as good an answer as any
    if got == 0 and normal and (scale is None or error > allowed + EPS[dtype] * scale()):
        tally.bad, tally.worst_excess = tally.bad + 1, math.inf
        tally.example = f"{where}: {got!r}, truth {mpmath.nstr(truth, 8)}"
        return
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


def finite_verdict(tally, got, truth, dtype, where):
    """Count a point whose truth overflows (got must be the infinity of its sign) or whose kernel gives NaN or an
    infinity where the truth is finite; True where both are finite, for the error to be judged."""
    expected = rounded(truth, dtype)
    if np.isinf(expected):
        if not (np.isinf(got) and np.sign(got) == np.sign(expected)):
            tally.overflow += 1
            tally.worst_ulps = math.inf
            tally.note(f"{where}: {got!r} where the truth overflows ({mpmath.nstr(truth, 5)})", math.inf)
        return False
    tally.cases += 1
    if not np.isfinite(got):
        tally.bad, tally.worst_ulps, tally.worst_excess = tally.bad + 1, math.inf, math.inf
        tally.example = f"{where}: {got!r}, truth {mpmath.nstr(truth, 8)}"
        return False
    return True


def unit_in_last_place(expected, dtype):
    """The spacing of dtype at expected (a float of dtype): the smallest subnormal at 0, and at the largest number
    the spacing below it."""
    info = np.finfo(dtype)
    with np.errstate(over="ignore"):  # the spacing at the largest number is inf's distance
        ulp = float(np.spacing(np.abs(expected))) if expected else float(info.smallest_subnormal)
    return ulp if math.isfinite(ulp) else float(np.spacing(info.max / 2) * 2)


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
        """{backend: function(points, target) -> (forward, backward)} of subject (of an index-notation subject,
        function(arrays) -> {(quantity, output name): array})."""
        classes = kernel_classes(subject, self.package) if self.package else {}
        if isinstance(subject, TensorSubject):
            return {backend: functools.partial(run_tensor_class, cls, subject) for backend, cls in classes.items()}
        return {backend: functools.partial(run_class, cls, subject) for backend, cls in classes.items()}

    def of(self, subject):
        if isinstance(subject, TensorSubject):
            return self.of_tensor(subject)
        variables = (*subject.inputs, *subject.target, *subject.gradient)
        upstream = tuple(subject.upstream) if subject.gradient else ()
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
                given = (*subject.variables(target), *upstream)
                # a label is exact: only a target that is a number is rounded like the inputs
                targets = len(given) - len(upstream)
                counted = [*range(len(subject.inputs)),
                           *range(len(subject.inputs) + targets * isinstance(target, int), len(variables))]
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
                            # a row in units of its scale, figures too, as an index-notation op's
                            scale = (functools.partial(truth.scale, entry, args, counted)
                                     if self.verdict or subject.row else None)
                            for backend, outputs in results.items():
                                tally = tallies.setdefault((subject.name, backend, dtype.__name__, quantity), Tally())
                                (judge_scaled if subject.row else judge)(
                                    tally, outputs[q][k, column], values[entry], scale, dtype,
                                    bound(subject.name, dtype), where)
        return tallies


    def of_tensor(self, subject):
        """The tallies of an index-notation subject: every entry of its output and gradients at each sample,
        judged in units of its scale (judge_scaled); an entry whose truth no precision settles (settled_values)
        is counted apart (Tally.unsettled), with no verdict."""
        runners, tallies = self.runners(subject), {}
        for dtype in self.dtypes:
            options = tensor_options(subject, dtype)
            for k, arrays in enumerate(tensor_samples(subject, dtype, self.quick, self.package)):
                truth = TensorTruth(subject, arrays, options)
                for backend, run in runners.items():
                    outputs = run(arrays)
                    for quantity in QUANTITIES:
                        judged(tallies.setdefault((subject.name, backend, dtype.__name__, quantity), Tally()),
                               outputs, truth, dtype, bound(subject.name, dtype), f"sample {k}, ", quantity)
        return tallies


def judged(tally, outputs, truth, dtype, ulps_bound, where="", quantity=None):
    """tally with every entry of outputs (run_tensor_class's) judged against truth (judge_entry), those of one
    quantity (forward, backward) where given; where prefixes each entry's name in the report."""
    for (kind, name), values in truth.values.items():
        if quantity in (None, kind):
            for at in np.ndindex(values.shape):
                judge_entry(tally, np.asarray(outputs[(kind, name)])[at], truth, (kind, name), at, dtype, ulps_bound,
                            f"{where}{name}{list(at)}")
    return tally


def judge_entry(tally, got, truth, key, at, dtype, ulps_bound, where):
    """judge_scaled got against truth's entry key[at] (a TensorTruth), or count it unsettled."""
    value = truth.values[key][at]
    if value is UNSETTLED:
        tally.unsettled += 1
    elif value is not None:
        judge_scaled(tally, got, value, functools.partial(truth.scale, key, at), dtype, ulps_bound, where)


def where_text(point):
    """A point as the report names it: x's value, or its row."""
    return repr(float(point[0])) if len(point) == 1 else f"({', '.join(repr(float(v)) for v in point)})"


# ---- make codegen's figures -------------------------------------------------------------------------

# ---- index notation -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSubject:
    """An index-notation op (derive.tensor.TensorOp, its flags at their defaults) at small sizes: its forward the
    declared steps, its backward the derivation's gradient programs, both the SymPy results its kernels print."""

    name: str
    op: object
    sizes: dict                     # {size Symbol: int}, check_sizes from 2 to 3

    @functools.cached_property
    def programs(self):
        """{(quantity, output name): assignments}: the forward steps, then each input's and param's gradient."""
        from derive.tensor import derivation
        found = {("forward", self.op.steps[-1].name): self.op.steps}
        found.update({("backward", program[-1].name): program for program in derivation(self.op).gradients.values()})
        return found

    @functools.cached_property
    def functions(self):
        """{assignment: its entry as a function of the arrays it reads, its indices and the options} (lambdify
        to mpmath), or the FirstMax of a mask, which derive.tensor.evaluated computes exactly (a comparison)."""
        from derive.tensor import FirstMax
        options = [sp.Symbol(o, real=True) for o in self.op.options]
        found = {}
        for program in self.programs.values():
            for a in program:
                if a in found or isinstance(a.expr, FirstMax):
                    continue
                expr = a.expr.replace(sigmoid, lambda u: 1 / (1 + sp.exp(-u))).xreplace(self.sizes)
                bases = sorted({e.base for e in expr.atoms(sp.Indexed)}, key=str)
                found[a] = [b.name for b in bases], sp.lambdify([*bases, *a.indices, *options], expr, MPMATH)
        return found

    @property
    def real_inputs(self):
        """The arrays whose rounding the scale counts: inputs, params, dense targets and the upstream gradient."""
        return [*self.op.inputs, *self.op.params, *(t for t in self.op.targets if t not in self.op.labels), "g"]


def tensor_subject(op):
    """The TensorSubject of an index-notation op at its default flags."""
    from derive.tensor import check_sizes, with_flags
    op = with_flags(op, {}) if op.flags else op
    return TensorSubject(op.name, op, check_sizes(op, 2, 3))


def tensor_samples(subject, dtype, quick, package):
    """[{array name: array of dtype}, ...]: the inputs of sample j hold every S-th magnitude of the grid from the
    j-th, S the number of samples (each magnitude once), with random signs, one entry 0, in random order: each row
    spans tiny to large. Params from the op's domain, g from (-1, 1), labels uniform, dense targets from [0, 1],
    noise drawn as the class draws it (package's runtime, seed SEED)."""
    from derive.tensor import size_of
    op, rng = subject.op, np.random.default_rng(SEED)

    def shape(axes):
        return tuple(subject.sizes[size_of(i)] for i in axes)
    grid_values = magnitudes(dtype, quick)
    entries = sum(math.prod(shape(axes)) for axes in op.inputs.values())
    count = math.ceil(len(grid_values) / entries) if entries else 1   # Embedding's input is labels alone
    samples = []
    for j in range(count + 1):
        magnitudes_j = grid_values[j::count] if j < count else past_cube_root(grid_values, entries)
        values = np.resize(magnitudes_j, entries) * rng.choice([-1, 1], entries)
        values[rng.integers(entries) if entries else slice(0)] = 0
        values = rng.permutation(values).astype(dtype)
        arrays, start = {}, 0
        for name, axes in op.inputs.items():
            size = math.prod(shape(axes))
            arrays[name], start = values[start:start + size].reshape(shape(axes)), start + size
        arrays |= {p: rng.uniform(*op.domain, shape(axes)).astype(dtype) for p, (axes, _) in op.params.items()}
        arrays |= {t: rng.integers(0, subject.sizes[op.labels[t]], shape(axes)) if t in op.labels else
                   rng.uniform(0, 1, shape(axes)).astype(dtype) for t, axes in op.targets.items()}
        arrays |= {z: getattr(package._tensor, f"{kind}_mask")(np.random.default_rng(SEED), shape(axes),
                                                               op.options[option], np.dtype(dtype), True)
                   for z, (axes, kind, option) in (op.noise or {}).items()}
        samples.append(arrays | {"g": rng.uniform(-1, 1, shape(op.steps[-1].indices)).astype(dtype)})
    return samples


def past_cube_root(grid_values, entries):
    """Magnitudes for one more sample, every other one 4 to 64 times the cube root of the largest number (below
    the root of the largest over entries: no sum of entries squares overflows), the others the grid's below it: a
    row's spread cubed overflows where the spread and its square do not (RMSNorm's (eps + ms)^(3/2)), which the
    grid's samples, each row holding a larger or only smaller magnitudes, never reach; a row's large entries
    within a factor 16, so that each weighs in the others' gradient."""
    root = float(grid_values[-1]) ** (1 / 3)
    past = np.minimum(root * np.geomspace(4, 64, 4), (float(grid_values[-1]) / max(entries, 1)) ** 0.5)
    below = grid_values[grid_values < root][::-3]
    return np.ravel(np.column_stack((np.resize(past, len(below)), below)))


def tensor_options(subject, dtype):
    """The options' values in the kernels of dtype (an option whose default is the dtype's machine epsilon)."""
    return {o: exact(np.finfo(dtype).eps if o in subject.op.dtype_eps else v) for o, v in subject.op.options.items()}


def program_values(subject, arrays, options, digits):
    """{(quantity, output name): object array of mpf, None where not a real number} of subject's programs at arrays
    (float or integer) and options (exact), by mpmath at digits."""
    from derive.tensor import FirstMax, evaluated
    with mpmath.workdps(digits):
        values = {name: a if a.dtype.kind in "iu" else np.vectorize(mpf_of, otypes=[object])(a)
                  for name, a in arrays.items()}
        option_values = [mpmath.mpf(v) for v in options.values()]
        for program in subject.programs.values():   # the forward steps first, which the gradients read
            for a in program:
                if a.name in values:    # an adjoint step two gradients share
                    continue
                if isinstance(a.expr, FirstMax):  # a mask of comparisons, 0 or 1: exact in floats
                    values[a.name] = evaluated([a], values, subject.sizes)[a.name].astype(object)
                else:
                    values[a.name] = entries(subject.functions[a], values, a, subject, option_values)
    return {key: values[program[-1].name] for key, program in subject.programs.items()}


def step_values(subject, arrays, options, digits, names):
    """{name: object array of mpf} of the forward steps names at arrays, by mpmath at digits."""
    if not names:
        return {}
    with mpmath.workdps(digits):
        values = {name: a if a.dtype.kind in "iu" else np.vectorize(mpf_of, otypes=[object])(a)
                  for name, a in arrays.items()}
        option_values = [mpmath.mpf(v) for v in options.values()]
        for a in subject.op.steps:
            if a.name in names:
                values[a.name] = entries(subject.functions[a], values, a, subject, option_values)
    return {name: values[name] for name in names}


class Unsettled:
    """The value of an entry two precisions disagree on at every level of SETTLE."""

    def __repr__(self):
        return "UNSETTLED"


UNSETTLED = Unsettled()
SETTLE = ((MORE_DIGITS, 560), (800, 1120), (1600, 2240))   # each pair's precisions: the noise of a cancellation differs


def real_value(value):
    """value is a settled real number (not None: not real; not UNSETTLED)."""
    return value is not None and value is not UNSETTLED


def settled_values(subject, arrays, options):
    """program_values at the first pair of precisions in SETTLE where the two agree on an entry (to AGREE, or both
    below the smallest float64 in magnitude, which rounds them to 0), UNSETTLED where no pair does: a sum whose
    terms cancel past 400 digits (MultiheadAttention's g_A where its scores reach 10^600) is noise at 400 digits,
    and a different noise at 560."""
    tiny = mpmath.mpf(np.finfo(np.float64).smallest_subnormal) / 2
    found = None
    for low, high in SETTLE:
        pair = [program_values(subject, arrays, options, digits) for digits in (low, high)]
        if found is None:
            found = {key: np.array([UNSETTLED] * values.size, object).reshape(values.shape)
                     for key, values in pair[1].items()}
        for key, values in pair[1].items():
            for k, (v, w) in enumerate(zip(pair[0][key].flat, values.flat)):
                if found[key].flat[k] is UNSETTLED and (v is None and w is None or v is not None and w is not None and (
                        abs(v - w) <= AGREE * abs(w) or max(abs(v), abs(w)) < tiny)):
                    found[key].flat[k] = w
        if not any(v is UNSETTLED for values in found.values() for v in values.flat):
            break
    return found


def mpf_of(value):
    """A float of any dtype, or an mpf (a perturbed input), as an mpf."""
    return value if isinstance(value, mpmath.mpf) else mpmath.mpf(float(value))


def entries(function, values, assignment, subject, option_values):
    """Every entry of one assignment (an object array of mpf, None where it is not a real number)."""
    from derive.tensor import size_of
    names, f = function
    reads = [values[name] for name in names]
    result = np.empty(tuple(subject.sizes[size_of(i)] for i in assignment.indices), object)
    for at in np.ndindex(result.shape):
        try:
            result[at] = real(f(*reads, *at, *option_values))
        except (ZeroDivisionError, ValueError, TypeError, OverflowError):  # TypeError: it read a None
            result[at] = None
    return result


class TensorTruth:
    """The truth of one sample: every output's entries at DIGITS (MORE_DIGITS where an input exceeds TINY_EXP, or
    the two precisions disagree), and, where asked, every entry's scale sum_v |v dq/dv| over every real input entry
    v, by differences q(v (1 + 10^-SCALE_DIGITS)) - q(v) at DIGITS, all of them at once (an allowance: two digits
    of it are enough)."""

    def __init__(self, subject, arrays, options):
        self.subject, self.arrays, self.options = subject, arrays, options
        large = any(np.max(np.abs(arrays[name]), initial=0) > TINY_EXP for name in subject.real_inputs)
        levels = [] if large else [program_values(subject, arrays, options, d) for d in (DIGITS - 10, DIGITS)]
        agree = levels and all(v is None or f is not None and abs(v - f) <= AGREE * abs(v)
                               for key in levels[1] for f, v in zip(levels[0][key].flat, levels[1][key].flat))
        self.values = levels[1] if agree else settled_values(subject, arrays, options)

    def scale(self, key, at):
        """sum_v |v dq/dv| of output key's entry at."""
        return self.scales[key][at]

    @functools.cached_property
    def scales(self):
        """{(quantity, output name): array of float, sum_v |v dq/dv| per entry (inf beyond the largest float)}, v
        every real input entry and every entry of a step the op declares rounded (its projections): a float kernel
        holds those rounded to the dtype, |dv| <= eps |v| as an input's, whatever it does after them."""
        total = {key: np.full(values.shape, mpmath.mpf(0), object) for key, values in self.values.items()}
        with mpmath.workdps(DIGITS), np.errstate(over="ignore"):
            delta = mpmath.mpf(10) ** -SCALE_DIGITS
            exact = step_values(self.subject, self.arrays, self.options, DIGITS, self.subject.op.rounded)
            for name, array in [*((n, self.arrays[n]) for n in self.subject.real_inputs), *exact.items()]:
                for at in np.ndindex(array.shape):
                    if not array[at]:
                        continue
                    moved = array.astype(object)
                    moved[at] = mpf_of(moved[at]) * (1 + delta)
                    # a rounded step moved: the programs read it as given (program_values computes no step given)
                    given = {**self.arrays, **(exact if name in exact else {}), name: moved}
                    shifted = program_values(self.subject, given, self.options, DIGITS)
                    for key, values in self.values.items():
                        for k, (v, w) in enumerate(zip(values.flat, shifted[key].flat)):
                            if real_value(v) and real_value(w):
                                total[key].flat[k] += abs(w - v) / delta
        return total


def run_tensor_class(cls, subject, arrays):
    """{(quantity, output name): array} of a generated index-notation class at one sample: its output (a window
    at stride 1, the derivation's; a loss unreduced) and the gradient of every input and param for upstream g."""
    op = subject.op
    instance = cls(**op.size_arguments(subject.sizes), **({"stride": 1} if op.window else {}),
                   **({"rng": np.random.default_rng(SEED)} if op.noise else {}),
                   **({"reduction": "none"} if op.kind == "loss" else {}))
    for p in op.params:
        setattr(instance, p, arrays[p].copy())
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = instance.forward(*(arrays[a].copy() for a in [*op.inputs, *op.targets]))
        grads = instance.backward(arrays["g"].copy())
    grads = dict(zip(op.inputs, grads if isinstance(grads, tuple) else (grads,)))
    grads |= {p: getattr(instance, f"d{p}") for p in op.params}
    return {("forward", op.steps[-1].name): y, **{("backward", f"d{name}"): grad for name, grad in grads.items()}}


def judge_scaled(tally, got, truth, scale, dtype, ulps_bound, where):
    """judge for an entry of an index-notation op, in units u = ulp(truth) + eps scale() / ulps_bound, scale() its
    sum_v |v dq/dv| (computed only where the error exceeds ulps_bound ulps of the truth): within ulps_bound units
    is the element-wise contract's error <= ulps_bound ulps + eps scale(), and the figure is the largest count of
    units, less the smallest normal number where the truth is below it (a kernel may flush a subnormal result).
    Where eps scale() itself passes the largest number, the rounding of the inputs alone may carry the value past
    it, and any result but NaN is within the allowance: MultiheadAttention's keys 0.496 - 8e-65 and 0.496 - 4e-175
    are one tie once rounded, so the truth's one-hot softmax row is two halves in any float kernel, whose g_k of
    3e336 makes dkey -inf where the truth is 4e201 (the full grid's float64 sample 5)."""
    info = np.finfo(dtype)
    if not np.isnan(got) and (np.isinf(got) or np.isinf(rounded(truth, dtype))) and beyond_largest(scale, dtype):
        tally.cases += 1
        return
    if not finite_verdict(tally, got, truth, dtype, where):
        return
    normal = abs(truth) >= info.tiny
    ulp = unit_in_last_place(rounded(truth, dtype), dtype)
    with mpmath.workdps(DIGITS):
        error = max(0.0, float(abs(mpmath.mpf(float(got)) - truth)) - (0.0 if normal else float(info.tiny)))
    ulps = error / ulp
    if ulps > ulps_bound:
        ulps = float(error / (ulp + EPS[dtype] * scale() / ulps_bound))
    if normal:
        tally.worst_ulps = max(tally.worst_ulps, ulps)
    if ulps > ulps_bound:
        tally.inexact += 1
        tally.note(f"{where}: {got!r}, truth {mpmath.nstr(truth, 10)} ({ulps:.3g} units of its scale)",
                   ulps / ulps_bound)
    tally.worst_excess = max(tally.worst_excess, ulps / ulps_bound)


def beyond_largest(scale, dtype):
    """eps scale() is past dtype's largest number (scale an mpf, or a float)."""
    with mpmath.workdps(DIGITS):
        return EPS[dtype] * mpmath.mpf(scale()) > np.finfo(dtype).max


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
