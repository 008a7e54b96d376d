"""Every constructor option of every generated class is checked in the constructor, from its declaration:
a wrong type is a TypeError, a value outside the declared range a ValueError, each naming the class, the
option and the value; PyTorch's refusals are ours. Parametrized over the catalog (and generated.fast)."""
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import generated
from codegen.pipeline import codegen
from codegen.write import import_package
from derive.catalog import CATALOG
from derive.declare import COMPARISONS, DeclarationError, activation, elementwise_loss
from derive.ops import Op, Param, Range, build_catalog

# the Op classes; an index-notation op's options (Linear's l2) are tested with its class below
OPS = [op for op in CATALOG.values() if isinstance(op, Op)]
try:
    from generated import fast
except ImportError:  # no numba: the NumPy classes alone
    fast = None
# every generated layer and loss: its NumPy class and, where one was generated, its fused one
CLASSES = [(op, package) for op in OPS for package in (generated, fast)
           if package is not None and hasattr(package, op.name)]
SCALARS = [(op, param, package) for op, package in CLASSES for param in op.params if param.kind == "scalar"]
WEIGHTS = [(op, param, package) for op, package in CLASSES for param in op.params if param.kind.endswith("weights")]
IGNORING = [(op, param, package) for op, package in CLASSES for param in op.params if param.kind == "ignore_index"]
FLAGS = [(op, param, package) for op, package in CLASSES for param in op.params if param.kind == "flag"]
CONSTRAINED = [(op, constraint, package) for op, package in CLASSES for constraint in op.constraints]
LOSSES = [(op, package) for op, package in CLASSES if op.kind == "loss"]
ids = lambda cases: [f"{case[0].name}-{case[1].name if isinstance(case[1], Param) else ''.join(case[1])}"  # noqa: E731
                     f"{'-fast' if case[-1] is fast else ''}" for case in cases]
NOT_NUMBERS = ["0.5", True, np.bool_(False), None, [1.0], np.array(1.0), 1j]


def make(op, package, **options):
    return getattr(package, op.name)(**options)


def names_all(excinfo, op, name, value):
    """Whether the error names the class, the option and the value."""
    text = str(excinfo.value)
    return text.startswith(f"{op.name}: {name} ") and f"got {value!r}" in text


def outside(bounds):
    """Values just outside a Range: NaN, each open finite end, the float past each closed one, and an
    infinity where its end is open."""
    values = [np.nan]
    for end, is_open, away in ((bounds.low, bounds.low_open, -np.inf), (bounds.high, bounds.high_open, np.inf)):
        if np.isfinite(end) or is_open:
            values.append(float(end if is_open else np.nextafter(end, away)))
    return values


def inside(bounds):
    """Values at the edge of a Range: each closed end (an infinity too) and the float inside each open finite one."""
    return [float(end if not is_open else np.nextafter(end, toward)) for end, is_open, toward in
            ((bounds.low, bounds.low_open, np.inf), (bounds.high, bounds.high_open, -np.inf))
            if np.isfinite(end) or not is_open]


@pytest.mark.parametrize("bounds, refused, accepted", [
    (Range.of("> 0"), [np.nan, 0.0, np.inf], [5e-324]),
    (Range.of("[0, 1]"), [np.nan, -5e-324, np.nextafter(1, 2)], [0.0, 1.0]),
    (Range.of("(-inf, 2]"), [np.nan, -np.inf, np.nextafter(2, 3)], [2.0]),
    (Range.of("[-inf, 0)"), [np.nan, 0.0], [-np.inf, -5e-324]),
    (Range(), [np.nan, -np.inf, np.inf], []),
])
def test_the_edges_of_a_range_are_where_the_tests_look(bounds, refused, accepted):
    """outside and inside, which the tests below read, find each end; an end is in the range when closed."""
    assert [repr(v) for v in outside(bounds)] == [repr(float(v)) for v in refused]  # NaN for NaN
    assert inside(bounds) == accepted
    assert not any(v in bounds for v in refused) and all(v in bounds for v in accepted)


