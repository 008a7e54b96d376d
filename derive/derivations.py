"""Derivations as lists of steps (lhs, rhs, rule), each rhs a SymPy result; printing is elsewhere."""
from dataclasses import dataclass

import sympy as sp

from derive.reduction import REDUCTIONS, row_weight
from derive.softmax import (cross_entropy_gradient, softmax, softmax_jacobian, softmax_jacobian_cases,
                            target_sum_is_one)
from derive.symbols import N, i, j, k, over_classes, p, t, total, x


@dataclass(frozen=True)
class Step:
    """One equation of a derivation and the rule that produced it."""

    lhs: sp.Expr
    rhs: sp.Expr
    rule: str


def softmax_steps():
    """The softmax Jacobian and its two cases (seeds 001, 002, 003)."""
    dp = sp.Derivative(p[i], x[j])
    cases = softmax_jacobian_cases()
    return [Step(p[i], softmax(i), "definition"),
            Step(dp, softmax_jacobian(), "quotient rule, contraction of a Kronecker delta"),
            Step(sp.Subs(dp, j, i), cases["i = j"], "case i = j"),
            Step(dp, cases["i != j"], "case i not equal to j")]


def softmax_cross_entropy_steps():
    """dL/dx_j = p_j - t_j for L = -sum_k t_k log p_k, and the batch mean's 1/N (seeds 000, 002, 004)."""
    dL = sp.Derivative(sp.Symbol("L"), x[j])
    reduced = target_sum_is_one(cross_entropy_gradient())
    mean = sp.Symbol(r"\bar{L}")
    return [Step(sp.Symbol("L"), -over_classes(t[k] * sp.log(p[k]), k), "definition, p = softmax(x)"),
            Step(dL, cross_entropy_gradient(), "chain rule, contraction of a Kronecker delta"),
            Step(dL, reduced, "substitution: the target row sums to 1"),
            Step(mean, REDUCTIONS["mean"].subs(total, N), "batch mean"),
            Step(sp.Derivative(mean, x[j]), row_weight(REDUCTIONS["mean"]).subs(total, N) * reduced,
                 "chain rule: each row weighs 1/N in the mean")]


DERIVATIONS = {"softmax": softmax_steps, "softmax_cross_entropy": softmax_cross_entropy_steps}
