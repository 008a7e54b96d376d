"""Three-address code with buffer reuse: what hand-tuned NumPy does, done for every kernel.

Each kernel line whose result has the input's full shape is split into one ufunc call per
operation (np.multiply(a, b, out=...)), and each call writes into a full-size temporary that no
later line reads, when there is one, instead of allocating. A call allocates only when every
buffer it could use is still needed. This saves allocations and their page faults, and, with
row sums printed as einsum, the full-size products a nested expression would build; the
arithmetic is the one the SymPy result says, operation for operation.

Values smaller than the input (columns, scalars) and boolean masks are printed whole: they cost
little, and a mask or a column is never a full-size float buffer to write into."""
import functools
import re
from dataclasses import dataclass

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p
from sympy.core.symbol import Str

from codegen.bounds import finite_where_unselected
from codegen.lower import (AtIndex, AtLabel, BatchSum, Column, FullLike, LabelEntry, RowArgmax, RowMax, RowSum,
                           RowSumBut, Shifted, Squeeze)
from codegen.printer import one_bound_clip, positive_first, print_code
from derive.special import ExpToInf

UNARY = {sp.exp: "exp", ExpToInf: "exp", sp.log: "log", sp.tanh: "tanh", log1p: "log1p", expm1: "expm1", sp.Abs: "absolute",
         sp.sign: "sign", sp.sin: "sin", sp.cos: "cos", sp.floor: "floor"}
POWERS = {-1: "reciprocal", 2: "square", sp.Rational(1, 2): "sqrt"}
# these produce an array smaller than the input (a column, a scalar), one of another shape, or a view
NARROWING = (RowSum, RowMax, RowSumBut, RowArgmax, AtIndex, BatchSum, AtLabel, LabelEntry, Column, Squeeze)


class RowDot(sp.Function):
    """Row-wise dot product of two full arrays, as a column: one pass, no product array."""


class Dot(sp.Function):
    """The sum of every entry of the product of two full arrays: one pass, no product array."""


def is_full(expr, full):
    """Whether expr has the input's full shape: it reads a full array outside any narrowing function."""
    if isinstance(expr, sp.Symbol):
        return expr.name in full
    if isinstance(expr, NARROWING + (RowDot, Dot)):
        return False
    return any(is_full(arg, full) for arg in expr.args)


def is_float_full(expr, full):
    """A full-size float array: a buffer a later operation may write into (a mask is bool: never)."""
    # (a Symbol is a Boolean to SymPy too)
    return is_full(expr, full) and (isinstance(expr, sp.Symbol) or not isinstance(expr, sp.logic.boolalg.Boolean))


@dataclass
class Step:
    """One line: target = a ufunc of operands (out= decided later), or a whole expression."""

    target: sp.Symbol
    ufunc: str = None              # None: `expr` printed whole
    operands: tuple = ()
    expr: sp.Expr = None
    buffer: bool = False           # the result is a full-size float array this kernel owns
    where: sp.Expr = None          # a ufunc applied only where this holds: the rest keeps operands[0]

    def reads(self):
        """The symbols read, in the operands' order (buffers freed here are reused in that order, whatever the
        hash seed)."""
        exprs = (self.operands + ((self.where,) if self.where is not None else ())) if self.ufunc else (self.expr,)
        return tuple(dict.fromkeys(s for e in exprs if isinstance(e, sp.Basic)
                                   for s in sorted(e.free_symbols, key=sp.default_sort_key)))


