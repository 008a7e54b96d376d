"""make bench's instrument: every baseline computes what the generated kernels compute (a wrong fast
baseline would flatter nobody), and a tiny run prints the table and writes the JSON. No timing is asserted."""
import json
import time

import numpy as np
import pytest

import generated
from codegen.bench import frameworks, layers, profile, profile_transformer, steps, targets, tuned
from codegen.bench.cases import CASES, Contender, contenders, make_inputs, numpy_step
from codegen.bench.run import SHORT_REPEATS, balanced_orders, main, time_interleaved
from codegen.bench.targets import paired_ratio

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


def assert_same(results, expected, dtype, who, tolerance=None):
    assert len(results) == len(expected), who
    for n, (got, want) in enumerate(zip(results, expected)):
        got = np.asarray(got)
        assert got.shape == np.shape(want), f"{who}: result {n} has shape {got.shape}, expected {np.shape(want)}"
        assert np.allclose(got, want, **(tolerance or TOLERANCE[dtype])), \
            f"{who}: result {n}\ngot      {got}\nexpected {want}"


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


LAYER_IDS = [case.name for case in layers.LAYERS]


@pytest.mark.parametrize("case", layers.LAYERS, ids=LAYER_IDS)
def test_every_layer_contender_computes_what_pytorch_computes(case):
    """The tuned layers, the generated ones in the catalog (or the example standing in) and PyTorch's: one
    forward + backward each on the same arrays, (y, the inputs' gradients, the params' gradients) alike."""
    arrays = case.arrays(case.tiny, np.dtype("float32"), np.random.default_rng(3))
    cls, _ = layers.generated_class(case)
    results = {c.name: c.make()() for c in layers.contenders(case, case.tiny, arrays, cls) if c.name != "copy"}
    assert {"tuned", "torch-1t"} <= set(results) and ("generated" in results) == (cls is not None)
    expected = [t.numpy() for t in results.pop("torch-1t")]
    for who, got in results.items():
        assert_same(got, expected, "float32", f"{who} {case.name}", dict(rtol=1e-4, atol=1e-5))


def test_the_steps_of_every_contender_move_the_weights_alike():
    """Two SGD steps from the same weights and batch: the generated, tuned and PyTorch networks end with the
    same losses and weights, so make bench times the same training."""
    arrays = steps.mlp_arrays(steps.TINY[0], np.dtype("float32"), np.random.default_rng(4))
    ends = {}
    for cls in (steps.GeneratedMLP, tuned.MLP, frameworks.TorchMLP):
        network = cls(arrays, lr=0.5, momentum=0.9)
        losses = [float(network.step()) for _ in range(2)]
        ends[cls.__name__] = [np.array(losses), *(np.array(w) for w in network.weights())]
    assert ends["MLP"][0][1] < ends["MLP"][0][0]
    assert not np.allclose(ends["MLP"][1], arrays["W1"])
    for who in ("GeneratedMLP", "TorchMLP"):
        assert_same(ends[who], ends["MLP"], "float32", who, dict(rtol=1e-5, atol=1e-6))


def test_the_fused_transformer_step_trains_as_the_numpy_one():
    # make bench's numba rows of the transformer are the same network and step with generated.fast's classes where
    # it has them: its loss and every gradient must be the NumPy step's, or its time is another training's (the
    # gradients, not the weights after it: Adam moves a weight by about lr whatever the size of its gradient)
    fast = pytest.importorskip("generated.fast")
    config = steps.TRANSFORMER_TINY[0]
    batch = steps.transformer_batch(config)
    runs = {}
    for package in (generated, fast):
        step = steps.GeneratedTransformer(config, batch, package)
        loss = float(step.step())
        runs[package.__name__] = (step, [np.array([loss]), *(getattr(layer, "d" + name)
                                                             for layer, name in step.model.parameters())])
    assert type(runs["generated.fast"][0].model.norm1) is fast.LayerNorm
    assert type(runs["generated.fast"][0].model.mlp.layers[1]) is fast.GELU
    assert_same(runs["generated.fast"][1], runs["generated"][1], "float32", "fused", dict(rtol=1e-4, atol=1e-6))


