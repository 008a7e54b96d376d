"""Derivations as data: numbered steps (lhs = rhs, by a rule), built from a catalog entry or from any
element-wise expression, so a new entry gets its derivation with no new code. Pure: every right
side is a SymPy result; codegen.latex prints them, derive.derivation_check checks them.

A step whose lhs and condition repeat those of the step before continues its chain of equalities;
any other step is a claim about what its lhs means, which the definitions of its Derivation say."""
import functools
from dataclasses import dataclass

import sympy as sp

from derive.algebra import contract, tidy
from derive.gradients import layer_backward, loss_forward, loss_gradient, saved_form, variants
from derive.reduction import REDUCTIONS, row_weight
from derive.softmax import vjp_at_argmax
from derive.stability import REWRITES, ClassArgmax, stable
from derive.symbols import L, N, c, dy, g, i, j, k, n, over_classes, r, t, total, x, y
from derive.tensor import TensorOp
from derive.zeros import of_quantity

LOSS = sp.Symbol("L")
MEAN = sp.Symbol("Lbar")           # printed as L with a bar
LABEL_LOSS = sp.Symbol("L_c")      # the loss of a row given its integer label c
OUTPUT = sp.Symbol("y")            # the output of an element-wise expression
dx = sp.IndexedBase("dx")


@dataclass(frozen=True)
class Step:
    """One equation of a derivation and the rule that produced it."""

    lhs: sp.Expr
    rhs: sp.Expr
    rule: str
    condition: sp.Basic = None     # Eq or Ne of two indices, when the step holds only there
    assumes: tuple = ()            # equations in force from this step on: t_k = delta_kc, sum_k t_k = 1


@dataclass(frozen=True)
class Derivation:
    """Numbered steps and what each name on a left side means."""

    title: str
    steps: tuple
    definitions: tuple = ()        # ((pattern, value), ...): (p[i], softmax(i)), (sigma(z), ...), (L, ...)
    ranges: tuple = ()             # ((free index, size), ...) beyond the class and batch indices
    op: object = None              # the index-notation op derived (derive.tensor.TensorOp): its checker checks it

    def _repr_latex_(self):
        """Jupyter's view of a derivation: its steps typeset, the align* block symgrad derive prints. The
        printer is codegen's (imported here, when a notebook asks: derive itself prints nothing)."""
        from codegen.latex import format_latex
        return format_latex(self)


def fresh_bounds(expr, clashing=None):
    """expr with each summation index (those in clashing, if given) renamed to a new Dummy.

    SymPy's diff of sum_k f(k) by p[k] confuses the bound k with the variable's k."""
    def renamed(total):
        function, limits = total.function, []
        for index, lower, upper in total.limits:
            if clashing is None or index in clashing:
                fresh = sp.Dummy(index.name, integer=True)
                function, index = function.xreplace({index: fresh}), fresh
            limits.append((index, lower, upper))
        return sp.Sum(function, *limits)
    return expr.replace(lambda e: isinstance(e, sp.Sum), renamed)


def contract_sums(expr):
    """contract, also where SymPy has merged a sum of a sum into one Sum over several indices (which
    contract refuses): those are contracted one index at a time, innermost first, while each goes."""
    def one_at_a_time(total):
        function, limits = total.function, list(total.limits)
        while limits:
            summed = contract(sp.Sum(function, limits[0]))
            if summed.has(limits[0][0]):
                break
            function, limits = summed, limits[1:]
        return sp.Sum(function, *limits) if limits else function
    expr = expr.replace(lambda e: isinstance(e, sp.Sum) and len(e.limits) > 1, one_at_a_time)
    return expr if any(len(s.limits) > 1 for s in expr.atoms(sp.Sum)) else contract(expr)


def partial(expr, var):
    """d expr / d var with its Kronecker deltas contracted."""
    return contract_sums(sp.diff(fresh_bounds(expr, set(getattr(var, "indices", ()))), var))


