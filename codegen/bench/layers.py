"""The layer rows of make bench (issue 25, target 2): one forward + backward of a layer at one size, float32.

A layer not yet in the catalog is timed from its declaration in examples/tensor_ops.py where that has one of
the same form (generated into a temporary folder once per run), else its generated row is left out with a note."""
import importlib.util
import inspect
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

import generated
from codegen.bench import frameworks, tuned
from codegen.bench.cases import Contender, copy_step, fast, warmed

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "tensor_ops.py"
# the names a generated class may give a param PyTorch calls by the first name
ALIASES = {"weight": ("weight", "w", "W"), "bias": ("bias", "b"), "gamma": ("gamma", "weight"), "beta": ("beta", "bias")}


@dataclass(frozen=True)
class LayerCase:
    name: str               # the table's label, and the key of the PyTorch formulation
    op: str                 # the class in generated/ (and generated.fast)
    size: tuple             # the size
    tiny: tuple             # the same form, small: what the tests run
    arrays: Callable        # (size, dtype, rng) -> {name: array}: the inputs, the params (PyTorch's layout), "g"
    inputs: tuple           # forward's arguments
    params: tuple           # by PyTorch's names
    tuned: Callable         # size -> the tuned instance
    keywords: Callable      # size -> the constructor keywords a generated class may take, by name
    example: str = None     # the declaration in examples/tensor_ops.py of the same function, while op is not in the catalog


def normal(rng, dtype, *shape, scale=1.0):
    return (rng.standard_normal(shape, dtype=dtype) * dtype.type(scale)).astype(dtype)


def norm_arrays(size, dtype, rng):
    features = size[-1] if len(size) == 2 else size[1]
    return {"x": normal(rng, dtype, *size), "gamma": 1 + normal(rng, dtype, features, scale=0.1),
            "beta": normal(rng, dtype, features, scale=0.1), "g": normal(rng, dtype, *size)}


def attention_arrays(size, dtype, rng):
    return {name: normal(rng, dtype, *size) for name in ("q", "k", "v", "g")}


def conv_arrays(size, dtype, rng):
    (n, c, h, w), o = size
    return {"x": normal(rng, dtype, n, c, h, w), "weight": normal(rng, dtype, o, c, 3, 3, scale=1 / np.sqrt(9 * c)),
            "bias": normal(rng, dtype, o, scale=0.1), "g": normal(rng, dtype, n, o, h, w)}


LAYERS = (
    LayerCase("layer_norm", "LayerNorm", (8192, 1024), (6, 5), norm_arrays, ("x",), ("gamma", "beta"),
              lambda size: tuned.LayerNorm(size[-1]), lambda size: {"normalized_shape": size[-1]}),
    LayerCase("batch_norm2d", "BatchNorm2d", (64, 16, 28, 28), (3, 4, 5, 5), norm_arrays, ("x",), ("gamma", "beta"),
              lambda size: tuned.BatchNorm2d(size[1]), lambda size: {"num_features": size[1], "C": size[1]}),
    LayerCase("attention", "ScaledDotProductAttention", (8, 8, 256, 64), (2, 3, 5, 4), attention_arrays,
              ("q", "k", "v"), (), lambda size: tuned.CausalAttention(), lambda size: {"is_causal": True, "causal": True},
              example="CausalAttention"),
    LayerCase("conv2d", "Conv2d", ((64, 16, 28, 28), 32), ((2, 3, 5, 4), 4), conv_arrays, ("x",), ("weight", "bias"),
              lambda size: tuned.Conv2d(size[0][1], size[1]),
              lambda size: {"in_channels": size[0][1], "out_channels": size[1], "kernel_size": 3, "padding": 1,
                            "C": size[0][1], "O": size[1], "J": 3, "L": 3}),
)


def size_label(size):
    """(8192, 1024) -> 8192x1024; Conv2d's ((N, C, H, W), O) -> NxCxHxW>O."""
    if isinstance(size[0], tuple):
        return "x".join(map(str, size[0])) + f">{size[1]}"
    return "x".join(map(str, size))


_examples = {}


