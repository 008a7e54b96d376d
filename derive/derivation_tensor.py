"""The derivation of an index-notation operation (derive.tensor's TensorOp) as data, and its check.

The steps: each forward step as a definition; then, for each step s in reverse, its adjoint g_s: the
chain rule through the steps that read s (the adjoint of each times its partial derivative), those
derivatives taken, their Kronecker deltas contracted (a range narrowed, or a term guarded, where a
delta's value must lie in it), and the sums a step defines written as that step; then the same for
the vector-Jacobian product dq of every input and param. Each chain ends at derive.tensor.derivation's
result. Pure: codegen.latex prints it (a file named derivation*, so it is no input of generated/).

The check, at explicit sizes in float64: each definition is the declared step, each chain rule agrees
with central differences of sum(g * output) along a random direction (the array read as independent,
the steps after it recomputed), and every other step equals the one before it at every index."""
import dataclasses

import numpy as np
import sympy as sp

from derive.algebra import at_kinks, differentiated
from derive.derivation_check import StepCheck
from derive.derivation_steps import Derivation, Step, continues, without_repeats
from derive.tensor import (Assignment, Sum, contracted, derivation, evaluated, explicit_sizes, in_terms_of_steps,
                           random_arrays, reads_of, shift_first, size_of, substituted)

PENALTY = sp.Symbol("P")
RULES = ("chain rule: the adjoint of each step that reads it times its partial derivative", "differentiation",
         "contraction of the Kronecker deltas, their ranges kept", "each sum that a step defines written as that step")
STEP_TOLERANCE = 1e-9              # relative, between two forms of one array at every index


def array(name):
    return sp.IndexedBase(name, real=True)


def axes_of(op, name):
    """The index letters of an input, a param or a step."""
    return op.inputs.get(name) or (op.params[name][0] if name in op.params else next(
        s.indices for s in op.steps if s.name == name))


def chain_terms(op, step, name):
    """The four forms of step's term in the adjoint of name, derive.tensor.vjp_term's stages: sum over
    step's indices of g_step times d step / d name (at name's own indices), that derivative taken, its
    deltas contracted, and the sums the steps define named."""
    axes = axes_of(op, name)
    at = tuple(sp.Dummy(str(i), integer=True) for i in axes)
    back = dict(zip(at, axes))
    adjoint = array("g" if step is op.steps[-1] else f"g_{step.name}")[step.indices]
    limits = [(i, 0, size_of(i) - 1) for i in reversed(step.indices)]
    wrt = array(name)[at]
    partial = Sum(adjoint * sp.Derivative(array(step.name)[step.indices], wrt), *limits)
    taken = shift_first(adjoint * at_kinks(differentiated(step.expr, wrt)), tuple(limits))
    contraction = substituted(contracted(taken, {a: (0, size_of(i) - 1) for a, i in back.items()}, op.sizes), back)
    return (substituted(partial, back), substituted(taken, back), contraction,
            in_terms_of_steps(contraction, op.steps))


def tensor_derivation(op):
    """The Derivation of op: its steps as definitions, then each adjoint and each VJP, from the chain rule to
    derive.tensor.derivation's form."""
    found = derivation(op)
    differentiable = {a.name[2:] for a in found.adjoints} | {op.steps[-1].name}

    def chain(name, lhs):
        readers = [s for s in reversed(op.steps) if s.name in differentiable and name in reads_of(s.expr)]
        forms = zip(*(chain_terms(op, s, name) for s in readers))
        return [Step(lhs, sp.Add(*terms), rule) for terms, rule in zip(forms, RULES)]

    steps = [Step(array(s.name)[s.indices], s.expr, "definition") for s in op.steps]
    for a in found.adjoints:
        steps += chain(a.name[2:], array(a.name)[a.indices])
    for name, program in found.gradients.items():
        steps += chain(name, array(program[-1].name)[program[-1].indices])
    definitions = tuple((array(s.name)[s.indices], s.expr) for s in op.steps)
    if op.penalty is not None:
        steps += penalty_steps(op, found)
        definitions += ((PENALTY, op.penalty),)
    return Derivation(f"{op.name}: {op.summary}", without_repeats(steps), definitions, op=op)


