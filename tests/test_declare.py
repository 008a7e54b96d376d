"""Operations of your own: one declaration, derived, generated and verified; every error path refused."""
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import generated
from codegen.cli import main
from codegen.render import render_package
from codegen.write import import_package, stage
from codegen.verify import check_class, load_class
from derive.catalog import CATALOG
from derive.declare import DeclarationError, activation, add_declaration, declaration_source, elementwise_loss
from derive.ops import build_catalog

SYMGRAD = Path(sys.executable).parent / "symgrad"
GENERATED = Path(generated.__file__).parent
USER_OPS = '''
from derive.declare import activation, elementwise_loss

OPS = [
    activation("Swish", "x*sigmoid(x)"),
    activation("Bent", "(sqrt(x**2 + 1) - 1)/2 + x"),
    activation("Scaled", "scale*tanh(x/scale)", params={"scale": 2.0}),
    elementwise_loss("LogCosh", "log(cosh(x - t))"),
]
'''


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.py"))}


def declaration_file(tmp_path, body):
    path = tmp_path / "my_ops.py"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.parametrize("expr, message", [
    ("x*(", "cannot parse"),
    ("x*beta", "unknown symbol beta"),
    ("frobnicate(x)", "unknown function frobnicate"),
    (sp.floor(sp.Symbol("x", real=True)), "finds no derivative"),
    ("2", "2 does not depend on x: nothing to differentiate"),
])
def test_a_bad_expression_is_refused_naming_the_operation_and_the_problem(expr, message):
    with pytest.raises(DeclarationError, match=f"Bad: .*{message}"):
        activation("Bad", expr)


def test_a_loss_that_does_not_read_x_is_refused():
    with pytest.raises(DeclarationError, match="Bad: t\\*\\*2 does not depend on x"):
        elementwise_loss("Bad", "t**2")


@pytest.mark.parametrize("name, message", [("my-op", "not a valid Python identifier"), ("class", "not a valid"),
                                           ("swish", "start with a capital letter")])
def test_a_bad_name_is_refused_with_the_reason(name, message):
    with pytest.raises(DeclarationError, match=message):
        activation(name, "x")


def test_a_name_clashing_with_the_catalog_or_another_declaration_is_refused():
    with pytest.raises(ValueError, match="'Sigmoid': the name is taken by symgrad's own Sigmoid"):
        build_catalog(activation("Sigmoid", "x"), taken=CATALOG)
    with pytest.raises(ValueError, match="'Twice' is declared twice"):
        build_catalog(activation("Twice", "x"), activation("Twice", "x**2"))
    with pytest.raises(ValueError, match="module name 'ge_lu'"):
        build_catalog(activation("GeLu", "x"), activation("Ge_Lu", "x"))


def test_a_loss_declaration_checks_its_target_variable_too():
    assert elementwise_loss("Sq", "(x - t)**2").targets == ("dense",)
    with pytest.raises(DeclarationError, match="unknown symbol y"):
        elementwise_loss("Sq", "(x - y)**2")


