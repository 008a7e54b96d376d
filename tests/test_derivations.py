"""Every printed derivation, step by step, and the checker that holds them to account."""
import functools

import pytest
import sympy as sp

from derive.catalog import CATALOG
from derive.derivation_check import check_derivation
from derive.derivation_networks import SIGMA
from derive.derivation_steps import LABEL_LOSS, LOSS, OUTPUT, Derivation, Step, elementwise_derivation, entry_gradient
from derive.derivations import DERIVATIONS, NAMED, build_registry
from derive.gradients import layer_backward, loss_forward, loss_gradient, variants
from derive.softmax import softmax
from derive.stability import stable
from derive import tensor
from derive.symbols import K, N, c, i, j, p, r, t, x, y
from derive.tensor import TensorOp

X = sp.Symbol("x")


@functools.cache
def derivation(name):
    return DERIVATIONS[name]()


def failures(checks):
    return "\n".join(check.report() for check in checks if not check.ok)


# a named derivation that is a catalog entry's under a name people search for: its steps are that entry's
ALIASES = {"attention": "scaled_dot_product_attention"}


def test_an_alias_is_its_entrys_derivation():
    for alias, entry in ALIASES.items():
        assert derivation(alias).steps == derivation(entry).steps


@pytest.mark.parametrize("name", [name for name in DERIVATIONS if name not in ALIASES])
def test_every_step_of_every_derivation_holds(name):
    found = derivation(name)
    checks = check_derivation(found)
    assert len(checks) == len(found.steps)
    assert all(check.ok for check in checks), f"{name}:\n{failures(checks)}"


@pytest.mark.parametrize("name", DERIVATIONS)
def test_every_rule_is_named_in_plain_words(name):
    for step in derivation(name).steps:
        assert step.rule and step.rule.isascii() and not set(step.rule) & set("_^\\{}$&#%~"), step.rule


@pytest.mark.parametrize("op", CATALOG.values(), ids=CATALOG)
def test_every_catalog_entry_has_a_derivation_ending_at_what_its_kernels_compute(op):
    steps = derivation(op.module).steps
    if isinstance(op, TensorOp):  # reverse mode through its steps, ending at each gradient its kernels lower
        found = tensor.derivation(op)
        ends = {step.lhs.base.name: step.rhs for step in steps if isinstance(step.lhs, sp.Indexed)}
        assert all(ends[program[-1].name] == program[-1].expr for program in found.gradients.values())
        assert all(ends[f"dP_{d.name}"] == d.expr for d in found.penalty)
    elif op.kind == "layer":
        assert steps[-1].rhs == layer_backward(op)
    else:
        results = [step.rhs for step in steps]
        assert all(entry_gradient(op, target, variants(op, target)["plain"]) in results for target in op.targets)


# an index-notation op's stable forms are its lowering's (codegen.tensor_lower.rewritten, in symgrad explain)
STABLE = [op for op in CATALOG.values() if not isinstance(op, TensorOp)]


@pytest.mark.parametrize("op", STABLE, ids=[op.name for op in STABLE])
def test_every_stable_form_a_kernel_evaluates_is_derived_from_the_plain_one(op):
    steps = derivation(f"{op.module}_stable").steps
    plain = ([(y[i], op.forward)] if op.kind == "layer" else
             [(LABEL_LOSS if target == "labels" else LOSS, loss_forward(op, target, variants(op, target)["plain"]))
              for target in op.targets])
    for lhs, expr in plain + [(base[i], value) for base, value in op.saved]:
        chain = [step.rhs for step in steps if step.lhs == lhs]
        assert chain[0] == expr and stable(expr) in chain, lhs


def test_the_seed_000_steps_and_its_worked_example():
    steps = derivation("softmax_cross_entropy").steps
    rules = [step.rule for step in steps]
    assert rules.index("chain rule") > rules.index("case k not equal to j") > rules.index("case k = j")
    assert [s.rhs for s in steps if s.rule == "substitution: the target row sums to 1"] == [p[j] - t[j]]
    assert steps[-1].rhs == (p[r, j] - t[r, j]) / N
    at_label = next(s.rhs for s in steps if "integer label" in s.rule)
    worked = [at_label.subs({p[j]: v, j: index, c: 2}) for index, v in enumerate([0.1, 0.2, 0.25, 0.4, 0.05])]
    assert [float(v) for v in worked] == pytest.approx([0.1, 0.2, -0.75, 0.4, 0.05])


