"""Issue 23's accuracy contract (tests/accuracy.py) for every element-wise and row catalog operation and the
declared list, float32 and float64, NumPy and fused kernels: finite where the truth (mpmath) is finite, inf where it
overflows, within the bound elsewhere. KNOWN_FAILURES is exactly the set that does not meet it yet."""
import sys
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402
from codegen.accuracy import BOUND  # noqa: E402

KNOWN_FAILURES = {   # {subject name: why it does not meet the contract yet}
}


@pytest.fixture(scope="module")
def tallies():
    return accuracy.survey(quick=True, torch=False)


def failing(tallies):
    """{subject name: an example} of subjects with a point breaking the contract in some backend and dtype."""
    found = {}
    for (name, backend, dtype, quantity), tally in tallies.items():
        if tally.failures:
            found.setdefault(name, f"{backend} {dtype} {quantity}: {tally.example}")
    return found


SUBJECTS = ([f"catalog:{s.name}" for s in accuracy.catalog_subjects() + accuracy.row_subjects()]
            + [s.name for s in accuracy.declared_subjects()])


def test_the_survey_covers_every_element_wise_and_row_catalog_op_and_thirty_declarations(tallies):
    from derive.catalog import CATALOG
    from derive.ops import Op
    element_wise = {f"catalog:{name}" for name, op in CATALOG.items() if accuracy.element_wise(op)}
    rows = {f"catalog:{name}" for name, op in CATALOG.items() if type(op) is Op} - element_wise
    assert len(element_wise) >= 16 and len(rows) >= 6 and len(accuracy.DECLARED) >= 30
    for name in element_wise | rows | {entry[0] for entry in accuracy.DECLARED}:
        for backend in ("numpy", "fused"):   # a row op's fused kernels (generated/fast) are surveyed too
            for dtype in ("float32", "float64"):
                for quantity in accuracy.QUANTITIES:
                    if backend == "numpy" or name in rows:
                        assert tallies[(name, backend, dtype, quantity)].cases > 0, (name, backend, dtype, quantity)


@pytest.mark.parametrize("name", SUBJECTS)
def test_the_contract_holds_unless_known(tallies, name):
    broken = failing(tallies)
    if name in KNOWN_FAILURES:
        assert name in broken, f"{name} now meets the contract: remove it from KNOWN_FAILURES"
    else:
        assert name not in broken, broken.get(name)


def test_known_failures_are_exactly_those_that_fail(tallies):
    assert set(failing(tallies)) == set(KNOWN_FAILURES)


def test_the_bounds_are_within_issue_23s_relative_limits():
    for name in [None, *accuracy.BOUNDS]:
        assert accuracy.bound(name, np.float32) * 2.0 ** -23 <= 1e-6
        assert accuracy.bound(name, np.float64) * 2.0 ** -52 <= 1e-12


class NaiveSoftplus:
    """log(1 + exp(x)) as written, derivative exp(x)/(1 + exp(x)): inf from x = 89 in float32, 0 below -17."""

    def forward(self, x):
        self.x = x
        with np.errstate(all="ignore"):
            return np.log(1 + np.exp(x))

    def backward(self, g):
        with np.errstate(all="ignore"):
            return g * np.exp(self.x) / (1 + np.exp(self.x))


def test_the_checker_catches_a_naive_softplus_and_passes_the_generated_one():
    (subject,) = accuracy.declared_subjects({"Softplus"})
    naive = types.SimpleNamespace(Softplus=NaiveSoftplus, fast=types.SimpleNamespace())
    found = accuracy.Survey([subject], naive, quick=True, torch=False).run()
    bad = {key[2:]: tally for key, tally in found.items() if tally.failures}
    assert {("float32", "forward"), ("float32", "backward"), ("float64", "forward"), ("float64", "backward")} <= set(bad)
    assert found[("Softplus", "numpy", "float32", "forward")].bad > 0      # log(1 + inf) and log(1) = 0
    (catalog,) = accuracy.catalog_subjects({"Softplus"})
    generated = accuracy.Survey([catalog], accuracy.imported(accuracy.GENERATED), quick=True, torch=False).run()
    assert not any(tally.failures for tally in generated.values())


class NaiveHinge:
    """The multiclass hinge as the sum over every class k of max(0, x_k + (1 - x_c)) less the label's own term 1,
    which rounds away where x_c is large (x_c = 1e10 in float32: a loss of -1); dx from the same terms."""

    def forward(self, x, c):
        self.x, self.c = x, c
        terms = np.maximum(0, x + (1 - x[np.arange(len(c)), c])[:, None])
        return terms.sum(axis=-1) - 1

    def backward(self, g):
        x, c = self.x, self.c
        steps = (x + (1 - x[np.arange(len(c)), c])[:, None] > 0).astype(x.dtype)
        steps[np.arange(len(c)), c] -= steps.sum(axis=-1)
        return g[:, None] * steps


def test_the_checker_catches_a_hinge_that_subtracts_its_label_term_and_passes_the_generated_one():
    (subject,) = accuracy.row_subjects({"MulticlassHinge"})
    naive = types.SimpleNamespace(MulticlassHinge=lambda reduction: NaiveHinge(), fast=types.SimpleNamespace())
    found = accuracy.Survey([subject], naive, quick=True, torch=False).run()
    assert all(found[("MulticlassHinge", "numpy", dtype, "forward")].inexact > 0 for dtype in ("float32", "float64"))
    generated = accuracy.Survey([subject], accuracy.imported(accuracy.GENERATED), quick=True, torch=False).run()
    assert not any(tally.failures for tally in generated.values())


