"""From a catalog entry to the kernels of its generated module: which derivation each output
comes from, lowered to arrays, with common subexpressions shared and printed as NumPy."""
from dataclasses import dataclass, replace

import sympy as sp

from codegen.lower import AtLabel, BatchSum, LabelEntry, RowSumBut, Squeeze, lower, shaped_like, split_at_label
from codegen.inplace import assignments_in_place
from codegen.printer import print_code
from derive import optim
from derive.gradients import layer_backward, loss_forward, loss_gradient, mean_weight, variants
from derive.reduction import REDUCTIONS, row_weight
from derive.special import ExpToInf, erf_numpy, erfc_numpy, erfc_steps
from derive.softmax import above_half, sums_split_at, vjp_above_half, vjp_at_argmax
from derive.stability import ClassArgmax, shift_in_halves, stable
from derive.algebra import contract
from derive.symbols import K, L, N, c, i, j, n, over_batch, r, total
from derive.zeros import of_quantity

# Kernel arguments in the order a reader expects them; names are those of derive.symbols.
ARG_ORDER = ("x", "c", "at", "t", "mask", "w", "pw", "y", "p", "lp", "e", "den", "rest", "W", "b", "g", "eps", "l2",
             "K_in", "param", "grad", "velocity", "lr", "momentum")
# How a loss kernel reads the sizes its formulas use from a full-size argument {a}: N loss entries
# (rows or elements) and K classes.
SIZES = {"row": {"N": "{a}.shape[0]", "K": "{a}.shape[-1]"}, "element": {"N": "{a}.size", "K": "{a}.shape[-1]"}}
FULL_SIZE = ("x", "p", "lp", "t", "y", "e")
# an optimizer's arrays: a parameter, its gradient and its velocity, all of one shape
STATE = ("param", "grad", "velocity")
# the array whose shape and dtype an output takes where it reads no full-size array (a constant
# derivative's dx = 2 g still reads x, which forward saves: the class checks g against it)
X = sp.Symbol("x")
# A saved quotient (softmax) is kept as its numerator e_i and its denominator, or where that is a shifted sum
# 1 + T (derive.stability) as T, the rest.
NUMERATOR, DENOMINATOR, REST = "e", "den", "rest"
# the reductions a forward writing dx serves, and the flag it takes: True under a mean (g = 1/total), False
# under a sum (g = 1)
WITH_DX, MEAN = ("mean", "sum"), sp.Symbol("mean")
# the name of a kernel's value at each row's label (Kernel.at_label)
AT_LABEL = sp.Symbol("at_label")
# the class index of the fused loops over a row (codegen.fused.Rows)
LOOP_INDEX = sp.Symbol("k", integer=True)


@dataclass(frozen=True)
class Kernel:
    """A function of the generated module: outputs computed from its arguments."""

    name: str
    doc: str
    derivation: str                # the index-notation result it prints, for the reader
    outputs: tuple                 # ((name, array expression), ...) in return order
    at_label: sp.Expr = None       # added to outputs[0] at each row's label, if any
    label_value: bool = False      # at_label is outputs[0]'s whole value at the label, written over it
    sizes: dict = None             # {size symbol: how to read it from the arguments}
    params: tuple = ()             # names of the op's own parameters, passed after the arrays
    full: tuple = FULL_SIZE        # the arguments of the input's full shape
    out: bool = False              # takes out=, a buffer for its result (a backward's dx)
    summed: "Kernel" = None        # the same with L summed over every entry (an element-wise loss's forward)
    recompute: bool = False        # negations of arguments recomputed where read, not held in a buffer
    weight: sp.Expr = None         # g, each loss entry's weight, from the total the kernel computes and the flags
                                   # its free symbols name but total (MEAN), not an argument
    takes: tuple = ()              # arguments taken even where no output reads them (a loss backward's g: its
                                   # class passes g, and a zero derivative reads none)
    arrays: tuple = ()             # arguments made arrays first: erf is called on an option alone too, and
                                   # its kernel computes in place, which a NumPy scalar (or a 0-d array) cannot
    updates: tuple = ()            # ((output, argument), ...): the output is the argument's new value, written
                                   # into it (an optimizer's state, updated in place as torch.optim's)
    steps: tuple = ()              # ((symbol, expr), ...) computing the one output, in the order derived and
                                   # printed as given, no cse (derive.special.erfc_steps: three arrays at once)
    fused: "Kernel" = None         # the kernel the fused backend prints instead, if another (a softmax layer's
                                   # loops find the argmax themselves, and keep no columns)
    redo: "Kernel" = None          # L again on the rows where it is not finite, from a form that overflows only
                                   # where the value does (a dense target's shift in halves), at a cost paid there
    near: tuple = ()               # (Near, ...): the output again where x is near a zero at which its form's terms
                                   # cancel, by the Taylor polynomial there (derive.zeros), at a cost paid there
    wide: tuple = ()               # arguments taken in float64 (a Near's kernel: float32's x - centre is not exact)


