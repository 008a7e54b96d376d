"""The contraction and re-expression pass that SymPy's simplify lacks for index notation."""
import pytest
import sympy as sp

from derive.algebra import contract, in_terms_of, tidy
from derive.softmax import softmax
from derive.symbols import K, c, i, j, k, m, over_classes, p, t, x
from tests.explicit import at_explicit_size, explicit_symbols

a = sp.Symbol("a")


@pytest.mark.parametrize("delta", [sp.KroneckerDelta(k, j), sp.KroneckerDelta(j, k)], ids=["kj", "jk"])
def test_a_delta_picks_the_summand_at_its_partner(delta):
    assert contract(over_classes(sp.exp(x[k]) * t[k] * delta, k)) == sp.exp(x[j]) * t[j]


def test_factors_free_of_the_index_leave_the_sum_and_a_constant_sum_counts_terms():
    assert contract(over_classes(a * x[k], k)) == a * over_classes(x[k], k)
    assert contract(over_classes(a, k)) == a * K


def test_a_sum_of_terms_contracts_term_by_term():
    expr = over_classes(x[k] * (sp.KroneckerDelta(k, j) - p[j]), k)
    assert sp.expand(contract(expr) - (x[j] - p[j] * over_classes(x[k], k))) == 0


def test_nested_sums_contract_inside_out():
    inner = over_classes(sp.exp(x[m]) * sp.KroneckerDelta(m, k), m)
    assert contract(over_classes(t[k] * inner * sp.KroneckerDelta(k, c), k)) == t[c] * sp.exp(x[c])


def test_a_delta_between_two_other_indices_stays():
    expr = over_classes(x[k] * sp.KroneckerDelta(i, j), k)
    assert contract(expr) == sp.KroneckerDelta(i, j) * over_classes(x[k], k)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_contraction_keeps_the_value_at_explicit_sizes(size):
    xs, ts = explicit_symbols("x", size), explicit_symbols("t", size)
    expr = over_classes(t[k] * x[k] * (sp.KroneckerDelta(k, j) + sp.KroneckerDelta(c, k)) + x[k] ** 2, k)
    for at in range(size):
        for label in range(size):
            subs = {j: at, c: label}
            before = at_explicit_size(expr.subs(subs), size, {"x": xs, "t": ts})
            after = at_explicit_size(contract(expr).subs(subs), size, {"x": xs, "t": ts})
            assert sp.expand(before - after) == 0


def test_in_terms_of_writes_softmax_as_p():
    raw = contract(sp.diff(softmax(i), x[j]))
    assert sp.expand(in_terms_of(raw, p, softmax(i), i) - (p[i] * sp.KroneckerDelta(i, j) - p[i] * p[j])) == 0


def test_in_terms_of_refuses_what_p_cannot_express():
    with pytest.raises(ValueError, match="not a function of the saved quantity"):
        in_terms_of(sp.exp(2 * x[j]) / over_classes(sp.exp(x[m]), m) + over_classes(sp.exp(x[m]), m), p,
                    softmax(i), i)


def test_tidy_pulls_the_leading_factor_out():
    assert tidy(p[i] * sp.KroneckerDelta(i, j) - p[i] * p[j], p[i]) == p[i] * (sp.KroneckerDelta(i, j) - p[j])