@pytest.mark.parametrize("name, result", [
    ("sigmoid_derivative", OUTPUT * (1 - OUTPUT)),
    ("tanh_derivative", 1 - OUTPUT ** 2),
    ("relu_derivative", sp.Piecewise((0, X < 0), (1, True))),
    ("softplus_derivative", SIGMA(X)),
])
def test_activations_end_at_their_textbook_derivatives(name, result):
    assert derivation(name).steps[-1].rhs == result


def test_the_softmax_jacobian_has_both_cases():
    cases = {step.rule: step.rhs for step in derivation("softmax_jacobian").steps}
    assert sp.expand(cases["case i = j"] - p[i] * (1 - p[i])) == 0
    assert cases["case i not equal to j"] == -p[i] * p[j]


def test_mse_with_a_sigmoid_carries_the_vanishing_factor_cross_entropy_does_not():
    a, z, target = sp.symbols("a z t")
    steps = derivation("sigmoid_cross_entropy_vs_mse").steps
    by_z = [s.rhs for s in steps if isinstance(s.lhs, sp.Derivative) and s.lhs.variables == (z,)]
    assert a - target in by_z and any(sp.expand(e - (a - target) * a * (1 - a)) == 0 for e in by_z)
    assert [s.rhs for s in steps if isinstance(s.lhs, sp.Limit)] == [0, 0]


def test_backprop_names_its_four_equations():
    rules = " ".join(step.rule for step in derivation("backprop").steps)
    assert all(f"BP{number}" in rules for number in range(1, 5))


def check(steps, definitions, ranges=()):
    return check_derivation(Derivation("test", tuple(steps), tuple(definitions), ranges))


def test_the_checker_catches_a_wrong_sign_in_the_softmax_jacobian():
    d = sp.Derivative(p[i], x[j])
    right = check([Step(d, p[i] * (sp.KroneckerDelta(i, j) - p[j]), "quotient rule")], [(p[i], softmax(i))])
    wrong = check([Step(d, p[i] * (sp.KroneckerDelta(i, j) + p[j]), "quotient rule")], [(p[i], softmax(i))])
    assert right[0].ok and not wrong[0].ok
    assert "before" in wrong[0].detail and "K = " in wrong[0].detail


def test_the_checker_catches_a_wrong_step_in_a_chain_and_names_it():
    d = sp.Derivative(OUTPUT, X)
    softplus = [(OUTPUT, sp.log(1 + sp.exp(X)))]
    checks = check([Step(d, sp.exp(X) / (1 + sp.exp(X)), "differentiation"),
                    Step(d, 1 / (1 + sp.exp(X)), "simplification")], softplus)
    assert [check.ok for check in checks] == [True, False]
    assert checks[1].method == "numeric" and checks[1].number == 2


def test_the_checker_catches_a_step_that_holds_only_under_an_undeclared_assumption():
    d = sp.Derivative(LOSS, x[j])
    definitions = [(p[i], softmax(i)), (LOSS, -sp.Sum(t[i] * sp.log(p[i]), (i, 0, K - 1)))]
    t_sum = sp.Eq(sp.Sum(t[i], (i, 0, K - 1)), 1)
    claim = p[j] - t[j]
    assert not check([Step(d, claim, "substitution")], definitions)[0].ok
    assert check([Step(d, claim, "substitution", assumes=(t_sum,))], definitions)[0].ok


def test_the_checker_holds_a_case_to_its_condition():
    d = sp.Derivative(p[i], x[j])
    outside = sp.Ne(i, j)
    assert check([Step(d, -p[i] * p[j], "case", condition=outside)], [(p[i], softmax(i))])[0].ok
    assert not check([Step(d, -p[i] * p[j], "case")], [(p[i], softmax(i))])[0].ok