@pytest.mark.parametrize("text, expected", [
    ("> 0", Range(0.0, np.inf, True, True)), (">= -1.5", Range(-1.5, np.inf, False, True)),
    ("< 2", Range(-np.inf, 2.0, True, True)), ("<=1e3", Range(-np.inf, 1000.0, True, False)),
    ("[0, 1]", Range(0.0, 1.0, False, False)), ("(0,1]", Range(0.0, 1.0, True, False)),
    ("[ -1 , 1 )", Range(-1.0, 1.0, False, True)), ("(0, inf]", Range(0.0, np.inf, True, False)),
])
def test_a_range_reads_comparisons_and_intervals(text, expected):
    assert Range.of(text) == expected


@pytest.mark.parametrize("params, message", [
    ({"alpha": (1.0, "0")}, "parameter alpha: range '0' is none of"),
    ({"alpha": (1.0, "> x")}, "parameter alpha: range '> x': 'x' is not a number"),
    ({"alpha": (1.0, "> nan")}, "parameter alpha: range '> nan': 'nan' is not a number"),
    ({"alpha": (0.5, "[1, 0]")}, r"parameter alpha: range '\[1, 0\]' holds at most one value"),
    ({"alpha": (1.0, "[1, 1]")}, r"parameter alpha: range '\[1, 1\]' holds at most one value"),
    ({"alpha": (0.5, "(0, 1")}, r"parameter alpha: range '\(0, 1' is none of"),
    ({"alpha": (1.0, 0)}, "parameter alpha: range 0 is none of"),
    ({"alpha": (1.0, "> 1")}, "parameter alpha's default 1.0 is outside its range '> 1'"),
    ({"alpha": (-1.0, "[0, 1]")}, r"parameter alpha's default -1.0 is outside its range '\[0, 1\]'"),
    ({"alpha": True}, "parameter alpha needs a finite number as default, got True"),
    ({"alpha": float("inf")}, "parameter alpha needs a finite number as default, got inf"),
    ({"alpha": (1.0, "> 0", "x")}, r"parameter alpha needs a finite number as default, got \(1.0, '> 0', 'x'\)"),
])
def test_a_malformed_range_or_a_default_outside_it_is_refused_naming_the_operation_and_parameter(params, message):
    with pytest.raises(DeclarationError, match=f"^Scaled: {message}"):
        activation("Scaled", "alpha*tanh(x)", params=params)


@pytest.mark.parametrize("constraints, message", [
    (("a <= c",), r"constraint 'a <= c' is not a comparison 'a <= b' \(<, <=, >, >=\) between two of its "
                  r"parameters \(a, b\)"),
    (("a == b",), "constraint 'a == b' is not a comparison"),
    (("a <= a",), "constraint 'a <= a' is not a comparison"),
    ((3,), "constraint 3 is not a comparison"),
    (("a > b",), "the defaults a=-1.0, b=1.0 break constraint 'a > b'"),
])
def test_a_malformed_constraint_or_one_the_defaults_break_is_refused(constraints, message):
    with pytest.raises(DeclarationError, match=f"^Clip: {message}"):
        activation("Clip", "Min(Max(x, a), b)", params={"a": -1.0, "b": 1.0}, constraints=constraints)
    with pytest.raises(DeclarationError, match=f"^Clip: {message}"):
        elementwise_loss("Clip", "(Min(Max(x, a), b) - t)**2", params={"a": -1.0, "b": 1.0}, constraints=constraints)


def declaration_problems(op):
    """What is wrong with op's options for the tests and the constructors: a default or an example outside its
    range, an example equal to the default, a constraint the defaults or the examples break."""
    scalars = [p for p in op.params if p.kind == "scalar"]
    problems = [f"{p.name}: default {p.default} outside {p.range}" for p in scalars if p.default not in p.range]
    problems += [f"{p.name}: example {p.example} outside {p.range} or the default" for p in scalars
                 if p.example not in p.range or p.example == p.default]
    for values in ({p.name: p.default for p in scalars}, {p.name: p.example for p in scalars}):
        problems += [f"{left} {relation} {right} broken by {values}" for left, relation, right in op.constraints
                     if not COMPARISONS[relation](values[left], values[right])]
    return problems


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_every_declared_default_and_example_is_in_its_range_and_meets_the_constraints(op):
    assert declaration_problems(op) == []


def test_declaration_problems_finds_an_example_outside_the_range_and_a_broken_constraint():
    eps = Param("eps", CATALOG["Huber"].params[0].symbol, 0.5, example=1.5, range=Range.of("[0, 1]"))
    other = Param("other", CATALOG["Huber"].params[0].symbol, 1.0, example=1.0)
    op = Op(name="Bad", kind="layer", summary="", source="", forward=CATALOG["ReLU"].forward,
            params=(eps, other), constraints=(("eps", "<", "other"),))
    assert len(declaration_problems(op)) == 3