class Flattener:
    """Splits expressions into Steps; full-size operations become ufunc calls on named operands."""

    def __init__(self, full, gathers=None):
        self.full, self.steps, self.count = set(full), [], 0
        self.named = {}                # full-size values assigned to a name: {expr: name}
        self.gathers = dict(gathers or {})  # {full-size expr: the name of its entries at the labels}, still to take
        self.definitions = {}          # {name: the expression assigned to it}, for the bounds of a selection's branches

    def emit(self, ufunc, *operands):
        self.count += 1
        target = sp.Symbol(f"u{self.count}")
        self.steps.append(Step(target, ufunc, operands, buffer=True))
        self.full.add(target.name)
        return target

    def assign(self, lhs, expr):
        """The steps of lhs = expr."""
        self.definitions[lhs] = expr
        if is_float_full(expr, self.full):
            self.named[expr] = lhs
            value = self.operand(expr)
            last = self.steps[-1] if self.steps else None
            if last is not None and last.target == value and value.name.startswith("u"):
                last.target = lhs  # the expression's last operation writes lhs itself
            else:
                self.steps.append(Step(lhs, expr=value, buffer=False))
            self.full.add(lhs.name)
        else:
            self.steps.append(Step(lhs, expr=self.small(expr, whole=True)))

    def small(self, expr, whole=False):
        """expr, smaller than the input, with the full-size arguments of its reductions computed first.
        A total inside expr (not expr whole) is a line of its own: the buffer it reads is free for
        the next one (a loss summed term by term needs one, not one per term)."""
        if isinstance(expr, BatchSum) and not whole and is_full(expr.args[0], self.full):
            self.count += 1
            target = sp.Symbol(f"s{self.count}")
            self.steps.append(Step(target, expr=self.small(expr, whole=True)))
            return target
        if isinstance(expr, RowSum) and isinstance(expr.args[0], sp.Mul):
            arrays = [f for f in expr.args[0].args if is_full(f, self.full)]
            if len(arrays) == 2 and len(expr.args[0].args) == 2:
                return RowDot(*[self.operand(a) for a in arrays])
        if isinstance(expr, BatchSum):
            # a total of a product of two full arrays (or a square) is their dot product: no product array
            summand = expr.args[0]
            pair = (list(summand.args) if isinstance(summand, sp.Mul) and len(summand.args) == 2
                    else [summand.base] * 2 if isinstance(summand, sp.Pow) and summand.exp == 2 else [])
            if pair and all(is_float_full(f, self.full) for f in pair):
                left = self.operand(pair[0])
                return Dot(left, left if pair[1] == pair[0] else self.operand(pair[1]))
        if isinstance(expr, RowSumBut) and isinstance(expr.args[0], sp.Mul) and len(expr.args[0].args) == 2 and all(
                is_float_full(f, self.full) for f in expr.args[0].args):  # a row dot product but one entry, as RowDot
            return RowSumBut(sp.Mul(*[self.operand(f) for f in expr.args[0].args]), self.small(expr.args[1]))
        if isinstance(expr, NARROWING):
            return expr.func(*[self.operand(a) if is_float_full(a, self.full) else self.small(a) for a in expr.args])
        if not expr.args or isinstance(expr, sp.Symbol):
            return expr
        return expr.func(*[self.small(a) for a in expr.args])

    def operand(self, expr):
        """A name (or a small expression) holding expr's value, after the steps computing it, and the
        entries of that value at the labels where a later line reads them (gathered_early), taken
        before any later step can write over its buffer."""
        value = self._operand(expr)
        gathered = self.gathers.pop(expr, None)
        if gathered is not None:
            self.steps.append(Step(gathered, expr=AtLabel(value)))
        return value

    def _operand(self, expr):
        if not is_float_full(expr, self.full):
            return self.small(expr)
        if isinstance(expr, sp.Symbol):
            return expr
        if isinstance(expr, sp.Mul):
            return self.product(expr)
        if isinstance(expr, sp.Add):
            return self.total(expr)
        if isinstance(expr, sp.Pow) and expr.exp in POWERS and is_full(expr.base, self.full):
            return self.emit(POWERS[expr.exp], self.operand(expr.base))
        if isinstance(expr, sp.Pow) and expr.exp.is_Integer:
            return self.emit("power", self.operand(expr.base), expr.exp)
        if isinstance(expr, FullLike):
            # its value is printed whole: a choice between numbers is no float buffer to write into
            like, value = expr.args
            return self.whole_step(FullLike(self.operand(like), self.small(value, whole=True)))
        if isinstance(expr, Shifted):
            return self.emit("subtract", self.operand(expr.args[0]), self.small(expr.args[1]))
        if type(expr) in UNARY:
            return self.emit(UNARY[type(expr)], self.operand(expr.args[0]))
        if isinstance(expr, (sp.Max, sp.Min)) and len(expr.args) == 2:
            clip = one_bound_clip(expr)  # as the printer's
            if clip:
                return self.emit("clip", self.operand(clip[0]), *clip[1:])
            return self.emit("maximum" if isinstance(expr, sp.Max) else "minimum", *map(self.operand, expr.args))
        if isinstance(expr, sp.Heaviside) and expr.args[1] == 0:
            # as the printer's Heaviside, one operation a line
            return self.emit("ceil", self.emit("clip", self.operand(expr.args[0]), 0, 1))
        if isinstance(expr, sp.Heaviside) and expr.args[1] == 1:
            return self.emit("subtract", 1, self.operand(sp.Heaviside(-expr.args[0], 0)))
        return self.whole(expr)

    def whole(self, expr):
        """A step printing expr whole (np.where, np.clip), its full-size values computed first."""
        if isinstance(expr, sp.Piecewise) and len(expr.args) == 2 and expr.args[1].cond == sp.true:
            chosen = self.chosen(*expr.args[0], expr.args[1].expr)
            if chosen:
                return chosen
        if isinstance(expr, sp.Piecewise):
            expr = sp.Piecewise(*[(self.operand(value), self.small(cond)) for value, cond in expr.args])
        else:
            expr = expr.func(*[self.operand(a) for a in expr.args])
        return self.whole_step(expr)

    def chosen(self, value, condition, other):
        """np.where(condition, value, other) in the fastest form that equals it, else None: one branch times the
        other's factor chosen by products, both branches' products, or one masked multiplication."""
        # NaN fails every comparison: "not condition" is ~(condition), never the flipped comparison
        found = (self.factored(value, other, negated(condition)) or self.factored(other, value, condition)
                 or self.selected(value, condition, other))
        if found or not isinstance(condition, sp.core.relational.Relational):
            return found
        return self.masked(value, other, negated(condition)) or self.masked(other, value, condition)

    def whole_step(self, expr):
        """A step printing expr whole into a new full-size buffer."""
        self.count += 1
        target = sp.Symbol(f"u{self.count}")
        self.steps.append(Step(target, expr=expr, buffer=True))
        self.full.add(target.name)
        return target

    def selected(self, value, condition, other):
        """np.where(condition, value, other) as value * c + other * (not c), c the condition's mask (one product where
        a branch is 0), where both branches are full-size float arrays (or 0: a float times a mask keeps its dtype,
        a number would not) that codegen.bounds proves finite wherever the other is chosen; else None. np.where's
        loop branches on every entry: at (8192, 1000) float32 it takes 9.5 multiplications when the condition holds
        at random half the entries, 2 when it always does; the products take 3.6 to 3.9 (one product 1.7); at
        (1024, 100), 26 and 4.8 against 4.9 (2.3). Conditions mostly of one value (overflow guards) have a zero
        branch, where the product is faster either way."""
        if value == 0:
            value, other, condition = other, value, negated(condition)
        if not (is_float_full(value, self.full) and (other == 0 or is_float_full(other, self.full))
                and finite_where_unselected(value, other, condition, self.definitions)):
            return None
        if other == 0:
            return self.emit("multiply", self.operand(value), self.mask(condition, named=False))
        chosen, rest = self.operand(value), self.operand(other)
        mask = self.mask(condition)
        return self.emit("add", self.emit("multiply", chosen, mask), self.emit("multiply", rest, negated(mask)))

    def mask(self, condition, named=True):
        """condition's mask: a name holding it where two lines read it (a negation reads its argument's), else the
        condition itself (not negated by SymPy: ~(u > 0) is not u <= 0 at a NaN)."""
        if isinstance(condition, sp.Not):
            return negated(self.mask(condition.args[0], named))
        if isinstance(condition, sp.Symbol) or not named:
            return self.small(condition)
        self.count += 1
        target = sp.Symbol(f"mask{self.count}")
        self.steps.append(Step(target, expr=self.small(condition)))
        return target

    def scale(self, value, other):
        """s where other is value * s and value a full-size array (a loss's g under a mean is a number, which no out=
        can hold), else None."""
        if isinstance(other, sp.Mul) and value in other.args and is_float_full(value, self.full):
            return other / value
        return None

    def factored(self, value, other, other_cond):
        """value where other_cond fails, value * s where it holds: value times s c + (not c), c other_cond's mask,
        where s is a full-size float array finite where other_cond fails (as in selected); else None. Three passes,
        where the masked multiplication takes 14 multiplications at (8192, 1000) float32 for a condition of random
        signs (2.5 for a constant one)."""
        scale = self.scale(value, other)
        if not (scale is not None and is_float_full(scale, self.full)
                and finite_where_unselected(scale, sp.S.One, other_cond, self.definitions)):
            return None
        factor, mask = self.operand(scale), self.mask(other_cond)
        factor = self.emit("add", self.emit("multiply", factor, mask), negated(mask))
        return self.emit("multiply", self.operand(value), factor)

    def masked(self, value, other, other_cond):
        """value where other_cond fails, value * s where it holds: one multiplication over the entries where the
        condition holds (out= and where=), into a copy of value; else None."""
        scale = self.scale(value, other)
        if scale is None:
            return None
        buffer = self.operand(value)
        self.count += 1
        target = sp.Symbol(f"u{self.count}")
        self.steps.append(Step(target, "multiply", (buffer, self.operand(scale)), buffer=True,
                               where=sp.Not(self.small(other_cond.args[0]), evaluate=False)
                               if isinstance(other_cond, sp.Not) else self.small(other_cond)))
        self.full.add(target.name)
        return target

    def product(self, expr):
        """A product: full factors multiplied (or divided) in turn, then one small factor at the end."""
        factors, divisors, scale = [], [], sp.S.One
        for f in expr.args:
            if not is_full(f, self.full):
                scale *= f
            elif isinstance(f, sp.Pow) and f.exp == -1:
                divisors.append(f.base)
            else:
                factors.append(f)
        if scale == -1 and len(factors) == 1 and not divisors and isinstance(factors[0], sp.Abs):
            # -|u| in one pass: min(u, -u) where -u is a value already, else |u| negated in place
            # (np.copysign has no SIMD loop: two SIMD passes beat it, 4x at (1024, 100) float32)
            u = factors[0].args[0]
            if self.named.get(-u) is not None:
                return self.emit("minimum", self.operand(u), self.named[-u])
            return self.emit("negative", self.emit("absolute", self.operand(u)))
        # compound factors first: the first makes a buffer the plain arrays then multiply in place
        factors.sort(key=lambda f: isinstance(f, sp.Symbol))
        if factors:
            value = self.operand(factors[0])
            for f in factors[1:]:
                value = self.emit("multiply", value, self.operand(f))
        else:
            value, scale = self.emit("divide", scale, self.operand(divisors.pop(0))), sp.S.One
        for d in divisors:
            value = self.emit("divide", value, self.operand(d))
        if scale == -1:
            return self.emit("negative", value)
        if isinstance(scale, sp.Pow) and scale.exp == -1 and scale.base.xreplace(self.definitions).has(*NARROWING):
            # divided by a column it computes (softmax's row sums, or a name for one), as hand-written code does:
            # multiplying by the column's reciprocal is one more call, 7% of a small batch's step, and no faster
            # at (8192, 1000)
            return self.emit("divide", value, self.small(scale.base))
        return value if scale == 1 else self.emit("multiply", value, self.small(scale))

    def total(self, expr):
        """A sum: full terms added (or subtracted) in turn, then the small terms' sum."""
        # the printed order, which sets terms that cancel side by side (a - a b^2 for b -> 1), but for a
        # positive term moved first, when there is one, so that no pass only negates
        terms = positive_first(t for t in expr.as_ordered_terms() if is_full(t, self.full))
        rest = sp.Add(*[t for t in expr.args if not is_full(t, self.full)])
        first = terms.pop(0)
        if first.could_extract_minus_sign() and rest != 0:
            value, rest = self.emit("subtract", self.small(rest), self.operand(-first)), sp.S.Zero
        else:
            value = self.operand(first)
        for t in terms:
            negative = t.could_extract_minus_sign()
            value = self.emit("subtract" if negative else "add", value, self.operand(-t if negative else t))
        if rest == 0:
            return value
        negative = rest.could_extract_minus_sign()
        return self.emit("subtract" if negative else "add", value, self.small(-rest if negative else rest))


