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
    """{phase: median seconds} over calls steps of a GeneratedMLP, each phase timed alone (the first Linear's
    backward as Sequential.backward calls it: its params' gradients alone)."""
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
        first.backward(g, input_grad=False)
        marks.append(time.perf_counter())
        mlp.optimizer.step()
        marks.append(time.perf_counter())
        for phase, start, end in zip(PHASES, marks, marks[1:]):
            seconds[phase].append(end - start)
    return {phase: float(np.median(times)) for phase, times in seconds.items()}


class Changed(steps.GeneratedMLP):
    """The generated step with the changes asked for, each what a generator could print instead (or did before):
    input_grad: the first Linear's dx = g W^T computed, which nothing reads (Sequential.backward(g,
        input_grad=True); before issue 25 every step did);
    relu_by_comparison: ReLU's backward as g (x > 0), one pass where the generated takes three (clip, ceil,
        multiply) to keep a NaN (symgrad's NaN policy: another function at NaN, timed to show the policy's cost)."""

    def __init__(self, arrays, lr, momentum, input_grad=False, relu_by_comparison=False):
        super().__init__(arrays, lr, momentum)
        self.changes = dict(input_grad=input_grad, relu_by_comparison=relu_by_comparison)

    def step(self):
        first, relu, second = self.net.layers
        h = first.forward(self.x)
        loss = self.loss.forward(second.forward(relu.forward(h)), self.labels)
        g = second.backward(self.loss.backward())
        g = np.multiply(g, h > 0) if self.changes["relu_by_comparison"] else relu.backward(g)
        first.backward(g, input_grad=self.changes["input_grad"])
        self.optimizer.step()
        return loss


def variant(name, arrays, threads=steps.BLAS_THREADS[0], **changes):
    """A Contender: the generated step with changes, NumPy's BLAS on threads threads."""
    setup = partial(frameworks.blas_threads, threads) if frameworks.installed("threadpoolctl") else None
    return Contender(name, lambda: Changed(arrays, steps.LR, steps.MOMENTUM, **changes).step, setup=setup)


def contenders(arrays, threads=steps.BLAS_THREADS[0]):
    """The generated step ("tuned" here: the baseline of the ratios), each change alone, NumPy's BLAS on one
    thread, the step in float64, the tuned NumPy step and PyTorch on one thread."""
    found = [variant("tuned", arrays, threads),              # the generated step as it is: the ratios' baseline
             variant("input-grad", arrays, threads, input_grad=True),
             variant("relu-cmp", arrays, threads, relu_by_comparison=True),
             *([variant("blas-1t", arrays, 1)] if threads != 1 else []),
             variant("float64", {name: a.astype(np.float64) if a.dtype.kind == "f" else a for name, a in arrays.items()},
                     threads)]
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