def penalty_steps(op, found):
    """The penalty P's definition, then its gradient in each param it reads: taken, then its deltas contracted."""
    steps = [Step(PENALTY, op.penalty, "definition: the penalty the class adds to the loss")]
    for gradient in found.penalty:
        param = gradient.name[1:]
        axes = op.params[param][0]
        at = tuple(sp.Dummy(str(i), integer=True) for i in axes)
        taken = substituted(at_kinks(differentiated(op.penalty, array(param)[at])), dict(zip(at, axes)))
        lhs = array(f"dP_d{param}")[axes]
        steps += [Step(lhs, taken, "differentiation"), Step(lhs, gradient.expr, RULES[2])]
    return steps


def penalty_against_differences(op, param, analytic, arrays, scope, rng, step, where):
    """(ok, method, detail) of the claim that analytic is the gradient of the penalty by param."""
    direction = rng.uniform(-1, 1, arrays[param].shape)
    moved = [float(evaluated([Assignment("P", (), op.penalty)], {**arrays, param: arrays[param] + shift * direction},
                             scope)["P"]) for shift in (step, -step)]
    numeric, projected = (moved[0] - moved[1]) / (2 * step), float(np.sum(direction * analytic))
    ok = abs(projected - numeric) <= op.tol * max(1.0, float(np.sum(np.abs(direction * analytic))))
    return ok, f"central differences of P along a random direction, {where}", (
        "" if ok else f"{projected:.10g} from the step, {numeric:.10g} by central differences")


def with_partials_taken(expr, definitions):
    """expr with each partial derivative d s[i, ...] / d q[j, ...] of a defined step taken from its definition."""
    defined = {lhs.base.name: (lhs, rhs) for lhs, rhs in definitions if isinstance(lhs, sp.Indexed)}

    def taken(partial):
        (wrt, _), = partial.variable_count
        lhs, rhs = defined[partial.expr.base.name]
        at = tuple(sp.Dummy(integer=True) for _ in wrt.indices)
        instance = substituted(rhs, dict(zip(lhs.indices, partial.expr.indices)))
        return substituted(at_kinks(differentiated(instance, wrt.base[at])), dict(zip(at, wrt.indices)))
    return expr.replace(lambda e: isinstance(e, sp.Derivative), taken)


