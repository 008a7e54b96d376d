"""python -m codegen.bench.profile_transformer: where the demo transformer's Adam step (make bench's `transformer`
rows) spends its time, layer by layer, generated against PyTorch on the same thread count.

The generated step's phases are its layers' own calls, each timed around it. PyTorch's forward phases are its
modules' calls (forward pre- and post-hooks); a backward phase runs from the module's backward pre-hook (its
output's gradient is ready) to its full backward hook (its inputs' gradients are), or for an embedding, whose
input is integers, to its table's gradient accumulated. What falls between phases (the residual adds, reshapes,
zero_grad, autograd's bookkeeping) is `rest`, the step's time less its phases'."""
import os

# as make bench (codegen/bench/__main__.py): OpenMP's threads, numba's and torch's, wait passively after a parallel
# region, so that NumPy's BLAS threads find the cores free; set before either runtime starts
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import argparse  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from functools import partial  # noqa: E402

import numpy as np  # noqa: E402

from codegen import demo_transformer  # noqa: E402
from codegen.bench import frameworks, steps  # noqa: E402

# the phases in the order a step runs them forward; each layer of the generated model by its attribute
LAYERS = (("embeddings", "token"), ("embeddings", "position"), ("norm 1", "norm1"), ("attention", "attention"),
          ("norm 2", "norm2"), ("MLP linear 1", "fc1"), ("GELU", "gelu"), ("MLP linear 2", "fc2"),
          ("final norm", "norm"), ("head", "head"))
PHASES = tuple(dict.fromkeys(phase for phase, _ in LAYERS)) + ("loss",)


def timed(seconds, key, method):
    """method, each call's seconds added to seconds[key]."""
    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - start
    return call


def generated_layers(model):
    """{attribute: layer} of the generated model, its MLP's three layers named as torch_transformer's modules."""
    fc1, gelu, fc2 = model.mlp.layers
    return {"token": model.token, "position": model.position, "norm1": model.norm1, "attention": model.attention,
            "norm2": model.norm2, "fc1": fc1, "gelu": gelu, "fc2": fc2, "norm": model.norm, "head": model.head}


def generated_phases(config, batch, calls, package=None):
    """{(phase, "forward" or "backward"): seconds a step}, "Adam" and "step" (the whole), over calls steps of
    the generated step (codegen/bench/steps.py; with package generated.fast, its fused classes where it has
    them), each layer's forward and backward timed around its call."""
    step = steps.GeneratedTransformer(config, batch, *([package] if package else []))
    step.step()
    seconds = defaultdict(float)
    layers = generated_layers(step.model)
    for phase, name in LAYERS:
        for direction in ("forward", "backward"):
            method = getattr(layers[name], direction)
            setattr(layers[name], direction, timed(seconds, (phase, direction), method))
    step.loss.forward = timed(seconds, ("loss", "forward"), step.loss.forward)
    step.loss.backward = timed(seconds, ("loss", "backward"), step.loss.backward)
    step.optimizer.step = timed(seconds, ("Adam", ""), step.optimizer.step)
    timed(seconds, ("step", ""), lambda: [step.step() for _ in range(calls)])()
    return {key: value / calls for key, value in seconds.items()}


