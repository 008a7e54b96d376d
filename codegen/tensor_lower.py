"""Stages 3-5 of an index-notation operation: its TensorDerivation lowered to whole-array NumPy.

    derivation(op) --max shift, corrected mean, ASSIGNMENT_REWRITES--> forward and backward assignments
    (1 - sigmoid and the other exact element-wise rewrites, masks of indices, powers combined, branches guarded,
    the logistic) --ArrayLowering--> array program: statements over views,
    np.einsum with its path chosen here, reductions, sliding windows, gathers and scatters
    --TensorPrinter--> NumPy source --templates/tensor.py.jinja--> the generated class.

The lowering rules. An array's axes are its index letters in declared order, and an expression is
evaluated over a scope, the ordered indices it is broadcast over (each with its range): a read
x[n, k] is a view of x aligned to the scope (transposed, None where it has no axis). A Sum of a
product is np.einsum over its factors' views (its output in scope order, its path chosen once, from
np.einsum_path at the check sizes), any other summand is broadcast over its indices and reduced
(np.add.reduce). A shifted index is a slice (x[n, h + H]) or, two indices in one (x[n, c, m + j]),
a sliding window, the array zero-padded where the derivation narrowed the range to keep the read
inside it (the transposed convolution's l - m): no read is ever out of range. A window contracted with
one array is one matrix product over the window copied to a matrix (im2col, window_product), forward's copy
saved for backward where it reads the same window (SavedWindows); a window's
strided positions are read at the stride in the view, and a Sum over taps of reads at p - t of a strided
position is the adjoint's scatter (windows_added, col2im). A label x[n, c[n]] is
np.take_along_axis; a Kronecker delta at a label on the gradient side is a scatter
(np.put_along_axis). A term guarded by a bound on an index (GLU's halves) updates that slice of its
array. A Piecewise on data is np.where once guarded_branches has made both branches safe."""
import itertools
import re
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import log2
from sympy.core.symbol import Str
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pycode import PythonCodePrinter
from sympy.printing.str import StrPrinter

from codegen.inplace import base_name, tensor_in_place
from codegen.printer import KernelPrinter, positive_first, range_arguments
from derive.special import ExpToInf
from derive.stability import INDEX_REWRITES, REWRITES, rewritten_by
from derive.tensor import (ArgFirstMax, Assignment, FirstMax, OverRanges, Sum, bound_of, check_sizes, derivation, eval_mode, flag_values, folded,
                           in_base_sizes, in_units, isolated_bound, isolated_entry, linear, linear_in, reads_of,
                           scale_degrees, size_of, unit_rows, with_flags)


class LoweringError(ValueError):
    """An index expression that has no whole-array form here; the message names the operation and the form."""


# Stage 3: the rewrites before lowering, each a named identity with the domain where it holds


class Maximum(OverRanges):
    """Maximum(e, (v, lo, hi), ...): the largest e over the ranges, as Sum is their total."""

    def _sympystr(self, printer):
        return f"Max({printer.doprint(self.function)}, {', '.join(map(printer.doprint, self.limits))})"


class Scale(sp.Function):
    """exp(m): the factor a max shift takes out of a sum of exponentials; max_shifted keeps a shift only
    where every Scale cancels, so none is ever printed."""


class Program(NamedTuple):
    """What the lowering reads: the forward steps and the backward assignments, in order."""

    forward: tuple
    backward: tuple
    returns: tuple                 # d<name> of every input and param, in order
    rewrites: tuple = ()           # the names of the rewrites that changed it, for the reader
    guards: tuple = ()             # (Guard, ...) of the forward program (rescaled_scores)
    backward_guards: tuple = ()    # (Guard, ...) of the backward program (rescaled_adjoints)


def program_of(op):
    """The forward steps and one backward program over every input's and param's adjoints, each adjoint
    computed once though several gradients read it (attention's g_A, for dQ and dK)."""
    found = derivation(op)
    needed = {a.name for program in found.gradients.values() for a in program[:-1]}
    backward = tuple(a for a in found.adjoints if a.name in needed)
    return Program(tuple(found.forward), backward + tuple(p[-1] for p in found.gradients.values()),
                   tuple(p[-1].name for p in found.gradients.values()))


def max_shifted(program, taken):
    """Each sum of exponentials Sum(exp(u), V) in a forward step, over the free indices F, is shifted by its
    max m[F] = Max(u, V), a step computed just before: every exp(u) (at any indices) becomes exp(u - m)
    exp(m); a step s that is such a sum becomes Sum(exp(u - m)), read as s exp(m), and its adjoint g_s,
    scaled by exp(m), is read as g_s exp(-m). The value is the same for any m; with m the max no
    exponential overflows and the sum is at least 1. A shift is kept only where every factor exp(m)
    cancels (a softmax, a log-sum-exp, their gradients): a sum of exponentials that is itself the output
    stays as it is, as its value overflows."""
    forward, backward, rewrites = list(program.forward), list(program.backward), list(program.rewrites)
    shifts, tried = set(), set()
    while True:
        found = [(step, total) for step in forward for total in sorted(step.expr.atoms(Sum), key=sp.default_sort_key)
                 if exponent_of(total.function) is not None and not reads_of(total) & shifts
                 and (step.name, total) not in tried]
        if not found:
            return program._replace(forward=tuple(forward), backward=tuple(backward), rewrites=tuple(rewrites))
        step, total = found[0]
        tried.add((step.name, total))
        (u, mask), limits = exponent_of(total.function), total.limits
        outer = [i for i in total.free_symbols if i.is_integer and i not in step.indices and not i.name[0].isupper()]
        indices = [i for i in step.indices if i in total.free_symbols] + sorted(outer, key=str)
        name = fresh(f"{step.name}_max", taken)
        shift = sp.IndexedBase(name, real=True)
        wilds = {i: sp.Wild(f"w_{i}") for i in (*indices, *(v for v, *_ in limits))}
        pattern, whole = u.xreplace(wilds), step.expr == total

        def split(e, shift=shift, wilds=wilds, pattern=pattern, indices=indices):
            match = e.args[0].match(pattern)
            if match is None or any(w not in match for w in wilds.values()):
                return e
            at = shift[tuple(match[wilds[i]] for i in indices)]
            return sp.exp(e.args[0] - at) * Scale(at)

        def scaled(a, step=step, shift=shift, whole=whole):
            expr = a.expr.replace(lambda e: isinstance(e, sp.exp), split)
            if whole:
                base, adjoint = sp.IndexedBase(step.name, real=True), sp.IndexedBase(f"g_{step.name}", real=True)
                expr = expr.xreplace({r: r * Scale(shift[r.indices]) for r in expr.atoms(sp.Indexed) if r.base == base})
                expr = expr.xreplace({r: r / Scale(shift[r.indices]) for r in expr.atoms(sp.Indexed)
                                      if r.base == adjoint})
                if a.name == step.name:     # s exp(m) = Sum(exp(u - m) exp(m)): s is Sum(exp(u - m))
                    expr = pulled(expr) / Scale(shift[a.indices])
                if a.name == f"g_{step.name}":  # term by term, where each term's 1/exp(m) cancels it
                    expr = sp.Add(*(term * Scale(shift[a.indices]) for term in sp.Add.make_args(expr)))
            return a._replace(expr=cancelled(expr))

        at = forward.index(step)
        largest = Maximum(u if mask is None else sp.Piecewise((u, mask), (-sp.oo, True)), *limits)
        shifted_forward = ([scaled(a) for a in forward[:at]] + [Assignment(name, tuple(indices), largest)]
                           + [scaled(a) for a in forward[at:]])
        shifted_backward = [scaled(a) for a in backward]
        if not any(a.expr.has(Scale) for a in shifted_forward + shifted_backward):
            forward, backward = shifted_forward, shifted_backward
            taken.add(name)
            shifts.add(name)
            rewrites.append(f"{'' if whole else 'a sum in '}{step.name} shifted by its max {name}")


def exponent_of(summand):
    """(u, None) of exp(u), (u, c) of a masked Piecewise((exp(u), c), (0, True)) (a causal softmax's), else None."""
    if isinstance(summand, sp.exp):
        return summand.args[0], None
    if (isinstance(summand, sp.Piecewise) and len(summand.args) == 2 and isinstance(summand.args[0].expr, sp.exp)
            and summand.args[1] == (0, True)):
        return summand.args[0].expr.args[0], summand.args[0].cond
    return None


def out_of_masks(expr):
    """Piecewise((a Scale(m), c), (0, True)) = Scale(m) Piecewise((a, c), (0, True)): a masked entry is 0 at any scale."""
    def out(piecewise):
        if len(piecewise.args) != 2 or piecewise.args[1] != (0, True):
            return piecewise
        (value, condition), _ = piecewise.args
        scales = [f for f in sp.Mul.make_args(value) if isinstance(sp.Pow(f, 1).as_base_exp()[0], Scale)]
        if not scales:
            return piecewise
        return sp.Mul(*scales) * sp.Piecewise((sp.Mul(*(f for f in sp.Mul.make_args(value) if f not in scales)),
                                               condition), (0, True))
    return expr.replace(lambda e: isinstance(e, sp.Piecewise), out)


def pulled(expr):
    """expr with each Scale factor of a Sum's summand that is free of the summed indices taken out of it."""
    def out(total):
        variables = {v for v, *_ in total.limits}
        terms = [sp.Mul.make_args(t) for t in sp.Add.make_args(total.function)]
        common = set.intersection(*(set(f for f in t if f.has(Scale) and not f.free_symbols & variables)
                                    for t in terms))
        if not common:
            return total
        factor = sp.Mul(*common)
        return factor * Sum(sp.Add(*(sp.Mul(*(f for f in t if f not in common)) for t in terms)), *total.limits)
    return expr.replace(lambda e: isinstance(e, Sum), out)


def cancelled(expr):
    """expr with its Scale factors out of sums and logs (log(s exp(m)) = log(s) + m), where they cancel."""
    def split_log(e):
        factors = sp.Mul.make_args(e.args[0])
        scales = [f for f in factors if isinstance(sp.Pow(f, 1).as_base_exp()[0], Scale)]
        if not scales:
            return e
        rest = sp.Mul(*(f for f in factors if f not in scales))
        return sp.log(rest) + sp.Add(*(f.as_base_exp()[1] * f.as_base_exp()[0].args[0] for f in scales))
    return pulled(out_of_masks(expr)).replace(lambda e: isinstance(e, sp.log), split_log)


def mean_corrected(program, taken):
    """Each mean m[F] = Sum(a[..], k)/K of a forward step that a later one subtracts from a (a[..] - m[F],
    a centring: LayerNorm's x - mu) becomes m0 + Sum(a - m0, k)/K with m0 the plain mean, a step just
    before: the same value, but the correction makes up m0's rounding (the corrected two-pass mean), so
    that a - m is exactly 0 on a constant row, where x - mu then divided by sqrt(var + eps) magnified the
    rounding of mu by up to 1/sqrt(eps)."""
    forward, rewrites = list(program.forward), list(program.rewrites)
    for number, step in enumerate(program.forward):
        total, size = mean_of(step.expr)
        if total is None:
            continue
        mean = sp.IndexedBase(step.name, real=True)[step.indices]
        if not any({total.function, -mean} <= set(add.args) for later in program.forward[number + 1:]
                   for add in later.expr.atoms(sp.Add)):
            continue
        name = fresh(f"{step.name}_0", taken)
        taken.add(name)
        plain = sp.IndexedBase(name, real=True)[step.indices]
        at = forward.index(step)
        forward[at:at + 1] = [Assignment(name, step.indices, step.expr),
                              step._replace(expr=plain + Sum(total.function - plain, *total.limits) / size)]
        rewrites += ["corrected mean"] * ("corrected mean" not in rewrites)
    return program._replace(forward=tuple(forward), rewrites=tuple(rewrites))


def mean_of(expr):
    """(the Sum, the size it is divided by) where expr is a mean Sum(a[..], k, ...)/(K ...) of one array's
    entries over the whole axes k, ..., else (None, None)."""
    total = [f for f in sp.Mul.make_args(expr) if isinstance(f, Sum)]
    rest = expr / total[0] if len(total) == 1 else None
    if rest is None or not isinstance(total[0].function, sp.Indexed):
        return None, None
    size = sp.Mul(*(high + 1 for _, _, high in total[0].limits))
    whole = all(low == 0 for _, low, _ in total[0].limits)
    return (total[0], size) if whole and sp.simplify(rest - 1 / size) == 0 else (None, None)


def guard_of(expr):
    """(value, condition) of a guard Piecewise((value, condition), (0, True)), else (expr, None)."""
    if isinstance(expr, sp.Piecewise) and len(expr.args) == 2 and expr.args[1] == (0, True):
        return expr.args[0].expr, expr.args[0].cond
    return expr, None


def read_back_rules(program):
    """{name: (costly factor f, the other factors r, condition c or None)} of each forward step but the output
    s = f r (or Piecewise((f r, c), (0, True))): f reads every index of s and is no Sum (in_terms_of_steps
    names those), r read fewer indices, so cost less (a softmax's P = exp(A - m) / Z: f the exponential, r 1/Z;
    a normalised x's (x - mu) / sqrt(var + eps): f x - mu, r the reciprocal root). f an array read only where
    r is a reciprocal (RMSNorm's x / sqrt(eps + ms)): read back as s times a power, never divided by what may
    be 0 (a gamma), and the powers of the statistic in the backward combine (g_ms's (eps + ms)^(3/2), which
    overflows where the spread is past the cube root of the largest number, is then eps + ms)."""
    found = {}
    for step in program.forward[:-1]:
        body, condition = guard_of(step.expr)
        factors = sp.Mul.make_args(body)
        costly = [f for f in factors if not f.is_number and not isinstance(f, Sum)
                  and set(step.indices) <= f.free_symbols]
        rest = [f for f in factors if f not in costly]
        reciprocals = [f for f in rest if f.is_Pow and f.exp.is_negative]
        if costly and isinstance(costly[0], sp.Indexed) and not (
                reciprocals and all(f.is_number or f in reciprocals for f in rest)):
            continue
        if len(costly) == 1 and not any(set(step.indices) <= f.free_symbols or f.has(Sum) for f in rest):
            found[step.name] = (costly[0], sp.Mul(*rest), condition)
    return found


def read_back(expr, program, rules, facts=frozenset()):
    """expr with each value f[at] that a forward step s = f r computes read back as s[at] / r[at] (the saved P
    times Z for exp(A - m)), where s's condition holds: facts are the conditions known to hold there (the
    enclosing Piecewise's branch and the Sums' ranges)."""
    if isinstance(expr, sp.Piecewise):
        branches, before = [], set()
        for value, condition in expr.args:
            known = facts | before | (set(sp.And.make_args(condition)) if condition != sp.true else set())
            branches.append((read_back(value, program, rules, frozenset(known)), condition))
            before.add(sp.Not(condition))
        return sp.Piecewise(*branches)
    if isinstance(expr, Sum):
        ranges = {c for v, lo, hi in expr.limits for c in (sp.Le(lo, v), sp.Le(v, hi))}
        return Sum(read_back(expr.function, program, rules, facts | ranges), *expr.limits)
    indices = {i: sp.Wild(f"w_{i}") for step in program.forward for i in step.indices}
    # a sum is matched by its primitive part: 2 x - 2 mu is 2 (x - mu)
    number, primitive = sp.factor_terms(expr).as_coeff_Mul() if isinstance(expr, sp.Add) else (1, expr)
    for name, (costly, rest, condition) in rules.items():
        step = next(s for s in program.forward if s.name == name)
        wilds = {i: indices[i] for i in step.indices}
        match = primitive.match(costly.xreplace(wilds)) if primitive.func == costly.func else None
        if match is None or any(w not in match for w in wilds.values()):
            continue
        at = {i: match[w] for i, w in wilds.items()}
        if condition is None or set(sp.And.make_args(condition.xreplace(at))) <= facts:
            return number * sp.IndexedBase(name, real=True)[tuple(at[i] for i in step.indices)] / rest.xreplace(at)
    if isinstance(expr, sp.Indexed) or not expr.args:
        return expr
    return expr.func(*(read_back(arg, program, rules, facts) for arg in expr.args))


def masks_applied(expr, guarded):
    """Piecewise((0, ~c), (e, True)) or Piecewise((e, c), (0, True)) as e, where each term of e is a saved step
    s[at] that is 0 wherever c fails (guarded: {s: (its indices, its condition)}, c[at] holding wherever s's
    condition does) times numbers and array reads (finite): the step applies the mask already."""
    def applied(piecewise):
        if len(piecewise.args) != 2 or piecewise.args[1].cond != sp.true:
            return piecewise
        (first, condition), (second, _) = piecewise.args
        if first == 0:
            kept, value = sp.Not(condition), second
        elif second == 0:
            kept, value = condition, first
        else:
            return piecewise
        needed = set(sp.And.make_args(kept))

        def masked(term):
            factors = sp.Mul.make_args(term)
            plain = all(f.is_number or isinstance(f.as_base_exp()[0], sp.Indexed) and f.as_base_exp()[1].is_Integer
                        for f in factors)
            return plain and any(
                isinstance(f, sp.Indexed) and f.base.name in guarded and needed <= set(sp.And.make_args(
                    guarded[f.base.name][1].xreplace(dict(zip(guarded[f.base.name][0], f.indices))))) for f in factors)
        return value if all(masked(t) for t in sp.Add.make_args(value)) else piecewise
    return expr.replace(lambda e: isinstance(e, sp.Piecewise), applied)


def sums_factored(expr):
    """expr with the factors of each Sum's summand that read none of its indices taken out of the Sum."""
    def out(total):
        variables = {v for v, *_ in total.limits}
        outside, inside = total.function.as_independent(*variables, as_Add=False)
        return total if outside == 1 else outside * Sum(inside, *total.limits)
    return expr.replace(lambda e: isinstance(e, Sum), out)


