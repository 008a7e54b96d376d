"""derive.zeros: near a zero where a kernel's terms cancel, the Taylor polynomial there (codegen.kernels.Near).

Each polynomial is checked against the function at 50 digits over its whole interval; the generated kernels near
the zeros are checked by the accuracy survey, whose grid holds each zero and points around it
(codegen.accuracy.zeros); and the survey is shown to catch the kernels printed without them."""
import mpmath
import numpy as np
import pytest
import sympy as sp

from codegen import accuracy
from codegen.kernels import layer_kernels
from codegen.pipeline import imported
from codegen.render import render_package
from codegen.write import stage
from derive.catalog import CATALOG
from derive.ops import build_catalog
from derive.zeros import even_zeros, mpmath_function, near_zeros, real_zeros

x = sp.Symbol("x", real=True)
WITH_NEAR = [name for name, op in CATALOG.items() if type(op).__name__ == "Op" and op.kind == "layer"
             and any(kernel.near for kernel in layer_kernels(op))]


def test_the_activations_whose_derivative_cancels_at_its_zero_have_one_and_silu_does_not_need_it():
    # SiLU's derivative cancels at its zero too, but within the allowance (derive.zeros.loses): its kernel's
    # worst there is 0.82 of it
    assert {"GELU", "GELUTanh", "Mish"} <= set(WITH_NEAR) and "SiLU" not in WITH_NEAR


@pytest.mark.parametrize("name", WITH_NEAR)
def test_each_polynomial_is_its_function_to_the_last_bits_over_its_interval(name):
    """The polynomial printed (in x, and g) against the derived quantity at 50 digits, at 41 points of the
    interval: within 2^-52 of the value, plus 2^-60 of x times the slope (the value near the zero is the slope
    times x's distance from it, which the centre's rounding moves by half an ulp of x)."""
    for kernel in layer_kernels(CATALOG[name]):
        (output, quantity), = kernel.outputs
        for near in kernel.near:
            (_, value), = near.kernel.outputs
            unit = {s: x if s.name == "x" else sp.S.One for s in value.free_symbols}
            polynomial = mpmath_function(value.xreplace(unit), x)
            truth = mpmath_function(exact_quantity(name, kernel.name), x)
            with mpmath.workdps(50):
                for point in np.linspace(near.center - near.radius, near.center + near.radius, 41):
                    p, f = mpmath.mpf(float(point)), truth(mpmath.mpf(float(point)))
                    slope = mpmath.diff(truth, p)
                    assert abs(polynomial(p) - f) <= 2.0 ** -52 * abs(f) + 2.0 ** -60 * abs(p * slope), (name, point)


def exact_quantity(name, kernel):
    """The op's forward (y) or its derivative (dx per unit g), in x alone."""
    op = CATALOG[name]
    y = op.forward.replace(lambda e: isinstance(e, sp.Indexed), lambda e: x)
    return y if kernel == "forward" else sp.diff(y, x)


def test_a_zero_of_a_product_is_left_alone_and_a_cancelling_sum_is_not():
    assert near_zeros(x * sp.erf(x), x * sp.erf(x), x) == ()          # x erf(x) at 0: a product, exact
    assert near_zeros(sp.exp(x) - 2, sp.exp(x) - 2, x) == ()            # cancelling, within the allowance
    (found,) = near_zeros(x - sp.tanh(x), x - sp.tanh(x), x)          # a triple zero at 0: x^3/3, the sum
    assert found.center == 0 and found.radius > 0.1                     # cancelling all around it


def test_an_even_zero_is_found_where_the_slope_changes_sign_and_the_function_vanishes():
    touching = (x - sp.Rational(1, 2)) ** 2 * sp.exp(x)       # 0 at 1/2 without changing sign
    f, terms = mpmath_function(touching, x), [mpmath_function(t, x) for t in sp.Add.make_args(sp.expand(touching))]
    assert real_zeros(touching, x, f, terms) == []
    assert [float(z) for z in even_zeros(touching, x, f, terms)] == [0.5]
    slope = sp.diff(x * (1 + sp.exp(-x)) ** -1, x)            # SiLU's: its extremum at -2.4 is no zero of it
    f, terms = mpmath_function(slope, x), [mpmath_function(t, x) for t in sp.Add.make_args(sp.expand(slope))]
    assert even_zeros(slope, x, f, terms) == []