@dataclass(frozen=True)
class Near:
    """Where |x - center| < radius, kernel gives the output in place of the usual form's (derive.zeros.NearZero)."""

    center: float
    radius: float
    kernel: Kernel


def layer_kernels(op):
    """forward(x) -> y (and the columns backward's value at the argmax reads) and backward(saved, g) -> dx of a
    layer."""
    backward = layer_backward(op)
    y = shaped_like(lower(stable(op.forward), i), X, FULL_SIZE)
    columns, dense, at_argmax, fused_dx = at_the_argmax(op, backward, y)
    forward = Kernel("forward", f"y = {op.summary}.", f"y_i = {sp.sstr(op.forward)}", (("y", y),),
                     params=param_names(op))
    backward = Kernel("backward", "dx = g times the Jacobian of y (a vector-Jacobian product), in out if that is "
                      "given.", f"dx_j = {sp.sstr(backward)}", (("dx", shaped_like(dense, X, FULL_SIZE + ("g",))),),
                      at_argmax, at_argmax is not None, params=param_names(op),
                      full=FULL_SIZE + ("g",), out=True, takes=("x",))  # x: its class checks g against it
    forward, backward = (replace(forward, near=near_kernels(op, op.forward, "y", forward.name)),
                         replace(backward, near=near_kernels(op, layer_backward(op), "dx", backward.name)))
    if not columns:
        return forward, backward
    # the fused loops find the argmax in a pass of their own, and keep no columns
    return (replace(forward, outputs=forward.outputs + columns, fused=forward),
            replace(backward, fused=replace(backward, outputs=(("dx", fused_dx),), at_label=None, label_value=False)))


def near_kernels(op, quantity, output, name):
    """(Near, ...) of an element-wise layer's forward or vjp quantity with no option: where it is 0 as a sum whose
    terms are not (GELU's derivative at -0.75), its Taylor polynomial there, computed in float64 (derive.zeros);
    () for any other op."""
    if op.params:
        return ()
    per_unit = sp.Symbol("g") if any(e.base.name == "g" for e in quantity.atoms(sp.Indexed)) else sp.S.One
    return tuple(Near(near.center, near.radius, Kernel(
        f"{name}_near_zero{'' if k == 0 else k}", f"{output} where |x - {near.center!r}| < {near.radius!r}, in "
        f"float64: the Taylor polynomial about that zero, where the usual form's terms cancel (derive.zeros).",
        f"{output} = the first {near.terms} terms of the Taylor series about {near.center!r}",
        ((output, per_unit * near.at(X)),), wide=("x", "g")))
        for k, near in enumerate(of_quantity(quantity, stable(quantity))))


