"""make bench's instrument: every baseline computes what the generated kernels compute (a wrong fast
baseline would flatter nobody), and a tiny run prints the table and writes the JSON. No timing is asserted."""
import json
import time

import numpy as np
import pytest

import generated
from codegen.bench import frameworks, tuned
from codegen.bench.cases import CASES, Contender, contenders, make_inputs, numpy_step
from codegen.bench.run import SHORT_REPEATS, balanced_orders, main, paired_ratio, time_interleaved

ids = [case.name for case in CASES]
TOLERANCE = {"float32": dict(rtol=2e-5, atol=1e-6), "float64": dict(rtol=1e-10, atol=1e-13)}


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_ce(x, target):
    p, n = softmax(x), x.shape[0]
    return np.mean(-np.log(p[np.arange(n), target])), (p - np.eye(x.shape[1])[target]) / n


def softmax_layer(x, g):
    y = softmax(x)
    return y, y * (g - np.sum(g * y, axis=-1, keepdims=True))


# The textbook formulas in float64, each returning what a contender's step returns.
REFERENCES = {
    "softmax_ce": softmax_ce,
    "bce_logits": lambda x, target: (np.mean(np.maximum(x, 0) - x * target + np.log1p(np.exp(-np.abs(x)))),
                                     (sigmoid(x) - target) / x.size),
    "softmax": softmax_layer,
    "sigmoid": lambda x, g: (sigmoid(x), g * sigmoid(x) * (1 - sigmoid(x))),
    "tanh": lambda x, g: (np.tanh(x), g * (1 - np.tanh(x) ** 2)),
    "relu": lambda x, g: (np.maximum(x, 0), g * (x > 0)),
    "linear": lambda x, g, W, b: (x @ W + b, g @ W.T, x.T @ g, g.sum(axis=0)),
}


def inputs_for(case, dtype, shape=(6, 5)):
    return make_inputs(case, *shape, np.dtype(dtype), np.random.default_rng(7))


def assert_same(results, expected, dtype, who):
    assert len(results) == len(expected), who
    for n, (got, want) in enumerate(zip(results, expected)):
        got = np.asarray(got)
        assert got.shape == np.shape(want), f"{who}: result {n} has shape {got.shape}, expected {np.shape(want)}"
        assert np.allclose(got, want, **TOLERANCE[dtype]), f"{who}: result {n}\ngot      {got}\nexpected {want}"


def test_every_case_has_a_reference_and_a_tuned_class():
    assert set(REFERENCES) == set(ids)
    assert all(hasattr(tuned, case.op) for case in CASES)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_tuned_matches_the_reference_and_keeps_the_dtype(case, dtype):
    inputs = inputs_for(case, dtype)
    results = numpy_step(case, getattr(tuned, case.op), inputs)()
    as64 = {name: a.astype(np.float64) if a.dtype.kind == "f" else a for name, a in inputs.items()}
    assert_same(results, REFERENCES[case.name](**as64), dtype, f"tuned {case.name}")
    assert all(np.asarray(r).dtype == dtype for r in results)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_tuned_and_seed_match_the_generated_kernel(case, dtype):
    inputs = inputs_for(case, dtype)
    expected = numpy_step(case, getattr(generated, case.op), inputs)()
    for who, cls in (("tuned", getattr(tuned, case.op)), ("seed", case.seed)):
        if cls is not None:
            assert_same(numpy_step(case, cls, inputs)(), expected, dtype, f"{who} {case.name}")


