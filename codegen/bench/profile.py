"""python -m codegen.bench.profile: where the generated MLP training step (codegen/bench/steps.py) spends its
time, phase by phase, and what each change a generator could make would save, each timed as a whole step
beside the generated one, interleaved as make bench does (the ratios are paired by repeat).

The changes are written here, outside generated/, to measure them: each is one function of a step."""
import argparse
import time
from functools import partial

import numpy as np

from codegen.bench import frameworks, steps
from codegen.bench.cases import Contender
from codegen.bench.run import time_interleaved
from codegen.bench.targets import paired_ratio

PHASES = ("Linear 1 forward", "ReLU forward", "Linear 2 forward", "loss forward", "loss backward",
          "Linear 2 backward", "ReLU backward", "Linear 1 backward", "SGD step")


def phases(mlp, calls):
    """{phase: median seconds} over calls steps of a GeneratedMLP, each phase timed alone."""
    first, relu, second = mlp.net.layers
    seconds = {phase: [] for phase in PHASES}
    for _ in range(calls):
        marks = [time.perf_counter()]
        h = first.forward(mlp.x)
        marks.append(time.perf_counter())
        a = relu.forward(h)
        marks.append(time.perf_counter())
        out = second.forward(a)
        marks.append(time.perf_counter())
        mlp.loss.forward(out, mlp.labels)
        marks.append(time.perf_counter())
        g = mlp.loss.backward()
        marks.append(time.perf_counter())
        g = second.backward(g)
        marks.append(time.perf_counter())
        g = relu.backward(g)
        marks.append(time.perf_counter())
        first.backward(g)
        marks.append(time.perf_counter())
        mlp.optimizer.step()
        marks.append(time.perf_counter())
        for phase, start, end in zip(PHASES, marks, marks[1:]):
            seconds[phase].append(end - start)
    return {phase: float(np.median(times)) for phase, times in seconds.items()}


class Changed(steps.GeneratedMLP):
    """The generated step with the changes asked for, each what a generator could print instead:
    in_place_sgd: torch.optim.SGD's update with one scratch buffer per parameter (v *= momentum; v += grad;
        param -= lr v), where the generated SGD makes three new arrays per parameter and copies two back;
    no_input_grad: the first Linear's backward without dx = g W^T, which nothing reads;
    bias_in_place: Linear's y = x @ W; y += b, where the generated prints b + (x @ W), a second (N, out) array;
    relu_by_comparison: ReLU's backward as g (x > 0), one pass where the generated takes three (clip, ceil,
        multiply) to keep a NaN (symgrad's NaN policy: another function at NaN, timed to show the policy's cost)."""

    def __init__(self, arrays, lr, momentum, in_place_sgd=False, no_input_grad=False, bias_in_place=False,
                 relu_by_comparison=False):
        super().__init__(arrays, lr, momentum)
        self.changes = dict(in_place_sgd=in_place_sgd, no_input_grad=no_input_grad, bias_in_place=bias_in_place,
                            relu_by_comparison=relu_by_comparison)
        self.scratch = [np.empty_like(v) for v in self.optimizer.velocities]

    def linear_forward(self, layer, x):
        if not self.changes["bias_in_place"]:
            return layer.forward(x)
        layer._x, y = x, x @ layer.W
        y += layer.b
        return y

    def linear_backward(self, layer, g, input_grad=True):
        if not self.changes["bias_in_place"] and input_grad:
            return layer.backward(g)
        x = layer._x if self.changes["bias_in_place"] else layer._saved[0]
        layer.dW, layer.db = x.T @ g, np.einsum("nk->k", g)
        return g @ layer.W.T if input_grad else None

    def update(self):
        if not self.changes["in_place_sgd"]:
            return self.optimizer.step()
        for (layer, name), velocity, scratch in zip(self.optimizer.parameters, self.optimizer.velocities, self.scratch):
            velocity *= self.optimizer.momentum
            velocity += getattr(layer, "d" + name)
            np.multiply(velocity, -self.optimizer.lr, out=scratch)
            getattr(layer, name)[...] += scratch

    def step(self):
        first, relu, second = self.net.layers
        h = self.linear_forward(first, self.x)
        loss = self.loss.forward(self.linear_forward(second, relu.forward(h)), self.labels)
        g = self.linear_backward(second, self.loss.backward())
        g = np.multiply(g, h > 0) if self.changes["relu_by_comparison"] else relu.backward(g)
        self.linear_backward(first, g, input_grad=not self.changes["no_input_grad"])
        self.update()
        return loss


