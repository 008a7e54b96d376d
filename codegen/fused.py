"""The numba backend's printer: the same cse'd assignments the NumPy kernels print, as fused loops.

Each assignment is a scalar of the call (N, K, options), a per-row value (a row reduction, the entry
at the label, a row loss's g) or a full quantity (one value per element). Row kernels: per row n of
numba.prange, a loop over k computes the reductions of level 1 (of full quantities and scalars
alone), then the per-row values they give; the loop of level 2 the reductions that read those, and so
on; a full output is written in the first loop after the per-row values it reads. A full temporary
that two loops read and that costs a function call is kept in the row of the output that reads it
last, otherwise computed again. Element-wise kernels are one flat prange loop."""
import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import expm1, hypot, log1p
from sympy.printing.precedence import PRECEDENCE

from codegen.kernels import FULL_SIZE, DENOMINATOR, REST, arguments, kernel_assignments, redo_lines, shared
from codegen.lower import AtIndex, AtLabel, BatchSum, Column, LabelEntry, RowArgmax, RowMax, RowSum, RowSumBut, Squeeze
from codegen.printer import KernelPrinter
from derive.special import FORMATS, Erfc, Expm1, ExpToInf, PowerOfTwo, erf_numpy, erfc_steps, exp_steps, log1p_steps
from derive.stability import sigmoid_by_branches

# math.* keeps a float32 argument float32 in numba; np.maximum and np.sign propagate NaN as NumPy does.
# exp and log1p (of an argument in [0, 1]) are _runtime's, which the loop vectorizer inlines: numba
# leaves math.exp and math.log1p scalar calls to libm (it vectorizes them only with Intel's SVML).
# tanh has no such form yet: a loop of scalar math.tanh ran 9x slower than np.tanh's SIMD loop, so a
# kernel with a tanh (Tanh, GELUTanh, Mish) stays the NumPy one.
FUNCTIONS = {sp.exp: "exp", ExpToInf: "exp", sp.log: "math.log", log1p: "math.log1p",
             expm1: "math.expm1", Expm1: "math.expm1", hypot: "math.hypot", sp.erf: "erf",
             Erfc: "erfc"}
# _runtime's functions: name, argument, docstring, its steps per dtype (derive/special.py)
RUNTIME = (("exp", "u", "e^u without libm: a clamp, a floor, a polynomial and two powers of two made of bits",
            exp_steps),
           ("log1p", "z", "log(1 + z) for z in [0, 1] without libm: a polynomial", log1p_steps),
           # numba's math.erf is a scalar libm call, which keeps the loop from vectorizing
           ("erf", "u", "erf(u) without libm: a series for |u| < 2, erfc's continued fraction beyond",
            lambda u, dtype: shared_steps(erf_numpy(u))),
           ("erfc", "z", "erfc(z) without libm: exp(-z^2) times a polynomial in |z|/(|z| + K), 2 minus it for z < 0",
            erfc_steps))
# an accumulator's start and its update: a sum and a max over the row. The max is _runtime's maximum
# (llvm.maximum: NaN if either is NaN, as np.maximum), a reduction the loop vectorizer vectorizes;
# np.maximum's branches keep the loop scalar (2 ns an element against 0.14)
# an argmax (lower.RowArgmax, after its max: argmax_after_max) as the least k whose entry is the max, np.argmax's
# index (the first of ties), a reduction that vectorizes; a sum but one entry (lower.RowSumBut) skips it by a select
REDUCE = {RowSum: ("T(0)", "{acc} + {value}"), RowMax: ("T(-math.inf)", "maximum({acc}, {value})"),
          RowArgmax: ("K", "min({acc}, k if {value} == {other} else K)"),
          RowSumBut: ("T(0)", "{acc} + ({value} if k != {other} else T(0))")}
REDUCTIONS = tuple(REDUCE)
UNFUSED = (LabelEntry, BatchSum, Column)
FUSED_ARGS = set(FULL_SIZE) | {"g", "c", DENOMINATOR, REST}
# per-row arrays a kernel takes as columns (N, 1), read at [n, 0]
COLUMNS = ("c", DENOMINATOR, REST)
# fastmath flags that keep the NumPy kernels' values: sums over a row reassociated into SIMD lanes,
# fused multiply-adds, reciprocals; never nnan or ninf, since the kernels give infinities and NaN
FASTMATH = ("arcp", "contract", "reassoc")