def negated(condition):
    """not condition: ~(u > 0), never u <= 0, which NaN fails too."""
    return condition.args[0] if isinstance(condition, sp.Not) else sp.Not(condition, evaluate=False)


def assignments_in_place(assignments, later, full, output=None, recompute=False, updates=()):
    """[(lhs, code)] for [(lhs, expr)], each full-size operation writing into a dead temporary where
    there is one; later are expressions read after these lines (returned names, the label update).
    output names an argument (out=) that may alias any full-size argument: the first operation that
    would allocate once no later line reads an argument writes into it instead (None allocates).
    recompute: negations of arguments are recomputed where read (recomputed_negations).
    updates: ((lhs, argument), ...): lhs is the argument's new value (an optimizer's state), written into the
    argument itself; the argument is a buffer like a temporary once no line reads it (a ValueError where
    lhs cannot end in it)."""
    if recompute:
        assignments = recomputed_negations(assignments, full)
    early, gathers = gathered_early(assignments, full)
    flat = Flattener(full, gathers)
    for lhs, expr in early:
        flat.assign(lhs, expr)
    if flat.gathers:  # a value to gather from was never made as such: gather where the lines read it
        flat = Flattener(full)
        for lhs, expr in assignments:
            flat.assign(lhs, expr)
    steps = flat.steps
    kept = {s for e in later for s in e.free_symbols}
    for step in reversed(steps):  # a kept name that only names another value (m' = v1) keeps that value whole
        if step.target in kept and step.ufunc is None and isinstance(step.expr, sp.Symbol):
            kept.add(step.expr)
    last_use = {}
    for position, step in enumerate(steps):
        for name in step.reads():
            last_use[name] = position
    arguments = {sp.Symbol(name) for name in full}
    # out may be a saved array: it is free only once no line reads an argument any more
    free_from = max([last_use.get(a, -1) for a in arguments], default=-1)
    if output is None or kept & arguments:
        free_from = len(steps)
    # an updated argument is owned like a temporary: its buffer is free once no line reads it
    owned, free, lines = {sp.Symbol(a) for _, a in updates}, [], []
    holder = {s: s for s in owned}     # the array each owned name's value is in
    for position, step in enumerate(steps):
        into = None
        if step.ufunc:
            dead = [s for s in step.operands if s in owned and last_use.get(s) == position and s not in kept]
            if step.where is not None:  # entries left alone keep the first operand's value
                dead = dead[:1] if dead and dead[0] == step.operands[0] else []
            into = dead[0] if dead else (free.pop() if free and step.where is None else None)
            if into is None and step.where is None and position >= free_from:
                into, free_from = output, len(steps)
        lines.append((step.target, _code(step, into)))
        for s in step.reads():
            if s in owned and last_use.get(s) == position and s not in kept and s != into:
                free.append(s)
        if into in owned:
            owned.discard(into)
        if step.buffer:
            owned.add(step.target)
            holder[step.target] = holder.get(into, step.target)
        elif isinstance(step.expr, sp.Symbol) and step.expr in holder:
            holder[step.target] = holder[step.expr]
    for lhs, argument in updates:
        if holder.get(sp.Symbol(lhs)) != sp.Symbol(argument):
            raise ValueError(f"{lhs} is not computed in place into {argument}: a line reads {argument} after "
                             f"the last one that could write it")
    return [(str(lhs), code) for lhs, code in lines]