def common_factor(assignment):
    """a[F] = s[F] u + s[F] v as s[F] (u + v), s an array read at every index F of the assignment: one
    pass of the product, after the sum (attention's g_A = P (g_P + Z g_Z))."""
    terms = [set(sp.Mul.make_args(t)) for t in sp.Add.make_args(assignment.expr)]
    common = [f for f in set.intersection(*terms) if isinstance(f, sp.Indexed)
              and set(assignment.indices) <= set(f.indices)] if len(terms) > 1 else []
    if not common:
        return assignment
    factor = sp.Mul(*sorted(common, key=sp.default_sort_key))
    return assignment._replace(expr=factor * sp.Add(*(t / factor for t in sp.Add.make_args(assignment.expr))))


def steps_read_back(program):
    """The backward program with each value a forward step computes read back from that step (read_back):
    a softmax's exp(A - m) as P Z, so that its adjoint is P (g_P - Sum(P g_P)) and A is not saved; then the
    masks that those steps apply already dropped (masks_applied), the factors free of a Sum's indices taken
    out of it, and a factor common to an adjoint's terms taken out of their sum."""
    rules = read_back_rules(program)
    if not rules:
        return program
    guarded = {s.name: (s.indices, guard_of(s.expr)[1]) for s in program.forward if guard_of(s.expr)[1] is not None}
    backward = []
    for a in program.backward:
        expr = read_back(a.expr, program, rules)
        if expr != a.expr:
            a = common_factor(a._replace(expr=sums_factored(masks_applied(expr, guarded))))
        backward.append(a)
    if tuple(backward) == program.backward:
        return program
    return program._replace(backward=tuple(backward), rewrites=(*program.rewrites, "steps read back"))


def adjoints_inlined(program):
    """Each adjoint a[F] = r[F] c of the backward program (r an array read at every index F, c factors reading
    fewer) written into the assignments that read it, where each Sum that reads it sums over indices c does not
    read: c then leaves the Sum (sums_factored). BatchNorm's g_y_gamma = g gamma[c] in sums over n, h, w: gamma
    times the sums dgamma and dbeta are, each computed once, and no pass makes g_y_gamma."""
    backward, returns = list(program.backward), set(program.returns)
    for a in program.backward:
        factors = sp.Mul.make_args(a.expr)
        full = [f for f in factors if isinstance(f, sp.Indexed) and set(a.indices) <= set(f.indices)]
        if a.name in returns or len(full) != 1 or a.expr.has(Sum) or any(
                set(a.indices) <= f.free_symbols for f in factors if f is not full[0]):
            continue
        rest = sp.Mul(*(f for f in factors if f is not full[0]))

        def at(read):
            return dict(zip(a.indices, read.indices))

        def constant(expr, bound=frozenset()):   # rest, where expr reads a, free of the enclosing Sums' indices
            if isinstance(expr, Sum):
                return constant(expr.function, bound | {v for v, *_ in expr.limits})
            if isinstance(expr, sp.Indexed):
                return expr.base.name != a.name or not rest.xreplace(at(expr)).free_symbols & bound
            return all(constant(arg, bound) for arg in expr.args)
        readers = [b for b in backward if b is not a and a.name in reads_of(b.expr)]
        if not all(constant(b.expr) for b in readers):
            continue
        written = {b.name: b._replace(expr=sums_factored(b.expr.replace(
            lambda e: isinstance(e, sp.Indexed) and e.base.name == a.name, lambda e: a.expr.xreplace(at(e)))))
            for b in readers}
        backward = [written.get(b.name, b) for b in backward if b is not a]
    if len(backward) == len(program.backward):
        return program
    return program._replace(backward=tuple(backward), rewrites=(*program.rewrites, "adjoints inlined"))


def exponents_masked(expr):
    """Piecewise((exp(u + v) r, c), (0, True)) as exp(Piecewise((u, c), (-oo, True)) + v) r, as exp(-oo) = 0: u
    the terms of the exponent that read every index c reads, v and r reading fewer, so that a masked entry
    shares them with an entry of its row that c keeps, where they are finite: c a condition on indices alone
    that keeps an entry of every row (a causal mask keeps key 0 of every query; a row it masked whole would be
    NaN, 0 before). One masked array then serves a softmax's max, its sum and its quotient."""
    def masked(piecewise):
        value, condition = guard_of(piecewise)
        exponentials = [f for f in sp.Mul.make_args(value) if isinstance(f, (sp.exp, ExpToInf))]
        if condition is None or condition.has(sp.Indexed) or len(exponentials) != 1:
            return piecewise
        indices, rest = condition.free_symbols, sp.Mul(*(f for f in sp.Mul.make_args(value) if f != exponentials[0]))
        terms = sp.Add.make_args(exponentials[0].args[0])
        reading = [t for t in terms if indices <= t.free_symbols]
        others = [t for t in terms if t not in reading]
        if not reading or any(indices <= f.free_symbols for f in (rest, *others)):
            return piecewise
        exponential = exponentials[0].func
        return exponential(sp.Piecewise((sp.Add(*reading), condition), (-sp.oo, True)) + sp.Add(*others)) * rest
    return expr.replace(lambda e: isinstance(e, sp.Piecewise), masked)


class LargestExponent(sp.Function):
    """E of an array's float dtype, every number of it below 2^E (np.finfo(dtype).maxexp): 128 in float32, 1024 in
    float64."""

    is_integer = is_positive = True

    def _pythoncode(self, printer):
        return f"np.finfo({self.args[0].name}.dtype).maxexp"

    _numpycode = _sympystr = _pythoncode


class FiniteOrZero(sp.Function):
    """Its argument where that is finite, else 0: a guard's bound on what it rescales reads the finite entries
    alone, as a NaN or inf input makes its own dependents NaN or inf whatever the scale, and read into one scale
    for the whole call it would make every other value NaN too (tests/test_errors.py's NaN policy)."""

    def _numpycode(self, printer):
        entries = printer._print(self.args[0])
        return f"np.where(np.isfinite({entries}), {entries}, 0)"

    _pythoncode = _numpycode


class FiniteOr(sp.Function):
    """FiniteOr(a, b): a where it is finite, else b (a product computed again in units of a power of two where it
    overflowed, and nowhere else)."""

    def _numpycode(self, printer):
        first = printer._print(self.args[0])
        return f"np.where(np.isfinite({first}), {first}, {printer._print(self.args[1])})"

    _pythoncode = _numpycode


class Guard(NamedTuple):
    """Assignments computed again where some entry of the checked arrays is not finite: after the statement of
    the last checked array (forward: a softmax's max shift) their new values in units of a power of two, then
    the statements from first to the last checked array run again (the scores step to the shift; backward:
    none), with the names of the arrays they read and the reason, for the reader."""

    checks: tuple
    first: str
    assignments: tuple
    reads: tuple
    why: str
    test: object = None            # a condition to run on (printed as it is), else: a checked array not all finite


def rescaled_scores(program, op, taken):
    """program with a Guard for each declared rescaled scores step A[F, s] = f Sum(Q[..] R[..], d), linear in Q
    (derive.tensor.linear_in), shifted by m[F] = Max(u(A), s): where m is not finite (a score overflowed, or an inf
    - inf in its sum gave NaN), c[F] = 2^-k is a power of two with c (terms) (1 + |f|) max|Q| max|R| <= 2^(E-2),
    E the dtype's largest exponent, so that c A = A(c Q) and its max m_c[F] = Max(u(c A), s) are finite, and A becomes
    (c A - m_c)/c: exp(A - m) = exp((c A - c m)/c), as c m = Max(u(c A)) for c > 0 (tests/test_stability_rules.py);
    the steps from A to m then run again, where m is now 0. Its entries far below the max are -inf, whose exp
    is the right 0."""
    guards, rewrites = [], list(program.rewrites)
    for name, array in (op.rescaled or {}).items():
        scores = next(a for a in program.forward if a.name == name)
        shift = next((a for a in program.forward if isinstance(a.expr, Maximum) and name in reads_of(a.expr)), None)
        totals = [f for f in sp.Mul.make_args(scores.expr) if isinstance(f, Sum)]
        factors = sp.Mul.make_args(totals[0].function) if len(totals) == 1 else ()
        reads = [f for f in factors if isinstance(f, sp.Indexed)]
        if shift is None or len(reads) != 2 or len(factors) != 2 or array not in {r.base.name for r in reads}:
            raise LoweringError(f"{op.name}: rescaled {name} must be f Sum(a product of {array} and one other array)"
                                f" whose max shifts a softmax")
        row, limits = shift.indices, {v: (v, lo, hi) for v, lo, hi in totals[0].limits}

        def largest(read, row=row, limits=limits):    # max |read| over its indices outside the row
            over = [limits.get(i, (i, 0, extent(i) - 1)) for i in read.indices if i not in row]
            return Maximum(sp.Abs(read), *over)
        (read,) = [r for r in reads if r.base.name == array]
        terms = sp.Mul(*(hi - lo + 1 for _, lo, hi in totals[0].limits))
        factor = terms * (1 + sp.Abs(scores.expr / totals[0]))   # the sum before its factor f, and after
        names = [fresh(f"{n}_{suffix}", taken) for n, suffix in
                 ((name, "scale"), (array, "scaled"), (name, "scaled"), (name, "scaled_max"))]
        taken |= set(names)
        c, scaled_read, scaled, scaled_max = (sp.IndexedBase(n, real=True) for n in names)
        # + 5: the 2 of 2^(E-2), and 3 to spare, as each of the three ceil(log2) may come out 1 low (a log2 rounded
        # down at 2^e (1 + eps)); k >= 0: c <= 1, so c Q is finite
        exponent = (sum(sp.ceiling(log2(largest(r))) for r in reads)
                    + sp.ceiling(sp.log(factor, 2)))
        power = sp.Max(0, exponent + 5 - LargestExponent(Str(array)))
        assignments = (Assignment(names[0], row, 2 ** -power),
                       Assignment(names[1], read.indices, c[row] * read),   # before the product, so c Q is finite
                       Assignment(names[2], scores.indices, scores.expr.xreplace({read: scaled_read[read.indices]})),
                       Assignment(names[3], row, shift.expr.replace(
                           lambda e: isinstance(e, sp.Indexed) and e.base.name == name, lambda e: scaled[e.indices])),
                       Assignment(name, scores.indices, (scaled[scores.indices] - scaled_max[row]) / c[row]))
        guards.append(Guard((shift.name,), name, assignments, tuple(sorted({r.base.name for r in reads})),
                            "a score past the largest number: the scores again in units of a power of two"))
        rewrites.append(f"{name} in units of a power of two where {shift.name} is not finite")
    return program._replace(guards=tuple(guards), rewrites=tuple(rewrites))


def rescaled_adjoints(program, op, taken):
    """program with a backward Guard for each rescaled scores step A (rescaled_scores): the adjoint of its
    softmax P, g_P = Sum(a b, e) with a an adjoint (g, or g_o = Wo^T g), overflows where |a| |b| passes the
    largest number though the gradients may be finite (a near one-hot P), and so may a product after it (dK =
    g_A^T Q / sqrt(D) within sqrt(D) of the largest number). Each step from g_P on that reads it is linear in
    g_P and the steps between (derive.tensor.linear_in, SymPy's proof), so where a gradient they give is not
    finite they run again from c a, c = 2^-k one power of two (one number: dK and dWq sum over rows and batch)
    with c (terms) max|a| max|b| <= 2^(E-2), and each such gradient is c times its value, then divided by c.
    c bounds g_P alone: a bound through every later product (max|Q| of one sample times max|V| of another)
    would make c so small that c g loses a small gradient's digits (tests/test_tensor_stability.py). The other
    gradients (dV) are left as they are."""
    guards, rewrites = [], list(program.rewrites)
    for name in op.rescaled or {}:
        softmax = [a for a in program.forward if name in reads_of(a.expr)][-1]
        adjoint = next((a for a in program.backward if a.name == f"g_{softmax.name}"), None)
        factors = sp.Mul.make_args(adjoint.expr.function) if isinstance(getattr(adjoint, "expr", None), Sum) else ()
        upstream = [f for f in factors if isinstance(f, sp.Indexed) and f.base.name in {
            "g", *(a.name for a in program.backward)}]
        if len(factors) != 2 or len(upstream) != 1 or not all(isinstance(f, sp.Indexed) for f in factors):
            raise LoweringError(f"{op.name}: rescaled {name}: its softmax's adjoint must be Sum(an adjoint times one "
                                f"other array)")
        (read,) = upstream
        again, proven = [adjoint], {adjoint.name}
        for a in program.backward[program.backward.index(adjoint) + 1:]:
            if reads_of(a.expr) & proven:
                if not linear_in(a.expr, *proven):
                    raise LoweringError(f"{op.name}: rescaled {name}: {a.name} is not linear in {sorted(proven)}")
                again.append(a)
                proven.add(a.name)
        results = [a for a in again if a.name in program.returns]
        names = [fresh(n, taken) for n in ("g_scale", f"{read.base.name}_scaled",
                                           *(f"{a.name}_scaled" for a in results))]
        taken |= set(names)
        c, scaled = sp.Symbol(names[0], real=True), sp.IndexedBase(names[1], real=True)
        units = dict(zip((a.name for a in results), names[2:]))
        (other,) = [f for f in factors if f is not read]
        terms = sp.Mul(*(hi - lo + 1 for _, lo, hi in adjoint.expr.limits))
        # + 4: the 2 of 2^(E-2), and one for each ceil(log2) of a max, which may come out 1 low (rescaled_scores)
        exponent = sp.ceiling(sp.log(terms, 2)) + sum(sp.ceiling(log2(Maximum(FiniteOrZero(sp.Abs(f)), *(
            (i, 0, extent(i) - 1) for i in f.indices)))) for f in factors) + 4
        products = [a if a not in results else product_in_units(a, proven, taken) for a in again[1:]]
        finer, finer_names = finer_run(again, proven, c, read, results, taken)
        assignments = (Assignment(names[0], (), 2 ** -sp.Max(0, exponent - LargestExponent(Str(other.base.name)))),
                       Assignment(names[1], read.indices, c * read),
                       adjoint._replace(expr=adjoint.expr.xreplace({read: scaled[read.indices]})),
                       *(b._replace(name=units.get(b.name, b.name)) for a in products for b in (
                           a if isinstance(a, tuple) and not isinstance(a, Assignment) else (a,))),
                       *finer, *(a._replace(expr=units_divided(a, units[a.name], c, finer_names)) for a in results))
        made = {a.name for a in assignments}
        reads = sorted(set().union(*(reads_of(a.expr) for a in assignments)) - made)
        guards.append(Guard(tuple(a.name for a in results), None, assignments, tuple(reads),
                            f"a gradient past the largest number: g_{softmax.name} again in units of a power of two"))
        rewrites.append(f"g_{softmax.name} in units of a power of two where a gradient it gives is not finite")
    return program._replace(backward_guards=tuple(guards), rewrites=tuple(rewrites))


class CountNonzero(sp.Function):
    """The number of nonzero entries of an array (a guard's test)."""

    def _numpycode(self, printer):
        return f"np.count_nonzero({printer._print(self.args[0])})"

    _pythoncode = _numpycode


def product_of_logs(e, r, h):
    """exp(e) r h as one exponential, sign(h) exp(e + log r + log|h|) (r > 0): finite and normal where exp(e) r
    underflows but the product does not (tests/test_tensor_stability.py proves the two equal)."""
    return sp.sign(h) * ExpToInf(e + sp.log(r) + sp.log(sp.Abs(h)))   # one exponential: exp would split it again


def underflow_recovered(program, op, taken):
    """program with a backward Guard for each softmax P = exp(E) R (sums_to_one; E reads the scores) whose adjoint
    of the scores is g_A = P H: where an entry of P underflowed to 0 though its exponent is finite (E below the
    log of the smallest float, a near one-hot row), P H may still be a normal number (H = g_P - Sum(P g_P) of
    10^281 beside P = 10^-529, MultiheadAttention's full grid), which g_A's 0 loses, and every gradient read from
    it with it. Test: fewer nonzero entries in P than P has unmasked ones (P_live, a count over the mask's
    indices alone; the masked entries are 0 by the mask). Then the steps E reads are computed again from what
    backward holds, and g_A at each 0 of P is product_of_logs, 0 where that is not finite (scores past the
    largest number: the forward's guard, not repeated here)."""
    guards, rewrites = list(program.backward_guards), list(program.rewrites)
    forward = {a.name: a for a in program.forward}
    available = set(program.returns) | {"g"} | set().union(*(reads_of(a.expr) for a in program.backward))
    for step in program.forward:
        if sums_to_one(program, step) is None:
            continue
        exps = [f for f in sp.Mul.make_args(step.expr) if isinstance(f, sp.exp)]
        here = sp.IndexedBase(step.name, real=True)[step.indices]
        adjoint = next((a for a in program.backward if here in sp.Mul.make_args(a.expr)
                        and not a.expr.as_independent(here, as_Add=False)[0].has(here)), None)
        if len(exps) != 1 or adjoint is None:
            continue
        e, r = exps[0].args[0], sp.Mul(*(f for f in sp.Mul.make_args(step.expr) if f is not exps[0]))
        h = sp.Mul(*(f for f in sp.Mul.make_args(adjoint.expr) if f != here))
        needed = reads_of(e) - available
        for a in program.forward:   # the steps E reads, and the steps they read, that backward lacks
            if a.name in needed:
                needed |= reads_of(a.expr) - available
        order = [forward[a.name] for a in program.forward if a.name in needed]
        if not all(reads_of(a.expr) <= available | needed for a in order) or reads_of(r) - available:
            continue
        conditions = {c for p in e.atoms(sp.Piecewise) for _, c in p.args if c is not sp.true}
        masked = set().union(*(c.free_symbols for c in conditions)) if conditions else set()
        limits = [(i, 0, extent(i) - 1) for i in step.indices]
        live = sp.Mul(*(extent(i) for i in step.indices if i not in masked))
        if conditions:
            live *= Sum(sp.Piecewise((1, sp.And(*conditions)), (0, True)), *(l for l in limits if l[0] in masked))
        live_name = fresh(f"{step.name}_live", taken)
        taken.add(live_name)
        count = Assignment(live_name, (), live)
        recovered = Assignment(adjoint.name, adjoint.indices, sp.Piecewise(
            (FiniteOrZero(product_of_logs(e, r, h)), sp.Eq(here, 0)),
            (sp.IndexedBase(adjoint.name, real=True)[adjoint.indices], True)))
        backward = list(program.backward)
        backward.insert(backward.index(adjoint), count)
        program = program._replace(backward=tuple(backward))
        assignments = (*order, recovered)
        made = {a.name for a in order}
        reads = sorted(set().union(*(reads_of(a.expr) for a in assignments)) - made | {step.name})
        test = sp.StrictLessThan(CountNonzero(View(step.name)), View(live_name))
        guards.insert(0, Guard((adjoint.name,), None, assignments, tuple(reads),
                               f"an entry of {step.name} underflowed: {adjoint.name} there from the scores, in logs",
                               test))
        rewrites.append(f"{adjoint.name} in logs where {step.name} underflowed")
    return program._replace(backward_guards=tuple(guards), rewrites=tuple(rewrites))