def torch_phases(config, batch, calls):
    """generated_phases' dict for the same step in PyTorch (codegen/bench/torch_transformer.py), from hooks."""
    from torch import nn

    from codegen.bench.torch_transformer import TorchTransformerStep
    step = TorchTransformerStep(demo_transformer.Transformer(config, dtype=np.float32), batch["x"], batch["targets"],
                                config.lr, demo_transformer.IGNORED)
    net, seconds, started = step.net, defaultdict(float), {}

    def mark(key):
        started[key] = time.perf_counter()

    def add(key):
        seconds[key] += time.perf_counter() - started.pop(key)

    for phase, name in LAYERS:
        module = getattr(net, name)
        module.register_forward_pre_hook(lambda m, args, key=(phase, name, "forward"): mark(key))
        module.register_forward_hook(lambda m, args, out, key=(phase, name, "forward"): add(key))
        module.register_full_backward_pre_hook(lambda m, g, key=(phase, name, "backward"): mark(key))
        if isinstance(module, nn.Embedding):
            module.weight.register_post_accumulate_grad_hook(lambda p, key=(phase, name, "backward"): add(key))
        else:
            module.register_full_backward_hook(lambda m, gi, go, key=(phase, name, "backward"): add(key))

    def one_step():
        logits = net(step.tokens)
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), step.targets.reshape(-1),
                                           ignore_index=step.ignored)
        seconds[("loss", "forward")] += time.perf_counter() - start
        step.optimizer.zero_grad()
        mark(("loss", "head", "backward start"))
        loss.backward()
        start = time.perf_counter()
        step.optimizer.step()
        seconds[("Adam", "")] += time.perf_counter() - start

    head_backward = {}   # the loss's backward ends where the head's begins
    net.head.register_full_backward_pre_hook(lambda m, g: head_backward.update(at=time.perf_counter()))
    one_step()
    seconds.clear()
    loss_backward = 0.0
    start = time.perf_counter()
    for _ in range(calls):
        one_step()
        loss_backward += head_backward["at"] - started.pop(("loss", "head", "backward start"))
    seconds[("step", "")] = time.perf_counter() - start
    merged = defaultdict(float)
    for key, value in seconds.items():
        merged[(key[0], key[-1]) if len(key) == 3 else key] += value
    merged[("loss", "backward")] = loss_backward
    return {key: value / calls for key, value in merged.items()}


def table(found):
    """The printed rows: each phase's forward and backward ms a step for each contender (found: {name: phases},
    the last the baseline), the others' over the baseline's; then Adam, rest and the whole step."""
    names = list(found)
    *ours, baseline = names
    lines = [f"  {'phase':<22}" + "".join(f"{name:>12}" for name in names)
             + "".join(f"{name + ' / ' + baseline:>22}" for name in ours)]

    def row(label, key):
        values = [found[name].get(key, 0.0) for name in names]
        ratios = "".join(f"{v / values[-1]:22.2f}" if values[-1] > 0 else f"{'':>22}" for v in values[:-1])
        return f"  {label:<22}" + "".join(f"{v * 1e3:12.3f}" for v in values) + ratios

    for phase in PHASES:
        for direction in ("forward", "backward"):
            lines.append(row(f"{phase} {direction}", (phase, direction)))
    for name in names:
        phases = sum(value for key, value in found[name].items() if key != ("step", ""))
        found[name][("rest", "")] = found[name][("step", "")] - phases
    lines += [row("Adam", ("Adam", "")), row("rest", ("rest", "")), row("step", ("step", ""))]
    return lines


def main(argv=None):
    args = argparse.ArgumentParser(prog="python -m codegen.bench.profile_transformer", description=__doc__)
    args.add_argument("--threads", type=int, default=1, help="NumPy's BLAS threads and torch's (default 1)")
    args.add_argument("--calls", type=int, default=20, help="steps timed per round (default 20)")
    args.add_argument("--rounds", type=int, default=5, help="rounds, alternating the two; medians (default 5)")
    args.add_argument("--sizes", default="0,1", help="which of steps.TRANSFORMER_SIZES, default both")
    args.add_argument("--tiny", action="store_true", help="steps.TRANSFORMER_TINY instead: checks the instrument")
    args = args.parse_args(argv)
    if frameworks.installed("threadpoolctl"):
        frameworks.blas_threads(args.threads)
    contenders = {"generated": generated_phases}
    if frameworks.installed("numba"):
        import numba

        import generated.fast
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        contenders["numba"] = partial(generated_phases, package=generated.fast)
    if frameworks.installed("torch"):
        frameworks.torch_threads(args.threads)
        contenders[f"torch-{args.threads}t"] = torch_phases
    configs = steps.TRANSFORMER_TINY if args.tiny else [steps.TRANSFORMER_SIZES[int(i)] for i in args.sizes.split(",")]
    for config in configs:
        batch = steps.transformer_batch(config)
        calls = max(1, args.calls * steps.TRANSFORMER_SIZES[0].batch // config.batch)
        rounds = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, phases in contenders.items():
                rounds[name].append(phases(config, batch, calls))
        found = {name: {key: float(np.median([r.get(key, 0.0) for r in runs])) for key in runs[0]}
                 for name, runs in rounds.items()}
        print(f"\ntransformer step {steps.transformer_label(config)} float32, {args.threads} thread(s): "
              f"ms a step, medians of {args.rounds} rounds of {calls} steps")
        print("\n".join(table(found)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