def nan_pattern(results):
    return [np.isnan(np.asarray(r)) for r in results]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_tuned_keeps_a_nan_where_the_generated_kernel_does_and_a_variant_does_not(case, dtype):
    """A baseline that turned a NaN into a number would be timed computing another function; a
    variant (timed for the NaN policy's cost) is one that does."""
    inputs = inputs_for(case, dtype)
    inputs["x"][1, 2] = np.nan
    expected = nan_pattern(numpy_step(case, getattr(generated, case.op), inputs)())
    assert any(pattern.any() for pattern in expected)
    for who, cls in (("tuned", getattr(tuned, case.op)), *case.variants):
        got = nan_pattern(numpy_step(case, cls, inputs)())
        same = all(np.array_equal(a, b) for a, b in zip(got, expected))
        assert same == (who == "tuned"), f"{who} {case.name}: NaN at\n{got}\nthe generated kernel's:\n{expected}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=ids)
@pytest.mark.parametrize("framework", ["torch"])  # the dev extra has torch; JAX comes with make bench only
def test_frameworks_match_tuned(framework, case, dtype):
    inputs = inputs_for(case, dtype)
    step = frameworks.torch_step if framework == "torch" else frameworks.jax_step
    assert_same(step(case, inputs)(), numpy_step(case, getattr(tuned, case.op), inputs)(), dtype,
                f"{framework} {case.name}")


def test_a_tiny_run_prints_every_contender_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["--sizes", "4x3", "--dtypes", "float32", "--repeats", "2", "--short-repeats", "1",
                 "--sample-ms", "0.1", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    records = json.loads(path.read_text())["records"]
    for case in CASES:
        names = [c.name for c in contenders(case, inputs_for(case, "float32", (4, 3)))]
        assert ("generated" in names) == hasattr(generated, case.op)
        assert [r["contender"] for r in records if r["case"] == case.name] == names
        for name in names:
            assert any(line.split()[:4] == [case.name, "4x3", "float32", name] for line in printed.splitlines())
        if "generated" not in names:
            assert f"generated.{case.op} does not exist yet" in printed
    assert all(r["median_s"] > 0 for r in records)
    for case in CASES:  # 2 repeats, rounded up to one round of balanced orders
        repeats = [r["repeats"] for r in records if r["case"] == case.name]
        assert set(repeats) == {len(balanced_orders(len(repeats), np.random.default_rng(0)))}
    assert printed.count("target ") == 6


@pytest.mark.parametrize("seconds, samples", [(0.0, 4 * SHORT_REPEATS), (2e-3, 4)])
def test_only_short_calls_take_more_repeats(seconds, samples):
    """A tuned call shorter than a sample (1 ms here; this one does nothing) takes SHORT_REPEATS times
    the repeats (the default) for every contender; a longer one (a sleep) the repeats asked for."""
    def make():
        return lambda: time.sleep(seconds) if seconds else None
    found = [Contender("tuned", make), Contender("generated", make)]
    times, _ = time_interleaved(found, 4, 1e-3)
    assert {name: len(t) for name, t in times.items()} == {"tuned": samples, "generated": samples}


def test_a_slow_phase_between_two_samples_of_a_pair_moves_one_ratio_not_the_estimate():
    """The machine slows down (3x) from the middle of the fourth repeat on: the contender, 1.1x the tuned
    in every repeat, is measured 1.1x; the ratio of the two medians would say 3.3x."""
    tuned = [1.0] * 4 + [3.0] * 3
    contender = [1.1] * 3 + [3.3] * 4
    assert np.median(contender) / np.median(tuned) == pytest.approx(3.3)
    assert paired_ratio(contender, tuned) == pytest.approx(1.1)


@pytest.mark.parametrize("count", range(2, 10))
def test_each_contender_comes_right_after_every_other_equally_often(count):
    """What a contender leaves behind (spinning threads, freed memory) lands on each other contender
    alike. Rotations of one order, or a few shuffled ones, fail this."""
    orders = balanced_orders(count, np.random.default_rng(count))
    assert all(sorted(order) == list(range(count)) for order in orders)
    follows = {}
    for order in orders:
        for before, after in zip(order, order[1:]):
            follows[before, after] = follows.get((before, after), 0) + 1
    assert len(follows) == count * (count - 1) and len(set(follows.values())) == 1