def units_divided(result, units, c, finer):
    """result's value from its run in units of c (named units), where that is finite, else from finer_run's in
    units of its c_f (finer: finer_run's names, empty where there is no such run)."""
    value = sp.IndexedBase(units, real=True)[result.indices] / c
    if not finer:
        return value
    return FiniteOr(value, sp.IndexedBase(finer[result.name], real=True)[result.indices]
                    / sp.Symbol(finer[c.name], real=True))


def finer_run(again, proven, c, read, results, taken):
    """(assignments, {name: its name in them}) running the guard's steps again (again[0] reads read, the upstream adjoint) from
    c_f = c 2^-k, k >= 0 the least with c_f/c (terms) (1 + |f|) max|x| max|y| <= 2^(E-2)
    for each intermediate product f Sum(x y, V) of them (x an adjoint the guard computes, y an array it does not,
    read at c's run): MultiheadAttention's per-head g_k = Sum(g_A q, t)/sqrt(D), which overflows where g_A (finite at
    c) meets a large q, though dW_k = Sum(g_k key) is finite. Each step's value is then c_f/c times its value at c,
    each such product finite; c_f's value is divided out by the caller where the run at c is not finite, and only there (a smaller c loses a small gradient's
    digits, rescaled_adjoints)."""
    exponents = []
    for a in again[1:]:
        coefficient, total = a.expr.as_independent(Sum, as_Add=False)
        factors = sp.Mul.make_args(total.function) if a not in results and isinstance(total, Sum) else ()
        xs = [f for f in factors if isinstance(f, sp.Indexed) and f.base.name in proven]
        ys = [f for f in factors if isinstance(f, sp.Indexed) and f.base.name not in proven]
        if len(factors) != 2 or len(xs) != 1 or len(ys) != 1 or coefficient.has(sp.Indexed):
            continue
        terms = sp.Mul(*(hi - lo + 1 for _, lo, hi in total.limits)) * (1 + sp.Abs(coefficient))
        # + 5: the 2 of 2^(E-2), and one for each ceil(log2), which may come out 1 low (rescaled_scores)
        exponents.append(sp.ceiling(sp.log(terms, 2)) + 5 - LargestExponent(Str(ys[0].base.name)) + sum(
            sp.ceiling(log2(Maximum(FiniteOrZero(sp.Abs(f)), *((i, 0, extent(i) - 1) for i in f.indices))))
            for f in (xs[0], ys[0])))
    if not exponents:
        return (), {}
    names = {}
    for name in (c.name, read.base.name, *(a.name for a in again)):
        names[name] = fresh(f"{name}_finer", taken)
        taken.add(names[name])
    finer = sp.IndexedBase(names[read.base.name], real=True)

    def renamed(expr):
        return expr.replace(lambda e: isinstance(e, sp.Indexed) and e.base.name in names,
                            lambda e: sp.IndexedBase(names[e.base.name], real=True)[e.indices])
    return (Assignment(names[c.name], (), c * 2 ** -sp.Max(0, *exponents)),
            Assignment(finer.name, read.indices, sp.Symbol(names[c.name], real=True) * read),
            *(a._replace(name=names[a.name], expr=renamed(a.expr.xreplace({read: finer[read.indices]})))
              for a in again)), names


def product_in_units(result, proven, taken):
    """(assignments) computing a gradient f Sum(x y, V), x an adjoint the guard computes again from c g and y an
    array it does not (dK = Sum(g_A Q, t)/sqrt(D)), where it is not finite in units of a power of two of y: c2[F] =
    2^-k per entry F of y's axes outside V, with c2 (terms) (1 + |f|) max|x| max|y| <= 2^(E-2) (each max over the
    axes outside F), and the gradient f Sum(x (c2 y), V)/c2. Each partial sum is then finite, so the sign of a sum whose truth overflows is
    its own, and the division makes it the infinity of that sign: x y summed as it is overflows before the terms
    cancel (inf - inf, or the infinity of the other sign). Only there: c2 y rounds y's small entries away, which
    a finite entry may need (g_A = 0 at y's large entry, and the truth from a subnormal one). (result,) where result
    is no such product."""
    coefficient, total = result.expr.as_independent(Sum, as_Add=False)
    factors = sp.Mul.make_args(total.function) if isinstance(total, Sum) else ()
    adjoints = [f for f in factors if isinstance(f, sp.Indexed) and f.base.name in proven]
    others = [f for f in factors if isinstance(f, sp.Indexed) and f.base.name not in proven]
    if len(factors) != 2 or len(adjoints) != 1 or len(others) != 1:
        return (result,)
    (x,), (y,) = adjoints, others
    limits = {v: (v, lo, hi) for v, lo, hi in total.limits}
    own = tuple(i for i in y.indices if i not in limits)

    def largest(read):   # max |read| over its axes outside F, an input's inf left out (its own NaN policy)
        return Maximum(FiniteOrZero(sp.Abs(read)), *(limits.get(i, (i, 0, extent(i) - 1)) for i in read.indices
                                                     if i not in own))
    names = [fresh(n, taken) for n in (f"{result.name}_scale", f"{y.base.name}_units", f"{result.name}_plain")]
    taken |= set(names)
    c2, units, plain = (sp.IndexedBase(n, real=True) for n in names)
    terms = sp.Mul(*(hi - lo + 1 for _, lo, hi in total.limits)) * (1 + sp.Abs(coefficient))  # before f and after
    # + 5: the 2 of 2^(E-2), and one for each ceil(log2), which may come out 1 low (rescaled_scores)
    exponent = sp.ceiling(sp.log(terms, 2)) + sp.ceiling(log2(largest(x))) + sp.ceiling(log2(largest(y))) + 5
    return (result._replace(name=names[2]),
            Assignment(names[0], own, 2 ** -sp.Max(0, exponent - LargestExponent(Str(y.base.name)))),
            Assignment(names[1], y.indices, c2[own] * y),
            result._replace(expr=FiniteOr(plain[result.indices], coefficient * Sum(x * units[y.indices], *total.limits)
                                          / c2[own])))


def sums_to_one(program, step):
    """(the summed index, its limits) where SymPy proves sum over it of forward step's value 1 (a softmax P = e/Z[F],
    Z = Sum(e, s) a forward step: Sum(P, s) = Sum(e, s)/Z = 1), else None."""
    forward = {a.name: a for a in program.forward}
    factors = sp.Mul.make_args(step.expr)
    denominators = [f.base for f in factors if f.is_Pow and f.exp == -1 and isinstance(f.base, sp.Indexed)
                    and isinstance(getattr(forward.get(f.base.base.name), "expr", None), Sum)]
    for total in denominators:
        z = forward[total.base.name]
        if len(z.expr.limits) != 1 or tuple(z.indices) != tuple(total.indices):
            continue
        (v, lo, hi), = z.expr.limits
        if v not in step.indices or v in total.indices:
            continue
        summed = sums_factored(Sum(step.expr, (v, lo, hi))).xreplace({total: z.expr})
        if sp.simplify(summed - 1) == 0:
            return v, (v, lo, hi)
    return None


def split_sums(expr):
    """expr with each Sum of a sum written as the sum of Sums, their factors free of the summed index outside."""
    def split(total):
        return sp.Add(*(sums_factored(Sum(t, *total.limits)) for t in sp.Add.make_args(sp.expand(total.function))))
    return expr.replace(lambda e: isinstance(e, Sum), split)


def unchanged_by_a_shift(reader, inner, g_P, step, row, total):
    """Whether SymPy proves reader's value (the inner readers' values in place of their reads) the same with every
    g_P[.., s, ..] read as g_P - c[row], given total = Sum(step, s) = 1 (sums_to_one)."""
    c = sp.IndexedBase("c", real=True)

    def shifted(e):
        return e.xreplace({r: r - c[tuple(r.indices[step.indices.index(i)] for i in row)]
                           for r in e.atoms(sp.Indexed) if r.base == g_P})

    def composed(by):
        a = by(reader.expr)
        for b in inner:
            a = a.xreplace({r: by(b.expr) for r in a.atoms(sp.Indexed) if r.base.name == b.name})
        return a
    return sp.simplify(split_sums(composed(shifted) - composed(lambda e: e)).xreplace({total: 1})) == 0


def argmax_shifted(program, taken):
    """program with the adjoint g_P of each forward step P whose sum over an index s is 1 (sums_to_one: a softmax)
    shifted by its value at P's first largest entry a over s: g_P - g_P[.., a[F]], where the steps reading g_P give
    the same gradients (SymPy's proof: P (h - Sum(P h)) is unchanged by h - c, as Sum(P) = 1). It keeps the softmax's
    adjoint P (g_P - Sum(P g_P)) whole at a near one-hot row's largest entry, where P_a is near 1 and g_P,a -
    Sum(P g_P) cancels: shifted, that entry of g_P is 0 exactly, so g_A,a is -P_a Sum_{s != a} P_s (g_P,s - g_P,a),
    the others' terms alone (derive.softmax's vjp_at_argmax, the row operations' form, in index notation). Its cost
    is a pass for the argmax and one for the shift."""
    backward, rewrites = list(program.backward), list(program.rewrites)
    for step in program.forward:
        adjoint = next((a for a in backward if a.name == f"g_{step.name}"), None)
        found = sums_to_one(program, step) if adjoint is not None else None
        if found is None:
            continue
        v, limit = found
        readers = [a for a in backward if adjoint.name in reads_of(a.expr)]
        within = {a.name for a in readers}
        inner = [a for a in readers if any(a.name in reads_of(b.expr) for b in readers)]
        if any(a.name in program.returns or any(a.name in reads_of(b.expr) and b.name not in within
                                                for b in backward) for a in inner):
            continue
        row = tuple(i for i in step.indices if i != v)
        names = [fresh(n, taken) for n in (f"{step.name}_argmax", f"{adjoint.name}_top", f"{adjoint.name}_shifted")]
        taken |= set(names)
        at, top, shifted = (sp.IndexedBase(n, real=True) for n in names)
        g_P = sp.IndexedBase(adjoint.name, real=True)
        added = (Assignment(names[0], row, ArgFirstMax(sp.IndexedBase(step.name, real=True)[step.indices], limit)),
                 Assignment(names[1], row, g_P[tuple(at[row] if i == v else i for i in step.indices)]),
                 Assignment(names[2], adjoint.indices, g_P[adjoint.indices] - top[row]))

        def read_shifted(expr, g_P=g_P, shifted=shifted):
            return expr.xreplace({r: shifted[r.indices] for r in expr.atoms(sp.Indexed) if r.base == g_P})
        total = Sum(sp.IndexedBase(step.name, real=True)[step.indices], limit)
        if not all(unchanged_by_a_shift(a, inner, g_P, step, row, total) for a in readers if a not in inner):
            continue
        at_reader = backward.index(readers[0])
        backward[at_reader:at_reader] = added
        backward = [a._replace(expr=read_shifted(a.expr)) if a.name in within else a for a in backward]
        rewrites.append(f"g_{step.name} shifted by its value at the argmax of {step.name}")
    return program._replace(backward=tuple(backward), rewrites=tuple(rewrites))


# the rewrites of each assignment's scalar expression: the element-wise ones that are identities (1 - sigmoid gives
# GLU's gate derivative as sigmoid(b) sigmoid(-b)), then INDEX_REWRITES. Left out: the approximate ones, their
# thresholds found for an element-wise op's one variable x; those INDEX_REWRITES holds; the shifts, which max_shifted
# makes here over any axes (the row max's ClassMax is an element-wise op's one class axis); and the steps as
# branches, whose Piecewise would leave a Sum over the index it tests (masks of indices is their index form)
ELEMENT_WISE_ONLY = {"shift by the row max", "1 - softmax", "exponential sums shifted", "steps as branches"}
ASSIGNMENT_REWRITES = tuple(r for r in REWRITES if r[2] and r[0] not in ELEMENT_WISE_ONLY
                            and r[0] not in {name for name, _, _ in INDEX_REWRITES}) + INDEX_REWRITES


def rewritten(program, taken):
    """program after max_shifted and mean_corrected, which rewrite it as a whole, then every rewrite of
    ASSIGNMENT_REWRITES on each assignment, then steps_read_back and adjoints_inlined on the backward
    program and exponents_masked on the forward one."""
    program = mean_corrected(max_shifted(program, taken), taken)

    applied = list(program.rewrites)

    def each(assignments):
        out = []
        for a in assignments:
            expr, names = rewritten_by(a.expr, ASSIGNMENT_REWRITES)
            applied.extend(name for name in names if name not in applied)
            out.append(a._replace(expr=expr))
        return tuple(out)
    program = program._replace(forward=each(program.forward), backward=each(program.backward))
    program = adjoints_inlined(steps_read_back(program._replace(rewrites=tuple(applied))))
    forward = tuple(a._replace(expr=exponents_masked(a.expr)) for a in program.forward)
    masked = ("exponents masked",) if forward != program.forward else ()
    return program._replace(forward=forward, rewrites=program.rewrites + masked)


def fresh(name, taken):
    """name, or name with a number, whichever no array, option, size or index of the op has."""
    return next(n for n in itertools.chain([name], (f"{name}{k}" for k in itertools.count(1))) if n not in taken)


# Stage 4: the array program


class View(sp.Symbol):
    """An array read as NumPy source: its name and the indexing that aligns it to a scope."""

    def __new__(cls, text):
        return super().__new__(cls, text, real=True)


class ArrayOperation(sp.Function):
    """An operation of the array program: an array-valued function of arrays and of its printed settings
    (Str arguments, which SymPy would otherwise take as non-commuting)."""

    def _eval_is_commutative(self):
        return True

    def _eval_is_real(self):
        return True


class Aligned(ArrayOperation):
    """An array result indexed by the given text (a slice, None for a broadcast axis, a transpose)."""


class Einsum(ArrayOperation):
    """np.einsum(subscripts, *operands) along the contraction path chosen at generation time."""


class MatMul(ArrayOperation):
    """a @ b: a contraction of two arrays over one index, their leading axes a batch (np.matmul's form)."""


class Reduce(ArrayOperation):
    """np.<ufunc>.reduce(operand, axis=axes): add for a Sum, maximum for a Maximum."""


class ArgMax(ArrayOperation):
    """np.argmax(array, axis): the position of the first largest entry along one axis (derive.tensor.ArgFirstMax)."""


class Gather(ArrayOperation):
    """np.take_along_axis(array, index, axis) with the gathered axis dropped: x[n, c[n]]."""


class GatherAtArgmax(Gather):
    """A Gather at an argmax's positions (first_argmax): where the axis is empty, zeros (gathered_or_0)."""


class Take(ArrayOperation):
    """np.take(array, index, axis): the label's own axes in place of the gathered one: weight[c[n], d]."""


class Window(ArrayOperation):
    """sliding_window_view(array, size, axis): the last axis a window along axis, which holds positions."""


class Diagonal(ArrayOperation):
    """np.diagonal(array, 0, axis1, axis2): the entries where two axes of one index agree, as the last axis (a
    mask of windows read at a window of its own: max pooling's m[n, c, h - u, w - v, u, v])."""


class FirstMaxMask(ArrayOperation):
    """first_max(array, axes): 1 at the first largest entry over axes, 0 elsewhere (derive.tensor.FirstMax)."""


class Padded(ArrayOperation):
    """np.pad(array, widths): zeros around the axes, so a shifted read past an end reads 0."""


class WindowsAdded(ArrayOperation):
    """windows_added(windows, shape, axes, taps, stride): each window's entries added back where a strided
    sliding window read them (col2im), the adjoint of the window read."""


class Reshaped(ArrayOperation):
    """array.reshape(shape): a window view copied once into a matrix (im2col), or a product's matrix given back
    its axes."""


class Broadcast(ArrayOperation):
    """np.broadcast_to(value, shape): a value of fewer axes than its target."""


def new_array(value):
    """Whether NumPy makes a new array of value, not a view of an array it reads (a buffer to write into)."""
    if isinstance(value, (sp.Symbol, Aligned, Broadcast, Window)):
        return False
    return not isinstance(value, Einsum) or len(value.args) > 3   # one operand's einsum may be a view of it


