"""What new users' own declarations hit, each a regression test: wrong fused kernels, crashes on constant or
kinked derivatives, nested erf, rewrites that did not hold, ties, dtypes, tails that went NaN, runaway stages,
and kernels written without verification."""
import importlib
import math
import sys
import time

import mpmath
import numpy as np
import pytest
import sympy as sp

import codegen.pipeline as pipeline
from codegen.fused import FusedPrinter
from codegen.pipeline import codegen, summary
from codegen.printer import KernelPrinter
from codegen.stages import in_stage
from derive.functions import sigmoid
from derive.declare import DeclarationError, activation, elementwise_loss
from derive.ops import build_catalog

# name -> declaration: each crashed, hung or printed a wrong kernel before its fix
DECLARED = {
    "SigmoidSquared": activation("SigmoidSquared", "sigmoid(x)**2"),       # fused printed /v0*v0 for /(v0*v0)
    "Double": activation("Double", "2*x"),                                 # a constant derivative: IndexError
    "Identity": activation("Identity", "x"),
    "SignedSquare": activation("SignedSquare", "sign(x)*x**2"),            # DiracDelta could not print
    "PlusSign": activation("PlusSign", "x + sign(x)"),
    "ErfErf": activation("ErfErf", "erf(erf(x))"),                         # RecursionError
    "SigmoidErf": activation("SigmoidErf", "sigmoid(erf(x))"),
    "Deep": activation("Deep", "sigmoid(log(cosh((erf(x))**2)))"),         # ran for 15 minutes
    "ThreeMax": activation("ThreeMax", "Max(0, -x, x - 3) + 1"),          # too many values to unpack
    "AbsSigmoid": activation("AbsSigmoid", "Abs(sigmoid(x) - 0.5)"),       # re() and im(): read-only output
    "LogProduct": activation("LogProduct", "log((x + 5)*(x + 4))", domain=(-30.0, -6.0)),  # NaN below -5
    "TiedMax": activation("TiedMax", "Max(Abs(x), x)"),                    # backward 0 for x > 0
    "Swish": activation("Swish", "x/(1 + exp(-x))"),                       # backward NaN from x = 50
    "LogCoshExp": activation("LogCoshExp", "log(exp(x) + exp(-x))"),       # backward NaN from x = 50
    "Difference": elementwise_loss("Difference", "x - t"),                 # a constant derivative
    "AbsErf": elementwise_loss("AbsErf", "Abs(erf(t - x))"),
    "ExpAbove": elementwise_loss("ExpAbove", "Piecewise((exp(x), x > 2), (x, True))"),  # scalar g with out=
    "CappedLinear": elementwise_loss("CappedLinear", "Piecewise((x, x <= 1), (1, True))"),  # int64 gradient
    # found by the fuzzer: np.where of two numbers was float64; a loss constant on its domain; a gcd
    # that expanded (x - t)^5 into a polynomial cancelling to 1e-8
    "NumberChoice": activation("NumberChoice", "exp(Piecewise((atan(3*x), x + E > 0), (Piecewise((0, log(x) > 1), (E, True)), True)))"),
    "ConstantLoss": elementwise_loss("ConstantLoss", "x*0 + sign(log(sigmoid(tanh(x - t))))"),
    "SixthPower": elementwise_loss("SixthPower", "((Piecewise((x - t, t > 1/2), (pi, True)))**6 + 1/4)**(3/2)"),
    # a sigmoid of a piecewise value chose its stable branch by x alone in the fused mean kernel; a
    # condition on an option among conditions on arrays made np.logical_or.reduce fail
    "BranchSigmoid": elementwise_loss("BranchSigmoid", "sigmoid(Piecewise((x, x - t > 0), (t, True)))**(3/2)"),
    "OptionOr": elementwise_loss("OptionOr", "Piecewise((x**2, (x > t) | (alpha > 1)), (x, True))",
                                 params={"alpha": 2.0}),
    # found by the 2,000-declaration fuzz run: a max's derivative expanded into b' - b' + a', which lost a
    # small a' (0 for 5e-19); a constant cse split (v0 = -pi) made np.exp(v0) float64; erf of an option
    # alone is a NumPy scalar, which the erf kernel wrote into
    "TanhMaxExp": elementwise_loss("TanhMaxExp", "tanh(Max(exp((x - t)**3), x))"),
    "CoshMaxErf": elementwise_loss("CoshMaxErf", "Max(cosh(((erf(x - t))**2 + 1)**(-2)), x)"),
    "ExpOfExpPi": elementwise_loss("ExpOfExpPi", "sqrt(exp((x)/(exp(pi))))"),
    "ErfOfOption": elementwise_loss("ErfOfOption", "Min(x - t, erf(beta/2))", params={"beta": -0.5}),
    # SymPy's NumPy printer simplified the reference derivative's conditions until it recursed (for some hash seeds)
    "MaxSinhLogSigmoid": elementwise_loss("MaxSinhLogSigmoid", "Max(sinh(sqrt(1 + Abs(atan(t - x)))), log(sigmoid(x - t))/alpha + 3)",
                                          params={"alpha": 1.5}),
    # the README's example: log cosh overflowed to inf, and its derivative sinh/cosh to NaN, from |x - t| = 89 in float32
    "LogCosh": elementwise_loss("LogCosh", "log(cosh(x - t))"),
    "LogOnePlusSquare": activation("LogOnePlusSquare", "log(1 + x**2)"),    # 0 where x^2 < 1e-16 rounds away
    # make fuzz seed 5 #10: a condition comparing a Piecewise became SymPy's ITE, which the fused printer rewrote
    # into a Piecewise of comparisons: TypeError while printing (codegen.fused's _print_ITE)
    "ComparedPiecewise": elementwise_loss(
        "ComparedPiecewise", "Piecewise((sign((((x) * (x - t))**2 + 1)**(1/2)), erf(sigmoid(x - t)) > alpha), "
        "(Piecewise((t, Piecewise((3, x > 1/2), (x - t, True)) > alpha), (atan(x - t), True)), True))",
        params={"alpha": 2.0}),
    "SoftNorm": activation("SoftNorm", "sqrt(x**2 + 1)"),                   # inf from |x| = 1.3e154 (1.8e19 float32)
    # -inf where exp(-x^2) rounds to 1; checked by differences away from its pole at 0, where they lose the
    # digits of a slope near 2/x (a point 7e-4 from it was 8e-6 off): the tails are tested below
    "LogOneMinusExp": activation("LogOneMinusExp", "log(1 - exp(-x**2))", domain=(0.05, 3.0)),
    "XLogX": activation("XLogX", "x*log(x)", domain=(0.1, 3.0)),            # NaN (0 * -inf) at x = 0
    "Focal": elementwise_loss("Focal", "-(1 - sigmoid(x))**2*t*log(sigmoid(x)) - sigmoid(x)**2*(1 - t)*log(1 - sigmoid(x))"),
}