def differentiation_rule(expr, var):
    """The rules a differentiation of expr by var applies, named for a reader."""
    base = var.base if isinstance(var, sp.Indexed) else var
    factors = [f for f in sp.Mul.make_args(expr) if f.has(base)]
    rules = []
    if any(f.is_Pow and f.exp.is_negative for f in factors):
        rules.append("quotient rule")
    elif len(factors) > 1:
        rules.append("product rule")
    applied = [f for f in expr.atoms(sp.Function) if len(f.args) == 1 and f.args[0].has(base)]
    if any(not (f.args[0].is_Symbol or isinstance(f.args[0], sp.Indexed)) for f in applied):
        rules.append("chain rule")
    rules += sorted({f"derivative of {type(f).__name__}" for f in applied
                     if f.args[0].is_Symbol or isinstance(f.args[0], sp.Indexed)})
    if expr.has(sp.Piecewise):
        rules.append("each piece differentiated")
    return "differentiation" + (": " + ", ".join(rules) if rules else "")


def in_row(expr, row):
    """expr of one row (x_k, t_k, p_k) written for row `row` of a batch (x_{row,k}, ...)."""
    return expr.replace(lambda e: isinstance(e, sp.Indexed) and len(e.indices) == 1,
                        lambda e: e.base[row, e.indices[0]])


def continues(steps, number):
    """Whether steps[number] continues the chain of equalities of the step before it."""
    return number > 0 and (steps[number].lhs, steps[number].condition) == (steps[number - 1].lhs,
                                                                           steps[number - 1].condition)


def without_repeats(steps):
    """steps without any that repeats the equation just before it (its rule adds nothing)."""
    kept = []
    for step in steps:
        if not kept or (step.lhs, step.rhs, step.condition) != (kept[-1].lhs, kept[-1].rhs, kept[-1].condition):
            kept.append(step)
    return tuple(kept)


def jacobian_steps(base, definition, out, wrt, in_saved):
    """d base_out / d x_wrt for base_i = definition: differentiated, contracted, written with base by
    in_saved, then the cases out = wrt and out != wrt where a Kronecker delta tells them apart."""
    value = definition.subs(i, out)
    d = sp.Derivative(base[out], x[wrt])
    raw = sp.diff(fresh_bounds(value, {wrt}), x[wrt])
    contracted = contract(raw)
    result = tidy(in_saved(contracted), base[out])
    steps = [Step(base[out], value, "definition"), Step(d, raw, differentiation_rule(value, x[wrt])),
             Step(d, contracted, "contraction of a Kronecker delta"),
             Step(d, result, f"substitution of the definition of {base.name}")]
    delta = sp.KroneckerDelta(out, wrt)
    if result.has(delta):
        steps += [Step(sp.Derivative(base[out], x[out]), tidy(result.subs(wrt, out), base[out]), f"case {out} = {wrt}"),
                  Step(d, result.subs(delta, 0), f"case {out} not equal to {wrt}", condition=sp.Ne(out, wrt))]
    return list(without_repeats(steps)), result


def layer_derivation(op):
    """y_i = forward, its Jacobian and cases, then dx_j = sum_i g_i dy_i/dx_j, ending at layer_backward(op)."""
    steps, jacobian = jacobian_steps(y, op.forward, i, j, lambda e: saved_form(e, op))
    vjp = over_classes(dy[i] * sp.Derivative(y[i], x[j]), i)
    substituted = over_classes(sp.Mul(dy[i], jacobian, evaluate=False), i)
    steps += [Step(dx[j], vjp, "chain rule: g is the gradient of the objective by y"),
              Step(dx[j], substituted, "substitution of the Jacobian"),
              Step(dx[j], contract(sp.expand(substituted)), "contraction of a Kronecker delta"),
              Step(dx[j], layer_backward(op), "simplification")]
    definitions = ((y[i], op.forward), *((base[i], value) for base, value in op.saved), (dx[j], vjp))
    return Derivation(f"{op.name}: {op.summary}", without_repeats(steps), definitions)