def check_tensor_derivation(op, found, sizes, seed=0, values=None, step=1e-6):
    """[StepCheck] for every step of found, a Derivation of op, at the explicit sizes {"N": 3, ...}; values
    gives arrays in place of the random ones (a target with zeros)."""
    rng = np.random.default_rng(seed)
    scope = {**explicit_sizes(op, sizes), **{sp.Symbol(o, real=True): v for o, v in op.options.items()}}
    arrays = evaluated(op.steps, {**random_arrays(op, scope, rng), **(values or {})}, scope)
    where = ", ".join(f"{size} = {value}" for size, value in scope.items() if size.is_integer)
    declared = {s.name: s for s in op.steps}

    def value(s):
        name, indices = (s.lhs.name, ()) if s.lhs == PENALTY else (s.lhs.base.name, s.lhs.indices)
        return evaluated([Assignment(name, indices, with_partials_taken(s.rhs, found.definitions))],
                         arrays, scope)[name]

    def against_differences(name, analytic):
        """(ok, method, detail) of the claim that analytic is the gradient of sum(g * output) by array name."""
        direction = rng.uniform(-1, 1, arrays[name].shape)
        later = op.steps[[t.name for t in op.steps].index(name) + 1:] if name in declared else op.steps

        def objective(shift):
            moved = evaluated(later, {**arrays, name: arrays[name] + shift * direction}, scope)
            return float(np.sum(moved["g"] * moved[op.steps[-1].name]))
        numeric = (objective(step) - objective(-step)) / (2 * step)
        projected = float(np.sum(direction * analytic))
        ok = abs(projected - numeric) <= op.tol * max(1.0, float(np.sum(np.abs(direction * analytic))))
        return ok, f"central differences along a random direction, {where}", (
            "" if ok else f"{projected:.10g} from the step, {numeric:.10g} by central differences")

    checks, before = [], None
    for number, s in enumerate(found.steps):
        name = s.lhs.name if s.lhs == PENALTY else s.lhs.base.name
        current = value(s)
        if continues(found.steps, number):
            gap = float(np.max(np.abs(before - current), initial=0.0))
            ok = gap <= STEP_TOLERANCE * max(1.0, float(np.max(np.abs(before), initial=0.0)))
            verdict = ok, f"numeric at every index, {where}", "" if ok else f"differs from the step before by {gap:.3g}"
        elif name in declared:
            ok = (s.lhs.indices, s.rhs) == (declared[name].indices, declared[name].expr)
            verdict = ok, "the declared step", "" if ok else f"the declaration says {declared[name]}"
        elif name.startswith("g_") and name[2:] in declared or name[1:] in {*op.inputs, *op.params}:
            verdict = against_differences(name[2:] if name.startswith("g_") else name[1:], current)
        elif s.lhs == PENALTY:
            ok = s.rhs == op.penalty
            verdict = ok, "the declared penalty", "" if ok else f"the declaration says P = {op.penalty}"
        elif name.startswith("dP_d") and name[4:] in op.params:
            verdict = penalty_against_differences(op, name[4:], current, arrays, scope, rng, step, where)
        else:
            verdict = False, "none", f"{name} is no step, adjoint g_<step> or gradient d<input or param> of {op.name}"
        checks.append(StepCheck(number + 1, s.rule, *verdict))
        before = current
        if name not in declared:   # the chain so far: the adjoints after it read its last form
            arrays[name] = current
    return checks


def batch_norm_textbook(op):
    """op's derivation (BatchNorm1d's, or BatchNorm2d's), its dx then written in the compact form textbooks
    give: with r = 1/sqrt(var + eps), xhat = (x - mu) r and g' = gamma g over the M values of a channel,
    dx = (r/M) (M g' - sum g' - xhat sum(g' xhat)). The checker holds that step equal to the chain's form."""
    found = tensor_derivation(op)
    axes = op.inputs["x"]
    channel, summed = axes[1], [i for i in axes if i != axes[1]]
    others = [sp.Symbol(f"{i}_2", integer=True) for i in summed]   # the summed copies of the batch indices
    count = sp.Mul(*map(size_of, summed))
    rstd = 1 / sp.sqrt(array("var")[channel] + sp.Symbol("eps", real=True))

    def at(positions):
        full = dict(zip(summed, positions))
        return tuple(full.get(i, channel) for i in axes)

    def xhat(positions):
        return (array("x")[at(positions)] - array("mu")[channel]) * rstd

    def scaled(positions):   # g' = gamma g
        return array("gamma")[channel] * array("g")[at(positions)]
    limits = [(o, 0, size_of(i) - 1) for o, i in zip(others, summed)]
    # unevaluated, so that it prints as the textbook writes it (SymPy would expand the bracket)
    inner = sp.Add(count * scaled(summed), -Sum(scaled(others), *limits),
                   -sp.Mul(xhat(summed), Sum(scaled(others) * xhat(others), *limits), evaluate=False), evaluate=False)
    compact = sp.Mul(rstd / count, inner, evaluate=False)
    lhs = array("dx")[axes]
    last = max(number for number, s in enumerate(found.steps) if s.lhs == lhs)
    rule = (f"the textbook's form: with xhat = (x - mu)/sqrt(var + eps) and g' = gamma g over the M = {count} values "
            f"of a channel, dx = (M g' - sum g' - xhat sum g' xhat)/(M sqrt(var + eps))")
    steps = (*found.steps[:last + 1], Step(lhs, compact, rule), *found.steps[last + 1:])
    return dataclasses.replace(found, steps=steps, ranges=tuple((o, size_of(i)) for o, i in zip(others, summed)))