@pytest.fixture(scope="module")
def package(tmp_path_factory, unsurveyed):
    """The declarations generated, verified and published with both backends, imported."""
    out = tmp_path_factory.mktemp("trust") / "declared"
    reports, changed, _ = codegen(build_catalog(*DECLARED.values()), out, cache=None)
    assert changed, summary(reports)
    sys.path.insert(0, str(out.parent))
    try:
        yield importlib.import_module("declared"), importlib.import_module("declared.fast")
    finally:
        sys.path.remove(str(out.parent))
        for name in [m for m in sys.modules if m == "declared" or m.startswith("declared.")]:
            del sys.modules[name]


def both(package, name):
    return [getattr(module, name) for module in package]


def layer_gradient(cls, x):
    layer = cls()
    layer.forward(x)
    return layer.backward(np.ones_like(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_choice_between_numbers_keeps_xs_dtype(package, dtype):
    for cls in both(package, "NumberChoice"):
        assert cls().forward(np.array([-3.0, 1.0, 20.0], dtype)).dtype == dtype


def test_a_power_of_a_difference_is_not_expanded_into_cancelling_terms(package):
    x, t = np.array([1.6934443456666664]), np.array([1.6214464347404407])
    u = x - t
    for cls in both(package, "SixthPower"):
        loss = cls(reduction="none")
        loss.forward(x, t)
        np.testing.assert_allclose(loss.backward(np.ones(1)), 9 * np.sqrt(u ** 6 + 0.25) * u ** 5, rtol=1e-14)


@pytest.mark.parametrize("name", ["Double", "Identity", "PlusSign", "SignedSquare"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_constant_or_kinked_derivative_is_an_array_of_xs_shape_and_dtype(package, name, dtype):
    x = np.linspace(-2, 2, 12, dtype=dtype).reshape(3, 4)
    for cls in both(package, name):
        layer = cls()
        y = layer.forward(x)
        g = np.ones_like(x)
        dx = layer.backward(g)
        assert dx.shape == x.shape and dx.dtype == dtype and y.dtype == dtype
        assert dx is not g and y is not x, "a result is an array of its own, never an argument"
        slope = {"Double": 2.0, "Identity": 1.0, "PlusSign": 1.0}.get(name)
        expected = np.full_like(x, slope) if slope else 2 * np.abs(x)  # sign's derivative is 0 off 0
        np.testing.assert_allclose(dx, expected, rtol=1e-6)


def test_the_fused_square_of_a_sigmoid_divides_by_the_whole_power(package):
    x = np.linspace(-3, 3, 7)
    s = 1 / (1 + np.exp(-x))
    for cls in both(package, "SigmoidSquared"):
        np.testing.assert_allclose(layer_gradient(cls, x), 2 * s * s * (1 - s), rtol=1e-12)


def test_nested_erf_is_one_call_of_the_generated_erf(package):
    x = np.linspace(-4, 4, 9)
    expected = np.array([math.erf(math.erf(v)) for v in x])
    for cls in both(package, "ErfErf"):
        np.testing.assert_allclose(cls().forward(x), expected, rtol=1e-14, atol=1e-16)


def test_a_tie_between_max_arguments_keeps_the_slope_they_share(package):
    x = np.array([-2.0, -0.5, 0.5, 2.0])
    for cls in both(package, "TiedMax"):
        np.testing.assert_array_equal(layer_gradient(cls, x), [-1.0, -1.0, 1.0, 1.0])


def test_max_of_three_arguments_takes_the_largest_ones_slope(package):
    x = np.array([-2.0, 1.0, 5.0])
    for cls in both(package, "ThreeMax"):
        np.testing.assert_array_equal(layer_gradient(cls, x), [-1.0, 0.0, 1.0])


def test_a_log_of_a_product_of_negative_factors_is_not_split(package):
    for cls in both(package, "LogProduct"):
        np.testing.assert_allclose(cls().forward(np.array([-20.0])), [math.log(15 * 16)], rtol=1e-14)


@pytest.mark.parametrize("name, slope", [("Swish", lambda x: 1 / (1 + math.exp(-x)) * (1 + x - x / (1 + math.exp(-x)))),
                                         ("LogCoshExp", math.tanh)])
def test_derivatives_stay_finite_and_right_in_float32_tails(package, name, slope):
    x = np.array([-100, -50, -20, 0.5, 20, 50, 100], np.float32)
    for cls in both(package, name):
        dx = layer_gradient(cls, x)
        np.testing.assert_allclose(dx, [slope(float(v)) for v in x], rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["Difference", "CappedLinear", "ExpAbove", "ConstantLoss", "SixthPower", "OptionOr",
                                  "ExpOfExpPi", "ErfOfOption"])
def test_a_loss_gradient_has_xs_dtype_and_shape_whatever_the_reduction(package, name, dtype, reduction):
    x = np.linspace(-1, 3, 12, dtype=dtype).reshape(3, 4)
    t = np.zeros_like(x)
    # the fused class at float32 alone: numba compiles each dtype apart (seconds each), and float32 is the
    # dtype a kernel could lose (float64 is what it computes in by default); and not under sum, whose kernel is the
    # mean's but for the scale (compiling ErfOfOption's erf once more costs 10 s)
    for cls in both(package, name)[:1 if dtype == np.float64 or reduction == "sum" else None]:
        loss = cls(reduction=reduction)
        value = loss.forward(x, t)
        dx = loss.backward(np.ones_like(x)) if reduction == "none" else loss.backward()
        assert dx.shape == x.shape and dx.dtype == dtype and np.asarray(value).dtype == dtype


def test_a_small_slope_of_one_max_argument_is_not_lost_beside_the_others(package):
    x, t = np.array([-1.96716819270086, 0.5]), np.array([1.5263258457923987, 0.0])
    u = np.exp((x - t) ** 3)
    expected = np.where(u > x, 3 * (x - t) ** 2 * u * (1 - np.tanh(np.maximum(u, x)) ** 2), 0)
    for cls in [module.TanhMaxExp for module in package if hasattr(module, "TanhMaxExp")]:  # fused has no tanh
        loss = cls(reduction="none")
        loss.forward(x, t)
        np.testing.assert_allclose(loss.backward(np.ones(2)), expected, rtol=1e-13)


def test_a_step_in_a_sum_becomes_branches_that_agree_with_it_at_and_off_the_kink():
    from derive.stability import steps_as_branches
    a, b = sp.symbols("a b", real=True)
    derivative = sp.expand((sp.Heaviside(a - b, 0) * sp.exp(a) + (1 - sp.Heaviside(a - b, 0)) * b) * sp.cosh(a))
    rewritten = steps_as_branches(derivative)
    assert sp.count_ops(rewritten) < sp.count_ops(derivative)
    for point in [(0.5, -1.0), (-1.0, 0.5), (0.25, 0.25), (30.0, 2.0)]:
        values = dict(zip((a, b), point))
        assert rewritten.subs(values) == derivative.subs(values)
    assert steps_as_branches(sp.Heaviside(a, 0) * b) == sp.Heaviside(a, 0) * b  # a product has nothing to cancel


def test_log_softmax_subtracts_the_row_max_before_the_log_sum():
    import generated
    import generated.fast
    x = np.array([[0.0, 1e4, 1e4]], np.float32)
    for cls in (generated.LogSoftmax, generated.fast.LogSoftmax):
        assert cls().forward(x)[0, 1] == np.float32(-math.log(2))


def test_a_stage_past_its_budget_or_raising_is_one_line_naming_the_operation_and_stage():
    with pytest.raises(DeclarationError, match=r"^Slow: deriving took more than 0.2 s"):
        with in_stage("Slow", "deriving", seconds=0.2):
            time.sleep(5)
    with pytest.raises(DeclarationError, match=r"^Broken: printing failed: IndexError: list index out of range$"):
        with in_stage("Broken", "printing"):
            [][0]


def test_the_numpy_backend_alone_writes_no_fast_folder(tmp_path):
    out = tmp_path / "pkg"
    reports, changed, _ = codegen(build_catalog(DECLARED["Double"]), out, cache=None, backend="numpy")
    assert changed and not (out / "fast").exists() and [r.name for r in reports] == ["Double"]


def test_without_numba_the_fast_backend_is_refused_and_all_writes_numpy_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "numba_installed", lambda: False)
    with pytest.raises(DeclarationError, match="--backend fast needs numba"):
        codegen(build_catalog(DECLARED["Double"]), tmp_path / "pkg", cache=None, backend="fast")
    assert not (tmp_path / "pkg").exists()
    reports, changed, _ = codegen(build_catalog(DECLARED["Double"]), tmp_path / "pkg", cache=None)
    assert changed and not (tmp_path / "pkg" / "fast").exists()


def test_a_failing_fused_kernel_says_its_numpy_twin_passed(tmp_path, monkeypatch):
    real = FusedPrinter._print_Pow
    monkeypatch.setattr(FusedPrinter, "_print_Pow", lambda self, e, rational=False: real(self, e).replace("*", "/", 1)
                        if e.exp == 2 else real(self, e))
    reports, changed, _ = codegen(build_catalog(DECLARED["SigmoidSquared"]), tmp_path / "pkg", cache=None)
    assert changed is None and not (tmp_path / "pkg").exists()
    assert [r.ok for r in reports] == [True, False]
    assert "the NumPy kernels passed; the fused kernels of SigmoidSquared did not" in summary(reports)
    assert "--backend numpy" in summary(reports)


# The class of the fused printer's bug: a form printed as a product or a quotient placed by the precedence of
# a power. Every printer's output is evaluated against SymPy on expressions built to put powers, reciprocals
# and square roots in each position: divisor, base, exponent, argument.
u, v = sp.symbols("u v", positive=True)
PLACES = [lambda a: 1 / a, lambda a: a ** 2, lambda a: a ** -2, lambda a: a ** 3, lambda a: sp.sqrt(a),
          lambda a: 1 / sp.sqrt(a), lambda a: a ** sp.Rational(3, 2), lambda a: v ** a, lambda a: sp.exp(-a),
          lambda a: v / a, lambda a: a / (v + 1), lambda a: -a, lambda a: a * v]
AT = {u: 0.7, v: 1.3}
NESTED = [e for outer in PLACES for inner in PLACES for e in [outer(inner(u + 1))] if e.subs(AT).is_real]


# what either backend's printed code calls, as Python's math computes it
SCOPE = {"np": np, "math": math, "T": float, "maximum": max, "minimum": min, "exp": math.exp, "log1p": math.log1p,
         "erf": math.erf}


def evaluate(code, values):
    """A printed expression's value."""
    return float(eval(code, dict(SCOPE, **values)))  # noqa: S307 (our own printers' output)


@pytest.mark.parametrize("printer", [KernelPrinter, FusedPrinter])
def test_every_printed_power_quotient_and_root_evaluates_as_sympy_does(printer):
    wrong = [(str(expr), code) for expr in NESTED for code in [printer().doprint(expr)]
             if not math.isclose(evaluate(code, {s.name: value for s, value in AT.items()}), float(expr.subs(AT)),
                                 rel_tol=1e-12)]
    assert not wrong, wrong


def test_the_printer_check_catches_a_precedence_bug(monkeypatch):
    real = FusedPrinter._print_Pow  # the bug as it was: a power printed as a product, unparenthesized
    monkeypatch.setattr(FusedPrinter, "_print_Pow", lambda self, e, rational=False: "*".join(
        [self.parenthesize(e.base, 60, strict=True)] * int(e.exp)) if e.exp.is_Integer and 0 < e.exp <= 4
        else real(self, e))
    with pytest.raises(AssertionError):
        test_every_printed_power_quotient_and_root_evaluates_as_sympy_does(FusedPrinter)


def test_the_generated_erf_is_within_a_few_ulps_of_maths_in_both_backends():
    import numba

    import generated._special
    import generated.fast._runtime as runtime
    fused = numba.njit(lambda values: np.array([runtime.erf(v) for v in values]))
    x = np.concatenate([np.linspace(-6, 6, 4001), [0.0, -0.0, 2.0, -2.0, 1e-300, 30.0, 100.0]])
    for dtype, ulps in ((np.float64, 4), (np.float32, 6)):  # as measured: the series summed in float32
        values = x.astype(dtype)
        truth = np.array([math.erf(float(v)) for v in values]).astype(dtype)
        spacing = np.spacing(np.maximum(np.abs(truth), np.finfo(dtype).tiny))
        for erf in (generated._special.erf, fused):
            result = erf(values)
            assert result.dtype == dtype
            assert np.max(np.abs(result - truth) / spacing) <= ulps


def test_the_generated_erfc_is_within_a_few_ulps_of_maths_in_both_backends_however_small():
    import numba

    import generated._special
    import generated.fast._runtime as runtime
    from derive.special import erfc_tail_polynomial
    assert erfc_tail_polynomial()[1] < 2.0 ** -55               # the fit itself, relative to the tail's value
    fused = numba.njit(lambda values: np.array([runtime.erfc(v) for v in values]))
    x = np.concatenate([np.linspace(-6, 27, 6601), [0.0, -0.0, 0.5, -0.5, 1e-300, -30.0, 30.0, 100.0]])
    for dtype, ulps in ((np.float64, 6), (np.float32, 6)):
        values = x.astype(dtype)
        truth = np.array([math.erfc(float(v)) for v in values]).astype(dtype)
        normal = np.abs(truth) >= np.finfo(dtype).tiny                # a flushed subnormal is within the contract
        spacing = np.spacing(np.abs(truth[normal]))
        for erfc in (generated._special.erfc, fused):
            result = erfc(values)
            assert result.dtype == dtype
            assert np.max(np.abs(result[normal] - truth[normal]) / spacing) <= ulps, (dtype, erfc)
            assert (np.abs(result[~normal]) <= np.finfo(dtype).tiny).all()


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"weight": np.array([1.0, 2.0, 0.5])}])
def test_softmax_cross_entropy_subtracts_the_row_max_before_the_log_sum_on_every_path(options):
    import generated
    import generated.fast
    x, labels = np.array([[0.0, 1e4, 1e4]], np.float32), np.array([1])
    truth = generated.SoftmaxCrossEntropy(**options).forward(x.astype(np.float64), labels)
    for cls in (generated.SoftmaxCrossEntropy, generated.fast.SoftmaxCrossEntropy):
        assert abs(cls(**options).forward(x, labels) - truth) <= 2 * np.spacing(np.float32(truth))