def at_the_argmax(op, vjp, y):
    """(columns forward returns for backward, dx lowered, dx's whole value at each row's argmax lowered, or None,
    and the fused loops' dx: that value at an entry above 1/2, read from y alone).

    A layer saving a shifted softmax e/(1 + T) (derive.stability) loses its vjp y_a (g_a - sum_i g_i y_i) at the
    row's argmax a, where y_a is near 1, to cancellation: there it is written whole (derive.softmax.vjp_at_argmax),
    from forward's argmax positions (at, which the loss kernels' value at a label reads too) and T, and the
    others' sum it reads is shared with dx's row sum, written as that plus the term at the argmax."""
    _, denominator = sp.fraction(stable(op.saved[0][1])) if op.saved else (None, sp.S.One)
    if not (denominator.is_Add and 1 in denominator.args and denominator.has(ClassArgmax)):
        return (), lower(stable(vjp), j), None, None
    (argmax,), (rest_sum,) = denominator.atoms(ClassArgmax), y.atoms(RowSumBut)
    at, rest = sp.Symbol("at"), sp.Symbol(REST, nonnegative=True)
    positions = {lower(argmax, j): at}
    dense = lower(sums_split_at(stable(vjp), c, argmax), j).xreplace(positions)
    value = lower(vjp_at_argmax(stable(vjp), op.saved[0][0], rest / (1 + rest), c, argmax), j).xreplace(positions)
    # the fused loops need no argmax: an entry above 1/2 is the row's argmax, the others' sums skip it by a select in
    # the pass that sums g y (derive.softmax.vjp_above_half), and an argmax at most 1/2 does not cancel: two passes
    saved = op.saved[0][0]
    fused = sp.Piecewise((lower(vjp_above_half(stable(vjp), saved), j), lower(above_half(saved, j), j)),
                         (lower(stable(vjp), j), True))
    return ((at.name, lower(argmax, j)), (rest.name, rest_sum)), dense, value, fused


def param_names(op):
    """The op's scalar parameters that kernels take by their own name."""
    return tuple(p.symbol.name for p in op.params if p.symbol.name not in ARG_ORDER)


def loss_kernels(op, target, variant):
    """forward_<target>_<variant>(x, target, options) -> (L, saved..., total) and its backward."""
    values = variants(op, target)[variant]
    index = j if op.granularity == "row" else i
    loss = loss_forward(op, target, values)
    per_entry = shaped_like(lower(stable(loss), index), X, FULL_SIZE) if op.granularity == "element" else lower(
        stable(loss), index)
    saved, in_saved, note = saved_arrays(op)
    # a row's weight depends on its row (its label, its mask) but for a number: sum only that over N
    omega = mean_weight(op, target, values)
    weights = contract(over_batch(omega)) if omega.is_number else lower(over_batch(omega), n)
    suffix = f"{target}_{variant}"
    doc = f"Losses L, what backward needs, and the mean's total ({target}, {variant})."
    outputs = lambda L: (("L", L),) + saved + (("total", weights),)  # noqa: E731
    summed = (None if op.granularity == "row" else
              Kernel(f"forward_{suffix}", doc, f"L = {sp.sstr(loss)}", outputs(term_totals(per_entry, param_names(op))),
                     sizes=SIZES[op.granularity], params=param_names(op), recompute=True))
    forward = Kernel(f"forward_{suffix}", doc, f"L = {sp.sstr(loss)}",
                     outputs(Squeeze(per_entry) if op.granularity == "row" else per_entry),
                     sizes=SIZES[op.granularity], params=param_names(op), summed=summed,
                     redo=in_halves(loss, index, suffix, param_names(op)) if op.granularity == "row" and target == "dense"
                     else None)   # labels: x - max overflows only at the label's own term, where L does
    gradient = loss_gradient(op, target, values)
    stable_gradient = in_saved(stable(gradient))
    dense, at_label = (split_at_label(stable_gradient, j) if target == "labels"
                       else (sp.factor_terms(stable_gradient), None))  # g (p - t): one product, not two
    # from a saved softmax (p or log p), the whole derivative at the label, its terms over one denominator and
    # then made stable, not dense's entry plus the delta's term: g p_c - g rounds p_c first, and loses p_c - 1
    # where p_c is within an ulp of 1 (the focal loss's p (1 - p) likewise, as p - p^2)
    whole = target == "labels" and bool(op.saved)
    at_label = stable(in_saved(sp.factor_terms(sp.cancel(gradient.xreplace({j: c}))))) if whole else at_label
    backward = Kernel(f"backward_{suffix}", f"dL/dx times each entry's weight g ({target}, {variant}); out, if given, "
                      "is a buffer for it, which may be a saved array this call then overwrites.",
                      f"dx_j = {sp.sstr(gradient)}{note}", (("dx", shaped_like(lower(dense, j), X, FULL_SIZE)),),
                      None if at_label is None else lower(at_label, j), whole, sizes=SIZES[op.granularity],
                      params=param_names(op), out=True, takes=("g",))
    return forward, backward


