"""The training-step rows of make bench (issue 25, target 3): one SGD step (momentum 0.9) of the MLP
Linear-ReLU-Linear-softmax cross-entropy, float32, every contender from the same weights and batch."""
from functools import partial

import numpy as np

import generated
from codegen.bench import frameworks, tuned
from codegen.bench.cases import Contender, copy_step

# (N, in, hidden, classes)
SIZES = ((32, 64, 64, 10), (256, 784, 256, 10), (1024, 784, 512, 100), (4096, 1024, 1024, 1000))
TINY = ((5, 4, 6, 3),)
LR, MOMENTUM = 0.01, 0.9
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