def shared_steps(expr):
    """expr as assignments [(symbol, expr)], each subexpression it repeats computed once, the last y."""
    temporaries, (value,) = shared([expr])
    return temporaries + [(sp.Symbol("y"), value)]


class FusionError(ValueError):
    """A kernel the fused printer does not print (class weights, masks, batch sums, matrix products)."""


class FusedPrinter(KernelPrinter):
    """Scalar code for numba: numbers in the input's dtype T (a Python float would make float32
    work float64), functions from math or _runtime, branches as conditional expressions. used
    collects the _runtime functions printed; dtype is the float type of _runtime's own functions."""

    def __init__(self, used=None, dtype=None):
        super().__init__()
        self.used, self.dtype = set() if used is None else used, dtype

    def _print(self, expr, **kwargs):
        if isinstance(expr, sp.Expr) and expr.is_number and expr.is_real and expr.is_finite:
            return f"T({int(expr)})" if expr.is_Integer else f"T({float(expr)!r})"
        return super()._print(expr, **kwargs)

    def _print_Function(self, expr):
        if type(expr) in FUNCTIONS:
            name = FUNCTIONS[type(expr)]
            if isinstance(expr, log1p) and in_unit_interval(expr.args[0]):
                name = "log1p"
            if "." not in name:
                self.used.add(name)
            return f"{name}({', '.join(self._print(arg) for arg in expr.args)})"  # every argument: hypot has two
        raise FusionError(f"no fused form for {expr.func}")

    _print_exp = _print_ExpToInf = _print_log = _print_log1p = _print_expm1 = _print_hypot = _print_tanh = _print_erf = _print_Erfc = _print_Function

    def _print_floor(self, expr):
        return f"np.floor({self._print(expr.args[0])})"

    def _print_PowerOfTwo(self, expr):
        """2^m, m integral: m + 1.5 2^(p-1) has m in its low bits, m + bias goes to the exponent field."""
        precision, emax = FORMATS[self.dtype]
        floating, integer = f"np.{self.dtype}", f"np.int{np.dtype(self.dtype).itemsize * 8}"
        magic = 1.5 * 2.0 ** (precision - 1)
        offset = int(np.array(magic, self.dtype).view(integer[3:])) - emax
        bits = f"{floating}({self._print(expr.args[0])} + T({magic!r})).view({integer}) - {offset}"
        return f"{integer}(({bits}) << {precision - 1}).view({floating})"

    def _print_TimesPowerOfTwo(self, expr):
        """p 2^m, m integral, the product normal: m (m + 1.5 2^(p-1)'s low bits) added to p's exponent field."""
        precision, _ = FORMATS[self.dtype]
        floating, integer = f"np.{self.dtype}", f"np.int{np.dtype(self.dtype).itemsize * 8}"
        magic = 1.5 * 2.0 ** (precision - 1)
        offset = int(np.array(magic, self.dtype).view(integer[3:]))
        p, m = (self._print(arg) for arg in expr.args)
        exponent = f"(({floating}({m} + T({magic!r})).view({integer}) - {offset}) << {precision - 1})"
        bits = f"{floating}({p}).view({integer}) + {exponent}"
        return f"{integer}({bits}).view({floating})"

    def _print_ZeroOrNaN(self, expr):
        value = self.parenthesize(expr.args[0], PRECEDENCE["Add"], strict=True)
        return f"({value} - {value})"

    def _print_Pow(self, expr, rational=False):
        # each form that prints as a product or a quotient is parenthesized: the printers around it
        # place it by the precedence of a power (y/x**2 must not read y/x*x)
        base = self.parenthesize(expr.base, PRECEDENCE["Pow"], strict=True)
        if expr.exp == -1:
            return f"(T(1)/{base})"
        if expr.exp == sp.S.Half:
            return f"math.sqrt({self._print(expr.base)})"
        if expr.exp == -sp.S.Half:
            return f"(T(1)/math.sqrt({self._print(expr.base)}))"
        if expr.exp.is_Integer and 0 < expr.exp <= 4:
            return "(" + "*".join([base] * int(expr.exp)) + ")"
        return f"{base}**{self.parenthesize(expr.exp, PRECEDENCE['Atom'], strict=True)}"

    def _print_Piecewise(self, expr):
        (value, condition), *rest = expr.args
        if not rest:
            return self._print(value)
        otherwise = self._print(type(expr)(*rest)) if len(rest) > 1 or rest[0][1] is not True else self._print(rest[0][0])
        return f"({self._print(value)} if {self._print(condition)} else {otherwise})"

    def _print_ITE(self, expr):
        # a condition that compares a Piecewise (Piecewise((3, x > 1/2), (x, True)) > alpha) is SymPy's ITE of
        # comparisons; its printer would rewrite it into a Piecewise of comparisons, which no Boolean accepts
        condition, then, otherwise = expr.args
        return f"({self._print(then)} if {self._print(condition)} else {self._print(otherwise)})"

    def _print_Or(self, expr):
        return "(" + " or ".join(self._print(a) for a in sorted(expr.args, key=sp.default_sort_key)) + ")"

    def _print_And(self, expr):
        return "(" + " and ".join(self._print(a) for a in sorted(expr.args, key=sp.default_sort_key)) + ")"

    def _print_Not(self, expr):
        return f"(not {self._print(expr.args[0])})"

    def _print_Heaviside(self, expr):
        u, at_zero = expr.args
        if at_zero == 1:  # derive.stability.steps_as_branches's complement: 1 - H(-u)
            return f"(T(1) - {self._print(sp.Heaviside(-u, 0))})"
        if at_zero != 0:
            raise FusionError(f"only Heaviside(u, 0) and (u, 1) print, got {expr}")
        return f"np.sign(np.maximum({self._print(u)}, T(0)))"

    def _print_sign(self, expr):
        return f"np.sign({self._print(expr.args[0])})"

    def _print_Abs(self, expr):
        return f"abs({self._print(expr.args[0])})"

    def _print_Clip(self, expr):
        # _runtime's own functions clamp with its maximum and minimum (llvm.maximum, llvm.minimum:
        # one instruction each against a point that is not NaN); the kernels keep NumPy's, which
        # also keep the sign of a zero as NumPy does
        maximum, minimum = ("maximum", "minimum") if self.dtype else ("np.maximum", "np.minimum")
        u, lo, hi = expr.args
        text = self._print(u)
        if lo != -sp.oo:
            text = f"{maximum}({text}, {self._print(lo)})"
        return text if hi == sp.oo else f"{minimum}({text}, {self._print(hi)})"

    def _print_AtLabel(self, expr):
        return f"{self._print(expr.args[0])}[n, c[n, 0]]"

    def _print_Squeeze(self, expr):
        return self._print(expr.args[0])

    def _print_FullLike(self, expr):
        return self._print(expr.args[1])


