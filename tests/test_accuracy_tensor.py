"""Issue 23's accuracy contract for every index-notation catalog operation (codegen/accuracy.py, TensorSubject):
at small sizes, each sample's rows spanning the whole grid of magnitudes of float32 and float64, the output and
every gradient against the op's steps and derivation by mpmath, each entry within BOUND ulps of its scale, of the
NumPy classes and the fused ones (generated/fast, run interpreted with math as numba compiles it) where they exist.
KNOWN is exactly what does not meet it yet, each (backend, dtype, quantity) with its reason."""
import dataclasses
import functools
import math
import types

import mpmath
import numpy as np
import pytest

from codegen import accuracy
from codegen.pipeline import imported
from codegen.render import ROOT
from derive.catalog import CATALOG
from derive.tensor import TensorOp

TENSOR_OPS = [name for name, op in CATALOG.items() if isinstance(op, TensorOp)]
BOTH = {(dtype, quantity) for dtype in ("float32", "float64") for quantity in accuracy.QUANTITIES}
KNOWN = {}   # {name: ({(backend, dtype, quantity), ...}, reason)}


@pytest.fixture(scope="module")
def package():
    return imported(ROOT / "generated", fused=True)


def failing_cells(tallies):
    """{(backend, dtype, quantity): an example} of the tallies that break the contract."""
    return {key[1:]: tally.example for key, tally in tallies.items() if tally.failures}


@pytest.mark.parametrize("name", TENSOR_OPS)
def test_the_contract_holds_but_where_known(name, package):
    tallies = accuracy.Survey([accuracy.subject(CATALOG[name])], package, quick=True).run()
    assert {key[2:] for key in tallies} == BOTH and all(t.cases for t in tallies.values()), tallies
    assert {key[1] for key in tallies} == {"numpy", *["fused"] * hasattr(package.fast, name)}
    found = failing_cells(tallies)
    known = KNOWN.get(name, (set(), ""))[0]
    assert not set(found) - known, {cell: found[cell] for cell in set(found) - known}
    assert not known - set(found), f"{name} now meets the contract in {known - set(found)}: update KNOWN"


def test_known_names_only_index_notation_ops():
    assert set(KNOWN) <= set(TENSOR_OPS) and all(reason for _, reason in KNOWN.values())


def test_an_entry_is_judged_in_units_of_its_scale():
    # 1 + 2^-20 against 1: 8 ulps in float32, past the bound of 8 unless the scale allows it
    got, truth = np.float32(1 + 2.0 ** -20), mpmath.mpf(1)
    for scale, inexact in ((0.0, 1), (4.0, 0)):
        tally = accuracy.Tally()
        accuracy.judge_scaled(tally, got, truth, lambda scale=scale: scale, np.float32, 7, "x")
        assert tally.inexact == inexact and tally.cases == 1
    tally = accuracy.Tally()
    accuracy.judge_scaled(tally, np.float32(1.0), mpmath.mpf(1e300), lambda: 0.0, np.float32, 8, "x")
    assert tally.overflow == 1 and tally.worst_ulps == math.inf    # the truth overflows: only inf will do


class NaiveAttention:
    """softmax(Q K^T / sqrt(D)) V with the exponentials unshifted, backward by the textbook's formulas: inf / inf
    once a score passes 88 in float32."""

    def forward(self, Q, K, V):
        self.Q, self.K, self.V = Q, K, V
        with np.errstate(all="ignore"):
            e = np.exp(np.einsum("ntd,nsd->nts", Q, K) / np.sqrt(Q.shape[-1]).astype(Q.dtype))
            self.P = e / e.sum(axis=-1, keepdims=True)
        return np.einsum("nts,nse->nte", self.P, V)

    def backward(self, g):
        with np.errstate(all="ignore"):
            dP = np.einsum("nte,nse->nts", g, self.V)
            dA = self.P * (dP - (dP * self.P).sum(axis=-1, keepdims=True)) / np.sqrt(self.Q.shape[-1]).astype(g.dtype)
            return (np.einsum("nts,nsd->ntd", dA, self.K), np.einsum("nts,ntd->nsd", dA, self.Q),
                    np.einsum("nts,nte->nse", self.P, g))


def test_the_checker_catches_an_unshifted_softmax_and_passes_the_generated_attention(package):
    subject = accuracy.subject(CATALOG["ScaledDotProductAttention"])
    naive = types.SimpleNamespace(ScaledDotProductAttention=lambda: NaiveAttention())
    found = accuracy.Survey([subject], naive, quick=True, dtypes=(np.float32,)).run()
    assert found[("ScaledDotProductAttention", "numpy", "float32", "forward")].bad > 0
    assert found[("ScaledDotProductAttention", "numpy", "float32", "backward")].bad > 0
    generated = accuracy.Survey([subject], package, quick=True, dtypes=(np.float32,)).run()
    assert not any(tally.failures for tally in generated.values())


def test_make_codegens_figures_of_an_index_notation_op(package, monkeypatch):
    figures = accuracy.figures(CATALOG["Linear"], package)
    assert set(figures) == {"numpy"} and len(figures["numpy"]) == 4
    assert max(figures["numpy"]) <= accuracy.BOUND
    assert accuracy.figures(CATALOG["LayerNorm"], package)["numpy"][1] <= accuracy.BOUND
    # without the guard of an isolated entry (derive.tensor.isolated_entry), dx's cancellation: the figure shows it
    monkeypatch.setattr(package.layer_norm, "isolated",
                        lambda a, bound, axis: (np.zeros(0, np.intp), None))
    assert accuracy.figures(CATALOG["LayerNorm"], package)["numpy"][1] > accuracy.BOUND