def example_class(name):
    """The class of the declaration name in examples/tensor_ops.py, generated (NumPy backend) into a temporary
    folder the first time it is asked for."""
    if name not in _examples:
        from codegen.pipeline import codegen
        from codegen.write import import_package
        from derive.ops import build_catalog
        spec = importlib.util.spec_from_file_location("tensor_ops_examples", EXAMPLES)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        declaration = next(op for op in module.OPS if op.name == name)
        out = Path(tempfile.mkdtemp(prefix="symgrad-bench-")) / "examples"
        reports, changed, _ = codegen(build_catalog(declaration), out, cache=None, backend="numpy")
        if changed is None or not all(report.ok for report in reports):
            raise RuntimeError(f"examples/tensor_ops.py's {name} did not generate: {reports}")
        _examples[name] = getattr(import_package(out), name)
    return _examples[name]


def generated_class(case):
    """(the generated class of case or None, a note saying where it came from or why there is none)."""
    if hasattr(generated, case.op):
        return getattr(generated, case.op), None
    if case.example is None:
        return None, f"note: generated.{case.op} is not in the catalog yet: {case.name} is timed without it"
    try:
        cls = example_class(case.example)
    except Exception as error:       # the engine is someone else's moving part: say what failed, time the rest
        return None, f"note: generated.{case.op} is not in the catalog yet, and the example {case.example} failed " \
                     f"to generate ({type(error).__name__}: {error}): {case.name} is timed without it"
    return cls, (f"note: generated.{case.op} is not in the catalog yet: {case.name}'s generated row times "
                 f"examples/tensor_ops.py's {case.example}")


def built(cls, case, size):
    """An instance of a generated class made for size: the constructor gets those of case.keywords it takes
    (and float32); the TypeError naming what it asks that the benchmark does not know."""
    accepted = inspect.signature(cls).parameters
    offered = {**case.keywords(size), "dtype": np.float32}
    missing = [name for name, p in accepted.items() if p.default is p.empty and name not in offered
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise TypeError(f"{cls.__name__}{inspect.signature(cls)} asks for {missing}, which codegen/bench/layers.py "
                        f"does not offer (it offers {sorted(offered)})")
    return cls(**{name: value for name, value in offered.items() if name in accepted})


def param_names(instance, case):
    """{PyTorch's name: the instance's} of case's params."""
    own = tuple(getattr(instance, "params", ())) or tuple(vars(instance))
    names = {}
    for name in case.params:
        found = [alias for alias in ALIASES.get(name, (name,)) if alias in own and alias not in names.values()]
        if not found:
            raise TypeError(f"{type(instance).__name__} has no param for PyTorch's {name} (it has {own})")
        names[name] = found[0]
    return names


def layer_step(case, instance, arrays):
    """A step of instance on arrays: (y, the inputs' gradients, the params' gradients), each param set first."""
    names = param_names(instance, case)
    for name, own in names.items():
        setattr(instance, own, arrays[name].copy())
    inputs, g = [arrays[name] for name in case.inputs], arrays["g"]

    def step():
        y = instance.forward(*inputs)
        grads = instance.backward(g)
        return (y, *(grads if isinstance(grads, tuple) else (grads,)), *(getattr(instance, "d" + names[p]) for p in case.params))
    return step


def contenders(case, size, arrays, cls):
    """Everyone timed on a layer, in the table's order: the generated class (cls, None if none), its fused form,
    the tuned NumPy, PyTorch with 1 and 2 threads, and a copy of the first input."""
    found = []
    if cls is not None:
        found.append(Contender("generated", lambda: layer_step(case, built(cls, case, size), arrays)))
    if hasattr(fast, case.op):
        found.append(Contender("numba", lambda: warmed(layer_step(case, built(getattr(fast, case.op), case, size), arrays))))
    found.append(Contender("tuned", lambda: layer_step(case, case.tuned(size), arrays)))
    if frameworks.installed("torch"):
        for threads in frameworks.TORCH_THREADS:
            found.append(Contender(f"torch-{threads}t", lambda: frameworks.torch_layer_step(case, arrays),
                                   setup=partial(frameworks.torch_threads, threads), traced=False))
    found.append(Contender("copy", lambda: copy_step({"x": arrays[case.inputs[0]]})))
    return found