def test_the_grid_holds_a_derivatives_even_zero_where_the_function_is_not_0():
    # x^3 + 1 changes sign at -1; its derivative 3 x^2 touches 0 at 0, which only even_zeros finds
    X = accuracy.X
    assert accuracy.zeros_of((X ** 3 + 1, 3 * X ** 2), None) == [-1.0, 0.0]


@pytest.fixture(scope="module")
def sinh_less_x(tmp_path_factory):
    """sinh(x - 1) - x declared, printed as usual and without its polynomials (no Near): its derivative
    cosh(x - 1) - 1 vanishes at 1 without changing sign, its terms cancelling (0 in float64 at 1 + 1e-9, where
    it is 5e-19), and the function is -1 there: a zero that only even_zeros finds."""
    from derive.declare import activation
    op = activation("SinhLessX", "sinh(x - 1) - x")
    folder = tmp_path_factory.mktemp("sinh-less-x")
    packages = {"with": imported(stage(render_package(build_catalog(op), True), folder), fused=True)}
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr("codegen.kernels.near_kernels", lambda *args: ())
    try:
        packages["without"] = imported(stage(render_package(build_catalog(op), True), folder), fused=True)
    finally:
        monkeypatch.undo()
    return accuracy.Subject(op.name, op, (sp.sinh(accuracy.X - 1) - accuracy.X,), (None,), "declared"), packages


def test_a_derivatives_even_zero_gets_its_polynomial_and_the_grid_catches_the_kernel_without(sinh_less_x):
    subject, packages = sinh_less_x
    slope = sp.cosh(x - 1) - 1
    assert [near.center for near in near_zeros(slope, slope, x)] == [1.0]

    def failing(package):
        return {key[1:] for key, tally in accuracy.Survey([subject], package, quick=True).run().items()
                if tally.failures}
    assert failing(packages["with"]) == set()
    assert ("numpy", "float64", "backward") in failing(packages["without"])
    with pytest.MonkeyPatch.context() as monkeypatch:   # the grid as it was: sign changes alone
        monkeypatch.setattr("derive.zeros.even_zeros", lambda *args: [])
        accuracy.zeros_of.cache_clear()
        try:
            assert failing(packages["without"]) == set()
        finally:
            accuracy.zeros_of.cache_clear()


def test_a_sign_made_up_by_the_scans_own_rounding_is_no_zero():
    # erf(x) + 1 underflows to 0 in doubles below x = -6, where the scan sees signs of rounding noise
    gelu_slope = sp.diff(x * (1 + sp.erf(x / sp.sqrt(2))) / 2, x)
    assert [round(z.center, 4) for z in near_zeros(gelu_slope, gelu_slope, x)] == [-0.7518]


@pytest.fixture(scope="module")
def without_near(tmp_path_factory, request):
    """GELU, Mish and GELUTanh printed as before derive.zeros: the usual form everywhere."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr("codegen.kernels.near_kernels", lambda *args: ())
    try:
        catalog = build_catalog(*(CATALOG[name] for name in ("GELU", "Mish", "GELUTanh")))
        staged = stage(render_package(catalog, True), tmp_path_factory.mktemp("without-near"))
    finally:
        monkeypatch.undo()
    return imported(staged, fused=True)


@pytest.mark.parametrize("name", ["GELU", "Mish", "GELUTanh"])
def test_the_survey_catches_the_kernels_printed_without_their_polynomials(name, without_near):
    tallies = accuracy.Survey([accuracy.subject(CATALOG[name])], without_near, quick=True).run()
    failing = {key[1:] for key, tally in tallies.items() if tally.failures}
    assert ("numpy", "float32", "backward") in failing or ("numpy", "float64", "backward") in failing, failing


def test_the_survey_looks_at_each_zero_and_around_it():
    points = accuracy.grid(accuracy.subject(CATALOG["GELU"]), np.float32, True)[None][:, 0]
    near = points[np.abs(points + 0.7518) < 0.71]
    assert np.float32(-0.7517915) in points and len(near) >= 26


def test_symgrad_derive_prints_the_polynomial_as_a_step_the_checker_holds():
    from derive.derivation_check import check_derivation
    from derive.derivations import derivation
    for name in ("gelu_stable", "mish_stable"):
        found = derivation(name)
        assert [step.rule for step in found.steps][-2:] == ["definition", "near a zero where its terms cancel"]
        assert all(verdict.ok for verdict in check_derivation(found)), name
    assert "near a zero where its terms cancel" not in [step.rule for step in derivation("silu_stable").steps]