def test_every_change_the_profile_times_trains_as_the_generated_step_does():
    """python -m codegen.bench.profile times changes to the generated step (the first layer's input gradient,
    ReLU's backward by comparison, ...): each must leave the weights where the generated step leaves them, or its
    gain is no gain."""
    arrays = steps.mlp_arrays(steps.TINY[0], np.dtype("float32"), np.random.default_rng(5))
    ends = {}
    for contender in profile.contenders(arrays):
        step = contender.make()
        losses = [float(step()) for _ in range(2)]
        ends[contender.name] = [np.array(losses), *(np.array(w) for w in step.__self__.weights())]
    for who, end in ends.items():
        assert_same(end, ends["tuned"], "float32", who, dict(rtol=1e-5, atol=1e-6))


def record(contender, times, group="layers", case="layer_norm", size="8192x1024", **fields):
    return {"group": group, "case": case, "size": size, "dtype": "float32", "contender": contender,
            "samples_s": list(times), **fields}


def summary_of(records, missing=None, codegen=None):
    return {e["target"].split(", ", 1)[1]: e for e in targets.issue25(records, missing or {}, codegen)}


def test_the_summary_says_met_or_not_with_the_ratio_and_where_it_is_worst():
    steps_at = [steps.size_label(size) for size in steps.SIZES]
    records = [record("generated", [1.05, 1.0], x_tuned=1.05), record("tuned", [1, 1], x_tuned=1.0),
               record("numba", [1, 1], copies=2.5), record("torch-2t", [2.5, 1.5]),
               *(record(who, [time] * 3, group="steps", case="mlp_sgd", size=size)
                 for size, time in zip(steps_at, (1.0, 3.0, 1.0, 1.0))
                 for who, time in (("generated", time), ("generated-1t", time / 2), ("torch-1t", 2.0),
                                   ("torch-2t", 1.0)))]
    summary = summary_of(records, {"conv2d": "generated.Conv2d is not in the catalog yet"})
    layer_norm = summary["2. generated LayerNorm 8192x1024 <= 1.1x tuned NumPy"]
    assert layer_norm["met"] and layer_norm["figure"].startswith("1.05x")
    fused = summary["2. fused LayerNorm 8192x1024 >= 2x faster than torch-2t"]
    assert fused["met"] and fused["figure"].startswith("2.00x")       # the paired ratios 2.5 and 1.5
    assert summary["2. fused LayerNorm 8192x1024 <= 3 copies"]["met"]
    conv = summary["2. generated or fused conv2d 64x16x28x28>32, the faster, <= 1.5x torch-2t"]
    assert conv["met"] is None and "Conv2d is not in the catalog yet" in conv["figure"]
    norm = {"case": "batch_norm2d", "size": "64x16x28x28"}
    batch_norm = summary_of([record("generated", [3, 3], **norm), record("numba", [1, 2], **norm),
                             record("torch-2t", [1, 1], **norm)])["2. generated or fused batch_norm2d 64x16x28x28, the "
                                                                   "faster, <= 1.2x torch-2t"]
    assert batch_norm["met"] is False and batch_norm["figure"].startswith("1.50x")   # the fused, the faster
    one, two = (summary[f"3. generated MLP SGD step <= 1.0x torch-{t}t, every size"] for t in (1, 2))
    assert one["met"] is False and one["figure"] == f"1.50x (worst: mlp_sgd {steps_at[1]} float32)"
    assert two["met"] is False and two["figure"].startswith("3.00x")
    alike = summary["3. generated-1t MLP SGD step <= 1.0x torch-1t, every size (both on one thread)"]
    assert alike["met"] and alike["figure"] == f"0.75x (worst: mlp_sgd {steps_at[1]} float32)"
    assert summary["1. fused softmax_ce and bce_logits forward + backward at 8192x1000 float32 <= 1.3 copies"]["met"] is None
    # the transformer's step: the faster of the NumPy and the fused backend, at every size
    blocks = [record(who, [time] * 3, group="steps", case="transformer", size=steps.transformer_label(config))
              for config, fused in zip(steps.TRANSFORMER_SIZES, (0.5, 1.5))
              for who, time in (("generated-1t", 2.0), ("numba-1t", fused), ("torch-1t", 1.0),
                                ("generated", 3.0), ("numba", fused / 2), ("torch-2t", 1.0))]
    alone = summary_of(blocks)
    one = alone["3. generated-1t or numba-1t transformer block Adam step, the faster, <= 1.0x torch-1t, every size"]
    assert one["met"] is False and one["figure"] == f"1.50x (worst: transformer {steps.transformer_label(steps.TRANSFORMER_SIZES[1])} float32)"
    two = alone["3. generated or numba transformer block Adam step, the faster, <= 1.0x torch-2t, every size"]
    assert two["met"] and two["figure"].startswith("0.75x")
    cold = "4. make codegen from cold (--no-cache) <= 30 s, on this machine's cores"
    assert alone[cold]["met"] is None
    assert summary_of([], codegen={"cold": 31.0, "no input changed": 1.0})[cold] == {
        "target": f"issue 25, {cold}", "met": False, "figure": "31.0 s"}