def test_an_operation_whose_module_would_shadow_the_fast_package_is_refused():
    with pytest.raises(ValueError, match="module name 'fast'"):
        build_catalog(activation("Fast", "x"))


def test_fused_kernels_run_interpreted_see_maths_values_as_numba_compiles_them():
    compiled = pipeline.CompiledMath()
    assert compiled.log(0.0) == -math.inf and compiled.log1p(-1.0) == -math.inf and compiled.exp(1000.0) == math.inf
    assert math.isnan(compiled.log(-1.0)) and math.isnan(compiled.sqrt(-1.0)) and compiled.inf == math.inf
    assert compiled.tanh(0.5) == math.tanh(0.5)


def test_a_fused_sigmoid_of_a_piecewise_value_equals_the_numpy_one(package):
    x, t = np.array([[0.3, -1.2], [2.0, 0.1]]), np.array([[1.0, -2.0], [0.5, 0.7]])
    numpy_loss, fused_loss = both(package, "BranchSigmoid")
    assert fused_loss().forward(x, t) == pytest.approx(numpy_loss().forward(x, t), rel=1e-14)


def test_a_fused_kernel_that_disagrees_with_its_numpy_twin_is_refused(tmp_path, monkeypatch):
    import codegen.fused as fused
    # t read as 1.01 t by the fused kernels alone: their values and gradients in x agree with each other
    monkeypatch.setattr(fused, "sigmoid_by_branches", lambda e: e.xreplace({sp.Symbol("t"): 1.01 * sp.Symbol("t")}))
    reports, changed, _ = codegen(build_catalog(DECLARED["BranchSigmoid"]), tmp_path / "pkg", cache=None)
    assert changed is None and [r.ok for r in reports] == [True, False]
    assert all("against NumPy" in failure for failure in reports[1].failures)