def gathered_early(assignments, full):
    """(assignments, {full-size value: name}) with each a[label] - b, b a row's max or sum, read as
    (a - b)[label] where a - b is a full-size value an earlier line makes anyway (softmax-CE's
    max - x[label] beside exp(x - max)): the Flattener takes those entries as soon as a - b is made,
    before the buffer holding it is written over, and one small subtraction is saved (the tuned NumPy's
    shifted logit). Only a value the same across the row moves inside the gather: a per-class one would not."""
    made, gathers, rewritten, columns = set(), {}, [], set()
    def regather(add):  # noqa: E306
        terms = list(add.args)
        for term in terms:
            sign, at = (-1, -term) if term.could_extract_minus_sign() else (1, term)
            if not (isinstance(at, AtLabel) and is_float_full(at.args[0], full)):
                continue
            for shift in terms:
                value = at.args[0] + sign * shift
                if shift is not term and shift in columns and value in made:
                    name = gathers.setdefault(value, sp.Symbol(f"at_label{len(gathers) + 1}"))
                    rest = [t for t in terms if t is not term and t is not shift]
                    return sp.Add(sign * name, *rest)
        return add
    for lhs, expr in assignments:  # a value an earlier line makes: made before this line reads it
        rewritten.append((lhs, expr.replace(lambda e: isinstance(e, sp.Add), regather)))
        made |= {e for e in sp.preorder_traversal(expr) if isinstance(e, sp.Add) and is_float_full(e, full)}
        columns |= {lhs, expr} if isinstance(expr, (RowMax, AtIndex, RowSum)) else set()
    return rewritten, gathers