class Statement(NamedTuple):
    """One line of an array program: target = value, or an update of a region of target."""

    target: str
    value: sp.Expr
    form: str = "define"           # define | zeros | add (target[region] += value) | scatter (at the labels)
    #                                | accumulate (at labels that may repeat, each adding) | guard (region's
    #                                statements run where target is not all finite; value: (target, what they read))
    region: object = ""            # add: the slice it adds into; scatter: (index array, axis, into zeros);
    #                                accumulate: (index array, axis); guard: (Statement, ...)

    def source(self, printer):
        value = printer.doprint(self.value)
        if self.form == "define":
            return f"{self.target} = {value}"
        if self.form == "zeros":
            return f"{self.target} = np.zeros({value}, dtype)"
        if self.form == "add":
            return f"{self.target}[{self.region}] += {value}"
        if self.form == "guard":
            inner = "".join(f"\n        {line}" for s in self.region for line in s.source(printer).split("\n"))
            checks, _, why, *condition = self.value.args
            if condition:   # its own test; log(0) of an entry is -inf, whose exponential is the right 0
                return (f"if {printer.doprint(condition[0])}:  # {why.name}\n"
                        f"    with np.errstate(divide=\"ignore\", invalid=\"ignore\"):{inner}")
            test = " and ".join(f"np.isfinite({printer.doprint(c)}).all()" for c in checks.args)
            # a bound of entries all 0 or not finite (a NaN input) is 0: its log2 -inf gives the scale 1, no warning
            return (f"if not {test if len(checks.args) == 1 else f'({test})'}:  # {why.name}\n"
                    f"    with np.errstate(divide=\"ignore\"):  # log2(0): a bound of no finite entry, the scale 1{inner}")
        if self.form == "accumulate":
            return f"{self.target} = added_at({self.target}, {printer.doprint(self.region[0])}, {self.region[1]}, {value})"
        index, axis, into_zeros = printer.doprint(self.region[0]), self.region[1], self.region[2]
        if not into_zeros:      # added to what is there
            taken = f"np.take_along_axis({self.target}, {index}, axis={axis})"
            value = (f"{taken} - {printer.parenthesize(-self.value, PRECEDENCE['Add'])}"
                     if self.value.could_extract_minus_sign() else f"{taken} + {value}")
        return f"np.put_along_axis({self.target}, {index}, {value}, axis={axis})"


@dataclass(frozen=True)
class ArrayFunction:
    """A generated function: its arguments, the sizes it reads from their shapes, its statements, what it
    returns; derivation lists the assignments it lowers, for the reader."""

    name: str
    doc: str
    args: tuple
    sizes: tuple                   # ((size, how it is read or computed), ...)
    statements: tuple
    returns: tuple
    derivation: tuple
    imports: tuple = ()            # sliding_window_view where a window is read
    shapes: tuple = ()             # ((array, its shape at the check sizes), ...) of the arguments and assignments

    def lines(self, printer=None):
        """The body's source lines: sizes, shared subexpressions and statements in order; in NumPy (TensorPrinter)
        each operation on full-shape arrays a ufunc call into a buffer no later line reads (codegen.inplace)."""
        printer = printer or TensorPrinter()
        body = (tensor_in_place(self, printer, View, new_array) if isinstance(printer, TensorPrinter) and self.shapes
                else [s.source(printer) for s in self.statements])
        return [f"{s} = {how}" for s, how in self.sizes] + [line for text in body for line in text.split("\n")]

    def __str__(self):
        return "\n".join([f"def {self.name}({', '.join(self.args)}):", *(f"    {line}" for line in self.lines()),
                          f"    return {', '.join(self.returns)}"])


class Scope(NamedTuple):
    """The indices an expression is broadcast over, in order, each with its range and whether it is summed."""

    indices: tuple
    ranges: dict                   # {index: (lo, hi)}
    summed: frozenset = frozenset()

    def restricted(self, keep):
        return Scope(tuple(i for i in self.indices if i in keep), {i: self.ranges[i] for i in keep if i in self.ranges},
                     self.summed & set(keep))


def full_scope(indices):
    return Scope(tuple(indices), {i: (sp.S.Zero, extent(i) - 1) for i in indices})


def extent(index):
    """The size of an index's range: K for k, and for k' too (a Sum's index the derivation renamed)."""
    return size_of(sp.Symbol(str(index).rstrip("'"), integer=True))


class SavedWindows:
    """The window matrices (im2col copies) forward makes, each named so that forward returns it and backward
    reads it, or its transpose, where it contracts the same window read along the same rows and columns
    (Conv2d's dweight reads forward's x[n, c, i + u, j + v] as (c u v, n i j)): one copy of the window (29 MB at
    (64, 16, 28, 28), 3x3) where there were two, as a tape saves a product's operand."""

    def __init__(self, taken):
        self.taken, self.names, self.shapes, self.read = set(taken), {}, {}, []

    @staticmethod
    def key(read, groups):
        return str(read).replace("'", ""), tuple(tuple(str(i).rstrip("'") for i in group) for group in groups)

    def found(self, read, groups, note=True):
        """(the saved name, transposed) of the matrix of read over groups (rows, columns), else None; note: as
        read (an argument of backward, a return of forward)."""
        for key, transposed in ((self.key(read, groups), False), (self.key(read, groups[::-1]), True)):
            if key in self.names:
                self.read += [self.names[key]] * (note and self.names[key] not in self.read)
                return self.names[key], transposed
        return None

    def named(self, read, groups, shape):
        """A fresh name for the matrix of read over groups, which forward computes and may return."""
        name = fresh(f"{read.base.name}_windows", self.taken)
        self.taken.add(name)
        self.names[self.key(read, groups)], self.shapes[name] = name, shape
        return name