def in_halves(loss, index, suffix, params):
    """The kernel of a row loss's L alone, its max shift in halves (derive.stability.shift_in_halves), which its
    forward runs on the rows whose L is not finite; None where the loss has no such shift."""
    halves = shift_in_halves(stable(loss))
    if halves == stable(loss):
        return None
    return Kernel(f"forward_{suffix}_in_halves", f"L on rows where forward_{suffix}'s x - max overflows: in halves, "
                  "finite where L is.", f"L = {sp.sstr(loss)}", (("L", Squeeze(lower(halves, index))),),
                  sizes=SIZES["row"], params=params)


def near_lines(kernel, module=""):
    """The lines that write the output again, from kernel.near's kernels, where x is within a radius of a zero at
    which the usual form's terms cancel, after it is computed: one comparison of x on the usual path. Flat
    positions, taken and put (a boolean mask's gather and scatter took 5 times as long, at 13% of 2M entries);
    a fused kernel's output is flat, and put numbers it as x, in C order."""
    output = kernel.outputs[0][0]
    lines = []
    for near in kernel.near:
        called = ", ".join(f"{a}.take(near)" for a in kernel_code(near.kernel)["args"])
        lines += [f"near = np.greater(x, {near.center - near.radius!r})",
                  f"near &= np.less(x, {near.center + near.radius!r})",   # two passes making no float array
                  "near = np.flatnonzero(near)",
                  "if near.size:  # terms cancelling near their zero: its Taylor polynomial (derive.zeros)",
                  f"    {output}.put(near, {module}{near.kernel.name}({called}))"]
    return lines


def redo_lines(kernel, args, module="", near=True):
    """The lines that compute L again with kernel.redo on the rows where it is not finite (inf or NaN: an x - max
    that overflowed, and also a NaN or inf in x, which the redo gives again), after L is computed: one check of N
    numbers on the usual path. args: the arrays a row of which it reads, module: where the redo kernel is.
    Then near_lines, if near (the fused kernels have a loop of their own for them)."""
    after = near_lines(kernel, module) if near else []
    if kernel.redo is None:
        return after
    called = [f"{a}[redo]" if a in args else a for a in kernel_code(kernel.redo)["args"]]
    return ["redo = ~np.isfinite(L)",
            "if redo.any():  # an x - max overflowed: again in halves (derive.stability.shift_in_halves)",
            f"    L[redo] = {module}{kernel.redo.name}({', '.join(called)})"] + after


def with_gradient(forward, backward):
    """forward, also writing backward's dx under a mean or a sum in place of the arrays it saves for backward.

    The weight g (a mean's 1/total, a sum's 1) is known as soon as forward knows its total, so the pass
    that reads x for the loss can write dx as well, and backward has nothing left to read: what JAX's
    jit(value_and_grad) makes of a loss by fusing. render.py asks for it for the fused kernels; a row
    loss's dx keeps backward's update at each row's label (at_label). The kernel takes the flag MEAN
    and picks g from it: one compiled kernel serves both reductions (a kernel each would compile twice)."""
    outputs = dict(forward.outputs)
    saved = {name: expr for name, expr in forward.outputs if name not in ("L", "total")}
    (_, dx), = backward.outputs

    def in_forward(expr):  # matched by name: backward's den is a positive symbol, forward's output a name
        return expr.xreplace({s: saved[s.name] for s in expr.free_symbols if s.name in saved})
    under_mean, under_sum = (row_weight(REDUCTIONS[name]) for name in WITH_DX)
    weight = sp.Piecewise((under_mean, MEAN), (under_sum, True))
    return Kernel(f"{forward.name}_with_dx", f"The losses' total per row, dx (under a mean if mean, else under a "
                  f"sum) and the mean's total ({forward.name.split('_', 1)[1].replace('_', ', ')}).",
                  f"{forward.derivation}; {backward.derivation}",
                  (("L", outputs["L"]), ("dx", in_forward(dx)), ("total", outputs["total"])),
                  None if backward.at_label is None else in_forward(backward.at_label), backward.label_value,
                  sizes=forward.sizes, params=forward.params, weight=weight, redo=forward.redo)