def test_a_user_declaration_file_outside_the_repository_works_end_to_end(tmp_path):
    ops = declaration_file(tmp_path, USER_OPS)
    out = tmp_path / "my_generated"
    result = subprocess.run([str(SYMGRAD), "codegen", "--ops", str(ops), "--out", str(out)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()[1:5]] == ["Swish", "Bent", "Scaled", "LogCosh"]
    sys.path.insert(0, str(tmp_path))
    try:
        package = importlib.import_module("my_generated")
        x = np.linspace(-3, 3, 7)
        assert np.allclose(package.Swish().forward(x), x / (1 + np.exp(-x)))
        assert np.allclose(package.Scaled(scale=3.0).forward(x), 3.0 * np.tanh(x / 3.0))
        for name in ("Swish", "Bent", "Scaled", "LogCosh"):
            assert check_class(getattr(package, name), (3, 4), np.random.default_rng(0)).ok, name
    finally:
        sys.path.remove(str(tmp_path))
        for key in [k for k in sys.modules if k.startswith("my_generated")]:
            del sys.modules[key]
    checked = subprocess.run([str(SYMGRAD), "check", f"{out / 'bent.py'}:Bent"], capture_output=True, text=True,
                             timeout=300)
    assert checked.returncode == 0 and "OK: relative error" in checked.stdout


@pytest.mark.parametrize("body, message", [
    ('from derive.declare import activation\nOPS = [activation("Oops", "x*beta")]\n', "Oops: unknown symbol beta"),
    ('from derive.declare import activation\nOPS = [activation("Sigmoid", "x")]\n', "'Sigmoid': the name is taken"),
    ('OPS = 3\n', "defines no OPS list"),
])
def test_codegen_refuses_a_bad_declaration_file_and_writes_nothing(tmp_path, capsys, body, message):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.py").write_text("# untouched\n")
    before, committed = snapshot(out), snapshot(GENERATED)
    assert main(["codegen", "--ops", str(declaration_file(tmp_path, body)), "--out", str(out)]) == 1
    assert message in capsys.readouterr().err
    assert snapshot(out) == before and snapshot(GENERATED) == committed


def test_a_kernel_failing_its_check_is_reported_and_nothing_is_written(tmp_path, capsys):
    body = 'from derive.declare import activation\nOPS = [activation("Cube", "x**3", tol=0.0)]\n'
    out = tmp_path / "pkg"
    assert main(["codegen", "--ops", str(declaration_file(tmp_path, body)), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "Cube" in captured.out and "FAILED" in captured.out and "left untouched" in captured.err
    assert not out.exists() or not list(out.glob("*.py"))


def test_codegen_with_ops_needs_an_output_folder(tmp_path, capsys):
    assert main(["codegen", "--ops", str(declaration_file(tmp_path, USER_OPS))]) == 2
    assert "--ops needs --out" in capsys.readouterr().err


def test_new_prints_a_checked_declaration_and_writes_it_to_a_file(tmp_path, capsys):
    assert main(["new", "swish", "x*sigmoid(x)"]) == 0
    assert capsys.readouterr().out.strip() == "activation('Swish', 'x*sigmoid(x)')"
    target = tmp_path / "ops.py"
    assert main(["new", "Swish", "x*sigmoid(x)", "--write", str(target)]) == 0
    assert main(["new", "Cube", "x**3", "--write", str(target)]) == 0
    namespace = {}
    exec(target.read_text(), namespace)
    assert [op.name for op in namespace["OPS"]] == ["Swish", "Cube"]
    assert main(["new", "Bad", "x*beta"]) == 1 and "unknown symbol beta" in capsys.readouterr().err


def test_add_declaration_needs_the_ops_list():
    with pytest.raises(DeclarationError, match="closing"):
        add_declaration("OPS = []\n", declaration_source("Swish", "x*sigmoid(x)"))


def test_check_reports_the_worst_entry_and_fails_a_wrong_layer(tmp_path, capsys):
    module = tmp_path / "mine.py"
    module.write_text(textwrap.dedent('''
        import numpy as np

        class Square:
            def forward(self, x):
                self.x = x
                return x ** 2

            def backward(self, g):
                return g * self.x  # wrong: the derivative is 2 x
    '''))
    assert main(["check", f"{module}:Square"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: relative error" in out and "worst at index" in out
    assert main(["check", f"{module}:Nothing"]) == 2
    assert main(["check", "no/such/file.py:X"]) == 2


def test_load_class_imports_a_generated_module_with_its_package():
    assert load_class(f"{GENERATED / 'softmax.py'}:Softmax").__name__ == "Softmax"


def test_a_declared_loss_with_a_constant_term_counts_it_once_per_entry(tmp_path):
    # a summed forward (a mean, a sum) adds each term's total: a term without an array is N times itself
    catalog = build_catalog(elementwise_loss("Offset", "(x - t)**2 + 1 + scale", params={"scale": 0.5}))
    files = {name: text for name, text in render_package(catalog).items() if not name.startswith("fast/")}
    package = import_package(stage(files, tmp_path))
    rng = np.random.default_rng(4)
    x, t = rng.normal(size=(3, 4)), rng.uniform(size=(3, 4))
    losses = (x - t) ** 2 + 1.5
    for reduction, expected in (("mean", losses.mean()), ("sum", losses.sum()), ("none", losses)):
        assert np.allclose(package.Offset(reduction=reduction).forward(x, t), expected), reduction


def test_a_tensor_loss_with_a_further_mean_divides_its_sum_by_it_and_an_empty_batch_is_nan(tmp_path):
    import warnings
    from derive.declare import tensor_loss
    catalog = build_catalog(tensor_loss("RowSquares", inputs={"x": "n k"}, targets={"t": "n k"},
                                        means={"batchmean": "N"}, steps=["L[n, k] = (x[n, k] - t[n, k])**2"]))
    package = import_package(stage(render_package(catalog, fused=False), tmp_path))
    rng = np.random.default_rng(5)
    x, t = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    loss = package.RowSquares(reduction="batchmean")
    np.testing.assert_allclose(loss.forward(x, t), ((x - t) ** 2).sum() / 3, rtol=1e-14)
    np.testing.assert_allclose(loss.backward(), 2 * (x - t) / 3, rtol=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for reduction in ("mean", "batchmean"):   # no 0/0: NaN, as PyTorch's mean of nothing, and an empty dx
            empty = package.RowSquares(reduction=reduction)
            assert np.isnan(empty.forward(x[:0], t[:0])) and empty.backward().shape == (0, 4)


@pytest.mark.parametrize("declare, declaration, message", [
    ("tensor_loss", dict(means={"mean": "N"}), "means: 'mean' must be a reduction's name other than mean, sum"),
    ("tensor_loss", dict(means={"half": "2"}), "mean half: its divisor '2' reads none of the output's sizes"),
    ("tensor_loss", dict(means={"each": "J"}), "unknown name J"),
    ("element_loss", dict(means={"squared": "N*N"}), "mean squared divides by a product of the sizes of its first"),
    ("row_layer", dict(flags={"twice": False}), "a row layer has no flags"),
])
def test_a_further_mean_or_a_flag_that_cannot_be_is_refused_by_name(declare, declaration, message):
    from derive import declare as module
    kind = "layer" if declare == "row_layer" else "loss"
    steps = ["y[n, k] = Piecewise((2 * x[n, k], twice), (x[n, k], True))"] if kind == "layer" else [
        "L[n, k] = (x[n, k] - t[n, k])**2"]
    with pytest.raises(DeclarationError, match=message):
        op = (module.tensor_op if kind == "layer" else module.tensor_loss)(
            "Refused", inputs={"x": "n k"}, steps=steps, **({} if kind == "layer" else {"targets": {"t": "n k"}}),
            **declaration)
        getattr(module, declare)(op) if declare != "tensor_loss" else None


def test_the_catalogs_kl_div_takes_log_target_as_a_flag_and_batchmean_as_a_mean_over_the_first_axis():
    op = CATALOG["KLDivLoss"]
    assert [(p.name, p.kind, p.default) for p in op.params] == [("log_target", "flag", False)]
    assert op.means == {"batchmean": (0,)} and op.targets == ("dense",) and op.granularity == "element"
    focal = CATALOG["SoftmaxFocalLoss"]
    assert [(p.name, p.kind) for p in focal.params] == [("alpha", "class_weights"), ("gamma", "scalar")]
    assert focal.mean_weight == {} and focal.saved[0][0].name == "lp"   # the mean over rows; the log-softmax saved


def test_the_catalogs_row_layers_are_index_notation_declarations_of_the_seeds_forms():
    from derive.activations import log_softmax
    from derive.softmax import softmax
    from derive.symbols import i
    assert CATALOG["Softmax"].forward == softmax(i) and CATALOG["LogSoftmax"].forward == log_softmax()
    assert CATALOG["Softmax"].source == "derive.declare.row_layer (Softmax)"


@pytest.mark.parametrize("declaration, message", [
    (dict(inputs={"x": "n k"}, params={"gamma": ("k", "ones")}, steps=["y[n, k] = x[n, k] * gamma[k]"]), "no params"),
    (dict(inputs={"x": "n k"}, steps=["mu[k] = Sum(x[n, k], n) / N", "y[n, k] = x[n, k] - mu[k]"]), "last axis k alone"),
    (dict(inputs={"x": "n k"}, steps=["y[n, k] = x[n, k] - x[0, k]"]), r"reads its arrays at its row n alone, not x\[0, k\]"),
])
def test_a_tensor_op_that_is_not_a_row_layer_is_refused_as_one(declaration, message):
    from derive.declare import row_layer, tensor_op
    with pytest.raises(DeclarationError, match=message):
        row_layer(tensor_op("NotRow", **declaration))


def test_the_catalogs_pytorch_losses_are_declarations_of_the_seeds_forms_with_pytorchs_options():
    from derive import losses
    from derive.symbols import c, eps, mask, w
    entropy, logistic = CATALOG["SoftmaxCrossEntropy"], CATALOG["BinaryCrossEntropyWithLogits"]
    assert entropy.source == "derive.declare.row_loss (SoftmaxCrossEntropy)"
    assert logistic.source == "derive.declare.element_loss (BinaryCrossEntropyWithLogits)"
    smoothing = sp.Symbol("label_smoothing", real=True)
    assert entropy.forward.xreplace({smoothing: eps}) == losses.cross_entropy_options()
    assert logistic.forward == losses.binary_cross_entropy()
    assert entropy.targets == ("labels", "dense") and entropy.mean_weight == {"labels": w[c] * mask}
    assert [(p.name, p.kind, p.default) for p in entropy.params] == [
        ("weight", "class_weights", None), ("ignore_index", "ignore_index", -100), ("label_smoothing", "scalar", 0.0)]
    assert [(p.name, p.kind) for p in logistic.params] == [("weight", "element_weights"), ("pos_weight", "class_weights")]


@pytest.mark.parametrize("declare, declaration, message", [
    ("row_loss", dict(inputs={"x": "n k"}, weights={"weight": "n k"}, steps=["L[n] = Sum(weight[n, k] * x[n, k], k)"]),
     "at most one weight over the classes"),
    ("row_loss", dict(inputs={"x": "n k"}, targets={"t": "n k"}, steps=["L[n] = Sum(x[n, k] * t[n, k], k)"],
                      ignore_index=-1),
     "ignore_index is an integer label of a loss that takes labels"),
    ("row_loss", dict(inputs={"x": "n k"}, steps=["L[n] = Sum(x[n, k], k)"], labels=True), "labels=True takes"),
    ("element_loss", dict(inputs={"x": "n k"}, targets={"t": "n k"}, steps=["L[n, k] = x[n, k] - Sum(t[n, j], j)"]),
     "unknown name j|sums over nothing"),
    ("element_loss", dict(inputs={"x": "n k"}, steps=["L[n, k] = x[n, k]**2"]), "one dense target"),
])
def test_a_loss_that_is_not_of_its_form_is_refused_naming_what_it_lacks(declare, declaration, message):
    from derive import declare as module
    features = {key: declaration.pop(key) for key in ("ignore_index", "labels") if key in declaration}
    with pytest.raises(DeclarationError, match=message):
        getattr(module, declare)(module.tensor_loss("NotOfForm", **declaration), **features)


def test_the_catalogs_hinge_is_an_index_notation_declaration_right_for_any_margin():
    from derive import losses
    assert CATALOG["MulticlassHinge"].source == "derive.declare.row_loss (MulticlassHinge)"
    from derive.symbols import margin
    declared = CATALOG["MulticlassHinge"].forward
    assert declared.xreplace({sp.Symbol("margin", real=True): margin}) == losses.multiclass_hinge()  # the seeds' form
    rng = np.random.default_rng(4)
    x, c = rng.normal(size=(6, 5)), rng.integers(0, 5, 6)
    for margin in (1.0, 0.3, -0.5):  # the k = c term is max(0, margin), 0 for a negative margin
        terms = np.maximum(0, x - x[np.arange(6), c][:, None] + margin)
        terms[np.arange(6), c] = 0
        loss = generated.MulticlassHinge(margin=margin, reduction="none")
        np.testing.assert_allclose(loss.forward(x, c), terms.sum(axis=1), rtol=1e-14, atol=1e-15)


def test_a_row_loss_takes_one_target_a_label_or_a_dense_row():
    from derive.declare import row_loss, tensor_loss
    from derive.symbols import K, k, t, x
    squared = row_loss(tensor_loss("SquaredRow", inputs={"x": "n k"}, targets={"t": "n k"},
                                   steps=["L[n] = Sum((x[n, k] - t[n, k])**2, k)"]))
    assert squared.targets == ("dense",) and squared.forward == sp.Sum((x[k] - t[k]) ** 2, (k, 0, K - 1))
    with pytest.raises(DeclarationError, match="one integer label c.n. or dense target"):
        row_loss(tensor_loss("TwoTargets", inputs={"x": "n k"}, targets={"t": "n k", "c": "n"},
                             steps=["L[n] = Sum((x[n, k] - t[n, k])**2, k) - x[n, c[n]]"]))