def test_a_tiny_slope_of_a_large_sum_is_within_the_finite_differences_noise_and_a_wrong_one_is_not():
    from codegen.verify import check_gradient
    x = np.linspace(-1, 1, 20)
    f = lambda z: float(np.sum(np.sin(z) * 1e-8 + 1.0))  # noqa: E731 (a sum of 20 losses near 1)
    assert check_gradient(f, x, 1e-8 * np.cos(x)).ok
    assert not check_gradient(f, x, 1e-8 * np.cos(x) + 1e-2).ok


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_cosh_and_its_derivative_stay_finite_and_right_in_the_tails(package, dtype):
    u = np.array([-1e4, -800.0, -100.0, -0.5, 0.0, 0.5, 100.0, 800.0, 1e4])
    expected = [float(mpmath.log(mpmath.cosh(v))) for v in u]
    for cls in both(package, "LogCosh"):
        loss = cls(reduction="none")
        value = loss.forward(u.astype(dtype), np.zeros(len(u), dtype))
        np.testing.assert_allclose(value, expected, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-7)
        np.testing.assert_allclose(loss.backward(np.ones(len(u), dtype)), np.tanh(u), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", ["log_cosh", "tanh_quotients", "log_one_plus", "root_of_squares",
                                  "log_one_minus_exp", "one_minus_sigmoid", "one_minus_tanh_squared", "x_log_y"])