def recomputed_negations(assignments, full):
    """assignments with each temporary that only negates an argument (v = -x) written out where it
    is read: one more pass each time instead of a buffer held from the first use to the last. A
    kernel whose full-size arrays all fit in one buffer's memory then allocates one: NumPy frees
    each temporary, and glibc gives memory beyond twice the largest block back to the system,
    so the next call faults every page of every buffer in again (1024 x 100 float64: three
    buffers cost 1.3 ms a call, one costs 20 us). On a small array the passes cost more than the
    buffers, so only the summed losses, which then need one buffer, take this."""
    arguments = {sp.Symbol(name) for name in full}
    negations = {lhs: expr for lhs, expr in assignments
                 if lhs.name.startswith("v") and isinstance(expr, sp.Mul) and len(expr.args) == 2
                 and expr.args[0] == -1 and expr.args[1] in arguments}
    return [(lhs, expr.xreplace(negations)) for lhs, expr in assignments if lhs not in negations]


def _code(step, into):
    """The source of one step, writing into the buffer into if it is a ufunc."""
    if not step.ufunc:
        return print_code(step.expr)
    if step.ufunc == "clip":  # the method: np.clip's dispatch costs a microsecond a call
        first, *bounds = step.operands
        return f"{_print(first)}.clip({', '.join(_print(a) for a in bounds)}" + (f", out={into})" if into else ")")
    args = ", ".join(_print(a) for a in step.operands)
    if step.where is not None:
        into = into if into is not None else f"np.copy({_print(step.operands[0])})"
        args += f", where={_print(step.where)}"
    return f"np.{step.ufunc}({args}" + (f", out={into})" if into is not None else ")")


def _print(expr):
    if isinstance(expr, sp.Integer):
        return str(int(expr))  # a Python int keeps the array's dtype
    return print_code(expr)



# Index-notation kernels (codegen.tensor_lower): the same buffer reuse over their statements, printed by
# TensorPrinter. Which values are arrays of a full shape is known by evaluating the statements at the check
# sizes (an ArrayFunction's shapes): a value's shape is the one NumPy gives it there.


class Ufunc(sp.Function):
    """np.<ufunc>(operands..., out=buffer): one operation of an index-notation statement, written into the
    buffer named (the empty name: a new array). Args: (Str ufunc, Str buffer, *operands)."""

    def _eval_is_commutative(self):
        return True

    def _numpycode(self, printer):
        ufunc, into = self.args[:2]
        out = f", out={into.name}" if into.name else ""
        return f"np.{ufunc.name}({self.printed_operands(printer)}{out})"

    def printed_operands(self, printer):
        return ", ".join(_print(o) if o.is_Integer else printer.doprint(o) for o in self.args[2:])

    def kept_call(self, printer, site):
        """The call writing into a new array as the runtime's kept: one an earlier call made at this line (site, in
        the module calling) once nothing holds it, so that a large result costs no fresh pages each call."""
        return f'kept((__name__, "{site}"), np.{self.args[0].name}, {self.printed_operands(printer)})'


class Filled(Ufunc):
    """np.where(where, fill, value) with fill a number, or, where a buffer is named (value's own), fill copied
    into it where `where` holds (np.copyto: a mask costs no new array, and a tenth of a masked ufunc's time).
    Args: (Str "where", Str buffer, value, where, fill)."""

    def _numpycode(self, printer):
        _, _, value, where, fill = self.args
        return f"np.where({printer.doprint(where)}, {printer.doprint(fill)}, {printer.doprint(value)})"

    def lines(self, printer, target):
        """The lines computing target: np.copyto into the buffer, then target naming it; or target = np.where."""
        _, into, _, where, fill = self.args
        if not into.name:
            return [f"{target} = {printer.doprint(self)}"]
        return [f"np.copyto({into.name}, {printer.doprint(fill)}, where={printer.doprint(where)})",
                f"{target} = {into.name}"]


@dataclass
class Line:
    """A line of a buffered index-notation function: target = value (a Ufunc, or an expression printed
    whole), or one of its statements printed as it is (an update of a region, a scatter)."""

    target: str
    value: sp.Expr = None
    shape: tuple = None            # the full shape of the new array the line makes, None if it makes none
    statement: object = None