@pytest.mark.parametrize("value", NOT_NUMBERS, ids=repr)
@pytest.mark.parametrize("op, param, package", SCALARS, ids=ids(SCALARS))
def test_a_scalar_option_that_is_no_real_number_is_a_type_error_naming_it(op, param, package, value):
    with pytest.raises(TypeError) as excinfo:
        make(op, package, **{param.name: value})
    assert names_all(excinfo, op, param.name, value), str(excinfo.value)
    assert f"of type {type(value).__name__}" in str(excinfo.value)


@pytest.mark.parametrize("op, param, package", SCALARS, ids=ids(SCALARS))
def test_a_scalar_option_outside_its_range_is_a_value_error_naming_it_and_its_range(op, param, package):
    for value in outside(param.range) + [10 ** 400 if param.range.high_open else -10 ** 400]:
        with pytest.raises(ValueError) as excinfo:
            make(op, package, **{param.name: value})
        assert names_all(excinfo, op, param.name, value), str(excinfo.value)
        assert "real number" in str(excinfo.value)


@pytest.mark.parametrize("op, param, package", SCALARS, ids=ids(SCALARS))
def test_a_scalar_option_at_the_edge_of_its_range_is_kept_as_a_float(op, param, package):
    integral = [int(param.default)] if int(param.default) in param.range else []
    for value in inside(param.range) + [param.default, param.example, np.float32(param.example)] + integral:
        stored = getattr(make(op, package, **{param.name: value}), param.name)
        assert type(stored) is float and stored == float(value), (value, stored)


@pytest.mark.parametrize("op, param, package", IGNORING, ids=ids(IGNORING))
def test_ignore_index_is_an_integer_not_a_bool(op, param, package):
    for value in (None, 1.5, -100.0, True, "1", np.bool_(True)):
        with pytest.raises(TypeError) as excinfo:
            make(op, package, **{param.name: value})
        assert names_all(excinfo, op, param.name, value) and "must be an integer" in str(excinfo.value)
    assert type(make(op, package, **{param.name: np.int64(-1)}).ignore_index) is int


@pytest.mark.parametrize("op, param, package", FLAGS, ids=ids(FLAGS))
def test_a_flag_is_true_or_false(op, param, package):
    for value in (1, 0.0, "yes", None, np.array(True)):
        with pytest.raises(TypeError) as excinfo:
            make(op, package, **{param.name: value})
        assert names_all(excinfo, op, param.name, value) and "must be True or False" in str(excinfo.value)
    assert getattr(make(op, package, **{param.name: np.bool_(not param.default)}), param.name) is (not param.default)


@pytest.mark.parametrize("op, param, package", WEIGHTS, ids=ids(WEIGHTS))
def test_weights_are_none_or_an_array_of_real_numbers(op, param, package):
    one_d = param.kind == "class_weights"
    refused = [(TypeError, ["a", "b", "c"], "must hold real numbers, got dtype <U1"),
               (TypeError, [True, False, True], "must hold real numbers, got dtype bool"),
               (TypeError, [1j, 2, 3], "must hold real numbers, got dtype complex128"),
               (ValueError, [[1.0, 2.0], [3.0]], "must be None or")]
    refused += [(ValueError, np.ones((2, 3)), "must be None or a 1-d array of real numbers, got shape (2, 3)"),
                (ValueError, 2.0, "must be None or a 1-d array of real numbers, got shape ()")] if one_d else []
    for error, value, text in refused:
        with pytest.raises(error, match=re.escape(f"{op.name}: {param.name} {text}")):
            make(op, package, **{param.name: value})
    assert getattr(make(op, package, **{param.name: None}), param.name) is None
    assert np.array_equal(getattr(make(op, package, **{param.name: [1, 2, 3]}), param.name), [1, 2, 3])


@pytest.mark.parametrize("op, package", LOSSES, ids=[f"{op.name}{'-fast' if p is fast else ''}" for op, p in LOSSES])
def test_a_reduction_other_than_mean_sum_none_is_a_value_error_naming_it(op, package):
    for value in ("avg", "Mean", None, 1, ["mean"]):
        with pytest.raises(ValueError) as excinfo:
            make(op, package, reduction=value)
        assert names_all(excinfo, op, "reduction", value), str(excinfo.value)
    for value in ("mean", "sum", "none", *op.means):   # and its own further means (KLDivLoss's batchmean)
        assert make(op, package, reduction=value).reduction == value