class ArrayLowering:
    """Lowers the assignments of one function of an op into statements, given every array's axes; windows: the
    SavedWindows forward names (saving: this is forward) or backward reads."""

    def __init__(self, op, axes, check_sizes, windows=None, saving=False):
        self.op, self.axes, self.check_sizes = op, axes, check_sizes
        self.windows, self.saving = windows, saving
        self.statements, self.sizes, self.imports, self.dtype = [], set(), set(), False
        self.size_symbols = ({extent(i) for axes in axes.values() for i in axes} | set(op.sizes)
                             | {sp.Symbol(s, integer=True, positive=True) for s in op.given_sizes})
        # a kernel's taps: an index of a param's axis or of a size the constructor takes (a pooling's window)
        self.kernel_sizes = ({size_of(i) for axes, _ in op.params.values() for i in axes}
                             | {sp.Symbol(s, integer=True, positive=True) for s in op.given_sizes})
        # a window's strided positions (the output's axes i, j of stride="i j"): {index name: its stride, the
        # kernels' argument stride[k]}; the derivation is the stride-1 window's, read at every stride-th position
        output = op.steps[-1].indices
        self.strides = {str(output[at]): sp.Symbol(f"stride[{k}]", integer=True, positive=True)
                        for k, at in enumerate((op.window or {}).get("strided", ()))}
        self.stride_used = False

    def fail(self, problem):
        raise LoweringError(f"{self.op.name}: {problem}")

    # reading arrays

    def integer(self, expr):
        """An index or size expression as Python source; its sizes are noted as read."""
        self.sizes |= sp.sympify(expr).free_symbols & self.size_symbols
        return ScalarPrinter().doprint(sp.sympify(expr))

    def same(self, a, b):
        return sp.expand(in_base_sizes(sp.sympify(a) - b, self.op.sizes)) == 0

    def native(self, access, scope):
        """(expr, axes): access as a NumPy expression whose axes are the index symbols axes, in its own order."""
        name = access.base.name
        own = self.axes[name]
        if len(own) != len(access.indices):
            self.fail(f"{access} has {len(access.indices)} indices, {name} has {len(own)}")
        basic, axes, windows, labels, flips = [], [], [], [], []
        for index, axis in zip(access.indices, own):
            size = size_of(axis)
            if isinstance(index, sp.Indexed):
                labels.append((len(axes), index))
                basic.append(":")
                axes.append(None)
                continue
            free = [i for i in scope.indices if i in index.free_symbols]
            if not free:
                basic.append(self.integer(index))
                continue
            if len(free) == 2:
                windows.append((len(axes), index, free, size))
                basic.append(":")
                axes.append(None)
                continue
            (i,) = free if len(free) == 1 else self.fail(f"index {index} of {access} reads {len(free)} indices")
            found = linear(index, i)
            if found is None:
                self.fail(f"index {index} of {access} is not i + c or c - i")
            slope, offset = found
            lo, hi = scope.ranges[i]
            start, stop = (lo + offset, hi + offset + 1) if slope == 1 else (offset - hi, offset - lo + 1)
            if slope == -1:
                flips.append(len(axes))
            text = ("" if self.same(start, 0) else self.integer(start)) + ":" + (
                "" if self.same(stop, size) else self.integer(stop))
            basic.append(text)
            axes.append(i)
        expr = View(name) if all(b == ":" for b in basic) else View(f"{name}[{', '.join(trimmed(basic))}]")
        if flips:
            expr = Aligned(expr, Str(", ".join("::-1" if a in flips else ":" for a in range(max(flips) + 1))))
        # every window's axis padded by one np.pad before the first window: a pad after it would copy that window
        pads = [self.window_padding(index, free, size, scope) for _, index, free, size in windows]
        if any(front != 0 or back != 0 for front, back in pads):
            widths = {at: f"({self.integer(front)}, {self.integer(back)})"
                      for (at, *_), (front, back) in zip(windows, pads)}
            expr = Padded(expr, Str(tuple_text([widths.get(a, "(0, 0)") for a in range(len(axes))])))
        for (at, index, free, size), (front, back) in zip(windows, pads):
            expr, axes = self.windowed(expr, axes, at, index, free, size, scope, front, back)
        for at, label in reversed(labels):
            expr, axes = self.gathered(expr, axes, at, label, scope)
        while len({a for a in axes if a is not None}) < len([a for a in axes if a is not None]):
            twice = next(a for n, a in enumerate(axes) if a is not None and a in axes[n + 1:])
            one, two = [n for n, a in enumerate(axes) if a == twice][:2]
            expr = Diagonal(expr, Str(str(one)), Str(str(two)))
            axes = [a for n, a in enumerate(axes) if n not in (one, two)] + [twice]
        return expr, tuple(axes)

    def window_padding(self, index, free, size, scope):
        """(front, back): the zeros a shifted read x[..., p + w, ...] needs before and after x's axis of size
        size to stay inside it over the whole ranges of p and w."""
        for i in free:
            lo, hi = scope.ranges[i]
            if not self.same(lo, 0) or not self.same(hi, extent(i) - 1):
                self.fail(f"the shifted read of index {index} needs the whole range of {i}, not {lo}..{hi}")
        slopes = {i: linear(index, i)[0] for i in free}
        offset = index.subs({i: 0 for i in free})
        low = offset + sum(-(extent(i) - 1) for i in free if slopes[i] == -1)
        high = offset + sum(extent(i) - 1 for i in free if slopes[i] == 1)
        return self.padding(-low), self.padding(high - (size - 1))

    def windowed(self, expr, axes, at, index, free, size, scope, front, back):
        """The view of x[..., p + w, ...] with p a position and w a window axis (the summed one where one
        is), x padded by front and back already, as a sliding window (the window axis last); a strided
        position (self.strides) read at every stride-th entry, x[..., s p + w, ...], in the view itself."""
        summed = [i for i in free if i in scope.summed]
        window, position = (summed[0], next(i for i in free if i != summed[0])) if len(summed) == 1 else free[::-1]
        slopes = {i: linear(index, i)[0] for i in free}
        step = {i: self.stride_of(i) for i in free}
        if any(step.values()) and -1 in slopes.values():
            self.fail(f"the shifted read of index {index} reads a strided position backwards")
        offset = index.subs({i: 0 for i in free})
        # index + front = p~ + w~ + start, p~ and w~ the positions counted from 0 in reading order
        start = sp.expand(offset + front - sum(extent(i) - 1 for i in free if slopes[i] == -1))
        length = size + front + back
        expr = Window(expr, Str(self.integer(self.span(window))), Str(str(at)))
        self.imports.add("sliding_window_view")
        available = sp.expand(length - extent(window) + 1 - start)   # at stride 1
        exact = self.same(available, extent(position)) and not step[window]
        post = [":"] * len(axes) + [":"]
        post[at] = ("" if self.same(start, 0) else self.integer(start)) + ":" + (
            "" if exact else self.integer(start + self.span(position))) + (
            f":{self.integer(step[position])}" if step[position] else "")
        if slopes[window] == -1:
            post[-1] = "::-1"
        if step[window]:
            post[-1] = f"::{self.integer(step[window])}"
        if any(p != ":" for p in post):
            expr = Aligned(expr, Str(", ".join(trimmed(post))))
        if slopes[position] == -1:
            expr = Aligned(expr, Str(", ".join([":"] * at + ["::-1"])))
        axes = list(axes)
        axes[at] = position
        return expr, axes + [window]

    def stride_of(self, index):
        """The stride symbol of a strided position index (noted as read), else None."""
        found = self.strides.get(str(index).rstrip("'"))
        self.stride_used |= found is not None
        return found

    def span(self, index):
        """How many entries of an axis the positions of index read: its extent, s (extent - 1) + 1 at stride s."""
        step = self.stride_of(index)
        return extent(index) if step is None else step * (extent(index) - 1) + 1

    def padding(self, amount):
        """max(0, amount) for an amount whose sign the sizes decide: each declared size is positive (M =
        L - J + 1 >= 1 says L - J >= 0), so the amount is also read with a formula solved for a size in it."""
        forms = [sp.expand(amount), sp.expand(in_base_sizes(amount, self.op.sizes))]
        for size, formula in self.op.sizes.items():
            for base in formula.free_symbols:
                forms += [sp.expand(forms[1].subs(base, solution)) for solution in sp.solve(sp.Eq(size, formula), base)]
        if any(form.is_nonpositive for form in forms):
            return sp.S.Zero
        if any(form.is_nonnegative for form in forms):
            return forms[0]
        self.fail(f"cannot tell whether a shifted read passes the end of its array by {amount}")

    def gathered(self, expr, axes, at, label, scope):
        """x[..., c[F], ...]: np.take_along_axis along the label's axis, that axis dropped."""
        index, index_axes = self.native(label, scope)
        others = [a for a in axes if a is not None]
        if not set(index_axes) & set(others):   # labels over axes of their own (an embedding's tokens)
            return Take(expr, index, Str(str(at))), [*axes[:at], *index_axes, *axes[at + 1:]]
        if not set(index_axes) <= set(others):
            self.fail(f"label {label} reads an index its array's other axes lack")
        slot = sp.Dummy("slot")
        order = [slot if a is None and n == at else a for n, a in enumerate(axes)]
        index = self.align(index, index_axes, order, full=True)
        at_argmax = isinstance(label, sp.Indexed) and label.base.name in getattr(self, "argmaxes", set())
        if at_argmax:
            self.imports.add("gathered_or_0")
        expr = (GatherAtArgmax if at_argmax else Gather)(expr, index, Str(str(at)))
        return expr, [a for n, a in enumerate(axes) if n != at]

    def align(self, expr, axes, order, full=False):
        """expr (axes in its own order) broadcast to the order: transposed if its order differs, None
        where it has no axis (leading ones left to broadcasting, unless full)."""
        axes = list(axes)
        missing = [a for a in axes if a not in order]
        if missing:
            self.fail(f"axis {missing[0]} is not in the scope {order}")
        ordered = sorted(axes, key=order.index)
        if ordered != axes:
            expr = Aligned(expr, Str(f"transpose({', '.join(str(axes.index(a)) for a in ordered)})"))
        if not ordered:
            return expr
        first = 0 if full else order.index(ordered[0])
        entries = [":" if a in ordered else "None" for a in order[first:]]
        entries = trimmed(entries)
        return Aligned(expr, Str(", ".join(entries))) if entries else expr

    # expressions

    def value(self, expr, scope):
        """expr over arrays as a NumPy expression broadcast over scope."""
        if isinstance(expr, sp.Indexed):
            return self.align(*self.native(expr, scope), list(scope.indices))
        if isinstance(expr, Sum):
            return self.summed(expr, scope)
        if isinstance(expr, Maximum):
            return self.reduced(expr, scope, "maximum")
        if isinstance(expr, ArgFirstMax):
            inner, free = self.inner(expr, scope)
            (position,) = [inner.indices.index(v) for v, *_ in expr.limits]
            result = ArgMax(self.value(expr.function, inner), Str(str(position)))
            self.imports.add("first_argmax")
            return self.align(result, [i for i in inner.indices if i in free], list(scope.indices))
        if isinstance(expr, FirstMax):   # over the scope, its indices an axis each (a step's own)
            if not set(expr.args[1:]) <= set(scope.indices):
                self.fail(f"{expr} must take the largest over indices of its step")
            self.imports.add("first_max")
            positions = sorted(list(scope.indices).index(v) for v in expr.args[1:])
            if positions != list(range(len(scope.indices) - len(positions), len(scope.indices))):
                self.fail(f"{expr}: its indices must be its step's last ones")
            return FirstMaxMask(self.value(expr.args[0], scope), Str(axis_text(positions)))
        if isinstance(expr, sp.KroneckerDelta):
            self.fail(f"{expr} is no factor of a term of an assignment (a scatter) here")
        if isinstance(expr, sp.Symbol) and expr in scope.ranges:
            lo, hi = scope.ranges[expr]
            start = "" if self.same(lo, 0) else f"{self.integer(lo)}, "
            values = View(f"np.arange({start}{self.integer(hi + 1)})")
            return self.align(values, (expr,), list(scope.indices))
        if isinstance(expr, sp.Symbol):
            self.sizes |= {expr} & self.size_symbols
            return expr
        if not expr.args or isinstance(expr, sp.IndexedBase):
            return expr
        return expr.func(*(self.value(arg, scope) for arg in expr.args))

    def inner(self, total, scope):
        """(scope of a Sum's or Maximum's summand, its free indices in scope's order): the summand's indices
        in the order of its widest array read (BatchNorm's x[n, k] in a Sum over n: (n, k), no transpose),
        then any others in scope's order, then the summed ones."""
        variables = [v for v, *_ in total.limits]
        free = [i for i in scope.indices if i in total.free_symbols]
        reads = sorted(total.function.atoms(sp.Indexed), key=lambda r: (-len(r.indices), sp.default_sort_key(r)))
        native = [i for r in reads[:1] for i in r.indices if i in set(free) | set(variables)]
        order = list(dict.fromkeys(native + free + variables))
        ranges = {**{i: scope.ranges[i] for i in free}, **{v: (lo, hi) for v, lo, hi in total.limits}}
        return Scope(tuple(order), ranges, frozenset(variables)), free

    def widened(self, total, scope):
        """total with each range narrowed by a Max or Min back to the whole range, where the narrowing only
        kept a shifted read inside its array (the padded window then reads 0 outside it); a range narrowed
        by a condition on indices alone (s <= t) is the whole range with the summand's first factor masked."""
        limits, masks = [], []
        for depth, (v, lo, hi) in enumerate(total.limits):
            if self.same(lo, 0) and self.same(hi, extent(v) - 1):
                limits.append((v, lo, hi))
                continue
            conditions = []
            for access in total.function.atoms(sp.Indexed):
                for index, axis in zip(access.indices, self.axes[access.base.name]):
                    if not isinstance(index, sp.Indexed) and v in index.free_symbols and len(
                            index.free_symbols & set(scope.indices) | {v}) > 1:
                        conditions += [sp.Le(0, index), sp.Le(index, size_of(axis) - 1)]
            outer = {**scope.ranges, **{w: (l, h) for w, l, h in total.limits[depth + 1:]}}
            expected, _ = folded(conditions, v, sp.S.Zero, extent(v) - 1, outer, self.op.sizes)
            if conditions and not (self.same(expected[0], lo) and self.same(expected[1], hi)):
                self.fail(f"the range {lo}..{hi} of {v} is narrower than its shifted reads need; no form for both")
            if not conditions:   # a range from a condition on the indices (a causal mask): the summand masked
                masks.append(sp.And(sp.Le(lo, v), sp.Le(v, hi)))
            limits.append((v, sp.S.Zero, extent(v) - 1))
        if not masks:
            return Sum(total.function, *limits)
        first, *rest = sp.Mul.make_args(total.function)
        return Sum(sp.Mul(sp.Piecewise((first, sp.And(*masks)), (0, True)), *rest), *limits)

    def summed(self, total, scope):
        """A Sum: np.einsum over a product's factors, or the summand reduced by np.add.reduce."""
        total = self.widened(nested(total), scope)
        added = self.windows_added(total, scope)
        if added is not None:
            return added
        total = taps_reversed(total)
        inner, free = self.inner(total, scope)
        variables = [v for v, *_ in total.limits]
        coefficient, rest = total.function.as_independent(*variables, as_Add=False)
        for v in [v for v in variables if v not in rest.free_symbols]:
            coefficient, variables = coefficient * extent(v), [w for w in variables if w != v]
            inner = inner.restricted([i for i in inner.indices if i != v])
        if not variables:
            return self.value(coefficient * rest, scope)
        factors = sp.Mul.make_args(rest)
        reads = [f for f in factors if isinstance(f, sp.Indexed)]
        operands = [self.native(f, inner) for f in reads]
        others = sp.Mul(*(f for f in factors if not isinstance(f, sp.Indexed)))
        if others != 1:
            sub = inner.restricted(others.free_symbols & set(inner.indices))
            operands.append((self.value(others, sub), sub.indices))
        if len(operands) == 1:
            (operand, axes), = operands
            kept = [a for a in axes if a not in variables]
            result = (self.taps_summed(operand, axes, kept) if all(extent(v) in self.kernel_sizes for v in variables)
                      and operand.has(Window) else None)
            result = result or Reduce(operand, Str(axis_text(sorted(axes.index(v) for v in variables))), Str("add"))
            return self.value(coefficient, scope) * self.align(result, kept, list(scope.indices))
        product = self.einsum(operands, free, reads if others == 1 else ())
        return self.value(coefficient, scope) * self.align(product, free, list(scope.indices))

    def einsum(self, operands, out, reads=()):
        """Einsum over operands [(expr, axes)] giving the axes out, along the path np.einsum_path chooses at
        the check sizes."""
        letters = einsum_letters([a for _, axes in operands for a in axes])
        subscripts = ",".join("".join(letters[a] for a in axes) for _, axes in operands) + "->" + "".join(
            letters[a] for a in out)
        dummies = [np.zeros([int(in_base_sizes(extent(a), self.op.sizes).subs(self.check_sizes)) for a in axes])
                   for _, axes in operands]
        path, _ = np.einsum_path(subscripts, *dummies, optimize="optimal")
        path = path if path_pays(subscripts, path) else False
        return (matmul(operands, out) or self.window_product(operands, out, reads)
                or Einsum(Str(f'"{subscripts}"'), Str(repr(path)), *(expr for expr, _ in operands)))

    def windows_added(self, total, scope):
        """A Sum over taps t of reads at p - t of a strided position's axis (the transposed convolution's
        g[n, o, h - u], max pooling's m[n, c, h - u, w - v, u, v]), p an index of the scope, as its adjoint's
        form: the summand at each position i = p - t and tap t, G[..., i, t] (the Sum over the other summed
        indices, as a contraction of its own), added into p = s i + t by windows_added (col2im). Only the
        positions the stride kept are read, and none outside the array; None where the Sum has no such read."""
        variables = {v for v, *_ in total.limits}
        pairs = {}                           # {p: (t, the position index, its stride)}
        for read in total.function.atoms(sp.Indexed):
            for index, axis in zip(read.indices, self.axes[read.base.name]):
                step = None if isinstance(index, sp.Indexed) else self.strides.get(str(axis))
                taps = [t for t in index.free_symbols if t in variables] if step is not None else []
                outer = [p for p in index.free_symbols if p in scope.indices and p not in variables]
                if len(taps) == len(outer) == 1 and sp.expand(index - outer[0] + taps[0]) == 0:
                    if pairs.setdefault(outer[0], (taps[0], axis, step)) != (taps[0], axis, step):
                        return None
        if not pairs or {a for _, a, _ in pairs.values()} & (set(scope.indices) | variables):
            return None
        function = total.function.xreplace({p - t: axis for p, (t, axis, _) in pairs.items()})
        if function.free_symbols & set(pairs):
            return None                      # p read elsewhere than at p - t
        self.imports.add("windows_added")
        self.stride_used = True
        taps, positions = [t for t, _, _ in pairs.values()], [a for _, a, _ in pairs.values()]
        rest = [limit for limit in total.limits if limit[0] not in taps]
        kept = [i for i in scope.indices if i not in pairs]
        # G's axes: the taps before the positions, so that a product's matrix G[..., t] is a contiguous slice
        order = kept + taps + positions
        ranges = {**{i: scope.ranges[i] for i in kept}, **{i: (sp.S.Zero, extent(i) - 1) for i in taps + positions}}
        windows = self.value(Sum(function, *rest) if rest else function, Scope(tuple(order), ranges))
        target = [pairs[i][1] if i in pairs else i for i in scope.indices] + taps
        windows = transposed(windows, [order.index(i) for i in target])
        return WindowsAdded(windows, *(Str(tuple_text(entries)) for entries in (
            [self.integer(extent(i)) for i in scope.indices], [scope.indices.index(p) for p in pairs],
            [self.integer(extent(t)) for t in taps], [self.integer(step) for _, _, step in pairs.values()])))

    def taps_summed(self, operand, axes, kept):
        """The sum of windows over their few taps (a pooling's) as np.einsum's own loop, one pass over the
        windows: np.add.reduce over such short trailing axes runs an inner loop per window, 2.2x as long."""
        letters = einsum_letters(axes)
        return Einsum(Str(f'"{"".join(letters[a] for a in axes)}->{"".join(letters[a] for a in kept)}"'), Str("False"),
                      operand)

    def window_product(self, operands, out, reads):
        """The contraction of a sliding window with one other array (im2col) as one matrix product (np.matmul,
        BLAS), where it is one: each operand arranged (transposed, then copied by reshape) to a matrix of rows by
        columns, any leading axes of out the window's alone a batch the other broadcasts over, and the product
        given back its axes (transposed to out where the matrix order needs it). Of the layouts, the one whose
        window matrix ends with the positions along the window's source's last axis: its copy reads runs of
        that axis, contiguous (a layout ending with the kernel's few taps copies 3 entries at a time, and
        np.einsum's tensordot chose one: 18 ms of Conv2d's 59). None where no layout ends so (the einsum path).
        Also the product of two plain arrays into windows (windows_added's G), which any layout suits."""
        windowed = [k for k, (expr, _) in enumerate(operands) if expr.has(Window)]
        if (len(operands) != 2 or len(reads) != 2 or len(windowed) > 1
                or not (windowed or any(str(i) in self.strides for i in out))):
            return None
        x = windowed[0] if windowed else next(k for k in (0, 1) if out[0] in operands[k][1])
        a = 1 - x
        x_axes, a_axes = operands[x][1], operands[a][1]
        summed = [i for i in x_axes if i in a_axes]
        if not summed or set(summed) & set(out):
            return None
        source = {i: n for n, index in enumerate(reads[x].indices) if not isinstance(index, sp.Indexed)
                  for i in index.free_symbols if i in x_axes}
        taps = {i for i in x_axes if extent(i) in self.kernel_sizes}
        last = [i for i in x_axes if source.get(i) == len(reads[x].indices) - 1]
        run = [i for i in last if i not in taps or len(last) == 1] if windowed else [None]
        if len(run) != 1:
            return None
        summed.sort(key=lambda i: (source[i], i not in taps))
        owner = {**{i: x for i in x_axes}, **{i: a for i in a_axes}}
        candidates = list(layouts(out, owner, x))
        if windowed and self.windows is not None and not self.saving:
            # forward's window read again: first the layout that reads it as saved, not transposed (Conv2d's
            # dweight (C U V, N I J) x (N I J, O) took 7.4 ms, (O, N I J) x (N I J, C U V) 9.5, one thread)
            candidates.sort(key=lambda layout: self.saved_transposed(reads[x], summed, owner[layout[1][0][0]] == x,
                                                                     *layout))
        for lead, groups in candidates:
            first = owner[groups[0][0]]
            arranged = {first: [groups[0], summed], 1 - first: [summed, groups[1]]}
            saved = not lead and windowed and self.windows is not None and (
                self.saving or self.windows.found(reads[x], arranged[x], note=False))
            if windowed and arranged[x][-1][-1] != run[0] and not (saved and not self.saving):
                continue
            batch = [[i] for i in out[:lead]]
            product = MatMul(*(self.window_matrix(reads[k], *operands[k], arranged[k]) if saved and k == x
                               else self.matrix(*operands[k], ([] if k == a else batch) + arranged[k])
                               for k in (first, 1 - first)))
            order = [*out[:lead], *groups[0], *groups[1]]
            product = Reshaped(product, Str(self.shape_text([[i] for i in order])))
            if order != list(out):
                product = Aligned(product, Str(f"transpose({', '.join(str(order.index(i)) for i in out)})"))
            return product
        return None

    def window_matrix(self, read, expr, axes, groups):
        """The matrix of a window read over groups (rows, columns): in forward copied (im2col) under a name
        of its own, which it returns where backward reads it; in backward that name (or its transpose)."""
        if not self.saving:
            name, transposed = self.windows.found(read, groups)
            return Aligned(View(name), Str("T")) if transposed else View(name)
        shape = tuple(int(in_base_sizes(sp.Mul(*map(extent, group)), self.op.sizes).subs(self.check_sizes))
                      for group in groups)
        name = self.windows.named(read, groups, shape)
        self.statements.append(Statement(name, self.matrix(expr, axes, groups)))
        return View(name)

    def saved_transposed(self, read, summed, window_first, lead, groups):
        """Whether a layout (lead, groups) of a product reads forward's saved matrix of the window read
        transposed, or not at all (window_first: the window's matrix is the left one, its rows groups[0])."""
        found = None if lead else self.windows.found(
            read, [groups[0], summed] if window_first else [summed, groups[1]], note=False)
        return found is None or found[1]

    def matrix(self, expr, axes, groups):
        """expr (its axes in its own order) transposed to the order of groups and reshaped, each group one axis."""
        order = [i for group in groups for i in group]
        if list(axes) != order:
            expr = Aligned(expr, Str(f"transpose({', '.join(str(list(axes).index(i)) for i in order)})"))
        return Reshaped(expr, Str(self.shape_text(groups)))

    def shape_text(self, groups):
        """N, C*U*V, I*J: the sizes of groups of indices, each group's product in the group's order, as Python
        source (its sizes noted as read)."""
        self.integer(sp.Mul(*(extent(i) for group in groups for i in group)))
        return ", ".join("*".join(str(extent(i)) for i in group) for group in groups)

    def reduced(self, total, scope, ufunc):
        """A Maximum: the summand over its scope, reduced by np.maximum.reduce over the summed axes."""
        inner, free = self.inner(total, scope)
        positions = sorted(inner.indices.index(v) for v, *_ in total.limits)
        result = Reduce(self.value(total.function, inner), Str(axis_text(positions)), Str(ufunc))
        return self.align(result, [i for i in inner.indices if i in free], list(scope.indices))

    # assignments

    def assign(self, assignment):
        """The statements computing assignment: its plain terms, then each guarded term into its slice and
        each term at a label scattered."""
        target, indices = assignment.name, assignment.indices
        if isinstance(assignment.expr, ArgFirstMax):
            self.argmaxes = getattr(self, "argmaxes", set()) | {target}
        scope = full_scope(indices)
        plain, regions, scatters, accumulated = [], [], {}, []
        for term in sp.Add.make_args(assignment.expr):
            guard = self.guard(term, indices)
            at_labels = self.at_labels(term, indices)
            delta = next((f for f in sp.Mul.make_args(term) if isinstance(f, sp.KroneckerDelta)), None)
            at = [a for a in delta.args if a not in indices] if delta is not None else None
            if guard is not None:
                regions.append(guard)
            elif at_labels is not None:
                accumulated.append(at_labels)
            elif delta is not None and len(at) == 1 and not at[0].free_symbols & set(indices) | at[0].atoms(
                    sp.Indexed):   # delta(k, e), e a size or a number (x[n, 0]'s derivative): the entry k = e
                (index,) = [a for a in delta.args if a in indices]
                regions.append(({index: (at[0], at[0])}, term / delta))
            elif delta is not None:
                scatters.setdefault(delta, []).append(term / delta)
            else:
                plain.append(term)
        shape = sp.Tuple(*(extent(i) for i in indices))
        if plain:
            value = self.value(sp.Add(*plain), scope)
            if not set(indices) <= sp.Add(*plain).free_symbols:   # a view of fewer axes: broadcast to the shape
                self.sizes |= set(shape)
                value = Aligned(Broadcast(value, shape), Str("copy()"))
            elif (regions or scatters) and isinstance(value, (View, Aligned, Window, Padded)):
                value = Aligned(value, Str("copy()"))    # a view of an argument: updated below, so copied
            self.statements.append(Statement(target, value))
        else:
            self.dtype, self.sizes = True, self.sizes | set(shape)
            self.statements.append(Statement(target, shape, "zeros"))
        for ranges, term in regions:
            narrowed = Scope(scope.indices, {**scope.ranges, **ranges})
            region = ", ".join(trimmed([
                ("" if self.same(lo, 0) else self.integer(lo)) + ":" + (
                    "" if self.same(hi, extent(i) - 1) else self.integer(hi + 1)) if i in ranges else ":"
                for i in indices for lo, hi in [narrowed.ranges[i]]]))
            self.statements.append(Statement(target, self.value(term, narrowed), "add", region))
        for number, (delta, terms) in enumerate(scatters.items()):
            into_zeros = not plain and not regions and number == 0
            self.statements.append(self.scatter(target, indices, delta, sp.Add(*terms), into_zeros))
        for delta, rest in accumulated:
            self.statements.append(self.accumulate(target, indices, delta, rest))

    def guard(self, term, indices):
        """({index: (lo, hi)}, value) of c Piecewise((e, bounds on the target's indices), (0, True)), else None."""
        pieces = [f for f in sp.Mul.make_args(term) if isinstance(f, sp.Piecewise)]
        if len(pieces) != 1 or len(pieces[0].args) != 2 or pieces[0].args[1] != (0, True):
            return None
        (value, condition), _ = pieces[0].args
        ranges = {}
        for bound in sp.And.make_args(condition):
            inside = [i for i in indices if i in bound.free_symbols]
            found = bound_of(bound, inside[0]) if len(inside) == 1 and not bound.has(sp.Indexed) else None
            if found is None:
                return None
            i = inside[0]
            lo, hi = ranges.get(i, (sp.S.Zero, extent(i) - 1))
            ranges[i] = (found[1], hi) if found[0] == "lo" else (lo, found[1])
        return ranges, sp.Mul(*(f for f in sp.Mul.make_args(term) if f is not pieces[0])) * value

    def at_labels(self, term, indices):
        """(delta, rest) of a term c Sum(KroneckerDelta(i, l[V]) rest, V), i an index of the target and the
        Sum over the label's indices V, their whole ranges (an embedding's gradient: each token's row added
        at its label); else None."""
        coefficient, total = term.as_independent(Sum, as_Add=False)
        deltas = [f for f in sp.Mul.make_args(total.function) if isinstance(f, sp.KroneckerDelta)] if isinstance(
            total, Sum) else []
        if len(deltas) != 1:
            return None
        index, label = sorted(deltas[0].args, key=lambda a: isinstance(a, sp.Indexed))
        summed = {v for v, *_ in total.limits}
        if not (index in indices and isinstance(label, sp.Indexed) and set(label.indices) == summed
                and not summed & set(indices)
                and all(self.same(lo, 0) and self.same(hi, extent(v) - 1) for v, lo, hi in total.limits)):
            return None
        return deltas[0], coefficient * total.function / deltas[0]

    def accumulate(self, target, indices, delta, rest):
        """rest added into target at delta's labels by added_at (np.add.at's sums), so that labels that repeat
        add up."""
        index, label = sorted(delta.args, key=lambda a: isinstance(a, sp.Indexed))
        at, label_axes = indices.index(index), tuple(label.indices)
        where = self.align(*self.native(label, full_scope(label_axes)), list(label_axes), full=True)
        # rest over the target's axes with the label's axes in place of the labelled one
        value = self.value(rest, full_scope((*indices[:at], *label_axes, *indices[at + 1:])))
        self.imports.add("added_at")
        return Statement(target, value, "accumulate", (where, at))

    def scatter(self, target, indices, delta, rest, into_zeros):
        """rest added into target at delta's label: np.put_along_axis over np.take_along_axis (each label
        position is written by one entry of rest, so no position is written twice)."""
        index, label = sorted(delta.args, key=lambda a: isinstance(a, sp.Indexed))
        if not (index in indices and isinstance(label, sp.Indexed)):
            self.fail(f"{delta} is not a Kronecker delta between an index of {target} and a label")
        at = indices.index(index)
        rest = rest.xreplace({index: label}) if index in rest.free_symbols else rest
        others = Scope(tuple(i for i in indices if i != index), {i: (sp.S.Zero, extent(i) - 1) for i in indices
                                                                 if i != index})
        slot = sp.Dummy("slot")
        order = [slot if i == index else i for i in indices]
        labels, label_axes = self.native(label, others)
        where = self.align(labels, label_axes, order, full=True)
        # rest over the target's axes with a slot of one entry for the label's: it broadcasts against where
        value = self.value(rest, Scope(tuple(order), {**others.ranges, slot: (sp.S.Zero, sp.S.Zero)}))
        return Statement(target, value, "scatter", (where, at, into_zeros))