def test_the_allowance_counts_the_rounding_of_the_projections_and_still_fails_a_wrong_value(package):
    # the full grid's float64 sample 21: g_q = sum_s g_A k_s with g_A = (-1.6e192, 1.6e192) and k_s = bk + Wk key_s =
    # 0.5766 and 0.5749 (key -1.8e-3 and 1e-70 beside the bias): the truth 2.7e189 is 330 times below the terms, and k
    # rounded to float64, which every kernel forming the projections holds, moves it by eps |g_A| |k|; the bias's
    # own rounding does not (sum_s g_A = 0), so the inputs' allowance alone misses it
    subject = accuracy.subject(CATALOG["MultiheadAttention"])
    arrays = accuracy.tensor_samples(subject, np.float64, False, package)[21]
    options = accuracy.tensor_options(subject, np.float64)
    got = accuracy.run_tensor_class(package.MultiheadAttention, subject, arrays)[("backward", "dquery")][0, 0, 0]
    unrounded = dataclasses.replace(subject, op=dataclasses.replace(subject.op, rounded=()))
    for judged, passes in ((subject, True), (unrounded, False)):
        truth = accuracy.TensorTruth(judged, arrays, options)
        exact, scale = truth.values[("backward", "dquery")][0, 0, 0], truth.scale(("backward", "dquery"), (0, 0, 0))
        for value, ok in ((got, passes), (np.float64(np.nan), False), (np.float64(float(exact) * (1 + 1e-11)), False)):
            tally = accuracy.Tally()
            accuracy.judge_scaled(tally, value, exact, lambda scale=scale: scale, np.float64, accuracy.BOUND, "dquery")
            assert (not tally.failures) == ok, (judged.op.rounded, value, tally.example)


def full_grid_sample(package, name, k, dtype=np.float64):
    """(subject, arrays, options) of the full grid's sample k of catalog op name."""
    subject = accuracy.subject(CATALOG[name])
    return subject, accuracy.tensor_samples(subject, dtype, False, package)[k], accuracy.tensor_options(subject, dtype)


def test_a_truth_that_400_digits_leave_to_noise_is_settled_at_more(package):
    # the full grid's float64 sample 12: dWq sums terms of 10^700 that cancel; at 400 digits one entry reads
    # -4.7e309 (past the largest float64: a kernel's 0 would fail as an overflow), at 560 another noise
    subject, arrays, options = full_grid_sample(package, "MultiheadAttention", 12)
    key = ("backward", "dWq")
    noise = accuracy.program_values(subject, arrays, options, accuracy.MORE_DIGITS)[key][1, 0, 1]
    assert abs(noise) > np.finfo(np.float64).max
    settled = accuracy.settled_values(subject, arrays, options)[key][1, 0, 1]
    assert settled is accuracy.UNSETTLED or abs(settled) < np.finfo(np.float64).smallest_subnormal
    tally = accuracy.Tally()
    accuracy.judge_entry(tally, np.float64(0.0), accuracy.TensorTruth(subject, arrays, options), key, (1, 0, 1),
                         np.float64, accuracy.BOUND, "dWq")
    assert not tally.failures and tally.cases + tally.unsettled == 1


def test_an_infinity_passes_where_the_rounded_projections_tie_and_a_wrong_finite_value_still_fails(package):
    # the full grid's float64 sample 5: keys 0 and 1 are 0.496 - 8e-65 and 0.496 - 4e-175 exactly, one tie once
    # rounded: the truth's softmax row is one-hot (dkey 4e201), a float kernel's two halves, whose per-head g_k
    # is 3e336: the kernel's -inf, which eps times the scale (past the largest number) allows
    subject, arrays, options = full_grid_sample(package, "MultiheadAttention", 5)
    truth = accuracy.TensorTruth(subject, arrays, options)
    outputs = accuracy.run_tensor_class(package.MultiheadAttention, subject, arrays)
    key, at = ("backward", "dkey"), (0, 0, 0)
    assert outputs[key][at] == -np.inf and abs(truth.values[key][at]) < 1e202
    assert accuracy.beyond_largest(functools.partial(truth.scale, key, at), np.float64)
    for value, ok in ((outputs[key][at], True), (np.float64(np.nan), False)):
        tally = accuracy.Tally()
        accuracy.judge_entry(tally, value, truth, key, at, np.float64, accuracy.BOUND, "dkey")
        assert (not tally.failures) == ok, (value, tally.example)
    # dbo's entry (the sum of g) has a small allowance: 1% off fails, and so does an infinity
    key, at = ("backward", "dbo"), (0,)
    exact = float(truth.values[key][at])
    for value, ok in ((outputs[key][at], True), (exact * 1.01, False), (np.inf, False)):
        tally = accuracy.Tally()
        accuracy.judge_entry(tally, np.float64(value), truth, key, at, np.float64, accuracy.BOUND, "dbo")
        assert (not tally.failures) == ok, (value, tally.example)


def test_an_infinity_passes_only_where_the_allowance_itself_passes_the_largest_number():
    for scale, ok in ((mpmath.mpf("1e330"), True), (mpmath.mpf("1e320"), False), (1e300, False)):
        for got in (np.float64(np.inf), np.float64(-np.inf)):
            tally = accuracy.Tally()
            accuracy.judge_scaled(tally, got, mpmath.mpf(1), lambda scale=scale: scale, np.float64, 8, "x")
            assert (not tally.failures) == ok and tally.cases == 1
    tally = accuracy.Tally()
    accuracy.judge_scaled(tally, np.float64(np.nan), mpmath.mpf(1), lambda: mpmath.mpf("1e400"), np.float64, 8, "x")
    assert tally.bad == 1