@pytest.mark.parametrize("op, constraint, package", CONSTRAINED, ids=ids(CONSTRAINED))
def test_options_that_break_a_declared_constraint_are_refused_naming_both(op, constraint, package):
    left, relation, right = constraint
    other = next(p.default for p in op.params if p.name == right)
    beyond = other + 1 if relation in ("<", "<=") else other - 1
    with pytest.raises(ValueError, match=re.escape(f"{op.name}: {left} {relation} {right} must hold, got "
                                                   f"{left}={beyond!r}, {right}={other!r}")):
        make(op, package, **{left: beyond})
    if "=" in relation:
        make(op, package, **{left: other})
    else:
        with pytest.raises(ValueError, match=re.escape(f"{left} {relation} {right} must hold")):
            make(op, package, **{left: other})


@pytest.mark.parametrize("arguments, error, text", [
    ((0, 2), ValueError, "Linear: in_features must be an integer > 0, got 0"),
    ((3, -1), ValueError, "Linear: out_features must be an integer > 0, got -1"),
    ((3, 2.5), TypeError, "Linear: out_features must be an integer > 0, got 2.5 of type float"),
    ((True, 2), TypeError, "Linear: in_features must be an integer > 0, got True of type bool"),
    (("3", 2), TypeError, "Linear: in_features must be an integer > 0, got '3' of type str"),
    ((3, 2, {"l2": -1.0}), ValueError, "Linear: l2 must be a finite real number >= 0, got -1.0"),
    ((3, 2, {"l2": np.nan}), ValueError, "Linear: l2 must be a finite real number >= 0, got nan"),
    ((3, 2, {"l2": np.inf}), ValueError, "Linear: l2 must be a finite real number >= 0, got inf"),
    ((3, 2, {"l2": "0.1"}), TypeError, "Linear: l2 must be a finite real number >= 0, got '0.1' of type str"),
    ((3, 2, {"dtype": np.float16}), TypeError, "Linear: dtype must be float32 or float64, got float16"),
    ((3, 2, {"dtype": "frog"}), TypeError, "Linear: dtype must be float32 or float64, got frog"),
    ((3, 2, {"rng": "seed"}), TypeError, "Linear: rng must be None, a seed or a numpy Generator, got 'seed'"),
    ((3, 2, {"rng": -1}), ValueError, "Linear: rng must be None, a seed or a numpy Generator, got -1"),
])
def test_linear_refuses_bad_arguments_naming_them(arguments, error, text):
    *sizes, options = arguments if isinstance(arguments[-1], dict) else (*arguments, {})
    with pytest.raises(error, match=f"^{re.escape(text)}"):
        generated.Linear(*sizes, **options)


def test_linear_keeps_its_arguments_in_plain_types():
    layer = generated.Linear(np.int64(3), 2, l2=np.float32(0.5), dtype="float32", rng=0)
    assert layer.W.shape == (3, 2) and layer.W.dtype == np.float32 and type(layer.l2) is float
    assert generated.Linear(3, 2, l2=0).l2 == 0.0


