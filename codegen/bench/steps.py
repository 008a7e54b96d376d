"""The training-step rows of make bench (issue 25, target 3): one SGD step (momentum 0.9) of the MLP
Linear-ReLU-Linear-softmax cross-entropy, and one Adam step of the demo's transformer block
(codegen/demo_transformer.py), float32, every contender from the same weights and batch."""
from functools import partial

import numpy as np

import generated
from codegen import demo_transformer
from codegen.bench import frameworks, tuned
from codegen.bench.cases import Contender, copy_step

# (N, in, hidden, classes)
SIZES = ((32, 64, 64, 10), (256, 784, 256, 10), (1024, 784, 512, 100), (4096, 1024, 1024, 1000))
TINY = ((5, 4, 6, 3),)
LR, MOMENTUM = 0.01, 0.9
# the demo's transformer as it trains (width 32, 4 heads, batches of 64 sequences of 16 tokens), and 4 times as
# wide on 4 times the batch
TRANSFORMER_SIZES = (demo_transformer.Config(), demo_transformer.Config(width=128, heads=8, batch=256))
TRANSFORMER_TINY = (demo_transformer.Config(width=8, heads=2, batch=4),)
BLAS_THREADS = (2, 1)      # NumPy's BLAS threads of the generated step: its default here (2 cores), then one


def size_label(size):
    N, I, H, C = size
    return f"{N}:{I}-{H}-{C}"


def mlp_arrays(size, dtype, rng):
    """A batch x and its labels, and the two layers' weights (W (in, out)) drawn as nn.Linear draws them."""
    N, I, H, C = size
    arrays = {"x": rng.standard_normal((N, I), dtype=dtype), "labels": rng.integers(0, C, N)}
    for W, b, fan_in, fan_out in (("W1", "b1", I, H), ("W2", "b2", H, C)):
        bound = 1 / np.sqrt(fan_in)
        arrays[W] = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(dtype)
        arrays[b] = rng.uniform(-bound, bound, fan_out).astype(dtype)
    return arrays


class GeneratedMLP:
    """The step from generated/ alone, as codegen/demo.py trains: Sequential, SoftmaxCrossEntropy and SGD."""

    def __init__(self, arrays, lr, momentum):
        (I, H), C = arrays["W1"].shape, arrays["W2"].shape[1]
        dtype = arrays["W1"].dtype
        self.first, self.second = generated.Linear(I, H, dtype=dtype), generated.Linear(H, C, dtype=dtype)
        for layer, W, b in ((self.first, "W1", "b1"), (self.second, "W2", "b2")):
            layer.W, layer.b = arrays[W].copy(), arrays[b].copy()
        self.net = generated.Sequential([self.first, generated.ReLU(), self.second])
        self.loss = generated.SoftmaxCrossEntropy()
        self.optimizer = generated.SGD(self.net.parameters(), lr, momentum)
        self.x, self.labels = arrays["x"], arrays["labels"]

    def step(self):
        loss = self.loss.forward(self.net.forward(self.x), self.labels)
        self.net.backward(self.loss.backward())
        self.optimizer.step()
        return loss

    def weights(self):
        return [self.first.W, self.first.b, self.second.W, self.second.b]


def mlp_step(cls, arrays):
    return cls(arrays, LR, MOMENTUM).step


def contenders(arrays):
    """Everyone timed on a step, in the table's order: the generated step with NumPy's BLAS on 2 threads and on
    1 (what the BLAS threads cost or bring), the tuned NumPy step, PyTorch on 1 and 2 threads, a copy of x."""
    found = []
    threaded = frameworks.installed("threadpoolctl")
    for threads in BLAS_THREADS if threaded else (None,):
        name = "generated" if threads in (None, BLAS_THREADS[0]) else f"generated-{threads}t"
        found.append(Contender(name, partial(mlp_step, GeneratedMLP, arrays),
                               setup=threaded and partial(frameworks.blas_threads, threads) or None))
    found.append(Contender("tuned", partial(mlp_step, tuned.MLP, arrays),
                           setup=threaded and partial(frameworks.blas_threads, BLAS_THREADS[0]) or None))
    if frameworks.installed("torch"):
        for threads in frameworks.TORCH_THREADS:
            found.append(Contender(f"torch-{threads}t", partial(mlp_step, frameworks.TorchMLP, arrays),
                                   setup=partial(frameworks.torch_threads, threads), traced=False))
    found.append(Contender("copy", lambda: copy_step(arrays)))
    return found


