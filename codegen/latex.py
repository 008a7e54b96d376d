"""Printing a derivation: a LaTeX align* block, Markdown with math between $$, or SymPy's pretty text."""
import re

import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.printing.latex import LatexPrinter

from derive.derivation_steps import continues

FORMATS = ("latex", "markdown", "text")
# KaTeX's strict mode refuses _ and ^ in \text{}, and the rest are LaTeX's special characters.
UNPRINTABLE_IN_TEXT = re.compile(r"[_^\\{}$&#%~]")


class DerivationPrinter(LatexPrinter):
    """SymPy's LaTeX, with a derivative of a name written as a reader writes it: dL/dx_j as a fraction."""

    def _print_Derivative(self, expr):
        (var, count), = expr.variable_count
        if count == 1 and isinstance(expr.expr, (sp.Symbol, sp.Indexed, AppliedUndef)):
            return rf"\frac{{\partial {self._print(expr.expr)}}}{{\partial {self._print(var)}}}"
        return super()._print_Derivative(expr)


def latex(expr):
    return DerivationPrinter().doprint(expr)


def text(words):
    """words for \\text{...}, refusing what would not render there."""
    if UNPRINTABLE_IN_TEXT.search(words):
        raise ValueError(f"{words!r}: a rule is plain words, without any of _ ^ \\ {{ }} $ & # % ~")
    return rf"\text{{{words}}}"


def equation(step):
    """One step as a LaTeX equation, with its condition after it."""
    where = rf" \qquad ({latex(step.condition)})" if step.condition is not None else ""
    return f"{latex(step.lhs)} = {latex(step.rhs)}{where}"


def format_latex(derivation):
    """An align* block a user can paste into a paper: lhs &= rhs && (n) rule, one step a row."""
    rows = []
    for number, step in enumerate(derivation.steps):
        lhs = "" if continues(derivation.steps, number) else latex(step.lhs)
        where = rf" \quad ({latex(step.condition)})" if step.condition is not None else ""
        rows.append(rf"{lhs} &= {latex(step.rhs)}{where} && {text(f'({number + 1}) {step.rule}')}")
    return "\\begin{align*}\n" + " \\\\\n".join(rows) + "\n\\end{align*}"


def format_markdown(derivation):
    """Each step as its number and rule, then its equation between $$ (GitHub renders those)."""
    return "\n\n".join(f"({number}) {step.rule}\n\n$$\n{equation(step)}\n$$"
                       for number, step in enumerate(derivation.steps, 1))


def format_text(derivation):
    """Each step as its number and rule, then the equation pretty-printed for a terminal."""
    def header(number, step):
        where = f", where {sp.pretty(step.condition)}" if step.condition is not None else ""
        return f"({number}) {step.rule}{where}"
    return "\n\n".join(f"{header(number, step)}\n{sp.pretty(sp.Eq(step.lhs, step.rhs, evaluate=False))}"
                       for number, step in enumerate(derivation.steps, 1))


def format_derivation(derivation, fmt):
    """derivation printed in fmt, one of FORMATS, with its title first."""
    if fmt == "latex":
        return f"% {derivation.title}\n{format_latex(derivation)}"
    if fmt == "markdown":
        return f"**{derivation.title}**\n\n{format_markdown(derivation)}"
    if fmt == "text":
        return f"{derivation.title}\n\n{format_text(derivation)}"
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
