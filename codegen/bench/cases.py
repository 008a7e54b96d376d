"""What make bench times: each case is one operation's forward + backward, run by several contenders
on the same inputs of size (N, K)."""
import importlib
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

import generated
from codegen.bench import frameworks, tuned

# generated.fast, the fused numba kernels, where numba is installed (the extra symgrad[fast])
fast = importlib.import_module("generated.fast") if frameworks.installed("numba") else None


@dataclass(frozen=True)
class Case:
    """One operation. Kinds: "layer" (forward(x) -> y, backward(g) -> dx), "loss" (forward(x, target)
    -> 0-d loss, backward() -> dx) and "linear" (a layer whose W (K, K) and b are set, backward also sets dW, db)."""

    name: str                # the table's label, and the key of the torch and JAX formulations
    op: str                  # the class in generated/ and in tuned.py
    kind: str
    target: str = None       # a loss's target: "labels" (N,) integers or "binary" (N, K) zeros and ones
    seed: type = None        # seed 000's NumPy of the same thing, where it has one
    variants: tuple = ()     # (contender name, class): hand-written NumPy that computes another function
                             # (at NaN), timed to show what the generated function's policy costs


CASES = (
    Case("softmax_ce", "SoftmaxCrossEntropy", "loss", target="labels", seed=tuned.SeedSoftmaxCrossEntropy),
    Case("bce_logits", "BinaryCrossEntropyWithLogits", "loss", target="binary"),
    Case("softmax", "Softmax", "layer"),
    Case("sigmoid", "Sigmoid", "layer"),
    Case("tanh", "Tanh", "layer"),
    Case("relu", "ReLU", "layer", variants=(("tuned-cmp", tuned.ReLUByComparison),)),
    Case("linear", "Linear", "linear"),
)


@dataclass(frozen=True)
class Contender:
    """One way of computing a case: make() returns a new step, and step() runs one forward + backward."""

    name: str
    make: Callable
    setup: Callable = None   # run before each timed sample, untimed: torch's thread count
    traced: bool = True      # tracemalloc sees NumPy's allocations, not torch's or XLA's


def make_inputs(case, N, K, dtype, rng):
    """The arrays every contender of case gets: x, and g, target, or W and b, as its kind needs."""
    x = rng.standard_normal((N, K), dtype=dtype)
    if case.kind == "loss":
        target = rng.integers(0, K, N) if case.target == "labels" else rng.integers(0, 2, (N, K)).astype(dtype)
        return {"x": x, "target": target}
    inputs = {"x": x, "g": rng.standard_normal((N, K), dtype=dtype)}
    if case.kind == "linear":
        inputs["W"] = rng.standard_normal((K, K), dtype=dtype) / np.sqrt(K, dtype=dtype)
        inputs["b"] = rng.standard_normal(K, dtype=dtype)
    return inputs


def numpy_step(case, cls, inputs):
    """A step on a new instance of cls (generated, tuned or seed API): returns (y or loss, dx[, dW, db])."""
    x = inputs["x"]
    if case.kind == "loss":
        loss = cls()
        return lambda: (loss.forward(x, inputs["target"]), loss.backward())
    if case.kind == "linear":
        layer = cls(*inputs["W"].shape)
        layer.W, layer.b = inputs["W"], inputs["b"]

        def step():
            y = layer.forward(x)
            return y, layer.backward(inputs["g"]), layer.dW, layer.db
        return step
    layer = cls()
    return lambda: (layer.forward(x), layer.backward(inputs["g"]))


def warmed(step):
    """step, called once: numba compiles on the first call, which no sample should time."""
    step()
    return step


def copy_step(inputs):
    """A step that copies x into a buffer of its size: the memory-bandwidth floor."""
    out = np.empty_like(inputs["x"])
    return lambda: np.copyto(out, inputs["x"])


def contenders(case, inputs):
    """Everyone timed on case, in the table's order; the generated class only once it exists."""
    found = []
    if hasattr(generated, case.op):
        found.append(Contender("generated", lambda: numpy_step(case, getattr(generated, case.op), inputs)))
    if hasattr(fast, case.op):
        found.append(Contender("numba", lambda: warmed(numpy_step(case, getattr(fast, case.op), inputs))))
    found.append(Contender("tuned", lambda: numpy_step(case, getattr(tuned, case.op), inputs)))
    for name, cls in case.variants:
        found.append(Contender(name, partial(numpy_step, case, cls, inputs)))
    if case.seed is not None:
        found.append(Contender("seed", lambda: numpy_step(case, case.seed, inputs)))
    if frameworks.installed("torch"):
        for threads in frameworks.TORCH_THREADS:
            found.append(Contender(f"torch-{threads}t", lambda: frameworks.torch_step(case, inputs),
                                   setup=partial(frameworks.torch_threads, threads), traced=False))
    if frameworks.installed("jax"):
        found.append(Contender("jax", lambda: frameworks.jax_step(case, inputs), traced=False))
    found.append(Contender("copy", lambda: copy_step(inputs)))
    return found