def path_pays(subscripts, path):
    """Whether einsum's contraction path is worth its intermediates and its dispatch: where one of its steps is
    a product of matrices (np.tensordot's BLAS: each operand with indices of its own, every shared one summed,
    as a convolution's), or where it lowers the scaling of the loops (three matrices in a chain). The rest are
    sums of products one pass reads at the memory's speed in einsum's own loop (optimize=False): LayerNorm's
    "nk,nk->k" takes 35x as long along its path at (8192, 1024) float32, BatchNorm2d's "nchw,nchw->c" 65x."""
    inputs, output = subscripts.split("->")
    terms, widest = inputs.split(","), 0
    for pair in path[1:]:
        a, b = (terms.pop(k) for k in sorted(pair, reverse=True))
        kept = set(output).union(*terms)
        shared = set(a) & set(b)
        if shared and not shared & kept and set(a) - shared and set(b) - shared:
            return True
        widest = max(widest, len(set(a + b)))
        terms.append("".join(sorted(set(a + b) & kept)))
    return widest < len(set(inputs) - {","})


def matmul(operands, out):
    """The MatMul of two operands [(expr, axes)] giving the axes out, where it is one: a single index summed, a
    single free one of each, the batch indices (shared and kept) in any order; else None. Each operand is viewed
    with the batch axes first, in out's order, and its two matrix axes last, and the product viewed in out's order:
    BLAS, without einsum's parsing of its subscripts and choice of a path on every call (multi-head attention's
    "nshd,nthd->nhts" in einsum's own loop took 10x as long). Only where one of each operand's matrix axes is its
    last, so that BLAS reads each matrix with a unit stride rather than NumPy copying it."""
    if len(operands) != 2:
        return None
    (a, a_axes), (b, b_axes) = operands
    shared = set(a_axes) & set(b_axes)
    batch = [i for i in out if i in shared]
    summed = shared - set(out)
    own_a, own_b = [i for i in a_axes if i not in shared], [i for i in b_axes if i not in shared]
    if not (len(summed) == len(own_a) == len(own_b) == 1 and len(out) == len(batch) + 2):
        return None
    (v,) = summed
    if a_axes[-1] not in (v, own_a[0]) or b_axes[-1] not in (v, own_b[0]):
        return None
    (left, left_axes, row), (right, right_axes, column) = sorted(
        ((a, a_axes, own_a[0]), (b, b_axes, own_b[0])), key=lambda operand: list(out).index(operand[2]))
    product = MatMul(viewed(left, left_axes, batch + [row, v]), viewed(right, right_axes, batch + [v, column]))
    return viewed(product, batch + [row, column], list(out))


def layouts(out, owner, x):
    """The layouts of a product of two operands into the axes out, owner giving each axis's operand, as (lead,
    (rows, columns)): first one matrix product, the rows one operand's axes of out and the columns the other's
    (the product transposed to out where they interleave: one BLAS call, where a batch of small ones ran 15 ms
    each on a busy 2-core host, OpenBLAS's threads waiting on each other), then a batch of out's first lead axes
    that x (the window) owns alone, the rest two runs of one operand's axes each."""
    own = [[i for i in out if owner[i] == k] for k in (1 - x, x)]
    if all(own):
        yield 0, own
        yield 0, own[::-1]
    for lead in range(1, len(out)):
        if any(owner[i] != x for i in out[:lead]):
            return
        rest = out[lead:]
        cut = next((n for n in range(1, len(rest)) if owner[rest[n]] != owner[rest[0]]), None)
        if cut is None or any(owner[i] != owner[rest[cut]] for i in rest[cut:]):
            continue
        yield lead, [rest[:cut], rest[cut:]]
        yield lead, [rest[cut:], rest[:cut]]


def transposed(expr, order):
    """expr.transpose(*order), one transpose where expr is a transpose already (a product given back its axes)."""
    inner = re.fullmatch(r"transpose\((.*)\)", expr.args[1].name) if isinstance(expr, Aligned) else None
    if inner:
        first = [int(k) for k in inner.group(1).split(", ")]
        expr, order = expr.args[0], [first[k] for k in order]
    return expr if order == sorted(order) else Aligned(expr, Str(f"transpose({', '.join(map(str, order))})"))


def viewed(expr, axes, order):
    """expr, whose axes are axes, as a view with its axes in order: itself, its last two swapped, or a transpose."""
    axes = list(axes)
    if axes == order:
        return expr
    if axes[:-2] == order[:-2]:
        return Aligned(expr, Str("T" if len(axes) == 2 else f"swapaxes({len(axes) - 2}, {len(axes) - 1})"))
    return Aligned(expr, Str(f"transpose({', '.join(str(axes.index(i)) for i in order)})"))


def nested(total):
    """Sum(a Sum(b, j), o) as Sum(a b, o, j), j not read by a: one einsum over every factor (a bilinear
    form's dx), not one inside another. Only over whole ranges (a narrowed one is widened alone)."""
    factors = sp.Mul.make_args(total.function)
    inner = [f for f in factors if isinstance(f, Sum) and not any(b.has(sp.Max, sp.Min) for l in f.limits
                                                                    for b in l[1:])]
    if len(inner) != 1 or any(b.has(sp.Max, sp.Min) for l in total.limits for b in l[1:]):
        return total
    (sub,) = inner
    rest = [f for f in factors if f is not sub]
    bound = {v for v, *_ in sub.limits}
    if bound & (sp.Mul(*rest).free_symbols | {v for v, *_ in total.limits}):
        return total
    return Sum(sp.Mul(*rest, sub.function), *total.limits, *sub.limits)


def taps_reversed(total):
    """total with each summed index v that every shifted read takes with slope -1 (the transposed convolution's
    g[n, o, h - u]) and every other read as itself (weight[o, c, u]) counted from the other end, v -> V - 1 - v
    over its whole range: the same sum, its shifted reads then windows in reading order and the flip on the
    plain reads (weight[o, c, U - 1 - u], a small array): a copy of a large window read backwards is slow."""
    flipped = []
    outside = total.function.xreplace({r: sp.Dummy() for r in total.function.atoms(sp.Indexed)}).free_symbols
    for v, lo, hi in total.limits:
        if lo != 0 or sp.expand(hi - extent(v) + 1) != 0 or v in outside:
            continue
        shifted, plain = 0, True
        for index in (i for r in total.function.atoms(sp.Indexed) for i in r.indices if v in i.free_symbols):
            found = None if isinstance(index, sp.Indexed) else linear(index, v)
            if found and found[0] == -1 and any(i != v and not i.name[0].isupper() for i in index.free_symbols):
                shifted += 1
            elif index != v:
                plain = False
        if shifted and plain:
            flipped.append(v)
    if not flipped:
        return total
    return Sum(total.function.xreplace({v: extent(v) - 1 - v for v in flipped}), *total.limits)


def trimmed(entries):
    """An index tuple without its trailing ":" entries, which NumPy implies, or, where it has none, with two or
    more leading ones as "..." (m[..., None]): "..." before the entries kept would move them to the last axes."""
    entries, count = list(entries), len(entries)
    while entries and entries[-1] == ":":
        entries.pop()
    leading = next((n for n, e in enumerate(entries) if e != ":"), len(entries))
    return ["..."] + entries[leading:] if leading >= 2 and len(entries) == count else entries


def tuple_text(entries):
    """(a, b) or (a,): a tuple of entries (source text or numbers), as Python source."""
    return f"({', '.join(map(str, entries))}{',' if len(entries) == 1 else ''})"


def axis_text(positions):
    return str(positions[0]) if len(positions) == 1 else f"({', '.join(map(str, positions))})"


def einsum_letters(indices):
    """{index: einsum letter}: an index's own letter where it is one and free, else the next unused one."""
    letters, used = {}, set()
    for index in dict.fromkeys(indices):
        name = str(index)
        letter = name if len(name) == 1 and name.isalpha() and name not in used else next(
            c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used
            and c not in {str(i) for i in indices})
        letters[index] = letter
        used.add(letter)
    return letters


# The two functions of a generated module

# names the generated functions use for themselves, which no array may take
SOURCE_NAMES = ("np", "math", "erf", "sliding_window_view", "dtype", "g")


def names_of(op):
    """Every name an op's arrays, options, sizes and indices take; temporaries take others."""
    indices = {i for axes in [*op.inputs.values(), *(a for a, _ in op.params.values()), *op.targets.values(),
                              *(s.indices for s in op.steps)] for i in axes}
    return ({*op.inputs, *op.params, *op.targets, *(op.noise or {}), *(op.given or {}), *op.options,
             *(b for b, _, _, _ in (op.running or {}).values()), *(s.name for s in op.steps), "g",
             *(f"g_{s.name}" for s in op.steps), *(f"d{a}" for a in [*op.inputs, *op.params])}
            | {str(i) for i in indices} | {str(size_of(i)) for i in indices} | set(SOURCE_NAMES))


def lowered(op, factor=True):
    """(forward, backward) ArrayFunctions of op: forward(inputs, params, targets, options) returns the output
    and what backward reads; backward(what it reads, g, options) returns every input's and param's gradient.
    An op with a penalty has two more: penalty(params, options) returns its value and penalty_backward its
    gradient in each param it reads. factor: save a param's factor (factor_saved), as the NumPy kernels do;
    codegen.tensor_fused's loops compute it again from the input for nothing, where saving it is a pass more."""
    if op.weights:
        raise LoweringError(f"{op.name}: weights ({', '.join(op.weights)}) are options of row_loss and element_loss "
                            f"(derive.declare); in a general tensor_loss, declare them as targets")
    clash = sorted((set(SOURCE_NAMES) - {"g"}) & {*op.inputs, *op.params, *op.targets, *op.options,
                                                 *(s.name for s in op.steps)})
    if clash:
        raise LoweringError(f"{op.name}: the name {clash[0]} is taken by the generated code; rename it")
    op = factor_saved(op) if factor else op
    taken = names_of(op)
    original = program_of(op)
    program = underflow_recovered(rescaled_adjoints(argmax_shifted(rescaled_scores(rewritten(original, taken), op,
                                                                                 taken), taken), op, taken), op, taken)
    axes = {**op.inputs, **{p: a for p, (a, _) in op.params.items()}, **op.targets,
            **{z: a for z, (a, _, _) in (op.noise or {}).items()}, **(op.given or {}), "g": op.steps[-1].indices,
            **{a.name: a.indices for a in (*program.forward, *program.backward)}}
    sizes = check_sizes(op)
    given = [*op.inputs, *op.params, *op.targets, *(op.noise or {}), *(op.given or {})]
    output = op.steps[-1].name
    steps = [a.name for a in program.forward]
    read = set().union(*(reads_of(a.expr) for a in program.backward))
    # what backward reads, and the steps the class moves its running statistics towards
    saved = [name for name in steps if (name in read or name in (op.running or {})) and name != output]
    options = [sp.Symbol(o, real=True) for o in op.options]
    notes = [f"rewritten: {', '.join(program.rewrites)} (codegen.tensor_lower)"] if program.rewrites else []
    windows = SavedWindows(taken)
    forward = function(op, "forward", f"{output} and what backward reads, by the forward steps.", program.forward,
                       given, (output, *saved), axes, sizes, options, taken,
                       [str(a) for a in original.forward] + notes, program.guards, windows, saving=True)
    backward = function(op, "backward", "The gradient of each input and param: g times the Jacobian (a "
                        "vector-Jacobian product) by the adjoint steps.", program.backward,
                        [name for name in given + saved if name in read] + ["g"], program.returns, axes, sizes,
                        options, taken, [str(a) for a in original.backward] + notes, program.backward_guards,
                        windows)
    forward = replace(forward, returns=(*forward.returns, *windows.read))
    if op.penalty is None:
        return forward, backward
    gradients = derivation(op).penalty
    axes |= {"P": (), **{a.name: a.indices for a in gradients}}
    read = [p for p in op.params if p in reads_of(op.penalty)]
    value = Assignment("P", (), op.penalty)
    return forward, backward, *(
        function(op, name, doc, assignments, read, tuple(a.name for a in assignments), axes, sizes, options, taken,
                 list(map(str, assignments)))
        for name, doc, assignments in [("penalty", "The penalty P, to add to the loss.", [value]),
                                       ("penalty_backward", "The penalty's gradient in each param it reads.",
                                        gradients)])


def factor_saved(op):
    """op with the factor of a param in its layer's output, y = f p + ..., made a step of its own just before,
    y_p = f, where f is no array read and reads every index of y: the operand of a product that reverse mode
    saves, as a tape does (LayerNorm's normalised x, the factor of gamma), which its backward then reads (dgamma
    = Sum(g y_gamma), and steps_read_back finds it inside the other adjoints) rather than computing again."""
    output = op.steps[-1]
    for term in sp.Add.make_args(output.expr) if op.kind == "layer" else ():
        params = [f for f in sp.Mul.make_args(term) if isinstance(f, sp.Indexed) and f.base.name in op.params]
        factor = sp.Mul(*(f for f in sp.Mul.make_args(term) if f not in params))
        if (len(params) == 1 and set(output.indices) <= factor.free_symbols and not isinstance(factor, sp.Indexed)
                and not factor.has(Sum) and not reads_of(factor) & set(op.params)):
            name = fresh(f"{output.name}_{params[0].base.name}", names_of(op))
            step = Assignment(name, output.indices, factor)
            read = sp.IndexedBase(name, real=True)[output.indices] * params[0]
            return replace(op, steps=(*op.steps[:-1], step, output._replace(expr=output.expr.xreplace({term: read}))))
    return op


def running_update(op):
    """The ArrayFunction of op's running statistics (derive.tensor.tensor_op's running): each buffer moved towards
    its estimate, buffer + momentum (estimate - buffer), from the steps forward returned and the buffers."""
    steps = {s.name: s for s in op.steps}
    updates = [Assignment(buffer, steps[step].indices, sp.IndexedBase(buffer, real=True)[steps[step].indices]
                          + sp.Symbol(option, real=True) * (estimate - sp.IndexedBase(buffer, real=True)[
                              steps[step].indices]))
               for step, (buffer, _, estimate, option) in op.running.items()]
    axes = {**{step: steps[step].indices for step in op.running}, **{a.name: a.indices for a in updates},
            **op.inputs, **{p: a for p, (a, _) in op.params.items()}, **op.targets}
    options = list(dict.fromkeys(sp.Symbol(option, real=True) for _, _, _, option in op.running.values()))
    return function(op, "running_update", "Each running statistic moved towards its estimate from this batch.",
                    updates, [*op.running, *(a.name for a in updates)], tuple(a.name for a in updates), axes,
                    check_sizes(op), options, names_of(op), list(map(str, updates)))


def function(op, name, doc, assignments, arrays, returns, axes, sizes, options, taken, derivation, guards=(),
             windows=None, saving=False):
    """The ArrayFunction computing assignments from the arrays and the options they read, and after each guard's
    shift step the statement computing its assignments again where that step is not finite (guarded); windows
    and saving as ArrayLowering's (the saved window matrices it reads are arguments before g)."""
    lowering = ArrayLowering(op, axes, sizes, windows, saving)
    for assignment in assignments:
        lowering.assign(assignment)
    statements = shared(lowering.statements, taken)
    for guard in guards:
        statements = guarded(statements, guard, lowering, taken)
    used = set().union(*(sp.sympify(s.value).free_symbols for s in statements if s.form != "zeros"))
    lines, arrays, passed = size_lines(op, lowering.sizes, arrays, axes)
    read = windows.read if windows is not None and not saving else []
    arrays = [a for a in arrays if a != "g"] + read + ["g"] * ("g" in arrays)
    lines = strided_sizes(lines, op, lowering)
    passed += ("stride",) * lowering.stride_used
    args = tuple(arrays) + passed + tuple(o.name for o in options if o in used)
    if lowering.dtype:   # the dtype of g, or of the first input (never of integer labels)
        lines.append(("dtype", f"{'g' if 'g' in arrays else next(iter(op.inputs))}.dtype"))
    shapes = tuple((a, tuple(int(in_base_sizes(extent(i), op.sizes).subs(sizes)) for i in axes[a]))
                   for a in dict.fromkeys([*arrays, *(x.name for x in assignments)]) if a in axes)
    shapes += tuple((a, windows.shapes[a]) for a in read)
    return ArrayFunction(name, doc, args, tuple(lines), tuple(statements), tuple(returns),
                         tuple(derivation), tuple(sorted(lowering.imports)), shapes)