def transformer_label(config):
    return f"{config.batch}:{demo_transformer.CONTEXT}x{config.width}/{config.heads}h"


def transformer_batch(config):
    """A batch of the demo's training sequences: x, the tokens the network reads, and the targets."""
    rows = demo_transformer.sequences(np.random.default_rng(config.seed), config.batch)
    x, targets = demo_transformer.inputs_and_targets(rows)
    return {"x": x, "targets": targets}


class GeneratedTransformer:
    """The demo's Adam step from generated/ alone, as codegen/demo_transformer.py trains, in float32; with
    package generated.fast, its fused classes where it has them (demo_transformer.Transformer)."""

    def __init__(self, config, batch, package=generated):
        self.model = demo_transformer.Transformer(config, dtype=np.float32, package=package)
        self.loss = package.SoftmaxCrossEntropy(ignore_index=demo_transformer.IGNORED)
        self.optimizer = generated.Adam(self.model.parameters(), lr=config.lr)
        self.batch = batch

    def step(self):
        logits = self.model.forward(self.batch["x"])
        loss = self.loss.forward(logits.reshape(-1, logits.shape[-1]), self.batch["targets"].reshape(-1))
        self.model.backward(self.loss.backward().reshape(logits.shape))
        self.optimizer.step()
        return loss


def fused_threads(threads):
    """numba's threads and NumPy's BLAS both on threads (None: as they are)."""
    if threads is None:
        return
    import numba
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    frameworks.blas_threads(threads)


def warmed(step):
    """step, called once: the fused kernels compiled (or loaded from numba's cache) before the timing."""
    step()
    return step


def torch_transformer_step(config, batch):
    from codegen.bench.torch_transformer import TorchTransformerStep
    model = demo_transformer.Transformer(config, dtype=np.float32)
    return TorchTransformerStep(model, batch["x"], batch["targets"], config.lr, demo_transformer.IGNORED).step


def transformer_contenders(config, batch):
    """The generated step on NumPy's BLAS threads (2, then 1), the same with generated.fast's fused classes where
    numba is installed (its threads and NumPy's BLAS both 2, then 1), PyTorch on 1 and 2 threads, a copy of the
    tokens."""
    found = []
    threaded = frameworks.installed("threadpoolctl")
    for threads in BLAS_THREADS if threaded else (None,):
        name = "generated" if threads in (None, BLAS_THREADS[0]) else f"generated-{threads}t"
        found.append(Contender(name, lambda: GeneratedTransformer(config, batch).step,
                               setup=threaded and partial(frameworks.blas_threads, threads) or None))
    if frameworks.installed("numba"):
        import generated.fast as fast
        for threads in BLAS_THREADS if threaded else (None,):
            name = "numba" if threads in (None, BLAS_THREADS[0]) else f"numba-{threads}t"
            found.append(Contender(name, lambda: warmed(GeneratedTransformer(config, batch, fast).step),
                                   setup=partial(fused_threads, threads if threaded else None)))
    if frameworks.installed("torch"):
        for threads in frameworks.TORCH_THREADS:
            found.append(Contender(f"torch-{threads}t", partial(torch_transformer_step, config, batch),
                                   setup=partial(frameworks.torch_threads, threads), traced=False))
    found.append(Contender("copy", lambda: copy_step(batch)))
    return found