class TensorFlattener:
    """Splits an index-notation function's statements into Lines: each operation whose value is a float array
    of a full shape (that of an argument or assignment with the most axes) a Ufunc on named operands."""

    def __init__(self, function, printer, view, fresh):
        self.printer, self.view, self.fresh, self.lines, self.count = printer, view, fresh, [], 0
        shapes = dict(function.shapes)
        most = max(map(len, shapes.values()), default=0)
        self.full = {shape for shape in shapes.values() if most and len(shape) == most}
        self.taken = {*function.args, *shapes, *(s.target for s in function.statements)}
        self.namespace, self.known = evaluation_namespace(function), {}
        self.named = {}            # {full-shape value: the name of an earlier statement that holds it}
        self.results = {s.value for s in function.statements if s.target in function.returns and s.form == "define"}

    def value(self, expr):
        """expr's value at the check sizes, None where it has none (a condition, a Piecewise's pair)."""
        if expr not in self.known:
            try:
                self.known[expr] = eval(self.printer.doprint(expr), self.namespace)  # noqa: S307 - the kernel's source
            except Exception:
                self.known[expr] = None
        return self.known[expr]

    def shape(self, expr):
        """expr's shape if its value is a float array of a full shape, else None."""
        value = self.value(expr) if isinstance(expr, sp.Expr) else None
        full = value is not None and np.asarray(value).dtype.kind == "f" and np.shape(value) in self.full
        return np.shape(value) if full else None

    def name(self, prefix):
        self.count += 1
        while f"{prefix}{self.count}" in self.taken:
            self.count += 1
        return self.view(f"{prefix}{self.count}")

    def emit(self, ufunc, shape, *operands):
        target = self.name("u")
        self.lines.append(Line(target.name, Ufunc(Str(ufunc), Str(""), *operands), shape))
        return target

    def whole(self, expr, shape):
        """expr printed whole (its full-shape values inside computed first), as a line of its own where it
        makes a new array."""
        value = self.within(expr)
        if not self.fresh(value):
            return value
        target = self.name("w")
        self.lines.append(Line(target.name, value, shape))
        return target

    def statement(self, statement):
        """The Lines of one statement, which then runs in the namespace (for the next ones' values)."""
        start = len(self.lines)
        if statement.form != "define":       # an update of its target: no longer the value it was named for
            self.lines.append(Line(statement.target, statement=statement))
            self.named = {value: name for value, name in self.named.items() if name.name != statement.target}
        else:
            value = self.operand(statement.value)
            if len(self.lines) > start and getattr(value, "name", None) == self.lines[-1].target:
                self.lines[-1].target = statement.target   # the value's last operation writes the target itself
            else:
                shape = self.shape(statement.value) if self.fresh(value) else None
                self.lines.append(Line(statement.target, value, shape))
            if self.lines[-1].shape is not None:
                self.named[statement.value] = self.view(statement.target)
        exec(statement.source(self.printer), self.namespace)  # noqa: S102 - the kernel's own source

    def operand(self, expr):
        """A name (or an expression printed whole) holding expr's value, after the Lines computing it."""
        shape = self.shape(expr)
        if shape is None or isinstance(expr, sp.Symbol):
            return self.within(expr)
        if expr in self.named:
            return self.named[expr]
        if isinstance(expr, sp.Mul):
            return self.product(expr, shape)
        if isinstance(expr, sp.Add):
            return self.total(expr, shape)
        if isinstance(expr, sp.Pow) and self.shape(expr.base) and (expr.exp in POWERS or expr.exp.is_Integer):
            exponent = () if expr.exp in POWERS else (expr.exp,)
            return self.emit(POWERS.get(expr.exp, "power"), shape, self.operand(expr.base), *exponent)
        if type(expr) in UNARY and self.shape(expr.args[0]):
            return self.emit(UNARY[type(expr)], shape, self.operand(expr.args[0]))
        return self.filled(expr, shape) or self.whole(expr, shape)

    def filled(self, expr, shape):
        """Piecewise((value, c), (fill, True)) (or its branches the other way) with fill a number, as Filled, so that
        it may write fill over value's buffer; else None."""
        if not (isinstance(expr, sp.Piecewise) and len(expr.args) == 2 and expr.args[1].cond == sp.true):
            return None
        (first, condition), (second, _) = expr.args
        value, fill = (first, second) if second.is_number else (second, first) if first.is_number else (None, None)
        if value is None or self.shape(value) != shape:
            return None
        # where fill goes: not the condition where fill is the other branch, ~(u > 0), never u <= 0, which a NaN fails
        where = self.within(condition)
        where = sp.Not(where, evaluate=False) if fill is second else where
        target = self.name("u")
        self.lines.append(Line(target.name, Filled(Str("where"), Str(""), self.operand(value), where, fill), shape))
        return target

    def within(self, expr):
        """expr with the full-shape values inside it (a reduction's operand, a branch) computed first."""
        if not isinstance(expr, sp.Basic) or not expr.args or isinstance(expr, sp.Symbol):
            return expr
        dot = self.dot(expr)
        if dot is not None:
            return dot
        args = [self.operand(a) if self.shape(a) else self.within(a) for a in expr.args]
        return expr if args == list(expr.args) else expr.func(*args)

    def dot(self, expr):
        """A sum of the product of two full arrays (or of a square) as einsum of the two, one pass and no product
        array (LayerNorm's variance: Sum((x - mu)^2, k) as np.einsum("ab,ab->a", t, t)), else None."""
        from codegen.tensor_lower import Einsum, Reduce
        if not (isinstance(expr, Reduce) and expr.args[2].name == "add"):
            return None
        summand, axes = expr.args[:2]
        pair = ([summand.base] * 2 if isinstance(summand, sp.Pow) and summand.exp == 2
                else list(summand.args) if isinstance(summand, sp.Mul) and len(summand.args) == 2 else [])
        shapes = {self.shape(f) for f in pair}
        if not pair or None in shapes or len(shapes) != 1:
            return None
        letters = "abcdefghij"[:len(shapes.pop())]
        summed = {int(a) for a in re.findall(r"\d+", axes.name)}
        kept = "".join(letter for at, letter in enumerate(letters) if at not in summed)
        first = self.operand(pair[0])
        second = first if pair[1] == pair[0] else self.operand(pair[1])
        return Einsum(Str(f'"{letters},{letters}->{kept}"'), Str("False"), first, second)

    def product(self, expr, shape):
        """Full factors multiplied (or divided) in turn, then the others: together where that makes no full
        array itself, else the numbers and scalars with the first of them, and each other one alone."""
        scaled = self.scaled_operand(expr)
        if scaled is not None:
            return self.operand(scaled)
        factors, divisors, rest = [], [], []
        for f in self.reusing(expr.args):
            if isinstance(f, sp.Pow) and f.exp == -1 and self.shape(f.base):
                divisors.append(f.base)
            elif self.shape(f):
                factors.append(f)
            else:
                rest.append(f)
        if not factors and not divisors:      # a row times a column
            return self.whole(expr, shape)
        factors.sort(key=lambda f: isinstance(f, sp.Symbol))   # a compound factor first makes a buffer
        scale = sp.Mul(*rest)
        if factors:
            value = self.operand(factors[0])
            for f in factors[1:]:
                value = self.emit("multiply", shape, value, self.operand(f))
        else:
            value, scale = self.emit("divide", shape, self.within(scale), self.operand(divisors.pop(0))), sp.S.One
        for d in divisors:
            value = self.emit("divide", shape, value, self.operand(d))
        if scale == -1:
            return self.emit("negative", shape, value)
        scalars = [f for f in rest if np.ndim(self.value(f)) == 0]
        arrays = [f for f in rest if f not in scalars]
        groups = [scale] if self.shape(scale) is None else [sp.Mul(*scalars, arrays[0]), *arrays[1:]]
        for group in groups:
            if group != 1:
                value = self.emit("multiply", shape, value, self.within(group))
        return value

    def scaled_operand(self, expr):
        """A scalar times a matrix product, the scalar moved onto the product's smallest operand where that is
        smaller than the product (attention's scores: Q / sqrt(D), T D entries, not the T S of Q K^T); else None.
        Never in a result: there a subnormal entry of the operand would round (4.9e-324 / sqrt(2) is 4.9e-324
        again) and a large other operand carry that error into a normal entry (dK = g_A^T Q / sqrt(D) at
        Q = -4.9e-324, g_A = 2e171, sqrt(2) times its truth); scaled after the product, each entry rounds once,
        in a pass over the result, no larger than the operand where the sizes match (self-attention's T = S)."""
        from codegen.tensor_lower import MatMul
        products = [f for f in expr.args if isinstance(f, MatMul)]
        scale = sp.Mul(*(f for f in expr.args if not isinstance(f, MatMul)))
        if len(products) != 1 or np.ndim(self.value(scale)) != 0 or expr in self.results:
            return None
        sizes = [np.size(self.value(o)) for o in products[0].args]
        smallest = int(np.argmin(sizes))
        if sizes[smallest] >= np.size(self.value(products[0])):
            return None
        return MatMul(*(scale * o if n == smallest else o for n, o in enumerate(products[0].args)))

    def reusing(self, factors):
        """factors with each sum that is a number times a value an earlier statement holds written so (LayerNorm's
        2 x - 2 mu, 2 times x - mu): the number joins the other small factors, and no pass makes the sum."""
        found = []
        for f in factors:
            number, inner = sp.factor_terms(f).as_coeff_Mul() if isinstance(f, sp.Add) else (1, f)
            found += [number, inner] if number != 1 and inner in self.named else [f]
        return found

    def total(self, expr, shape):
        """Full terms added (or subtracted) in turn, then the others' sum; printed whole where no term is
        full (a row plus a column)."""
        terms = positive_first(t for t in expr.as_ordered_terms() if self.shape(t))
        rest = sp.Add(*[t for t in expr.args if not self.shape(t)])
        if not terms:
            return self.whole(expr, shape)
        first = terms.pop(0)
        if first.could_extract_minus_sign() and rest != 0:
            value, rest = self.emit("subtract", shape, self.within(rest), self.operand(-first)), sp.S.Zero
        else:
            value = self.operand(first)
        for t in terms:
            negative = t.could_extract_minus_sign()
            value = self.emit("subtract" if negative else "add", shape, value, self.operand(-t if negative else t))
        if rest == 0:
            return value
        negative = rest.could_extract_minus_sign()
        return self.emit("subtract" if negative else "add", shape, value, self.within(-rest if negative else rest))