def guarded(statements, guard, lowering, taken):
    """statements with, after the last checked step, a guard statement: where a checked array is not all finite,
    its assignments (a fresh lowering's, their subexpressions shared among themselves alone, so that the usual
    path computes none of them) and again the statements from its first step to that checked step."""
    axes = {**lowering.axes, **{a.name: a.indices for a in guard.assignments}}
    inner = ArrayLowering(lowering.op, axes, lowering.check_sizes)
    for assignment in guard.assignments:
        inner.assign(assignment)
    lowering.sizes |= inner.sizes
    lowering.imports |= inner.imports
    targets = [s.target for s in statements]
    stop = max(len(targets) - targets[::-1].index(c) for c in guard.checks)
    start = targets.index(guard.first) + 1 if guard.first else stop
    # the scale's own statement left out of the sharing: its sizes' arithmetic stays Python numbers (a NumPy
    # float64 scalar would make a float32 kernel's scale float64)
    rescaled = [*shared_but_scales(inner.statements, taken | set(targets)), *statements[start:stop]]
    check = sp.Tuple(sp.Tuple(*map(View, guard.checks)), sp.Tuple(*map(View, guard.reads)), Str(guard.why),
                     *([guard.test] if guard.test is not None else []))
    # its target the first array it checks: the in-place pass takes a statement's target as read, and the scores'
    # buffer, written anew here, is free for the mask that follows them (a causal softmax's)
    return [*statements[:stop], Statement(guard.checks[0], check, "guard", tuple(rescaled)), *statements[stop:]]


def shared_but_scales(statements, taken):
    """shared(statements) with each statement of a power of two's scale (it reads LargestExponent) left out of the
    sharing in its place, as guarded's first: its sizes' arithmetic stays Python numbers."""
    scales = [s for s in statements if s.form != "zeros" and sp.sympify(s.value).has(LargestExponent)]
    others = iter(shared([s for s in statements if s not in scales], taken))
    out = []
    for statement in statements:
        if statement in scales:
            out.append(statement)
            continue
        while (emitted := next(others)) is not None:
            out.append(emitted)
            if emitted is statement or emitted.target == statement.target and emitted.form == statement.form:
                break
    return out + list(others)


def strided_sizes(lines, op, lowering):
    """lines with the size of each strided position that its declared formula gives (I = H - U + 1, the
    count at stride 1) counted at its stride instead: (H - U) // s + 1 (the stride noted as read)."""
    found = []
    for size, how in lines:
        step = lowering.strides.get(size.lower())
        if step is not None and sp.Symbol(size, integer=True, positive=True) in op.sizes and not how.endswith("shape"):
            lowering.stride_used = True
            formula = sp.expand(in_base_sizes(sp.Symbol(size, integer=True, positive=True), op.sizes) - 1)
            how = f"({ScalarPrinter().doprint(formula)}) // {step} + 1"
        found.append((size, how))
    return found


def size_lines(op, needed, arrays, axes):
    """((size, source), ...): each size the statements read, from an argument's shape where one has that axis
    (several from one shape: N, K = x.shape), else from its declared formula."""
    needed = set(needed)
    for size in list(needed):
        needed |= in_base_sizes(size, op.sizes).free_symbols if size in op.sizes else set()
    # a size the constructor takes (a pooling's window) is an argument
    passed = tuple(s for s in op.given_sizes if sp.Symbol(s, integer=True, positive=True) in needed)
    lines, known = [], {sp.Symbol(s, integer=True, positive=True) for s in passed}
    given = [*op.inputs, *op.params, *op.targets]
    # a size no argument has (NLL's K, in a backward that reads only g and the labels): the input's shape
    extra = [a for a in given if a not in arrays and any(
        size_of(i) in needed - {size_of(j) for b in arrays for j in axes[b]} for i in axes[a])][:1]
    arrays = [a for a in arrays if a != "g"] + extra + ["g"] * ("g" in arrays)
    for array in arrays:
        mine = [size_of(i) for i in axes[array]]
        if any(s in needed and s not in known for s in mine):
            names = [str(s) if s in needed and s not in known and mine.index(s) == n else "_"
                     for n, s in enumerate(mine)]
            lines.append((", ".join(names) + ("," if len(names) == 1 else ""), f"{array}.shape"))
            known |= {s for s in mine if s in needed}
    for size, formula in op.sizes.items():
        if size in needed and size not in known:
            numerator, denominator = sp.fraction(sp.together(formula))
            text = ScalarPrinter().doprint(numerator)
            text = f"({text})" if numerator.is_Add and denominator != 1 else text
            lines.append((str(size), text if denominator == 1 else f"{text} // {denominator}"))
            known.add(size)
    missing = sorted(map(str, needed - known))
    if missing:
        raise LoweringError(f"{op.name}: size {missing[0]} is read by no argument's shape and declared by no formula")
    return lines, arrays, passed


def shared(statements, taken):
    """statements with every subexpression they share computed once (sympy.cse), each just before its
    first use."""
    names = (View(n) for n in (f"t{k}" for k in itertools.count()) if n not in taken)
    values = [s.value for s in statements if s.form != "zeros"]
    replacements, reduced = sp.cse(values, symbols=names, order="none")
    reduced = iter(reduced)
    statements = [s if s.form == "zeros" else s._replace(value=next(reduced)) for s in statements]
    pending = dict(replacements)
    out = []

    def emit(expr):
        for symbol in sorted(sp.sympify(expr).atoms(View), key=str):
            if symbol in pending:
                value = pending.pop(symbol)
                emit(value)
                out.append(Statement(symbol.name, value))
    for statement in statements:
        emit(statement.value)
        out.append(statement)
    return out


def module_context(op, factor=True):
    """What templates/tensor.py.jinja needs to print op's module: its two functions' source and its class's
    structure (constructor, input checks, calls, saved arrays), every formula printed from SymPy; factor as
    lowered's."""
    flagged, op = op, with_flags(op, {})   # the kernels of the flags' defaults, then one pair per other setting
    forward, backward, *penalty = lowered(op, factor)
    # backward(g, input_grad=False)'s kernel; none where flags choose among variants (the class calls those whole)
    only = [f for f in [params_only(flagged, backward)] if f is not None]
    printer = TensorPrinter()
    running = running_context(op, printer) if op.running else None
    variants = variants_context(flagged)
    units = (units_context(op, forward, backward, *(calls(op, forward, backward)[k] for k in ("forward_call",
                                                                                              "backward_options")),
                           printer) if op.scaling else None)
    output = op.steps[-1].name
    functions = [{"name": f.name, "doc": f.doc, "args": list(f.args), "lines": f.lines(printer),
                  "returns": list(f.returns), "derivation": list(f.derivation), "imports": f.imports,
                  "overflows": any(sp.sympify(s.value).has(ExpToInf) for s in f.statements)}
                 for f in (forward, backward, *only, *penalty, *(running.pop("functions") if running else ()),
                           *(units.pop("functions") if units else ()),
                           *(f for v in variants for f in v.pop("functions")))]
    arguments = {}
    for size, name in op.constructor_sizes.items():
        arguments.setdefault(name, []).append(str(size))
    sizes = [{"name": name, "sizes": sizes, "given": any(s in op.given_sizes for s in sizes)}
             for name, sizes in arguments.items()]   # kernel_size: U and V
    # a param axis's declared size (D = E/H), computed by the constructor from its arguments
    param_sizes = {size_of(i) for axes, _ in op.params.values() for i in axes}
    computed = [{"name": str(size), "formula": FormulaPrinter().doprint(formula),
                 "numerator": printer.scalar.doprint(fraction[0]), "denominator": printer.scalar.doprint(fraction[1])}
                for size, formula in op.sizes.items() if size in param_sizes
                for fraction in [sp.fraction(sp.together(in_base_sizes(formula, op.sizes)))]]
    params = [{"name": p, "init": init, "shape": shape_text(axes),
               "bound": printer.scalar.doprint(1 / sp.sqrt(op.fan_in[p])) if init == "uniform" else None}
              for p, (axes, init) in op.params.items()]
    imports = set().union(*(f["imports"] for f in functions))
    imports |= {"math"} if printer.scalar.module_imports else set()
    if any(sp.sympify(s.value).has(sp.erf) for f in (forward, backward) for s in f.statements):
        imports.add("erf")
    source = {**{p: f"self.{p}" for p in op.params}, **{o: f"self.{o}" for o in op.options}}
    first = next(iter([*op.inputs, *op.targets]))
    size_names = {s: sp.Symbol(f'size["{s}"]') for s in {size_of(i) for axes in op.inputs.values() for i in axes}
                  | {size_of(i) for axes, _ in op.params.values() for i in axes}
                  | {size_of(i) for axes in op.targets.values() for i in axes}}
    size_names |= {sp.Symbol(s, integer=True, positive=True): sp.Symbol(source) for s, source in given_sources(op).items()}
    derived = []
    for size, formula in op.sizes.items():
        numerator, denominator = sp.fraction(sp.together(in_base_sizes(formula, op.sizes)))
        derived.append({"name": str(size), "formula": FormulaPrinter().doprint(formula),
                        "denominator": printer.scalar.doprint(denominator.xreplace(size_names)),
                        "numerator": printer.scalar.doprint(numerator.xreplace(size_names))})
    inputs = [{"name": a, "ndim": len(axes), "trailing": len(axes) - 1, "labels": a in op.labels,
               "optional": a in op.optional_axis}
              for a, axes in [*op.inputs.items(), *op.targets.items()]]
    shaped = [{"name": a, "source": source.get(a, a), "letters": "".join(map(str, axes))}
              for a, axes in [*op.inputs.items(), *((p, ax) for p, (ax, _) in op.params.items()), *op.targets.items()]]
    gradients = [f"d{a}" for a in op.inputs]
    batched = op.batch_index is not None
    # a batched input's leading axes are any number, none too: (*, K) as PyTorch writes them
    shapes = "; ".join(f"{a}: {shape_text(axes[:-1], op.names)} or " * (a in op.optional_axis)
                       + f"{a}: {shape_text(axes, op.names, batched=batched and a not in op.params)}"
                       for a, axes in [*op.inputs.items(), *((p, ax) for p, (ax, _) in op.params.items()),
                                       *op.targets.items()])
    arguments = [*op.inputs, *op.targets]
    layer = op.kind == "layer"
    signature = (f"forward({', '.join(arguments)}) -> {output if layer else 'the loss'}, "
                 f"{'backward(g)' if layer else 'backward() (backward(G) under reduction=none)'} -> "
                 f"{', '.join(gradients) or 'None (integer labels have no gradient)'}")
    signature += f", setting {', '.join('d' + p for p in op.params)}" if op.params else ""
    return {"op": op, "kind": op.kind, "functions": functions, "imports": sorted(imports), "batched": batched,
            "runtime": sorted({"float_input", "sizes"} | ({"generator"} if op.params else set())
                              | ({"first_max", "first_argmax", "gathered_or_0", "windows_added", "added_at"} & imports)
                              | ({"flattened"} if batched else set())
                              | ({"derived_size"} if derived or computed else set())
                              | ({"integers"} if any(len(s["sizes"]) > 1 for s in sizes) else set())
                              | ({"integers", "padded", "cropped"} if op.window else set())
                              | ({"label_input", "label_range"} if op.labels else set())
                              | ({"flag"} if op.switches or flagged.flags else set())
                              | ({"or_machine_eps"} if op.dtype_eps else set())
                              | ({"overflowed", "rows_joined", "units_of"} if units else set())
                              | ({"isolated", "rows_written"} if units and units["isolated"] else set())
                              | ({"flag", "generator", *(f"{kind}_mask" for _, kind, _ in op.noise.values())}
                                 if op.noise else set())
                              | ({"flag", "running_factor"} | ({"nonzero_size"} if running["denominators"] else set())
                                 if running else set())),
            "sizes": sizes, "computed": computed, "window": op.window, "options": [{"name": o, "default": "None" if o in op.dtype_eps else repr(v),
                                         "nullable": o in op.dtype_eps or o in (running or {}).get("momenta", ()),
                                         "checks": range_arguments(op.ranges[o])}
                                        for o, v in op.options.items()],
            "running": running, "optional": [a for a in op.optional_axis], "variants": variants, "units": units,
            "flags": [{"name": f, "default": repr(v)} for f, v in (flagged.flags or {}).items()],
            "switches": [{"name": flag, "params": list(params), "cleared": " = ".join(f"self.d{p}" for p in params),
                          "zeroed": [p for p in params if op.params[p][1] not in ("ones", "zeros")]}
                         for flag, params in (op.switches or {}).items()],
            "noise": [{"name": z, "kind": kind, "option": option, "shape": measured_shape(axes)}
                      for z, (axes, kind, option) in (op.noise or {}).items()],
            "penalty": penalty_context(op, penalty, source),
            "params": params, "cleared": " = ".join(f"self.d{p}" for p in op.params), "inputs": inputs,
            "arguments": arguments, "shaped": shaped,
            "cast": [t for t in op.targets if t not in op.labels], "first": first,
            "derived": derived, "labels": [{"name": t, "size": str(s)} for t, s in op.labels.items()],
            **calls(op, forward, backward),
            "params_only": {"name": only[0].name, "returns": [f"self.{r}" for r in only[0].returns]} if only else None,
            "backward_returns": [f"self.{r}" if r[1:] in op.params else r for r in backward.returns],
            "gradients": gradients, "returned": gradients or ["None"], "output": output,
            "reductions": reductions_context(op, printer) if op.kind == "loss" else [],
            "signature": signature, "shapes": shapes,
            "forward_doc": f"{output}[{', '.join(map(str, op.steps[-1].indices))}] = {op.summary}"
                           + ("." if layer else ", reduced by self.reduction."),
            "backward_doc": (f"{', '.join(gradients) or 'None'} for the upstream gradient g of {output}'s shape"
                             if layer else f"{', '.join(gradients)} of the reduced loss (G: the upstream gradient of "
                             f"the unreduced losses)") + (f"; sets {', '.join('d' + p for p in op.params)}"
                                                          if op.params else "") + "."}


def reductions_context(op, printer):
    """A loss's reductions as its class computes them: mean, sum and none (codegen.kernels.reductions), then its
    declared further means (derive.tensor.loss_means); each mean with the count it divides by, read from the
    losses' shape (L.size for the mean of every entry)."""
    from codegen.kernels import reductions
    found = [dict(r, count="L.size" if r["name"] == "mean" else None) for r in reductions("element")]
    mean, = (r for r in found if r["name"] == "mean")
    shape = {size_of(i): sp.Symbol(f"L.shape[{axis}]") for axis, i in enumerate(op.steps[-1].indices)}
    return found + [dict(mean, name=name, count=printer.scalar.doprint(divisor.xreplace(shape)))
                    for name, divisor in (op.means or {}).items()]


def calls(op, forward, backward, given=None):
    """How the class calls forward and backward: forward's arguments (params and options from self, given arrays
    as the class holds them, a buffer) and returns, what it saves for backward (backward's arguments before g),
    and backward's options after g. An option left None is the dtype's machine epsilon: x's in forward, g's (x's
    dtype) in backward."""
    source = {**{p: f"self.{p}" for p in op.params}, **{o: f"self.{o}" for o in op.options}, **(given or {}),
              "stride": "self.stride",
              **given_sources(op)}
    first = next(iter([*op.inputs, *op.targets]))
    forward_source = {**source, **{o: f"or_machine_eps(self.{o}, {first})" for o in op.dtype_eps}}
    backward_source = {**source, **{o: f"or_machine_eps(self.{o}, g)" for o in op.dtype_eps}}
    gone = backward.args.index("g")
    return {"forward_call": [forward_source.get(a, a) for a in forward.args], "forward_returns": list(forward.returns),
            "saved": [source.get(a, a) for a in backward.args[:gone]],
            "backward_options": [backward_source[a] for a in backward.args[gone + 1:]]}


def given_sources(op):
    """{size: how the class reads it} of the sizes its constructor takes that no array has: self.kernel_size[0]."""
    arguments = {}
    for size, name in op.constructor_sizes.items():
        arguments.setdefault(name, []).append(str(size))
    return {size: f"self.{name}" + (f"[{n}]" if len(sizes) > 1 else "")
            for name, sizes in arguments.items() for n, size in enumerate(sizes) if size in op.given_sizes}


def variants_context(op):
    """For each setting of op's flags but the defaults: its two functions (forward_<suffix>, backward_<suffix>,
    derived with the flags fixed), the test of the class's flags that picks them, and their calls."""
    found = []
    for values in flag_values(op)[1:]:
        suffix = "_".join(f if v else f"not_{f}" for f, v in values.items() if v != op.flags[f])
        forward, backward = (replace(f, name=f"{f.name}_{suffix}") for f in lowered(with_flags(op, values))[:2])
        found.append({"functions": [forward, backward], "suffix": suffix, "forward": forward.name,
                      "backward": backward.name,
                      "test": " and ".join(f"self.{f}" if v else f"not self.{f}" for f, v in values.items()),
                      **calls(op, forward, backward)})
    return found