def in_unit_interval(expr):
    """Whether expr is in [0, 1] for every real value of its symbols (the kernels' inputs are real):
    exp of an argument that is never positive, as softplus's exp(-|u|)."""
    real = expr.xreplace({s: sp.Dummy(real=True) for s in expr.free_symbols})
    return isinstance(real, (sp.exp, ExpToInf)) and real.args[0].is_nonpositive is True


def scalar_code(expr, names, used=None):
    """expr as scalar numba code, its symbols printed as names says (x as x[n, k], say); used
    collects the _runtime functions it calls."""
    expr = expr.xreplace({at: sp.Symbol(f"{at.args[0]}[n, c[n, 0]]") for at in expr.atoms(AtLabel)})
    return FusedPrinter(used).doprint(expr.xreplace({s: sp.Symbol(names[s.name]) for s in expr.free_symbols
                                                     if s.name in names}))


def runtime_variant(assignments, dtype):
    """One dtype's function of _runtime: {dtype, body, result}, the steps as lines, the last one's name."""
    printer = FusedPrinter(dtype=dtype)
    return {"dtype": dtype, "body": [f"{lhs} = {printer.doprint(expr)}" for lhs, expr in assignments],
            "result": assignments[-1][0].name}


def runtime_functions():
    """_runtime's exp and log1p: per dtype, the lines of the steps derive/special.py gives."""
    return [{"name": name, "arg": arg, "doc": doc,
             "variants": [runtime_variant(steps(sp.Symbol(arg), dtype), dtype) for dtype in FORMATS]}
            for name, arg, doc, steps in RUNTIME]