def loss_derivation(op):
    """L, dL/dx_j through what the forward saves (seed 000's three steps) when L is a function of
    those alone, else directly; then for rows summing to 1, integer labels, and the batch mean."""
    target = "dense" if "dense" in op.targets else "labels"
    values = variants(op, target)["plain"]
    forward = loss_forward(op, target, values)
    if op.granularity == "element":  # the loss of element j, the one x_j moves
        forward = forward.subs(i, j)
    d = sp.Derivative(LOSS, x[j])
    steps = [Step(base[i], value, "definition: the forward saves it") for base, value in op.saved]
    through_saved = _in_saved(forward, op)
    if through_saved is None:
        raw = sp.diff(fresh_bounds(forward, {j}), x[j])
        steps += [Step(LOSS, forward, "definition"), Step(d, raw, differentiation_rule(forward, x[j])),
                  Step(d, contract(raw), "contraction of a Kronecker delta")]
    else:
        steps += _chain_through_saved(op, through_saved, d)
    general = entry_gradient(op, target, values)
    steps.append(Step(d, general, "simplification"))
    target_sum = over_classes(t[k], k)
    summing_to_one = general.subs(target_sum, 1)
    if summing_to_one != general:
        steps.append(Step(d, summing_to_one, "substitution: the target row sums to 1",
                          assumes=(sp.Eq(target_sum, 1),)))
    if target != "labels" and "labels" in op.targets:
        steps.append(Step(d, entry_gradient(op, "labels", variants(op, "labels")["plain"]),
                          "substitution: an integer label c, t its one-hot row",
                          assumes=(sp.Eq(t[k], sp.KroneckerDelta(k, c)),)))
    row_assumes = () if summing_to_one == general else (sp.Eq(in_row(target_sum, r), 1),)
    steps += batch_mean_steps(summing_to_one, row_assumes)
    definitions = (*((base[i], value) for base, value in op.saved),
                   *((base[n, i], in_row(value, n)) for base, value in op.saved),
                   (LOSS, forward if through_saved is None else through_saved),
                   (L[n], in_row(forward, n)), (MEAN, REDUCTIONS["mean"].subs(total, N)))
    return Derivation(f"{op.name}: {op.summary}", without_repeats(steps), definitions)


def entry_gradient(op, target, values):
    """dL/dx_j of one loss entry: loss_gradient with the upstream weight g set to 1."""
    gradient = loss_gradient(op, target, values).subs(g, 1)
    return gradient.replace(lambda e: isinstance(e, sp.Indexed) and e.base == dy, lambda e: 1)


def _in_saved(expr, op):
    """expr written with the saved quantities alone, or None where it needs x itself: a loss is
    differentiated through what it saves (seed 000's chain) only when it is a function of those."""
    if not op.saved:
        return None
    try:
        rewritten = saved_form(expr, op)
    except ValueError:
        return None
    return None if rewritten.has(x) else rewritten


def _chain_through_saved(op, in_saved, d):
    """dL/ds_k for each saved s, ds_k/dx_j with its cases, the chain rule sum, its contraction."""
    steps, chain, substituted = [Step(LOSS, in_saved, "definition")], [], []
    for base, definition in op.saved:
        outer = partial(in_saved, base[k])
        steps.append(Step(sp.Derivative(LOSS, base[k]), outer, differentiation_rule(in_saved, base[k])))
        jacobian_part, jacobian = jacobian_steps(base, definition, k, j, lambda e: saved_form(e, op))
        steps += jacobian_part[1:]
        chain.append(over_classes(sp.Derivative(LOSS, base[k]) * sp.Derivative(base[k], x[j]), k))
        substituted.append(over_classes(sp.Mul(outer, jacobian, evaluate=False), k))
    steps += [Step(d, sp.Add(*chain), "chain rule"), Step(d, sp.Add(*substituted), "substitution of the steps above"),
              Step(d, contract(sp.expand(sp.Add(*substituted))), "contraction of a Kronecker delta")]
    return steps