X, LABELS, DENSE = torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2, 3)
# (PyTorch's call, ours) with the same bad option; where PyTorch says TypeError, so do we
AS_PYTORCH = {
    "label_smoothing=1.5": (lambda: F.cross_entropy(X, LABELS, label_smoothing=1.5),
                            lambda: generated.SoftmaxCrossEntropy(label_smoothing=1.5)),
    "label_smoothing='a'": (lambda: F.cross_entropy(X, LABELS, label_smoothing="a"),
                            lambda: generated.SoftmaxCrossEntropy(label_smoothing="a")),
    "ignore_index=None": (lambda: F.cross_entropy(X, LABELS, ignore_index=None),
                          lambda: generated.SoftmaxCrossEntropy(ignore_index=None)),
    "ignore_index=1.5": (lambda: F.cross_entropy(X, LABELS, ignore_index=1.5),
                         lambda: generated.SoftmaxCrossEntropy(ignore_index=1.5)),
    "ignore_index=True": (lambda: F.cross_entropy(X, LABELS, ignore_index=True),
                          lambda: generated.SoftmaxCrossEntropy(ignore_index=True)),
    "reduction='avg'": (lambda: F.cross_entropy(X, LABELS, reduction="avg"),
                        lambda: generated.SoftmaxCrossEntropy(reduction="avg")),
    "weight of shape (2, 3)": (lambda: F.cross_entropy(X, LABELS, weight=torch.ones(2, 3)),
                               lambda: generated.SoftmaxCrossEntropy(weight=np.ones((2, 3)))),
    "delta=-1": (lambda: F.huber_loss(X, DENSE, delta=-1.0), lambda: generated.Huber(delta=-1)),
    "delta=0": (lambda: F.huber_loss(X, DENSE, delta=0.0), lambda: generated.Huber(delta=0)),
    "delta='a'": (lambda: F.huber_loss(X, DENSE, delta="a"), lambda: generated.Huber(delta="a")),
    "min_val > max_val": (lambda: F.hardtanh(X, 2.0, 1.0), lambda: generated.HardTanh(min_val=2.0, max_val=1.0)),
    "negative_slope='a'": (lambda: F.leaky_relu(X, "a"), lambda: generated.LeakyReLU(negative_slope="a")),
    "alpha='a'": (lambda: F.elu(X, "a"), lambda: generated.ELU(alpha="a")),
    "margin='a'": (lambda: F.multi_margin_loss(X, LABELS, margin="a"), lambda: generated.MulticlassHinge(margin="a")),
    "out_features=2.5": (lambda: torch.nn.Linear(3, 2.5), lambda: generated.Linear(3, 2.5)),
}


def raised(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 -- which error is the question
        return error
    return None


@pytest.mark.parametrize("case", list(AS_PYTORCH))
def test_what_pytorch_refuses_we_refuse_in_the_constructor(case):
    theirs, ours = (raised(call) for call in AS_PYTORCH[case])
    assert theirs is not None and isinstance(ours, (TypeError, ValueError)), (theirs, ours)
    assert isinstance(ours, TypeError) == isinstance(theirs, TypeError), (theirs, ours)


def test_label_smoothing_below_zero_is_refused_though_pytorch_checks_only_its_upper_end():
    """PyTorch's message says 0.0 <= label_smoothing <= 1.0, but with class labels it computes -0.5."""
    assert raised(lambda: F.cross_entropy(torch.randn(2, 3), LABELS, label_smoothing=-0.5)) is None
    with pytest.raises(ValueError, match=re.escape("SoftmaxCrossEntropy: label_smoothing must be a real number "
                                                   "in [0, 1], got -0.5")):
        generated.SoftmaxCrossEntropy(label_smoothing=-0.5)


def test_a_range_declared_on_a_users_operation_is_enforced_by_its_generated_class(tmp_path):
    ops = build_catalog(activation("Scaled", "alpha*tanh(x)", params={"alpha": (1.0, "> 0")}),
                        elementwise_loss("Band", "(Min(Max(x, low), high) - t)**2",
                                         params={"low": (-1.0, "[-2, 0]"), "high": 1.0}, constraints=("low < high",)))
    reports, changed = codegen(ops, tmp_path / "out", cache=None, backend="numpy")[:2]
    assert changed is not None, reports
    package = import_package(tmp_path / "out")
    for value in (0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match=re.escape(f"Scaled: alpha must be a finite real number > 0, got {value!r}")):
            package.Scaled(alpha=value)
    with pytest.raises(TypeError, match=re.escape("Scaled: alpha must be a finite real number > 0, got 'a' of type str")):
        package.Scaled(alpha="a")
    assert package.Scaled(alpha=5e-324).alpha == 5e-324
    with pytest.raises(ValueError, match=re.escape("Band: low must be a real number in [-2, 0], got 0.5")):
        package.Band(low=0.5)
    with pytest.raises(ValueError, match=re.escape("Band: low < high must hold, got low=-0.5, high=-0.5")):
        package.Band(low=-0.5, high=-0.5)
    with pytest.raises(ValueError, match=re.escape("Band: reduction must be one of ('mean', 'sum', 'none'), got 'avg'")):
        package.Band(reduction="avg")
    assert package.Band(low=-2, high=-1.5).forward(np.zeros(3), np.zeros(3)) == 2.25
