"""Three-address code with buffer reuse: what hand-tuned NumPy does, done for every kernel.

Each kernel line whose result has the input's full shape is split into one ufunc call per
operation (np.multiply(a, b, out=...)), and each call writes into a full-size temporary that no
later line reads, when there is one, instead of allocating. A call allocates only when every
buffer it could use is still needed. This saves allocations and their page faults, and, with
row sums printed as einsum, the full-size products a nested expression would build; the
arithmetic is the one the SymPy result says, operation for operation.

Values smaller than the input (columns, scalars) and boolean masks are printed whole: they cost
little, and a mask or a column is never a full-size float buffer to write into."""
from dataclasses import dataclass

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from codegen.lower import AtLabel, BatchSum, Column, FullLike, LabelEntry, RowMax, RowSum, Shifted, Squeeze
from codegen.printer import one_bound_clip, positive_first, print_code
from derive.special import ExpToInf

UNARY = {sp.exp: "exp", ExpToInf: "exp", sp.log: "log", sp.tanh: "tanh", log1p: "log1p", expm1: "expm1", sp.Abs: "absolute",
         sp.sign: "sign", sp.sin: "sin", sp.cos: "cos"}
POWERS = {-1: "reciprocal", 2: "square", sp.Rational(1, 2): "sqrt"}
# these produce an array smaller than the input (a column, a scalar), one of another shape, or a view
NARROWING = (RowSum, RowMax, BatchSum, AtLabel, LabelEntry, Column, Squeeze)


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
        exprs = (self.operands + ((self.where,) if self.where is not None else ())) if self.ufunc else (self.expr,)
        return {s for e in exprs if isinstance(e, sp.Basic) for s in e.free_symbols}


class Flattener:
    """Splits expressions into Steps; full-size operations become ufunc calls on named operands."""

    def __init__(self, full, gathers=None):
        self.full, self.steps, self.count = set(full), [], 0
        self.named = {}                # full-size values assigned to a name: {expr: name}
        self.gathers = dict(gathers or {})  # {full-size expr: the name of its entries at the labels}, still to take

    def emit(self, ufunc, *operands):
        self.count += 1
        target = sp.Symbol(f"u{self.count}")
        self.steps.append(Step(target, ufunc, operands, buffer=True))
        self.full.add(target.name)
        return target

    def assign(self, lhs, expr):
        """The steps of lhs = expr."""
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
        if (isinstance(expr, sp.Piecewise) and len(expr.args) == 2 and expr.args[1].cond == sp.true
                and isinstance(expr.args[0].cond, sp.core.relational.Relational)):
            (value, cond), (other, _) = expr.args
            # NaN fails every comparison: "not cond" is ~(cond), never the flipped comparison
            scaled = self.scaled_branch(value, other, sp.Not(cond, evaluate=False)) or self.scaled_branch(other, value, cond)
            if scaled:
                return scaled
        if isinstance(expr, sp.Piecewise):
            expr = sp.Piecewise(*[(self.operand(value), self.small(cond)) for value, cond in expr.args])
        else:
            expr = expr.func(*[self.operand(a) for a in expr.args])
        return self.whole_step(expr)

    def whole_step(self, expr):
        """A step printing expr whole into a new full-size buffer."""
        self.count += 1
        target = sp.Symbol(f"u{self.count}")
        self.steps.append(Step(target, expr=expr, buffer=True))
        self.full.add(target.name)
        return target

    def scaled_branch(self, value, other, other_cond):
        """value where other_cond does not hold, value * s where it does, when other is value * s:
        one multiplication over the entries where the condition holds (out= and where=)."""
        # value is the buffer the product writes into where the condition holds: a full-size array
        # (a loss's g under a mean is a number, which no out= can hold)
        if not (isinstance(other, sp.Mul) and value in other.args and is_float_full(value, self.full)):
            return None
        scale = other / value
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
        if isinstance(scale, sp.Pow) and scale.exp == -1 and scale.base.has(*NARROWING):
            # divided by a column it computes (softmax's row sums), as hand-written code does: multiplying
            # by the column's reciprocal is one more call, 7% of a small batch's step, and no faster at
            # (8192, 1000)
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


def assignments_in_place(assignments, later, full, output=None, recompute=False):
    """[(lhs, code)] for [(lhs, expr)], each full-size operation writing into a dead temporary where
    there is one; later are expressions read after these lines (returned names, the label update).
    output names an argument (out=) that may alias any full-size argument: the first operation that
    would allocate once no later line reads an argument writes into it instead (None allocates).
    recompute: negations of arguments are recomputed where read (recomputed_negations)."""
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
    owned, free, lines = set(), [], []
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
        columns |= {lhs, expr} if isinstance(expr, (RowMax, RowSum)) else set()
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