def argmax_after_max(assignments):
    """The assignments with a max read at the argmax (lower.AtIndex) the row's max, a sum but the argmax summed by
    ties (sum_but_by_ties), and any other argmax found after the max, RowArgmax(x, RowMax(x)): in a loop the max
    is the reduction that vectorizes, and the argmax the first entry equal to it."""
    definitions = dict(assignments)
    def fused(expr):
        expr = expr.replace(lambda e: isinstance(e, AtIndex), lambda e: RowMax(e.args[0]))
        expr = expr.replace(lambda e: isinstance(e, RowSumBut), lambda e: sum_but_by_ties(e, definitions))
        return expr.replace(lambda e: isinstance(e, RowArgmax) and len(e.args) == 1,
                            lambda e: RowArgmax(e.args[0], RowMax(e.args[0])))
    fused_assignments = [(lhs, fused(expr)) for lhs, expr in assignments]
    read = set().union(*(expr.free_symbols for _, expr in fused_assignments))
    # an argmax that only a sum but it read is no longer read
    return [(lhs, expr) for lhs, expr in fused_assignments if lhs in read or not isinstance(expr, RowArgmax)]


def sum_but_by_ties(reduction, definitions):
    """RowSumBut(v, a), a the argmax of the row x and v = f(x) entry by entry (f reads no other full array), as
    sum_{x_k != M} v_k + (n - 1) f(M), n the count of entries equal to the max M: the entries at ties are
    f(M) alike, so it is the sum but the argmax's term, and its two reductions take one pass after the max's,
    where the argmax would take a pass of its own. A NaN
    x_k is unequal to M: its v_k is summed, NaN as the plain sum. Else the reduction unchanged."""
    value, at = reduction.args
    index = definitions.get(at, at)
    if not (isinstance(index, RowArgmax) and len(index.args) == 1):
        return reduction
    (x,) = index.args
    def whole(expr):  # v's definition through the temporaries it reads
        return expr.xreplace({s: whole(definitions[s]) for s in expr.free_symbols if s in definitions})
    entry = whole(value)
    if entry.free_symbols - {x}:  # another array, or an option: summed past the argmax
        return reduction
    top = RowMax(x)
    # f(M): x's entry the max, and the max read at the argmax (lower.AtIndex) the max too
    at_top = entry.replace(lambda e: isinstance(e, AtIndex), lambda e: x).xreplace({x: top})
    # both select on the one comparison x == M (printed alike), which LLVM computes once per SIMD vector
    others = RowSum(sp.Piecewise((0, sp.Eq(x, top)), (value, True)))
    ties = RowSum(sp.Piecewise((1, sp.Eq(x, top)), (0, True)))
    return others + (ties - 1) * at_top


def take_reductions(assignments):
    """The assignments with each row reduction an assignment of its own, a0, a1, ..., inner ones first."""
    taken, accumulators = [], {}   # a reduction read twice (a max, and the argmax after it) is taken once
    for lhs, expr in assignments:
        while expr.has(*REDUCTIONS):
            inner = [r for r in expr.atoms(*REDUCTIONS) if not any(a.has(*REDUCTIONS) for a in r.args)]
            for reduction in sorted(inner, key=sp.default_sort_key):
                if reduction not in accumulators:
                    accumulators[reduction] = sp.Symbol(f"a{len(accumulators)}")
                    taken.append((accumulators[reduction], reduction))
                expr = expr.xreplace({reduction: accumulators[reduction]})
        taken.append((lhs, expr))
    return taken