def term_totals(per_entry, params):
    """The total of the losses per_entry, term by term: sum(a + b) = sum(a) + sum(b), numbers and
    options taken out of each. All a mean or a sum needs, and no array of losses: each term's total
    reads a buffer the next term can reuse. The error is that of adding the terms entry by entry,
    a rounding of the largest term's size (the stable forms keep each term finite). A term that
    reads no array is the same for every entry: N times it."""
    scalars = set(params) | {N.name, K.name}
    def total(term):  # noqa: E306
        coefficient, rest = term.as_coeff_Mul()
        options = [f for f in sp.Mul.make_args(rest) if {s.name for s in f.free_symbols} <= scalars]
        arrays = [f for f in sp.Mul.make_args(rest) if f not in options]
        return coefficient * sp.Mul(*options) * (BatchSum(sp.Mul(*arrays)) if arrays else N)
    return sp.Add(*[total(term) for term in sp.Add.make_args(per_entry)])


def saved_arrays(op):
    """((name, array expression), ...) that a loss's forward saves for its backward, and the rewrite
    of a gradient in saved quantities into one in those arrays.

    A saved quotient num_i / den whose denominator is the same for every i (softmax) is saved as
    its numerator's array and its denominator (T of a denominator 1 + T, which the log reads too), a column
    forward makes anyway: forward then skips the pass that divides, and backward multiplies the numerator by one column, g / den, in the pass it
    makes anyway. That is the tuned NumPy's softmax-CE, printed from the derivation; saving 1/den
    instead would cost a call on the column each step, which at a small batch is as dear as a pass."""
    arrays, rewrites = [], {}
    for base, definition in op.saved:
        numerator, denominator = sp.fraction(stable(definition))
        if not (denominator.has(sp.Sum) and not denominator.has(i) and numerator.has(i)):
            arrays.append((base.name, lower(stable(definition), i)))
            continue
        part = sp.IndexedBase(NUMERATOR, real=True)
        if denominator.is_Add and 1 in denominator.args:   # 1 + T: T saved, the sum log1p(T) reads too
            saved, whole = sp.Symbol(REST, nonnegative=True), denominator - 1
            scale = 1 + saved
        else:
            saved, whole = sp.Symbol(DENOMINATOR, positive=True), denominator
            scale = saved
        arrays += [(part.name, lower(numerator, i)), (saved.name, lower(whole, i))]
        rewrites[base] = lambda at, part=part, scale=scale: part[at] / scale
    def in_saved(expr):  # noqa: E306
        return expr.replace(lambda e: isinstance(e, sp.Indexed) and e.base in rewrites,
                            lambda e: rewrites[e.base](*e.indices))
    note = "".join(f"; {sp.sstr(base[j])} = {sp.sstr(rewrite(j))}" for base, rewrite in rewrites.items())
    return tuple(arrays), in_saved, note


def reductions(granularity):
    """[{name, value, total, weight}]: the reduced loss from the losses L, from L the losses' total
    (what a summed forward returns; None for a reduction that reads each loss), and each entry's
    weight g, printed."""
    summed = sp.Symbol("L")
    return [{"name": name, "value": print_code(lower(reduced, n)),
             "total": print_code(reduced.xreplace({over_batch(L[n]): summed})) if reduced.has(sp.Sum) else None,
             "weight": print_code(lower(row_weight(reduced), r, column=granularity == "row"))}
            for name, reduced in REDUCTIONS.items()]