def evaluation_namespace(function):
    """The names a function's statements read, at the check sizes: its arrays random from 0.5 to 1.5 (where
    every function of the catalog is defined), its options 0.5, a window's stride 1 on each axis, its sizes as its
    first lines compute them."""
    import math
    rng = np.random.default_rng(0)
    shapes = dict(function.shapes)
    from numpy.lib.stride_tricks import sliding_window_view
    runtime = {"sliding_window_view": sliding_window_view, **vars(tensor_runtime())} if function.imports else {}
    namespace = {"np": np, "math": math, **{name: runtime[name] for name in function.imports}}
    for name in function.args:
        namespace[name] = rng.uniform(0.5, 1.5, shapes[name]) if name in shapes else (1,) * 3 if name == "stride" else 0.5
    for names, how in function.sizes:
        exec(f"{names} = {how}", namespace)  # noqa: S102 - the kernel's own source
    return namespace


@functools.cache
def tensor_runtime():
    """The index-notation runtime (generated/_tensor.py) as the templates render it now, imported from a
    temporary package: the helpers a statement calls (first_argmax, windows_added), for evaluation_namespace.
    Rendered, not read from generated/: this stage runs before anything is written."""
    import importlib.util
    import sys
    import tempfile
    from pathlib import Path

    from codegen.render import runtime_files
    files = runtime_files()   # in the order they import each other
    folder = Path(tempfile.mkdtemp(prefix="symgrad-runtime-")) / "symgrad_runtime"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for file, text in files.items():
        (folder / file).write_text(text)
    for name, file in (("symgrad_runtime", "__init__.py"), *((f"symgrad_runtime.{f[:-3]}", f) for f in files)):
        spec = importlib.util.spec_from_file_location(
            name, folder / file, submodule_search_locations=[str(folder)] if file == "__init__.py" else None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules["symgrad_runtime._tensor"]


def base_name(text):
    """The array a name or a view of one reads: mu of mu[:, None], W of W.T."""
    return re.match(r"\w*", text).group()


def tensor_in_place(function, printer, view, fresh):
    """The printed lines of an index-notation function (codegen.tensor_lower.ArrayFunction), each operation
    on float arrays of a full shape a ufunc call writing into a buffer of that shape that no later line reads,
    where there is one; view makes a name, fresh tells whether an expression's value is a new array (not a
    view of another). Its statements printed as they are where they do not run at the check sizes."""
    flat = TensorFlattener(function, printer, view, fresh)
    try:
        with np.errstate(all="ignore"):
            for statement in function.statements:
                flat.statement(statement)
    except Exception:
        return [statement.source(printer) for statement in function.statements]

    def reads(line):
        if line.statement is None:
            exprs = [line.value]
        else:
            region = line.statement.region[:1] if line.statement.form in ("scatter", "accumulate") else ()
            exprs = [line.statement.value, *region, sp.Symbol(line.statement.target)]
        return {base_name(s.name) for e in exprs if isinstance(e, sp.Basic) for s in e.atoms(sp.Symbol)}

    def operands(line):
        """The names a ufunc line reads whole as its operands, but those it also reads through a view (u.T):
        the buffers it may write into."""
        args = line.value.args[2:] if isinstance(line.value, Ufunc) else ()
        viewed = {base_name(s.name) for s in line.value.atoms(sp.Symbol) if s.name != base_name(s.name)}
        return [a.name for a in args if isinstance(a, sp.Symbol) and a.name == base_name(a.name) and a.name not in viewed]

    last_use, kept = {}, set(function.returns)
    for position, line in enumerate(flat.lines):
        for name in reads(line):
            last_use[name] = position
        if line.statement is None and not fresh(line.value):
            kept |= reads(line)                  # a view of an array keeps that array
    owned, free, printed = {}, [], []
    for position, line in enumerate(flat.lines):
        if isinstance(line.value, Ufunc):
            whole = operands(line)
            dead = [o for o in whole if owned.get(o) == line.shape and last_use.get(o) == position and o not in kept]
            spare = next((f for f in free if owned[f] == line.shape), None) if type(line.value) is Ufunc else None
            into = dead[0] if dead else spare   # a Filled writes over its own value alone
            if into is not None:
                free = [f for f in free if f != into]
                del owned[into]
                line.value = line.value.func(line.value.args[0], Str(into), *line.value.args[2:])
        printed += ([line.statement.source(printer)] if line.statement is not None
                    else line.value.lines(printer, line.target) if isinstance(line.value, Filled)
                    else [f"{line.target} = {line.value.kept_call(printer, f'{function.name}.{line.target}')}"]
                    if type(line.value) is Ufunc and not line.value.args[1].name
                    else [f"{line.target} = {printer.doprint(line.value)}"])
        free += [name for name in sorted(reads(line)) if name in owned and last_use.get(name) == position
                 and name not in kept and name not in free]   # sorted: a set of names' order is the hash seed's
        if line.shape is not None and line.target not in kept:
            owned[line.target] = line.shape
    return printed