def running_context(op, printer):
    """What the class of an op with running statistics needs: its eval mode's two functions (forward_eval,
    backward_eval, reading the buffers in place of the steps), the update of the buffers, their shapes and
    inits, and each estimate's denominator over sizes, which training refuses at 0 (PyTorch's "more than 1
    value per channel")."""
    evaluation = eval_mode(op)
    forward, backward = (replace(f, name=f"{f.name}_eval") for f in lowered(evaluation)[:2])
    update = running_update(op)
    steps = {s.name: s for s in op.steps}
    buffers = {step: buffer for step, (buffer, _, _, _) in op.running.items()}
    momenta = list(dict.fromkeys(option for _, _, _, option in op.running.values()))
    size_names = {size_of(i): sp.Symbol(f'size["{size_of(i)}"]') for axes in op.inputs.values() for i in axes}
    denominators = []
    for step, (_, _, estimate, _) in op.running.items():
        denominator = sp.fraction(sp.together(estimate))[1]
        if denominator.free_symbols and not reads_of(denominator):
            denominators.append({"step": step, "formula": FormulaPrinter().doprint(denominator),
                                 "value": printer.scalar.doprint(denominator.xreplace(size_names))})
    return {"functions": [forward, backward, update], "momenta": momenta, "denominators": denominators,
            "buffers": [{"name": buffer, "init": init, "shape": shape_text(steps[step].indices)}
                        for step, (buffer, init, _, _) in op.running.items()],
            **calls(op, forward, backward, given={step: f"self.{buffer}" for step, buffer in buffers.items()}),
            "update_call": [f"self.{a}" if a in buffers.values() else "factor" if a in momenta else a
                            for a in update.args],
            "update_returns": list(update.returns), "output_shape": measured_shape(op.steps[-1].indices),
            "zeros": [f"np.zeros_like(self._saved[{list(op.inputs).index(r[1:])}])" if r[1:] in op.inputs
                      else f"np.zeros_like(self.{r[1:]})" for r in backward.returns]}


def units_context(op, forward, backward, forward_call, backward_options, printer):
    """The guard of an op with a scaling (a normalisation): where a statistic forward returns is not finite (it
    overflowed), those rows (unit_rows) are computed again by forward_units, in units of c, a power of two per row
    near 1/max|x| (units_of), with each option times c^its degree (c^2 eps as an array, in_units), and each result
    written back times c^-k, k its degree (scale_degrees: y as it is, a variance / c^2); backward computes dx
    again there by backward_units, times c, and the others' by backward (every gradient joined: a param's summed
    over rows is the sum of both parts). The check is O(rows); the NumPy kernels of forward_units and
    backward_units (the fused module imports them) save a param's factor whatever the module's kernels do.
    Then dx at an entry alone far from its row's others, again where the derived form cancels (isolated_context)."""
    factored = factor_saved(op)   # its saved factor (y_gamma) too, whatever the module's kernels save
    degrees, (row,) = scale_degrees(factored), unit_rows(op)
    units_forward, units_backward = (replace(f, name=f"{f.name}_units") for f in lowered(in_units(op))[:2])
    axes = {**op.inputs, **{p: a for p, (a, _) in op.params.items()},
            **{s.name: s.indices for s in factored.steps}, "g": op.steps[-1].indices,
            **{f"d{a}": axes for a, axes in op.inputs.items()}, **{f"d{p}": a for p, (a, _) in op.params.items()}}

    def at_rows(name, source=None):
        """name (or its source, self.gamma) read at the rows, along the axis of the row index."""
        where = axes[name].index(row) if row in axes.get(name, ()) else None
        return source or name if where is None else f"{source or name}[{':, ' * where}rows]"

    def times_c(name, k, value):
        """value times c^k, c broadcast along name's axes."""
        where = axes[name].index(row) if name in axes else 0
        scale = sp.Symbol("c" + (f"[:, {', '.join(['None'] * (len(axes[name]) - where - 1))}]"
                                 if len(axes.get(name, ())) > where + 1 else ""))
        return printer.scalar.doprint(scale ** k * sp.Symbol(value))

    calls = dict(zip(forward.args, forward_call))
    prepared = [f"{v}_c = {times_c(v, d, at_rows(v, calls[v]))}" for v, d in op.scaling.items()]
    arguments = [f"{a}_c" if a in op.scaling else at_rows(a, calls[a]) for a in units_forward.args]
    written = [f"{at_rows(r)} = {times_c(r, -degrees[r], f'{r}_c')}" for r in units_forward.returns
               if r in forward.returns]
    gone = units_backward.args.index("g")
    saved = [f"{a}_c" if a in (*units_forward.returns, *op.scaling) else at_rows(a, calls.get(a))
             for a in units_backward.args[:gone]]
    statistics = [r for r in forward.returns if degrees.get(r) and axes[r] == (row,)]
    kept = backward.args[:backward.args.index("g")]
    others = [f"{a}[{':, ' * axes[a].index(row)}good]" if row in axes.get(a, ()) else a
              for a in [*kept, "g"]] + backward_options
    joined = [f"{'self.' * (r[1:] in op.params)}{r} = " + (
        f"rows_joined({r}_1, good, {times_c(r, -degrees[r], f'{r}_c')}, rows, {axes[r].index(row)})"
        if row in axes[r] else printer.scalar.doprint(sp.Symbol(f"{r}_1") + sp.Symbol(f"{r}_c")))
        for r in backward.returns]
    exact = isolated_function(op)
    options = dict(zip(backward.args[backward.args.index("g") + 1:], backward_options))
    call = f"{', '.join(f'{r}_c' for r in units_forward.returns)} = forward_units({', '.join(arguments)})"
    isolated = exact and isolated_context(op, exact, factored, kept, options, at_rows, times_c, printer, call)
    return {"functions": [units_forward, units_backward, *[exact] * bool(isolated)], "statistics": statistics,
            "input": next(iter(op.inputs)), "axis": axes[next(iter(op.inputs))].index(row), "prepared": prepared,
            "isolated": isolated, "forward": call,
            "written": written, "saved": saved, "unpacked": f"{', '.join(kept)}{',' * (len(kept) == 1)} = self._saved",
            "others": f"{', '.join(f'{r}_1' for r in backward.returns)} = {backward.name}({', '.join(others)})",
            "backward": f"{', '.join(f'{r}_c' for r in units_backward.returns)} = "
                        f"backward_units(*saved, {', '.join([at_rows('g'), *units_backward.args[gone + 1:]])})",
            "joined": joined}


def isolated_context(op, exact, factored, kept, options, at_rows, times_c, printer, units_call):
    """How the class's backward calls backward_isolated: the rows whose x_hat^2 (the saved factor) passes
    isolated_bound at an entry, those rows' dx again in units of c (dx(x) = c dx(c x; c^2 eps)), written at that
    entry and at the others whose derived coefficient of its h cancels (rows_written),
    the bound printed from SymPy over the factor's shape. Where backward reads no saved factor (the fused
    kernels compute it again), forward returns the largest factor^2 of each row (largest_step, found in the
    pass that writes y), and the flagged rows' factors are computed again by forward_units (units_call) for
    the mask of their entry."""
    x = next(iter(op.inputs))
    factor = factored.steps[-2]
    fused = factor.name not in kept
    axis = op.inputs[x].index(unit_rows(op)[0])
    shape = {size_of(i): sp.Symbol(f"{x if fused else factor.name}.shape[{p}]")
             for p, i in enumerate(op.inputs[x] if fused else factor.indices)}
    bound = printer.scalar.doprint(isolated_bound(op).xreplace(shape))
    source = {x: x if x in kept else "self._input", "others": "others", "g": at_rows("g")}
    source |= {p: at_rows(p, f"self.{p}") for p in op.params}
    arguments = [f"{a}_c" if a in op.scaling else source[a] for a in exact.args]
    prepared = [f"{v}_c = {times_c(v, d, at_rows(v, source[x]) if v in op.inputs else options[v])}"
                for v, d in op.scaling.items()]
    largest = fresh("largest", names_of(op))
    if fused:
        rows = (f"rows = np.flatnonzero(self._{largest} > {bound})  # rows whose dx cancels at one entry: "
                f"forward's largest {factor.name}^2 of each row")
        kept_line = f"self._{largest} = {largest}  # the largest {factor.name}^2 of each row, which backward checks"
        prepared += [units_call, f"_, others = isolated({factor.name}_c, 0, {axis})  # each row's mask, 0 at its "
                                 f"entry of largest {factor.name} (bound 0: the rows are flagged already)"]
    else:
        rows = (f"rows, others = isolated({factor.name}, {bound}, {axis})  # rows whose dx cancels at one entry: "
                f"a max and a min per row")
        kept_line = (f"self._input = {x}  # what backward's form at an isolated entry reads, by reference"
                     if x not in kept else "")
    return {"rows": rows, "step": largest_step(largest, factor, unit_rows(op)) if fused else None,
            "source": source[x], "kept": kept_line, "prepared": prepared,
            "call": f"{exact.name}({', '.join(arguments)})",
            "dx": f"d{x}", "value": times_c(x, -scale_degrees(op)[f"d{x}"], "dx_rows"),   # dx on x's axes
            "factor": f"{factor.name}_c" if fused else at_rows(factor.name)}


def largest_step(name, factor, rows):
    """The step name[r] = the largest factor^2 over the rest of a row (the fused forward's, which saves no
    factor)."""
    return Assignment(name, tuple(rows), Maximum(factor.expr ** 2, *(
        (i, 0, size_of(i) - 1) for i in factor.indices if i not in rows)))


def isolated_function(op):
    """backward_isolated: dx at the entry of each row that is alone far from the others (derive.tensor.
    isolated_entry, proven equal to the derived dx there), from x, g, the mask of the others and eps per row,
    lowered as any steps; None for an op without that form."""
    exact = isolated_entry(op)
    if exact is None:
        return None
    axes = {**exact.inputs, **{p: a for p, (a, _) in exact.params.items()}, **exact.given,
            **{s.name: s.indices for s in exact.steps}}
    arrays = [*exact.inputs, *(p for p in exact.params if any(p in reads_of(s.expr) for s in exact.steps)),
              *(a for a in exact.given if a != "g"), "g"]
    return function(exact, "backward_isolated", "dx at the entry of each row alone far from the others, by the "
                    "form without the derived dx's cancellation.", exact.steps, arrays, ("y",), axes,
                    check_sizes(exact), [], names_of(exact), [str(s) for s in exact.steps])


def penalty_context(op, functions, source):
    """How the class calls the penalty's functions, and the options at 0 of which the penalty is 0 (its
    gradient is then not computed), or None without a penalty."""
    if not functions:
        return None
    value, gradient = functions
    zero_at = [o for o in op.options if op.penalty.subs(sp.Symbol(o, real=True), 0) == 0]
    return {"call": [source[a] for a in value.args], "gradient_call": [source[a] for a in gradient.args],
            "returns": list(gradient.returns), "zero_at": [source[o] for o in zero_at],
            "doc": sp.sstr(op.penalty)}


def params_only(op, backward):
    """backward_params: backward's statements that the params' gradients need, its arguments the same, for a
    layer's backward(g, input_grad=False): nothing reads the input's gradient there (a torch input that requires
    no grad), so it is not computed. None for an op with no param or no input gradient, or with running
    statistics or flags (whose backward has more than one path)."""
    returns = tuple(r for r in backward.returns if r[1:] in op.params)
    if op.kind != "layer" or not returns or len(returns) == len(backward.returns) or op.running or op.flags:
        return None
    needed, kept = set(returns), []
    for statement in reversed(backward.statements):
        # a guard writes again what its statements define (an input's gradient among them: computed for nothing
        # on that rare path, where the params' are computed with it)
        inner = statement.region if statement.form == "guard" else ()
        if statement.target in needed or any(s.target in needed for s in inner):
            if inner:   # checked on the params' gradients alone: an input's is not computed to be checked
                checks, reads, why, *test = statement.value.args
                checks = [c for c in checks.args if c.name in needed] or list(checks.args)
                statement = statement._replace(target=checks[0].name,
                                               value=sp.Tuple(sp.Tuple(*checks), reads, why, *test))
            kept.insert(0, statement)
            region = statement.region[:1] if statement.form in ("scatter", "accumulate") else ()
            needed |= {base_name(v.name) for e in (statement.value, *region, *(s.value for s in inner))
                       for v in sp.sympify(e).atoms(View)} - {s.target for s in inner}
    derivation = [line for line in backward.derivation if base_name(line) in needed]
    text = "\n".join(statement.source(TensorPrinter()) for statement in kept)
    sizes = [(names, how) for names, how in backward.sizes
             if any(re.search(rf"\b{name}\b", text) for name in re.findall(r"\w+", names) if name != "_")]
    return replace(backward, name="backward_params", doc="The gradient of each param alone (no input's): g times "
                   "the Jacobian by the adjoint steps they need.", sizes=tuple(sizes), statements=tuple(kept),
                   returns=returns, derivation=tuple(derivation))


def measured_shape(axes):
    """(size["N"], size["K"]): the shape of axes from the sizes the class measured its inputs' axes to be."""
    return f"({', '.join(f'size[{str(size_of(i))!r}]' for i in axes)}{',' if len(axes) == 1 else ''})"


def shape_text(axes, names=None, batched=False):
    """(K,) or (O, C, J): a shape of sizes, as Python source; a size by its name in names if it has one; a
    batched array's first axis any number of leading ones, * as PyTorch writes it: (*, K)."""
    text = [(names or {}).get(str(size_of(i)), str(size_of(i))) for i in axes]
    text = ["*", *text[1:]] if batched else text
    return f"({', '.join(text)}{',' if len(axes) == 1 else ''})"


# Stage 5: printing


class ScalarPrinter(PythonCodePrinter):
    """Sizes and options (Python numbers) as Python: math.sqrt(D) is a float, np.sqrt(D) a float64 that
    would turn a float32 array into float64."""

    def _print_Symbol(self, expr):
        return expr.name

    def _as_ordered_terms(self, expr, order=None):
        return positive_first(super()._as_ordered_terms(expr, order=order))


class FormulaPrinter(StrPrinter):
    """A size's formula as its declaration writes it (L - J + 1, K/2), for the messages."""

    def _as_ordered_terms(self, expr, order=None):
        return positive_first(super()._as_ordered_terms(expr, order=order))


class TensorPrinter(KernelPrinter):
    """KernelPrinter with the array program's operations."""

    def __init__(self):
        super().__init__()
        self.scalar = ScalarPrinter()

    def _print(self, expr, **kwargs):
        if (isinstance(expr, sp.Expr) and not expr.is_number and not expr.atoms(View)
                and not isinstance(expr, (sp.Symbol, ArrayOperation))
                and (expr.atoms(sp.Function) or any(not p.exp.is_Integer for p in expr.atoms(sp.Pow)))):
            return self.scalar.doprint(expr)
        return super()._print(expr, **kwargs)

    def _print_View(self, expr):
        return expr.name

    def _print_Str(self, expr):
        return expr.name

    def _print_Aligned(self, expr):
        operand, text = expr.args
        inner = self._print(operand)
        if not isinstance(operand, View):
            inner = inner if isinstance(operand, ArrayOperation) else f"({inner})"
        if text.name in ("copy()", "T") or text.name.startswith(("transpose(", "swapaxes(")):
            return f"{inner}.{text.name}"
        return f"{inner}[{text.name}]"

    def _print_Einsum(self, expr):
        subscripts, path, *operands = expr.args
        return f"np.einsum({subscripts.name}, {', '.join(self._print(o) for o in operands)}, optimize={path.name})"

    def doprint(self, expr, *args, **kwargs):
        if isinstance(expr, MatMul):   # a statement's whole value needs no parentheses
            return self._print_MatMul(expr)[1:-1]
        return super().doprint(expr, *args, **kwargs)

    def _print_MatMul(self, expr):
        # in parentheses: @ binds as * does in Python, and looser than ** and unary minus
        return "(" + " @ ".join(self._print(o) for o in expr.args) + ")"

    def _print_Reduce(self, expr):
        operand, axes, ufunc = expr.args
        # a max over no entry (attention with no key) is the identity -inf, not numpy's error
        initial = ", initial=-np.inf" if ufunc.name == "maximum" else ""
        return f"np.{ufunc.name}.reduce({self._print(operand)}, axis={axes.name}{initial})"

    def _print_ArgMax(self, expr):
        array, axis = expr.args
        return f"first_argmax({self._print(array)}, {axis.name})"

    def _print_Take(self, expr):
        array, index, axis = expr.args
        return f"np.take({self._print(array)}, {self._print(index)}, axis={axis.name})"

    def _print_GatherAtArgmax(self, expr):
        array, index, axis = expr.args
        return f"gathered_or_0({self._print(array)}, {self._print(index)}, {axis.name})"

    def _print_Gather(self, expr):
        array, index, axis = expr.args
        drop = ", ".join([":"] * int(axis.name) + ["0"])
        return f"np.take_along_axis({self._print(array)}, {self._print(index)}, axis={axis.name})[{drop}]"

    def _print_Window(self, expr):
        array, size, axis = expr.args
        return f"sliding_window_view({self._print(array)}, {size.name}, axis={axis.name})"

    def _print_WindowsAdded(self, expr):
        windows, shape, axes, taps, stride = expr.args
        return f"windows_added({self._print(windows)}, {shape.name}, {axes.name}, {taps.name}, {stride.name})"

    def _print_Reshaped(self, expr):
        array, shape = expr.args
        inner = self._print(array)
        return f"{inner if isinstance(array, (View, ArrayOperation)) else f'({inner})'}.reshape({shape.name})"

    def _print_Padded(self, expr):
        array, widths = expr.args
        return f"np.pad({self._print(array)}, {widths.name})"

    def _print_Diagonal(self, expr):
        array, one, two = expr.args
        return f"np.diagonal({self._print(array)}, 0, {one.name}, {two.name})"

    def _print_FirstMaxMask(self, expr):
        array, axes = expr.args
        return f"first_max({self._print(array)}, {axes.name})"

    def _print_Broadcast(self, expr):
        value, shape = expr.args
        return f"np.broadcast_to({self._print(value)}, ({''.join(self.scalar.doprint(s) + ', ' for s in shape)}))"

    def _print_Scale(self, expr):
        raise LoweringError(f"exp({expr.args[0]}) of a max shift did not cancel")