def sgd_kernel():
    """One SGD step with momentum: the new velocity and parameter."""
    velocity, update = optim.sgd_velocity(), optim.sgd_update()
    return Kernel("sgd_step", "One step of SGD with momentum (torch.optim.SGD), velocity and param updated in "
                  "place.",
                  f"v' = {sp.sstr(velocity)}; param' = {sp.sstr(update)}",
                  (("velocity_next", velocity), ("param_next", update.subs(sp.Symbol("velocity_next"), velocity))),
                  full=STATE, updates=(("velocity_next", "velocity"), ("param_next", "param")))


def adam_kernel(decoupled):
    """One Adam (AdamW if decoupled) step: the new moments and parameter. Its options are cast to the
    parameter's dtype where a NumPy function reads them alone (sqrt(1 - beta2^t))."""
    (m, v), update = optim.adam_moments(decoupled), optim.adam_update(decoupled)
    name = "adamw" if decoupled else "adam"
    return Kernel(f"{name}_step", f"One step of {'AdamW' if decoupled else 'Adam'} (torch.optim.{'AdamW' if decoupled else 'Adam'}), "
                  "the moments and param updated in place.",
                  f"m' = {sp.sstr(m)}; v' = {sp.sstr(v)}; param' = {sp.sstr(update)}",
                  (("exp_avg_next", m), ("exp_avg_sq_next", v),
                   ("param_next", update.subs({optim.EXP_AVG_NEXT: m, optim.EXP_AVG_SQ_NEXT: v}))),
                  params=("exp_avg", "exp_avg_sq", "beta1", "beta2", "epsilon", "weight_decay", "step"),
                  full=STATE + ("exp_avg", "exp_avg_sq"),
                  updates=(("exp_avg_next", "exp_avg"), ("exp_avg_sq_next", "exp_avg_sq"), ("param_next", "param")))


def erf_kernel():
    """erf(x) with NumPy alone, the generated package's _special.erf: derive.special's series and
    continued fraction, each branch's argument clamped to its range."""
    return Kernel("erf", "erf(x), element-wise: to a few ulp in float64, as math.erf.", "erf(x)",
                  (("y", erf_numpy(X)),), arrays=("x",))


def erfc_kernel(dtype):
    """erfc(x) with NumPy alone for a dtype array, called by the generated package's _special.erfc: exp(-x^2) times
    derive.special's polynomial, relatively accurate however small erfc is, in the steps derived there."""
    return Kernel(f"erfc_{dtype}", f"erfc(x), element-wise: to a few ulp in {dtype}, as math.erfc.", "erfc(x)",
                  (("y", erfc_numpy(X, dtype)),), arrays=("x",), steps=tuple(erfc_steps(X, dtype)))


def kernel_assignments(kernel):
    """(exprs, assignments, returned, names): the kernel's expressions, then cse's [(symbol, expr)]
    computing its outputs, what is read after them (the outputs, the label update) and the output names.
    Kept on the kernel: both backends print from one cse."""
    if "_assignments" not in vars(kernel):
        object.__setattr__(kernel, "_assignments", _assignments(kernel))
    return vars(kernel)["_assignments"]


def _assignments(kernel):
    exprs = [expr for _, expr in kernel.outputs] + ([kernel.at_label] if kernel.at_label is not None else [])
    names = [name for name, _ in kernel.outputs]
    if kernel.steps:  # the output's name is the last step's
        return exprs, list(kernel.steps), [sp.Symbol(name) for name in names], names
    temporaries, reduced = shared(exprs)
    # the value at the label first: it may read a saved array that the output is then written into
    label = [(AT_LABEL, reduced[len(names)])] if kernel.at_label is not None else []
    assignments = temporaries + label + [(sp.Symbol(name), expr) for name, expr in zip(names, reduced)]
    return exprs, assignments, [sp.Symbol(name) for name in names] + [lhs for lhs, _ in label], names