def test_the_tail_rewrites_keep_the_value_to_50_digits(rule):
    import derive.stability as stability
    u = sp.Symbol("u", real=True)
    expr = {"log_cosh": 3 * sp.log(sp.cosh(u - 2)) + u, "tanh_quotients": u * sp.sinh(u + 1) / sp.cosh(u + 1),
            "log_one_plus": sp.log(1 + u ** 2) * sp.log(3 + u ** 2),
            "root_of_squares": u * sp.sqrt((u - 1) ** 2 + 3) + 1 / sp.sqrt(u ** 2 + sp.Rational(1, 2)),
            # defined for every u: the exponent is below 0; both branches are taken at these points
            "log_one_minus_exp": sp.log(1 - sp.exp(-u ** 2 - sp.Rational(1, 10))) * u,
            # the product form, the expanded one, and a sum around them
            "one_minus_sigmoid": sigmoid(u) * (1 - sigmoid(u)) + 3 * sigmoid(u + 1) - 3 * sigmoid(u + 1) ** 2 + u,
            "one_minus_tanh_squared": u * (1 - sp.tanh(u - 2) ** 2) + 2 * sp.tanh(u) - 2 * sp.tanh(u) ** 3,
            # c log v for a target c (v > 0 here, where both sides are defined: at c = 0 the right one is 0)
            "x_log_y": t_symbol * sp.log(u ** 2 + 1) + u}[rule]
    rewritten = getattr(stability, rule)(expr)
    assert rewritten != expr
    for point in (-300, -20, -1, 0, sp.Rational(1, 3), 5, 300):
        before, after = (sp.N(e.subs({u: point, t_symbol: sp.Rational(3, 7)}).rewrite(sp.exp), 50)
                         for e in (expr, rewritten))
        assert abs(before - after) <= sp.Float(10) ** -45 * max(1, abs(before)), (point, before, after)