def test_the_checker_catches_a_stable_form_that_forgot_the_shift():
    shifted = sp.exp(x[i] - sp.Symbol("M")) / sp.Sum(sp.exp(x[i]), (i, 0, K - 1))
    assert not check([Step(p[i], shifted, "shift")], [(p[i], softmax(i))])[0].ok


def test_an_element_wise_derivation_refuses_what_it_cannot_derive():
    with pytest.raises(ValueError, match="does not depend on x"):
        elementwise_derivation(sp.Symbol("z") ** 2, X)
    with pytest.raises(ValueError, match="y names the output"):
        elementwise_derivation(OUTPUT * X, X)


def test_the_registry_refuses_a_name_declared_twice():
    with pytest.raises(ValueError, match="'softmax' is declared twice"):
        build_registry(CATALOG, {"softmax": NAMED["backprop"]})


def test_a_steps_condition_on_scalars_limits_where_the_checker_compares():
    """sqrt(v / (1 - b)) = sqrt(v) / sqrt(1 - b) holds where b < 1 (Adam's bias correction): checked there it
    passes, checked everywhere the checker finds where it fails."""
    b, v, q = sp.Symbol("b", positive=True), sp.Symbol("v", positive=True), sp.Symbol("q")

    def checks(condition):
        steps = (Step(q, sp.sqrt(v / (1 - b)), "definition"), Step(q, sp.sqrt(v) / sp.sqrt(1 - b), "split", condition))
        return check_derivation(Derivation("test", steps, ((q, sp.sqrt(v / (1 - b))),)))
    assert all(check.ok for check in checks(b < 1))
    assert not checks(None)[1].ok


def test_batch_norms_textbook_form_is_checked_against_the_chain_and_a_wrong_one_is_caught():
    """symgrad derive batch_norm ends dx in (M g' - sum g' - xhat sum g' xhat)/(M sqrt(var + eps)); the checker
    holds it equal to the chain rule's form at every index, and a form off by 10% fails there."""
    import dataclasses
    good = DERIVATIONS["batch_norm"]()   # its checks: test_every_step_of_every_derivation_holds[batch_norm]
    number = next(k for k, s in enumerate(good.steps) if s.rule.startswith("the textbook's form"))
    assert good.steps[number].lhs == good.steps[number - 1].lhs   # it continues dx's chain
    wrong = dataclasses.replace(good.steps[number], rhs=good.steps[number].rhs * sp.Rational(11, 10))
    checks = check_derivation(dataclasses.replace(good, steps=(*good.steps[:number], wrong, *good.steps[number + 1:])))
    assert not checks[number].ok and "differs from the step before" in checks[number].detail


def test_the_softmax_layers_stable_forms_end_at_its_backward_at_the_argmax_and_a_wrong_one_is_caught():
    # the step the NumPy kernel prints (codegen.kernels.at_the_argmax): y_a (g_a T/(1 + T) - sum_{i != a} g_i y_i)
    from derive.stability import ClassArgmax
    found = derivation("softmax_stable")
    *_, definition, at_argmax = found.steps
    argmax = ClassArgmax(x)
    assert definition.rhs == layer_backward(CATALOG["Softmax"]) and at_argmax.rule == "the backward at the row's argmax"
    assert at_argmax.lhs.indices == (argmax,) and at_argmax.rhs.has(sp.KroneckerDelta(i, argmax))
    assert all(check.ok for check in check_derivation(found))
    # the others' sum with the argmax's own term left in: dx_a counts g_a y_a twice, which the checker finds
    wrong = at_argmax.rhs.replace(lambda e: isinstance(e, sp.Sum) and e.function.has(y[i]),
                                  lambda e: sp.Sum(e.function.subs(sp.KroneckerDelta(i, argmax), 0), *e.limits))
    assert wrong != at_argmax.rhs
    steps = found.steps[:-1] + (Step(at_argmax.lhs, wrong, at_argmax.rule),)
    assert not check_derivation(Derivation(found.title, steps, found.definitions))[-1].ok
    # an op whose saved form has no shifted sum gets no such step
    assert not any(step.rule == at_argmax.rule for step in derivation("log_softmax_stable").steps)