def fused_code(kernel, rows, loss, summed=False):
    """The kernel as fused loops: {name, doc, derivation, args, returns, body, call}. rows: per-row
    reductions (softmax, a row loss) rather than element-wise; loss: g is one weight per loss entry.
    summed: an element-wise loss's forward that returns L summed over each row of x's last axis
    instead of L, all that a mean or a sum reads: it never writes L (one pass of x's size less, and
    the reduction's pass reads N numbers).

    body is the jitted function's lines, call the plain function's (shape the arrays for the loops,
    call, shape the results back)."""
    kernel = kernel.fused or kernel   # a softmax layer's: the argmax found in the loops (kernels.at_the_argmax)
    exprs, assignments, returned, names = kernel_assignments(kernel)
    assignments = argmax_after_max(assignments)
    assignments = [(lhs, sigmoid_by_branches(expr)) for lhs, expr in assignments]
    if summed:
        assignments = [(lhs, RowSum(expr) if lhs.name == "L" else expr) for lhs, expr in assignments]
        rows, name = True, f"{kernel.name}_summed"
    else:
        name = kernel.name
    uses_label = kernel.at_label is not None or any(e.has(AtLabel) for e in exprs)
    args = arguments(exprs, ({"c"} if uses_label else set()) | set(kernel.takes), kernel.params)
    flags, weighted = [], kernel.weight is not None and "g" in args   # not a constant dx, which reads no g
    if weighted:
        # the kernel computes g from its total, and takes the flags choosing it (mean: 1/total, or a sum's 1)
        flags = sorted(s.name for s in kernel.weight.free_symbols if s.name not in dict(kernel.outputs))
        args = [a for a in args if a != "g"] + flags
    unfused = sorted(set(args) - FUSED_ARGS - set(kernel.params) - set(flags))
    if unfused:
        raise FusionError(f"it reads {', '.join(unfused)}")
    if any(e.has(*UNFUSED) for e in exprs):
        raise FusionError(f"it uses {', '.join(sorted({f.__name__ for e in exprs for f in UNFUSED if e.has(f)}))}")
    # a layer's g has x's shape: the one full array of a constant derivative's kernel (2x: dx = 2 g)
    full = [a for a in args if a in FULL_SIZE or a == "g" and not loss]
    kinds = dict.fromkeys(full, "full") | dict.fromkeys(COLUMNS, "row") | {"g": "row" if rows and loss else "full"}
    assignments = take_reductions(assignments)
    if not rows and any(isinstance(expr, REDUCTIONS) for _, expr in assignments):
        raise FusionError(f"{kernel.name}: an element-wise kernel with a row reduction")
    for lhs, expr in assignments:
        kinds[lhs.name] = kind_of(expr, kinds)
    assignments = entries_at_label(assignments, kinds)
    # every argument but the arrays is a number, cast to the input's dtype once
    names_of = {a: f"{a}[n, k]" if rows else f"{a}[i]" for a in full}
    names_of |= {a: f"T({a})" for a in args if a not in full + flags and a not in COLUMNS + ("g",)}
    names_of |= {a: f"{a}[n, 0]" for a in COLUMNS if a in args and a != "c"}
    if "g" in args:
        names_of["g"] = "g_n" if rows and loss else "g[n, k]" if rows else "g_i"
    # g computed once, before the loop, in the input's dtype (T(1)/total alone is a float64 in numba)
    weight = f"g = T({scalar_code(kernel.weight, names_of)})" if weighted else None
    if summed:
        names_of["N"] = "N*K"  # the element count, which the rows' loops split into N rows of K
    # a backward writes into out (which may be a saved array it reads) when that is safe: every
    # element is read and then written in the same iteration, which one pass with no reduction does; not where the
    # value at the label reads an array's entry there: numba takes out and the arrays for unaliased, and LLVM may
    # then read the entry after the loop has written over it
    into = names[0] if kernel.out and not any(isinstance(e, REDUCTIONS) for _, e in assignments) and not (
        kernel.label_value and kernel.at_label.has(AtLabel)) else None
    loops = (Rows if rows else Elements)(assignments, kinds, names, full[0], names_of, into, weight,
                                         kernel.label_value)
    body = loops.lines()
    columns = {out for out, expr in kernel.outputs if kinds[out] == "row" and not isinstance(expr, Squeeze)}
    columns -= {"L"} if summed else set()
    return {"name": name, "doc": kernel.doc + (" L summed over each row." if summed else ""),
            "derivation": kernel.derivation, "args": args + (["out"] if into else []),
            "signature": args + (["out=None"] if kernel.out else []),
            "returns": names, "body": body, "runtime": sorted(loops.used | ({"PARALLEL_FROM"} if kernel.near else set())),
            "call": with_redo(call_lines(name, args, full, names, kinds, rows, columns, into, summed), kernel, full),
            "near": [near_code(near) for near in kernel.near]}