def shared(exprs):
    """sympy.cse of exprs, which leaves each real constant that is not rational (exp(-pi), sqrt(2/pi))
    whole: named apart (v0 = -pi), np.exp(v0) is a float64 scalar, which makes float32 arrays float64;
    whole, it prints as a Python float, which keeps their dtype."""
    constants = {}
    def named(e):
        return constants.setdefault(e, sp.Dummy(f"c{len(constants)}"))
    def constant(e):
        return isinstance(e, sp.Expr) and e.is_number and not e.is_Rational and not e.is_Float and e.is_real
    hidden = [expr.replace(constant, named) for expr in exprs]
    temporaries, reduced = sp.cse(hidden, symbols=sp.numbered_symbols("v"), order="canonical")
    back = {dummy: e for e, dummy in constants.items()}
    return [(name, e.xreplace(back)) for name, e in temporaries], [e.xreplace(back) for e in reduced]


def kernel_code(kernel):
    """The printable form of a kernel: arguments, assignment lines, scatter and returns."""
    exprs, assignments, returned, names = kernel_assignments(kernel)
    lines = assignments_in_place(assignments, returned, kernel.full, "out" if kernel.out else None, kernel.recompute,
                                 kernel.updates)
    takes_out = any(code.endswith("out=out)") for _, code in lines)
    used = {s.name for e in exprs for s in e.free_symbols}
    args = arguments(exprs, label_arguments(kernel, exprs) | set(kernel.takes), kernel.params)
    args += ["out=None"] if takes_out else []
    full = next((a for a in (*kernel.full, *FULL_SIZE) if a in args), None)
    summed = kernel_code(kernel.summed)["lines"] if kernel.summed else None
    if summed:
        args.append("summed=False")
    return {"name": kernel.name, "doc": kernel.doc + (" summed=True: L summed over every entry instead, all that a "
                                                      "mean or a sum needs." if summed else ""),
            "derivation": kernel.derivation, "args": args, "lines": lines, "summed_lines": summed,
            "sizes": [(name, how.format(a=full)) for name, how in (kernel.sizes or {}).items() if name in used],
            "casts": [(name, f"np.atleast_1d({name})") for name in kernel.arrays]
                     + [(name, f"{name}.astype(np.float64)") for name in kernel.wide if name in args]
                     + [(name, f"{full}.dtype.type({name})") for name in kernel.params
                        if full and read_by_function(exprs, name, kernel.params)],
            "at_label": None if kernel.at_label is None else print_code(returned[-1]),
            "label_value": kernel.label_value,
            "returns": names, "overflows": any(e.has(ExpToInf) for e in exprs),
            "redo": kernel_code(kernel.redo) if kernel.redo else None,
            "near": [kernel_code(near.kernel) for near in kernel.near],
            "redo_lines": redo_lines(kernel, FULL_SIZE)}


def read_by_function(exprs, name, params):
    """Whether a NumPy function of numbers alone reads the option name in exprs: np.abs(beta) of a Python float
    is a float64 scalar, which makes a float32 array float64, so the kernel first takes the option in x's
    dtype (a Python float in arithmetic with an array, or a function of an array, keeps the array's dtype).
    A max or min against a number prints as the method clip, which a Python float lacks and a NumPy scalar has."""
    numbers = set(params) | {N.name, K.name, total.name}
    return any(name in found and found <= numbers for e in exprs for node in sp.preorder_traversal(e)
               if isinstance(node, (sp.Function, sp.Max, sp.Min)) or isinstance(node, sp.Pow) and not node.exp.is_Integer
               for found in [{s.name for s in node.free_symbols}])


def label_arguments(kernel, exprs):
    """How the NumPy kernel reads the labels: at, each row's flat position of its label, to gather
    and update entries at the label; c, the labels, to index a per-class vector."""
    return ({"at"} if kernel.at_label is not None or any(e.has(AtLabel) for e in exprs) else set()) | (
        {"c"} if any(e.has(LabelEntry) for e in exprs) else set())


def arguments(exprs, labels=(), params=()):
    """The free arrays of exprs in ARG_ORDER, the label arguments labels, then params."""
    free = {s.name for e in exprs for s in e.free_symbols} | set(labels)
    free -= {"N", "K", total.name, LOOP_INDEX.name}   # sizes, and the fused loops' index
    unknown = free - set(ARG_ORDER) - set(params)
    if unknown:
        raise ValueError(f"kernel uses names outside the naming contract: {sorted(unknown)}")
    return [name for name in ARG_ORDER + tuple(params) if name in free]