t_symbol = sp.Symbol("t", real=True)


def test_x_log_y_is_0_where_the_weight_is_0_even_at_a_log_of_0():
    import derive.stability as stability
    u = sp.Symbol("u", real=True)
    rewritten = stability.x_log_y(t_symbol * sp.log(u))
    assert rewritten.subs({t_symbol: 0, u: 0}) == 0 and rewritten.subs({t_symbol: 2, u: 3}) == 2 * sp.log(3)
    assert stability.x_log_y(u * sp.log(u + 1)) == u * sp.log(u + 1)  # x's own weight: never rewritten


def test_log_of_one_plus_a_tiny_value_keeps_it(package):
    x = np.array([1e-10, -3e-9, 1e-4, 2.0])
    for cls in both(package, "LogOnePlusSquare"):
        np.testing.assert_allclose(cls().forward(x), np.log1p(x ** 2), rtol=1e-14)
        np.testing.assert_allclose(layer_gradient(cls, x), 2 * x / (1 + x ** 2), rtol=1e-14)


@pytest.mark.parametrize("dtype, big", [(np.float64, 1e200), (np.float32, 1e30)])
def test_a_root_of_squares_is_finite_and_right_where_the_square_overflows(package, dtype, big):
    x = np.array([-big, -3e19, -2.0, 0.0, 1e-3, 5.0, 3e19, big], dtype)
    exact = np.hypot(x.astype(np.float64), 1.0)
    for cls in both(package, "SoftNorm"):
        with np.errstate(over="raise"):
            np.testing.assert_allclose(cls().forward(x), exact, rtol=1e-6 if dtype == np.float32 else 1e-15)
            np.testing.assert_allclose(layer_gradient(cls, x), x / exact, rtol=1e-6 if dtype == np.float32 else 1e-15)