def with_redo(lines, kernel, full):
    """The plain function's lines with the NumPy kernel's L again on the rows where it is not finite
    (codegen.kernels.redo_lines) before it returns, as the NumPy one does, and the loops of kernel.near over the
    flat output (near_code)."""
    output = kernel.outputs[0][0]
    near = [f"(_{n.kernel.name}_parallel if {output}.size >= PARALLEL_FROM else _{n.kernel.name})"
            f"({', '.join(f'{a}.reshape(-1)' for a in arguments_of(n.kernel))}, {output})" for n in kernel.near]
    return lines[:-1] + redo_lines(kernel, full, "numpy_kernels.", near=False) + near + lines[-1:]


def arguments_of(kernel):
    return arguments([expr for _, expr in kernel.outputs], params=kernel.params)


def near_code(near):
    """A codegen.kernels.Near as a loop of its own after the fused kernel's: where x is within the radius, the
    output again, in float64 (T is float64 there), from the Taylor polynomial derive.zeros gives; one read of x
    elsewhere. The NumPy kernels' take and put of those entries cost as much as the whole fused kernel."""
    args = arguments_of(near.kernel)
    (_, value), = near.kernel.outputs
    return {"name": near.kernel.name, "args": args, "doc": near.kernel.doc, "derivation": near.kernel.derivation,
            "low": repr(near.center - near.radius), "high": repr(near.center + near.radius),
            "value": scalar_code(value, {a: f"T({a}[i])" for a in args})}


def entries_at_label(assignments, kinds):
    """The assignments with the label's entry of an expression (AtLabel(v1 - v4): a saved array that
    a forward writing dx replaced by its definition) read as that expression of the entries at the
    label: each full temporary it reads gets a per-row copy (v1_c = AtLabel(x) - a0) assigned just
    before, the per-row values are read as they are. Symbols replace symbols, so nothing is rewritten
    (SymPy would fold exp(u - log(s)) into exp(u)/s, and -expm1 into 1 - exp). kinds gets the copies' kinds."""
    full = {lhs: expr for lhs, expr in assignments if kinds[lhs.name] == "full"}
    copies, taken = {}, []

    def at_label(expr):
        for symbol in sorted(expr.free_symbols & set(full), key=str):  # sorted: the same file every run
            if symbol in copies:  # copied by an earlier one's definition
                continue
            copy = sp.Symbol(f"{symbol.name}_c")
            taken.append((copy, at_label(full[symbol])))
            copies[symbol] = copy
            kinds[copy.name] = kind_of(taken[-1][1], kinds)
        arrays = {s: AtLabel(s) for s in expr.free_symbols if kinds.get(s.name) == "full" and s not in full}
        return expr.xreplace(arrays | {s: copies[s] for s in expr.free_symbols if s in full})

    for lhs, expr in assignments:
        expr = expr.replace(lambda e: isinstance(e, AtLabel) and (e.args[0] in full or not e.args[0].is_Symbol),
                            lambda e: at_label(e.args[0]))
        taken.append((lhs, expr))
    return taken


def kind_of(expr, kinds):
    """"scalar", "row" or "full": what one value of expr is, from the kinds of its symbols."""
    if isinstance(expr, sp.Symbol):
        return kinds.get(expr.name, "scalar")
    if isinstance(expr, REDUCTIONS + (AtLabel,)):
        return "row"
    found = {kind_of(arg, kinds) for arg in expr.args}
    return "full" if "full" in found else "row" if "row" in found else "scalar"


