"""Checking a derivation step by step, so that the printed text cannot lie.

Each step's rhs must equal the rhs before it (a continued chain) or what its lhs means (a new claim),
both evaluated from the derivation's definitions. Symbolically where SymPy can (expand, contract,
cancel); otherwise numerically, at random points, at 30 digits, and for index expressions at
explicit sizes (each of K, N, ... takes the values 2, 3 and 4) for every value of their free indices."""
import itertools
from dataclasses import dataclass

import mpmath
import numpy as np
import sympy as sp

from derive.derivation_steps import continues, contract_sums, fresh_bounds
from derive.symbols import K, N, ClassMax, c, i, j, k, m, n, r

INDEX_RANGES = {i: K, j: K, k: K, m: K, c: K, n: N, r: N}
POINTS = 2                         # random points per explicit size and index value
DIGITS = 30
TOLERANCE = 1e-20                  # relative, at DIGITS digits
CANCEL_LIMIT = 200                 # operations in a difference that cancel may take on
EXPAND_LIMIT = 1000                # and that expand may


@dataclass(frozen=True)
class StepCheck:
    """The verdict on one step: how it was shown equal to what it follows, or where it is not."""

    number: int
    rule: str
    ok: bool
    method: str
    detail: str = ""

    def report(self):
        return f"({self.number}) {self.rule}: {'OK' if self.ok else 'FAILED'}, {self.method}" + (
            f"; {self.detail}" if self.detail else "")


def check_derivation(derivation, seed=0):
    """[StepCheck] for every step of derivation, in order; an index-notation op's derivation at explicit sizes,
    derive.derivation_tensor's way."""
    if derivation.op is not None:
        from derive.derivation_tensor import check_tensor_derivation   # that module builds on this one
        from derive.tensor import check_sizes
        # sizes from 2 to 4, distinct where they can be: a step's loops over BatchNorm2d's four axes at 2, 3, 4, 2
        sizes = {str(size): value for size, value in check_sizes(derivation.op, smallest=2, largest=4).items()}
        return check_tensor_derivation(derivation.op, derivation, sizes, seed=seed)
    rng = np.random.default_rng(seed)
    definitions, equations, known = list(derivation.definitions), [], {}
    ranges = {**INDEX_RANGES, **dict(derivation.ranges)}
    checks = []
    for number, step in enumerate(derivation.steps):
        for equation in step.assumes:
            if _is_pattern(equation.lhs):
                definitions.append((equation.lhs, equation.rhs))
                known = {}
            else:
                equations.append(equation)
        before = derivation.steps[number - 1].rhs if continues(derivation.steps, number) else step.lhs
        before, after = meaning(before, definitions, known), meaning(step.rhs, definitions, known)
        holding = [sp.Eq(*(meaning(side, definitions, known) for side in e.args)) for e in equations]
        checks.append(StepCheck(number + 1, step.rule, *compare(before, after, step.condition, holding, ranges, rng)))
    return checks


def compare(before, after, condition, equations, ranges, rng):
    """(ok, method, detail): whether before = after where condition holds, given the equations."""
    if _symbolically_equal(before, after, condition, equations):
        return True, "symbolic", ""
    return _numerically_equal(before, after, condition, equations, ranges, rng)


def meaning(expr, definitions, known=None):
    """expr with every defined name replaced by its definition, every Derivative and Limit evaluated;
    a derivative by p_k (a limit in z) holds p (z) itself fixed, whatever it is defined as.
    known caches what was evaluated under the same definitions: a network's units recur everywhere."""
    table = {_key(pattern): (pattern, value) for pattern, value in definitions}
    known = {} if known is None else known

    def walk(e, keep):
        if (e, keep) not in known:
            # e stands for itself while it is evaluated: a Derivative that SymPy leaves unevaluated
            # (of f(x), of re(x)) comes back from diff unchanged, and would be evaluated again forever
            known[e, keep] = e
            known[e, keep] = evaluated(e, keep)
        return known[e, keep]

    def evaluated(e, keep):
        if isinstance(e, sp.Derivative):
            (var, count), = e.variable_count
            inner = fresh_bounds(walk(e.expr, keep | {_key(var)[0]}), set(_params(var)))
            return walk(sp.diff(inner, var, count), keep)
        key = _key(e)
        if key in table and key[0] not in keep:
            return walk(_instantiate(*table[key], e), keep)
        if isinstance(e, sp.Limit):
            limited, var, point, direction = e.args
            return walk(sp.Limit(walk(limited, keep | {var}), var, point, str(direction)).doit(), keep)
        if isinstance(e, sp.Indexed) or not e.args:
            return e
        return e.func(*[walk(arg, keep) for arg in e.args])
    return walk(expr, frozenset())