def test_log_one_minus_exp_is_right_near_0_and_far_from_it(package):
    x = np.array([1e-10, 1e-5, 0.3, 0.8, 1.0, 3.0, 5.0, 20.0])
    with mpmath.workdps(250):  # 1 - exp(-400) holds 174 zeros before its digits
        exact = [float(mpmath.log(-mpmath.expm1(-mpmath.mpf(v) ** 2))) for v in x]
    for cls in both(package, "LogOneMinusExp"):
        np.testing.assert_allclose(cls().forward(x), exact, rtol=1e-14)


def test_x_log_x_is_its_limit_at_0_and_unchanged_elsewhere(package):
    import derive.stability as stability
    u, v = sp.Symbol("u", positive=True), sp.Symbol("v", nonnegative=True)
    assert sp.limit(u * sp.log(u), u, 0, "+") == 0  # the value the rewrite gives at 0
    rewritten = stability.x_log_x(3 * v * sp.log(v))
    assert rewritten.subs(v, 0) == 0 and all(rewritten.subs(v, w) == 3 * w * sp.log(w) for w in (sp.Rational(1, 7), 2))
    assert stability.x_log_x(u * sp.log(u)) == u * sp.log(u)  # never 0: nothing to extend
    x = np.array([0.0, 1e-300, 1e-5, 0.5, 2.0])
    for cls in both(package, "XLogX"):
        with np.errstate(divide="ignore", invalid="ignore"):  # np.where evaluates log(0) in the branch not taken
            np.testing.assert_allclose(cls().forward(x), [0.0, *(v * math.log(v) for v in x[1:])], rtol=1e-15)