def call_lines(name, args, full, names, kinds, rows, columns, into, summed=False):
    """The plain function's lines: the arrays as rows of K (or flat), the call, the results in x's
    shape (a per-row saved value as a column, as the NumPy kernels give it). summed: rows of any
    element-wise shape, (N, 0) included."""
    first = full[0]
    width = f"{first}.shape[-1] or 1" if summed else f"{first}.shape[-1]"
    as_loops = (lambda a: f"{a}.reshape(-1, {width})") if rows else (lambda a: f"{a}.reshape(-1)")
    shaped = {a: as_loops(a) for a in full}
    if into:
        args = args + ["out"]
        shaped["out"] = as_loops(f"(np.empty_like({first}) if out is None else out)")
    if "g" in args:
        # a loss's g is a number under a mean or a sum (an int 1 would compile a kernel of its own)
        per_entry = "g" if rows else "g.reshape(-1)"
        shaped["g"] = as_loops("g") if kinds["g"] == "full" and rows else f"{per_entry} if np.ndim(g) else float(g)"
    back = [f"{out}.reshape({first}.shape)" if kinds[out] == "full" else f"{out}[:, None]" if out in columns else out
            for out in names]
    return [f"{', '.join(names)} = _{name}({', '.join(shaped.get(a, a) for a in args)})",
            f"return {', '.join(back)}"]


class Loops:
    """What both shapes share: the dtype, the scalars before the loop, the outputs' buffers."""

    def __init__(self, assignments, kinds, names, first, names_of, into=None, weight=None, label_value=False):
        self.assignments, self.kinds, self.names, self.first = assignments, kinds, names, first
        self.names_of, self.into, self.weight, self.used = dict(names_of), into, weight, set()
        self.label_value = label_value   # at_label written over the label's entry, not added to it

    def code(self, expr):
        return scalar_code(expr, self.names_of, self.used)

    def preamble(self, sizes):
        lines = [f"T = {self.first}.dtype.type"] + sizes
        lines += [f"{lhs} = {self.code(expr)}" for lhs, expr in self.assignments if self.kinds[lhs.name] == "scalar"]
        lines += [self.weight] if self.weight else []
        for name in self.names:
            if self.kinds[name] == "full":
                lines.append(f"{name} = out" if name == self.into else f"{name} = np.empty_like({self.first})")
            elif self.kinds[name] == "row":
                lines.append(f"{name} = np.empty(N, {self.first}.dtype)")
        return lines


class Elements(Loops):
    """One flat loop over every element; each assignment a local of the iteration."""

    def lines(self):
        lines = self.preamble([f"N = {self.first}.shape[0]"]) + ["for i in numba.prange(N):"]
        body = ["g_i = T(entry(g, i))"] if "g" in self.names_of else []
        for lhs, expr in self.assignments:
            if self.kinds[lhs.name] != "scalar":
                body.append(f"{lhs}[i] = {self.code(expr)}" if lhs.name in self.names else f"{lhs} = {self.code(expr)}")
        return lines + ["    " + line for line in body]