def batch_mean_steps(row_gradient, assumes=()):
    """The mean over N rows, each row's weight 1/N in it, and the gradient by row r's inputs."""
    mean = REDUCTIONS["mean"].subs(total, N)
    weight = row_weight(mean)
    return [Step(MEAN, mean, "definition: the batch mean"),
            Step(sp.Derivative(MEAN, L[r]), weight, "contraction of a Kronecker delta"),
            Step(sp.Derivative(MEAN, x[r, j]), weight * in_row(row_gradient, r),
                 "chain rule: only the loss of row r depends on row r", assumes=assumes)]


def rewrite_steps(lhs, expr):
    """lhs = expr, then every rewrite of derive.stability that changes it, in turn."""
    steps = [Step(lhs, expr, "definition")]
    for name, rewrite, _ in REWRITES:
        steps.append(Step(lhs, rewrite(steps[-1].rhs), name))
    return list(without_repeats(steps))


def stable_derivation(op):
    """What the kernels evaluate, from the plain forms: every rewrite of derive.stability in turn, then a layer's
    backward at the row's argmax where its kernels write it whole (backward_at_argmax_steps)."""
    plain = ([(y[i], op.forward)] if op.kind == "layer" else
             [(LABEL_LOSS if target == "labels" else LOSS, loss_forward(op, target, variants(op, target)["plain"]))
              for target in op.targets])
    plain += [(base[i], value) for base, value in op.saved if (base[i], value) not in plain]
    backward, near = backward_at_argmax_steps(op), near_zero_steps(op)
    defined = [step.rhs for step in backward + near if step.lhs == dx[j] and step.rule == "definition"]
    return Derivation(f"{op.name}: the numerically stable forms its kernels evaluate",
                      tuple(step for lhs, value in plain for step in rewrite_steps(lhs, value)) + tuple(backward + near),
                      tuple(plain) + ((dx[j], defined[0]),) if defined else tuple(plain))


def near_zero_steps(op):
    """[each quantity = its kernel's form, with the Taylor polynomial within a radius of each zero where that
    form's terms cancel (derive.zeros)] of an element-wise layer with no option: the forward y_i, the backward dx_j
    (the definition first); [] where there is no such zero."""
    if op.kind != "layer" or op.params:
        return []
    steps = []
    for lhs, quantity, at in ((y[i], op.forward, x[i]), (dx[j], layer_backward(op), x[j])):
        found = of_quantity(quantity, stable(quantity))
        if not found:
            continue
        per_unit = dy[j] if quantity.has(dy[j]) else sp.S.One
        near = [(per_unit * zero.at(at), sp.Abs(at - sp.Float(zero.center, 17)) < zero.radius) for zero in found]
        steps += [Step(lhs, quantity, "definition"),
                  Step(lhs, sp.Piecewise(*near, (stable(quantity), True)), "near a zero where its terms cancel")]
    return steps


def backward_at_argmax_steps(op):
    """[dx_j = the layer's backward, its value at the row's argmax a] where the layer saves a softmax e/(1 + T) (the
    rule "shifted sum as 1 + the rest"): the NumPy kernel writes dx_a whole, derive.softmax.vjp_at_argmax's form with
    1 - y_a as T/(1 + T), where y_a (g_a - sum_i g_i y_i) cancels; [] for any other op."""
    if op.kind != "layer" or not op.saved:
        return []
    _, denominator = sp.fraction(stable(op.saved[0][1]))
    argmaxes = denominator.atoms(ClassArgmax)
    if not (denominator.is_Add and 1 in denominator.args and len(argmaxes) == 1):
        return []
    (argmax,), vjp, rest = argmaxes, layer_backward(op), denominator - 1
    at_argmax = vjp_at_argmax(vjp, op.saved[0][0], rest / (1 + rest), argmax, argmax)
    return [Step(dx[j], vjp, "definition"), Step(dx[argmax], at_argmax, "the backward at the row's argmax")]