def _key(e):
    """(head, arity) under which a definition of e is looked up: p[i] -> (p, 1), sigma(z) -> (sigma, 1)."""
    if isinstance(e, sp.Indexed):
        return e.base, len(e.indices)
    if isinstance(e, sp.Function):
        return e.func, len(e.args)
    return e, 0


def _is_pattern(e):
    """Whether e can be defined: a name, or a name applied to index symbols."""
    return e.is_Symbol or (isinstance(e, (sp.Indexed, sp.Function)) and all(a.is_Symbol for a in _params(e)))


def _params(e):
    return e.indices if isinstance(e, sp.Indexed) else e.args if isinstance(e, sp.Function) else ()


def _instantiate(pattern, value, instance):
    """value with pattern's parameters replaced by those of instance (clashing summation indices
    renamed first, so that p_m = e^{x_m} / sum_m e^{x_m} cannot capture the m)."""
    params, args = _params(pattern), _params(instance)
    clashing = set(params).union(*(sp.sympify(arg).free_symbols for arg in args))
    return fresh_bounds(value, clashing).xreplace(dict(zip(params, args)))


def _canonical(expr):
    """expr with summation indices named by nesting depth and position, so equal sums compare equal."""
    def renamed(total):
        names = {index: sp.Symbol(f"_s{_depth(total)}_{position}", integer=True)
                 for position, (index, _, _) in enumerate(total.limits)}
        return sp.Sum(total.function.xreplace(names), *[(names[v], lower, upper) for v, lower, upper in total.limits])
    return expr.replace(lambda e: isinstance(e, sp.Sum), renamed)


def _depth(total):
    return 1 + max((_depth(s) for s in total.function.atoms(sp.Sum)), default=0)


def _under(condition, expr):
    """expr where condition (Eq or Ne of two indices) holds."""
    if condition is None:
        return expr
    a, b = condition.args
    if isinstance(condition, sp.Eq):
        return expr.subs(b, a)
    return expr.replace(lambda e: isinstance(e, sp.KroneckerDelta) and set(e.args) == {a, b}, lambda e: sp.S.Zero)


def _symbolically_equal(before, after, condition, equations):
    """Whether expand, contract and cancel bring before - after to 0. (simplify would prove more, but
    takes minutes on what numbers decide in a second; so do expand and cancel on long expressions.)"""
    difference = _canonical(before - after)
    if sp.count_ops(difference) > EXPAND_LIMIT:
        return False
    for equation in equations:
        difference = difference.subs(_canonical(equation.lhs), equation.rhs)
    difference = sp.expand(contract_sums(sp.expand(_under(condition, difference))))
    return difference == 0 or (sp.count_ops(difference) <= CANCEL_LIMIT and sp.cancel(difference) == 0)