def test_a_tiny_run_of_every_group_prints_each_row_and_the_summary(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["--only", "losses,layers,steps", "--tiny", "--cases", "softmax_ce,relu", "--dtypes", "float32",
                 "--contenders", "generated,torch-2t", "--repeats", "1", "--short-repeats", "1", "--sample-ms", "0.1",
                 "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(path.read_text())
    records, lines = saved["records"], [line.split()[:4] for line in printed.splitlines()]
    expected = [(case.name, "4x3", [c.name for c in contenders(case, inputs_for(case, "float32", (4, 3)))])
                for case in CASES if case.name in ("softmax_ce", "relu")]
    for case in layers.LAYERS:
        cls, note = layers.generated_class(case)
        found = layers.contenders(case, case.tiny, case.arrays(case.tiny, np.dtype("float32"), np.random.default_rng(0)), cls)
        expected.append((case.name, layers.size_label(case.tiny), [c.name for c in found]))
        assert note is None or note in printed
    expected.append(("mlp_sgd", steps.size_label(steps.TINY[0]), [c.name for c in steps.contenders(
        steps.mlp_arrays(steps.TINY[0], np.dtype("float32"), np.random.default_rng(0)))]))
    config = steps.TRANSFORMER_TINY[0]
    expected.append(("transformer", steps.transformer_label(config),
                     [c.name for c in steps.transformer_contenders(config, steps.transformer_batch(config))]))
    for case, size, names in expected:
        names = [n for n in names if n in ("generated", "tuned", "torch-2t", "copy")]
        assert [r["contender"] for r in records if r["case"] == case] == names, case
        assert all([case, size, "float32", name] in lines for name in names), case
    assert all(r["median_s"] > 0 and len(r["samples_s"]) == r["repeats"] for r in records)
    assert printed.count("\ntarget ") == len(saved["targets"]) == 19
    assert "target issue 6, 2. make codegen from cold <= 20 s: -, not measured" in printed   # engine not asked for
    assert saved["cpu"]["vector"] == [] or "avx2" in saved["cpu"]["vector"]


def test_an_unknown_group_is_refused_naming_the_groups():
    with pytest.raises(SystemExit, match="unknown group.*losses, layers, steps, engine"):
        main(["--only", "layers,kernels"])


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


def test_the_transformer_profile_times_every_phase_of_both_steps():
    # a hook that never fired (a module the step does not call, a layer whose method is not the one timed) leaves
    # its phase out, and the phases' sum would then leave more than bookkeeping in `rest`
    config = steps.TRANSFORMER_TINY[0]
    batch = steps.transformer_batch(config)
    found = {"generated": profile_transformer.generated_phases(config, batch, 2),
             "torch": profile_transformer.torch_phases(config, batch, 2)}
    for name, phases in found.items():
        for phase in profile_transformer.PHASES:
            for direction in ("forward", "backward"):
                assert phases.get((phase, direction), 0) > 0, (name, phase, direction)
        assert phases[("Adam", "")] > 0
        assert sum(value for key, value in phases.items() if key != ("step", "")) < phases[("step", "")], name
    assert len(profile_transformer.table(found)) == 2 * len(profile_transformer.PHASES) + 4