def test_the_naive_torch_form_of_log_cosh_overflows_and_ours_does_not():
    (subject,) = accuracy.declared_subjects({"LogCosh"})
    x = np.array([100.0, -100.0], np.float32)
    forward, backward = accuracy.run_torch(accuracy.torch_function(subject.forward[0]), x[:, None], 0.0)
    assert np.isinf(forward).all() and np.isnan(backward).all()


def test_the_truth_keeps_a_term_that_40_and_50_digits_both_lose_beside_1():
    # Mish's derivative at x = -133: log(1 + exp(x)) is exp(x) = 1.2e-58, which both precisions round to log(1) = 0,
    # and the x sigmoid(x) beside it, -1.6e-56, makes their agreement look like an answer (0.75% off)
    import mpmath
    import sympy as sp
    x = -133.35214233398438
    truth = accuracy.Truth([accuracy.X / (1 + sp.exp(-accuracy.X)) + sp.log(1 + sp.exp(accuracy.X))], (accuracy.X,))
    with mpmath.workdps(60):
        small = mpmath.exp(mpmath.mpf(x))
        expected = mpmath.mpf(x) * small / (1 + small) + mpmath.log1p(small)
    assert abs(truth.at((x,))[0] - expected) <= 1e-25 * abs(expected)


# ---- make codegen's ulps columns (codegen.accuracy.figures, codegen.pipeline.summary) -----------------------------

def test_the_figure_is_the_worst_ulps_where_the_truth_is_normal_and_inf_for_nan():
    import math
    import mpmath
    from codegen.accuracy import Tally, judge
    tally = Tally()
    for got, truth in ((np.float32(1.0), mpmath.mpf(1) + mpmath.mpf(2) ** -23),    # 1 ulp off
                       (np.float32(0.0), mpmath.mpf(1e-40))):                        # a flushed subnormal: no figure
        judge(tally, got, truth, None, np.float32, 8, "x")
    assert tally.worst_ulps == 1.0 and tally.failures == 0
    judge(tally, np.float32(0.0), mpmath.mpf(1e-20), None, np.float32, 8, "x")       # a false 0: every bit wrong
    assert 2 ** 22 < tally.worst_ulps < 2 ** 24 and tally.bad == 1
    judge(tally, np.float32("nan"), mpmath.mpf(3), None, np.float32, 8, "x")
    assert tally.worst_ulps == math.inf


def test_every_element_wise_op_and_loss_of_the_catalog_has_figures():
    """(The index-notation operations' figures: tests/test_accuracy_tensor.py.)"""
    from codegen.accuracy import figures
    from derive.catalog import CATALOG
    from derive.ops import Op
    package = accuracy.imported(accuracy.GENERATED)
    # element-wise, and the row ops: Softmax, SoftmaxCrossEntropy, NLLLoss, ...
    found = {name: figures(op, package) for name, op in CATALOG.items() if type(op) is Op}
    for name, ulps_of in found.items():
        assert set(ulps_of) >= {"numpy"} and all(len(ulps) == 4 and None not in ulps for ulps in ulps_of.values()), (
            name, ulps_of)
    assert found["NLLLoss"]["numpy"] == (0, 0, 0, 0)                          # -x[c]: exact
    assert max(found["Softplus"]["numpy"]) <= BOUND
    assert found["MulticlassHinge"]["numpy"][0] <= BOUND   # the label's own term exact: never a negative loss
    # a dense target's t (x - max), whose x - max overflows, in halves (forward's redo): finite, as the truth
    assert found["SoftmaxCrossEntropy"]["numpy"][0] <= BOUND


def test_the_ulps_columns_catch_a_naive_kernel_that_the_finite_differences_pass(tmp_path, monkeypatch):
    import codegen.kernels as kernels
    from codegen.pipeline import codegen, summary
    from derive.declare import activation
    from derive.ops import build_catalog
    from derive.stability import logistic
    from derive.catalog import CATALOG
    catalog = build_catalog(activation("LogOnePlusExp", "log(1 + exp(x))"), CATALOG["Dropout"])
    (stable, dropout), _, _ = codegen(catalog, tmp_path / "stable", cache=None, backend="numpy")
    assert max(stable.ulps) <= BOUND and dropout.ulps == (0, 0, 0, 0)   # a mask times x: exact
    monkeypatch.setattr(kernels, "stable", logistic)  # no rewrite but the sigmoid's printable form
    (naive, _), changed, _ = codegen(catalog, tmp_path / "naive", cache=None, backend="numpy")
    assert changed and naive.ok   # log(exp(x) + 1) at random points of (-3, 3): right
    assert naive.ulps[0] == naive.ulps[2] == np.inf   # log(exp(x) + 1) is inf from x = 89 in float32, 710 in float64
    lines = summary([naive, dropout]).splitlines()
    assert lines[0].split() == ["operation", "kernels", "max", "rel", "error", "ulps", "f32", "fwd/bwd", "ulps", "f64",
                                "fwd/bwd", "status"]
    assert lines[1].split()[3:] == [f"inf/{naive.ulps[1]:.2g}", f"inf/{naive.ulps[3]:.2g}", "OK"]
    assert lines[2].split()[3:] == ["0/0", "0/0", "OK"]