def _numerically_equal(before, after, condition, equations, ranges, rng):
    """Both sides, and the equations' residuals, compiled by lambdify (sums become loops) and compared
    at every size case, free index value and random point."""
    exprs = [before, after, *(equation.lhs - equation.rhs for equation in equations)]
    labels = sorted({a.base.label for e in exprs for a in e.atoms(sp.Indexed)}
                    | {f.args[0].label for e in exprs for f in e.atoms(ClassMax)}, key=str)
    free = set().union(*(e.free_symbols for e in exprs)) - set(labels) - {a for e in exprs for a in e.atoms(sp.Indexed)}
    indices = sorted(free & set(ranges), key=str)
    sizes = sorted({ranges[index] for index in indices} | (free & set(ranges.values())), key=str)
    scalars = sorted(free - set(indices) - set(sizes), key=str)
    # mpmath at DIGITS digits; SymPy itself for what mpmath lacks (Heaviside)
    numeric = {"ClassMax": max, "ClassArgmax": first_argmax, "Clip": lambda u, lo, hi: max(lo, min(u, hi)),
               "ExpToInf": mpmath.exp, "Expm1": mpmath.expm1, "Erfc": mpmath.erfc}
    compiled = [sp.lambdify([*labels, *sizes, *indices, *scalars], e, modules=[numeric, "mpmath", "sympy"])
                for e in exprs]
    compared = 0
    with mpmath.workdps(DIGITS):
        # every size takes each of 2, 3, 4 once, and differs from the others in the same case
        for case in ([2 + (number + position) % 3 for position in range(len(sizes))] for number in range(3)):
            for _ in range(POINTS):
                arrays = {label: _Entries(max(case, default=2), rng) for label in labels}
                # a positive scalar (a rate, a moment of squares) is drawn positive
                numbers = [mpmath.mpf(rng.uniform(0 if s.is_positive else -2, 2)) for s in scalars]
                values = {s: sp.Float(str(v)) for s, v in zip(scalars, numbers)}
                for at in itertools.product(*[range(case[sizes.index(ranges[index])]) for index in indices]):
                    # the step holds where its condition does: on the indices, and on the scalars (beta < 1)
                    if condition is not None and condition.xreplace({**dict(zip(indices, at)), **values}) is not sp.true:
                        continue
                    args = [*arrays.values(), *case, *at, *numbers]
                    _hold(compiled[2:], equations, arrays, args, dict(zip(sizes, case)), dict(zip(indices, at)))
                    a, b = (_value(f, args) for f in compiled[:2])
                    if a is None or b is None:
                        continue
                    compared += 1
                    if abs(a - b) > TOLERANCE * max(1, abs(a), abs(b)):
                        where = ", ".join(f"{s} = {v}" for s, v in [*zip(sizes, case), *zip(indices, at)])
                        return False, "numeric", f"at {where or 'a random point'}: {_show(a)} before, {_show(b)} after"
    method = f"numeric at {compared} points" + (", sizes " + " and ".join(f"{s} = 2, 3, 4" for s in sizes)
                                                if sizes else "")
    return (True, method, "") if compared else (False, method, "no point where both sides are defined")


def first_argmax(row):
    """ClassArgmax of a row: the index of its max, the first where several entries are it."""
    values = list(row)
    return values.index(max(values))


class _Entries:
    """Random entries of one array, drawn as they are first read, for x[k] and x[n, k] alike."""

    def __init__(self, size, rng):
        self.size, self.rng, self.by_rank = size, rng, {}

    def _array(self, rank):
        if rank not in self.by_rank:
            draws = [mpmath.mpf(v) for v in self.rng.uniform(-2, 2, self.size ** rank)]
            self.by_rank[rank] = np.array(draws, dtype=object).reshape((self.size,) * rank)
        return self.by_rank[rank]

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        return self._array(len(key))[key]

    def __setitem__(self, key, value):
        self._array(len(key))[key] = value

    def __iter__(self):            # the max of a row
        return iter(self._array(1))


def _hold(residuals, equations, arrays, args, sizes, at):
    """Make each equation (sum_k t_k = 1) hold by solving for the last entry it sums over, in which
    its residual must be linear."""
    for residual, equation in zip(residuals, equations):
        entry = _last_entry(equation.lhs, sizes, at)
        if entry is None:
            continue
        array, where = arrays[entry.base.label], tuple(int(v) for v in entry.indices)
        start, r0 = array[where], _value(residual, args)
        array[where] = start + 1
        slope = _value(residual, args) - r0
        array[where] = start - r0 / slope
        if abs(_value(residual, args)) > TOLERANCE * max(1, abs(r0)):
            raise ValueError(f"assumption {equation} is not linear in {entry}")


def _last_entry(expr, sizes, at):
    """The entry of the summed array at the last value of each summation index, or None."""
    for total in expr.atoms(sp.Sum):
        last = {index: upper.xreplace(sizes) for index, _, upper in total.limits}
        for entry in total.function.atoms(sp.Indexed):
            if set(entry.indices) & set(last):
                return entry.xreplace({**last, **at})
    return None


def _value(compiled, args):
    """compiled at args, or None where it is undefined there."""
    try:
        value = mpmath.mpc(compiled(*args))
    except (ZeroDivisionError, ValueError, TypeError):
        return None
    return value if mpmath.isfinite(value.real) and mpmath.isfinite(value.imag) else None


def _show(value):
    return mpmath.nstr(value.real if value.imag == 0 else value, 15)