class Rows(Loops):
    """Per row: loops over k by reduction level, the per-row values between them."""

    def lines(self):
        lines = self.preamble([f"N, K = {self.first}.shape"]) + ["for n in numba.prange(N):"]
        return lines + ["    " + line for line in self.row()]

    def row(self):
        self.full = {lhs.name: expr for lhs, expr in self.assignments if self.kinds[lhs.name] == "full"}
        self.reductions = {lhs: expr for lhs, expr in self.assignments if isinstance(expr, REDUCTIONS)}
        rows = [(lhs, expr) for lhs, expr in self.assignments
                if self.kinds[lhs.name] == "row" and lhs not in self.reductions]
        self.level = {}
        for lhs, expr in self.assignments:
            if lhs in self.reductions:
                self.level[lhs] = self.level_of(expr) + 1
            elif self.kinds[lhs.name] == "row":
                self.level[lhs] = self.level_of(expr)
        outputs = [(lhs, expr) for lhs, expr in self.assignments if self.kinds[lhs.name] == "full" and lhs.name in self.names]
        self.written = {lhs: self.level_of(expr) + 1 for lhs, expr in outputs}
        self.kept = self.kept_temporaries(outputs)
        lines = ["g_n = T(entry(g, n))"] if self.names_of.get("g") == "g_n" else []
        for loop in range(max(list(self.level.values()) + list(self.written.values()) + [0]) + 1):
            if loop:
                lines += self.loop(loop, outputs)
            for lhs, expr in rows:
                if self.level[lhs] == loop:
                    lines.append(f"{lhs}[n] = {self.code(expr)}" if lhs.name in self.names else f"{lhs} = {self.code(expr)}")
        if any(lhs.name == "at_label" for lhs, _ in rows):
            dense = next(name for name in self.names if self.kinds[name] == "full")
            lines.append(f"{dense}[n, c[n, 0]] {'=' if self.label_value else '+='} at_label")
        return lines

    def row_values(self, expr):
        """The per-row symbols expr reads, through the full temporaries it reads."""
        found = set()
        for symbol in expr.free_symbols:
            if symbol.name in self.full:
                found |= self.row_values(self.full[symbol.name])
            elif symbol in self.level:
                found.add(symbol)
        return found

    def level_of(self, expr):
        return max((self.level[s] for s in self.row_values(expr)), default=0)

    def reads(self, expr, loop, found):
        """found[temporary] gets loop for every full temporary that expr reads."""
        for symbol in expr.free_symbols:
            if symbol.name in self.full:
                found.setdefault(symbol.name, set()).add(loop)
                self.reads(self.full[symbol.name], loop, found)
        return found

    def kept_temporaries(self, outputs):
        """{temporary: output}: a temporary with a function call that several loops read, kept in the
        row of an output written in the last of them."""
        loops = {}
        for accumulator, reduction in self.reductions.items():
            self.reads(reduction, self.level[accumulator], loops)
        for lhs, expr in outputs:
            self.reads(expr, self.written[lhs], loops)
        kept = {}
        for temporary, used in loops.items():
            readers = [lhs.name for lhs, expr in outputs if self.written[lhs] == max(used)
                       and sp.Symbol(temporary) in expr.free_symbols]
            if len(used) > 1 and self.full[temporary].has(*FUNCTIONS) and readers:
                kept[temporary] = (readers[0], min(used), max(used))
        return kept

    def loop(self, loop, outputs):
        """One pass over the row: the reductions of this level, the outputs written here."""
        here = [(a, r) for a, r in self.reductions.items() if self.level[a] == loop]
        lines = [f"{a} = {REDUCE[type(r)][0]}" for a, r in here] + ["for k in range(K):"]
        body, defined = [], set()

        def define(expr):
            for symbol in sorted(expr.free_symbols, key=str):
                if symbol.name not in self.full or symbol.name in defined:
                    continue
                defined.add(symbol.name)
                output, first, last = self.kept.get(symbol.name, (None, loop, loop))
                if loop > first:
                    body.append(f"{symbol} = {output}[n, k]")
                    continue
                define(self.full[symbol.name])
                body.append(f"{symbol} = {self.code(self.full[symbol.name])}")
                if loop < last:
                    body.append(f"{output}[n, k] = {symbol}")

        # every value first, its stores in the row among them, then the updates: with sum_but_by_ties's one
        # comparison, 5% less CPU time for softmax-CE at 8192x1000 float32 (docs/performance.md)
        for accumulator, reduction in here:
            define(reduction)
        for accumulator, reduction in here:
            value, *other = (self.code(a) for a in reduction.args)
            update = REDUCE[type(reduction)][1].format(acc=accumulator, value=value, other=other[0] if other else None)
            self.used |= {"maximum"} if isinstance(reduction, RowMax) else set()
            body.append(f"{accumulator} = {update}")
        for lhs, expr in outputs:
            if self.written[lhs] == loop:
                define(expr)
                body.append(f"{lhs}[n, k] = {self.code(expr)}")
        return lines + ["    " + line for line in body]