def variant(name, arrays, threads=steps.BLAS_THREADS[0], **changes):
    """A Contender: the generated step with changes, NumPy's BLAS on threads threads."""
    setup = partial(frameworks.blas_threads, threads) if frameworks.installed("threadpoolctl") else None
    return Contender(name, lambda: Changed(arrays, steps.LR, steps.MOMENTUM, **changes).step, setup=setup)


def contenders(arrays, threads=steps.BLAS_THREADS[0]):
    """The generated step ("tuned" here: the baseline of the ratios), each change alone, NumPy's BLAS on one
    thread, the step in float64 (Linear's default dtype; PyTorch's is float32), the changes all together, the
    tuned NumPy step and PyTorch on one thread."""
    found = [variant("tuned", arrays, threads),              # the generated step as it is: the ratios' baseline
             variant("sgd-in-place", arrays, threads, in_place_sgd=True),
             variant("no-input-grad", arrays, threads, no_input_grad=True),
             variant("bias-in-place", arrays, threads, bias_in_place=True),
             variant("relu-cmp", arrays, threads, relu_by_comparison=True),
             *([variant("blas-1t", arrays, 1)] if threads != 1 else []),
             variant("float64", {name: a.astype(np.float64) if a.dtype.kind == "f" else a for name, a in arrays.items()},
                     threads),
             variant("all", arrays, threads, in_place_sgd=True, no_input_grad=True, bias_in_place=True,
                     relu_by_comparison=True)]
    tuned_step = next(c for c in steps.contenders(arrays) if c.name == "tuned")
    found.append(Contender("numpy-tuned", tuned_step.make, setup=found[0].setup))
    if frameworks.installed("torch"):
        found.append(next(c for c in steps.contenders(arrays) if c.name == "torch-1t"))
    return found


def main(argv=None):
    args = argparse.ArgumentParser(prog="python -m codegen.bench.profile", description=__doc__)
    args.add_argument("--sizes", default="1,2", help="which of steps.SIZES (0 to 3), default 1,2 (the middle ones)")
    args.add_argument("--repeats", type=int, default=11)
    args.add_argument("--sample-ms", type=float, default=20.0)
    args.add_argument("--threads", type=int, default=steps.BLAS_THREADS[0], help="NumPy's BLAS threads (default 2)")
    args = args.parse_args(argv)
    rng = np.random.default_rng(0)
    for index in map(int, args.sizes.split(",")):
        size = steps.SIZES[index]
        arrays = steps.mlp_arrays(size, np.dtype("float32"), rng)
        if frameworks.installed("threadpoolctl"):
            frameworks.blas_threads(args.threads)
        mlp = steps.GeneratedMLP(arrays, steps.LR, steps.MOMENTUM)
        mlp.step()
        split = phases(mlp, max(5, args.repeats))
        total = sum(split.values())
        print(f"\nMLP step {steps.size_label(size)} float32, NumPy BLAS on {args.threads} thread(s), the generated "
              f"step phase by phase (median ms, share):")
        for phase, seconds in split.items():
            print(f"  {phase:<18} {seconds * 1e3:8.3f}  {seconds / total:5.1%}")
        found = contenders(arrays, args.threads)
        samples, _ = time_interleaved(found, args.repeats, args.sample_ms / 1e3, short_repeats=1)
        print("whole steps, over the generated step as it is (paired by repeat; < 1 is faster):")
        for contender in found:
            times = samples[contender.name]
            print(f"  {contender.name if contender.name != 'tuned' else 'generated':<14} {np.median(times) * 1e3:8.3f} ms"
                  f"  {paired_ratio(times, samples['tuned']):5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