def gradient_derivation(op):
    """The derivation of a catalog entry's backward."""
    return layer_derivation(op) if op.kind == "layer" else loss_derivation(op)


def op_derivations(op):
    """{name: function returning the Derivation} of one catalog entry: its gradient, its stable forms."""
    return {op.module: functools.partial(gradient_derivation, op),
            f"{op.module}_stable": functools.partial(stable_derivation, op)}


def elementwise_derivation(expr, var, title=None, output=OUTPUT):
    """output = expr, its derivative by var as SymPy differentiates it, simplified, then written with
    the output where that gives a polynomial in it (the form a kernel evaluates from what it saved)."""
    if output.name in {str(s) for s in expr.free_symbols}:  # by name: a real y is another Symbol, printed alike
        raise ValueError(f"{expr}: {output} names the output of the derivation; use another name")
    if not expr.has(var):
        raise ValueError(f"{expr} does not depend on {var}")
    d = sp.Derivative(output, var)
    raw = sp.diff(expr, var)
    simpler = simplest(raw)
    steps = [Step(output, expr, "definition"), Step(d, raw, differentiation_rule(expr, var)),
             Step(d, simpler, "simplification")]
    with_output = _in_output(simpler, expr, var, output)
    if with_output is not None:
        steps.append(Step(d, with_output, f"substitution of the output {output}"))
    return Derivation(title or f"{output} = {sp.sstr(expr)}", without_repeats(steps), ((output, expr),))


def declared_derivation(op):
    """The derivation of a declared operation: of an element-wise one (derive.declare's activation or
    elementwise_loss) its forward in the scalars x (and t), as symgrad derive --expr derives one; of an
    index-notation one (tensor_op, tensor_loss) its reverse mode, derive.derivation_tensor's."""
    if isinstance(op, TensorOp):
        from derive.derivation_tensor import tensor_derivation  # imported here: that module builds on this one
        return tensor_derivation(op)
    scalars = {x[i]: sp.Symbol("x", real=True), t[i]: sp.Symbol("t", real=True)}
    scalar = op.forward.xreplace(scalars)
    if scalar.has(sp.Indexed):
        raise ValueError(f"{op.name}: its forward {op.forward} is not element-wise")
    return elementwise_derivation(scalar, scalars[x[i]], f"{op.name}: {op.summary}",
                                  LOSS if op.kind == "loss" else OUTPUT)


def simplest(expr):
    """The shortest of expr, its factored and simplified forms that brings in no new function (no cosh
    where the input had exp)."""
    functions = {type(f) for f in expr.atoms(sp.Function)}
    candidates = [expr] + [e for e in (sp.factor(expr), sp.simplify(expr))
                           if {type(f) for f in e.atoms(sp.Function)} <= functions]
    return min(candidates, key=sp.count_ops)


def _in_output(derivative, expr, var, output):
    """derivative as a polynomial in output = expr, or None. The inverse of expr is searched with
    solve, which fails (NotImplementedError, TypeError) on Piecewise and others not invertible."""
    candidates = [derivative.subs(expr, output)]
    try:
        candidates += [sp.simplify(derivative.subs(var, inverse)) for inverse in sp.solve(sp.Eq(output, expr), var)]
    except (NotImplementedError, TypeError):
        pass
    for candidate in candidates:
        if not candidate.has(var) and candidate.has(output) and candidate.is_polynomial(output):
            quotient = sp.cancel(candidate / output)
            return output * quotient if quotient.is_polynomial(output) else sp.expand(candidate)
    return None
