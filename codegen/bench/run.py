"""Timing, memory, the table, the JSON and the targets' summary of make bench."""
import argparse
import gc
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import generated
from codegen.bench import frameworks, layers, steps
from codegen.bench.cases import CASES, contenders, make_inputs
from codegen.bench.targets import find, issue6, issue25, paired_ratio

SIZES = ((64, 10), (1024, 100), (8192, 1000))
DTYPES = ("float32", "float64")
GROUPS = ("losses", "layers", "steps", "engine")
COLUMNS = (("case", 13), ("size", 20), ("dtype", 8), ("contender", 10), ("median ms", 10), ("iqr %", 8),
           ("x tuned", 8), ("copies", 8), ("peak MB", 9), ("x input", 8))


def calls_per_sample(step, sample_seconds):
    """How many calls of step last sample_seconds, from a batch lasting at least a tenth of that;
    the batches are the warm-up too (JAX compiles, pages are faulted in)."""
    count = 1
    while True:
        start = time.perf_counter()
        for _ in range(count):
            step()
        elapsed = time.perf_counter() - start
        if elapsed >= sample_seconds / 10:
            return max(1, round(count * sample_seconds / elapsed))
        count *= 10


# A call shorter than a sample takes SHORT_REPEATS times the repeats: a sample of it costs no more than
# the least duration of a sample, so the extra repeats cost seconds, and its figures spread widest (30-70%
# at (64, 10) in a busy phase, 30-50% at (1024, 100) behind torch's and JAX's threads), a median's error
# falling as the square root of the repeats. About three minutes more over the whole table.
SHORT_REPEATS = 5


def balanced_orders(count, rng):
    """Orders of count contenders (numbers 0 to count - 1) in which each contender comes right after
    every other one equally often: a Williams design, count orders (twice as many for an odd count),
    each the first one with every number shifted by the same amount mod count. The numbers are
    assigned to the contenders in rng's random order."""
    first = [(k + 1) // 2 if k % 2 else (count - k // 2) % count for k in range(count)]
    orders = [[(n + shift) % count for n in first] for shift in range(count)]
    if count % 2:
        orders += [order[::-1] for order in orders]
    named = rng.permutation(count)
    return [[int(named[n]) for n in order] for order in orders]


def time_interleaved(found, repeats, sample_seconds, short_repeats=SHORT_REPEATS):
    """({name: [seconds per call]}, {name: calls timed}). Each repeat takes one sample of every
    contender, so that a drift in the machine's speed is shared out rather than landing on one
    contender, and the repeats' orders are balanced (balanced_orders, the repeats rounded up to a
    whole number of its orders) so that what a contender leaves behind for the next is shared out
    too: threads of torch, JAX or numba still spinning on the other core, memory the allocator has
    just given back. (Rotating one order kept each contender behind the same one: the generated
    classes always followed JAX and a copy, and measured 1.20x and 1.28x the tuned NumPy at
    (1024, 100) float32. Orders shuffled by a fixed seed did not balance 21 repeats: there the
    generated Linear at (1024, 100) measured 1.06x-1.14x the tuned in five runs, the same calls,
    and 1.00x with one contender more, which changed the orders.)
    Each sample's count of calls follows from the previous one's time per call, so a contender
    slowed down mid-run (threads waiting for a busy core) cannot stretch the run by its whole slowdown.
    Where the tuned NumPy's median call after those repeats is shorter than a sample, the repeats go
    on to short_repeats times as many."""
    steps, calls = {}, {}
    for contender in found:
        if contender.setup:
            contender.setup()
        steps[contender.name] = contender.make()
        calls[contender.name] = calls_per_sample(steps[contender.name], sample_seconds)
    samples = {contender.name: [] for contender in found}
    timed = dict.fromkeys(steps, 0)
    orders = balanced_orders(len(found), np.random.default_rng(0))
    def whole(count):                           # count rounded up to whole rounds of the orders
        return -(-count // len(orders)) * len(orders)
    gc.disable()
    try:
        for repeat in range(whole(repeats * short_repeats)):
            if repeat == whole(repeats) and np.median(samples.get("tuned", samples[found[0].name])) >= sample_seconds:
                break
            for contender in (found[n] for n in orders[repeat % len(orders)]):
                step, count = steps[contender.name], calls[contender.name]
                if contender.setup:
                    contender.setup()
                    step()                    # untimed: torch rebuilds its thread pool on the first call after
                start = time.perf_counter()
                for _ in range(count):
                    step()
                per_call = (time.perf_counter() - start) / count
                samples[contender.name].append(per_call)
                timed[contender.name] += count
                calls[contender.name] = max(1, round(sample_seconds / per_call))
    finally:
        gc.enable()
    return samples, timed


def peak_extra_bytes(contender):
    """Peak bytes allocated during one forward + backward of a new instance, its results included;
    None where tracemalloc cannot see the allocations. The collector is held off rather than run first
    (a full collection costs a tenth of a second with torch and JAX loaded; it could only lower the peak)."""
    if not contender.traced:
        return None
    step = contender.make()
    gc.disable()
    tracemalloc.start()
    try:
        step()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        gc.enable()


@dataclass(frozen=True)
class Unit:
    """Contenders timed side by side on the same inputs: one block of rows of the table."""

    group: str
    case: str
    size: str
    dtype: str
    contenders: list
    input_bytes: int         # the first input's, what peak memory is compared with
    extra: dict = field(default_factory=dict)


def loss_units(cases, sizes, dtypes, rng):
    """The losses and activations (codegen/bench/cases.py) at every size and dtype; inputs made one unit at a time."""
    for case in cases:
        for N, K in sizes:
            for dtype in dtypes:
                inputs = make_inputs(case, N, K, np.dtype(dtype), rng)
                yield Unit("losses", case.name, f"{N}x{K}", dtype, contenders(case, inputs), inputs["x"].nbytes,
                           {"N": N, "K": K})


def layer_units(classes, tiny, rng):
    """The layers of issue 25 (codegen/bench/layers.py), float32; classes: {case: its generated class or None}."""
    for case in layers.LAYERS:
        size = case.tiny if tiny else case.size
        arrays = case.arrays(size, np.dtype("float32"), rng)
        yield Unit("layers", case.name, layers.size_label(size), "float32",
                   layers.contenders(case, size, arrays, classes[case.name]), arrays[case.inputs[0]].nbytes)


def step_units(tiny, rng):
    """The MLP's SGD step and the demo transformer's Adam step (codegen/bench/steps.py) at each size, float32."""
    for size in steps.TINY if tiny else steps.SIZES:
        arrays = steps.mlp_arrays(size, np.dtype("float32"), rng)
        yield Unit("steps", "mlp_sgd", steps.size_label(size), "float32", steps.contenders(arrays), arrays["x"].nbytes)
    for config in steps.TRANSFORMER_TINY if tiny else steps.TRANSFORMER_SIZES:
        batch = steps.transformer_batch(config)
        yield Unit("steps", "transformer", steps.transformer_label(config), "float32",
                   steps.transformer_contenders(config, batch), batch["x"].nbytes)


def bench(units, repeats, sample_seconds, only=None, short_repeats=SHORT_REPEATS):
    """A record per unit and contender, each printed as a table row once measured; only: the contenders
    to time (tuned and copy always are: the ratios need them), None for all."""
    records = []
    for unit in units:
        found = [c for c in unit.contenders if only is None or c.name in set(only) | {"tuned", "copy"}]
        samples, calls = time_interleaved(found, repeats, sample_seconds, short_repeats)
        for contender in found:
            times = samples[contender.name]
            peak = peak_extra_bytes(contender)
            record = {"group": unit.group, "case": unit.case, "size": unit.size, **unit.extra, "dtype": unit.dtype,
                      "contender": contender.name, "median_s": float(np.median(times)),
                      "q1_s": float(np.percentile(times, 25)), "q3_s": float(np.percentile(times, 75)),
                      "x_tuned": paired_ratio(times, samples["tuned"]) if "tuned" in samples else None,
                      "copies": paired_ratio(times, samples["copy"]),
                      "peak_bytes": peak, "peak_x_input": None if peak is None else peak / unit.input_bytes,
                      "repeats": len(times), "calls": calls[contender.name], "samples_s": times}
            records.append(record)
            print(row(record), flush=True)
    return records


def row(record):
    """One line of the table."""
    peak = record["peak_bytes"]
    cells = (record["case"], record["size"], record["dtype"], record["contender"],
             f"{record['median_s'] * 1e3:.4g}", f"{(record['q3_s'] - record['q1_s']) / record['median_s'] * 100:.1f}",
             "n/a" if record["x_tuned"] is None else f"{record['x_tuned']:.2f}", f"{record['copies']:.1f}",
             "n/a" if peak is None else f"{peak / 1e6:.1f}",
             "n/a" if peak is None else f"{record['peak_x_input']:.2f}")
    return format_row(cells)


def format_row(cells):
    return "".join(f"{cell:<{width}}" if n < 4 else f"{cell:>{width}}"
                   for n, (cell, (_, width)) in enumerate(zip(cells, COLUMNS)))


def codegen_seconds():
    """{"cold": wall seconds of symgrad codegen into an empty folder deriving everything (--no-cache), "no input
    changed": of a run with nothing to derive (the cache filled first)}, each a process of its own, as make codegen."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "codegen", "codegen", "--out", str(Path(folder) / "generated")]
        seconds = {}
        for what, options in (("cold", ["--no-cache"]), ("filling the cache", []), ("no input changed", [])):
            start = time.perf_counter()
            subprocess.run(command + options, check=True, capture_output=True)
            seconds[what] = time.perf_counter() - start
    return seconds


def variant_costs(records):
    """For each variant (hand-written NumPy of another function at NaN), the generated time over the
    variant's at every size and dtype, lowest to highest: what the generated function's NaN policy costs."""
    costs = {}
    for case in CASES:
        for name, _ in case.variants:
            ratios = sorted((g["x_tuned"] / v["x_tuned"], g) for v in find(records, name, case=case.name)
                            for g in find(records, "generated", case=case.name, size=v["size"], dtype=v["dtype"]))
            if ratios:
                costs[f"{case.name}: generated over {name}"] = f"{ratios[0][0]:.2f}x-{ratios[-1][0]:.2f}x"
    return costs


def versions():
    found = {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count()}
    found.update({name: __import__(name).__version__ for name in frameworks.FRAMEWORKS if frameworks.installed(name)})
    return found


def cpu():
    """The host's CPU model and its vector extensions of note, from /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = fields.get("flags", "").split()
    return {"model": fields.get("model name", "?"),
            "vector": [flag for flag in flags if flag in ("avx2", "fma") or flag.startswith("avx512")]}


def parse_sizes(text):
    return tuple(tuple(int(n) for n in size.split("x")) for size in text.split(","))


def names(text):
    return tuple(text.split(","))


def parser():
    args = argparse.ArgumentParser(prog="python -m codegen.bench", description=__doc__)
    args.add_argument("--only", type=names, default=GROUPS, help=(
                      "run only these groups: losses (losses and activations at --sizes and --dtypes), layers "
                      "(issue 25's layers), steps (the MLP's training step), engine (symgrad codegen's own time); "
                      "default all"))
    args.add_argument("--tiny", action="store_true", help=(
                      "every layer and step at a tiny size of its form, the losses at 4x3 unless --sizes says: "
                      "to check the instrument, not to measure"))
    args.add_argument("--sizes", type=parse_sizes, help="the losses' NxK,... (default 64x10,1024x100,8192x1000)")
    args.add_argument("--dtypes", type=names, default=DTYPES, help="the losses' dtypes (default float32,float64)")
    args.add_argument("--cases", type=names, default=tuple(c.name for c in CASES), help="the losses' cases (default all)")
    args.add_argument("--repeats", type=int, default=21, help="interleaved samples of each contender (default 21)")
    args.add_argument("--short-repeats", type=int, default=SHORT_REPEATS, help=(
                      f"where a tuned call is shorter than a sample, this many times the repeats "
                      f"(default {SHORT_REPEATS})"))
    args.add_argument("--sample-ms", type=float, default=10.0, help="least duration of one sample (default 10)")
    args.add_argument("--contenders", type=names,
                      help="time only these (tuned and copy always are), e.g. generated,seed")
    args.add_argument("--json", type=Path, help="where to write the results as JSON")
    return args


def notes_of(cases, classes):
    """What the run leaves out or stands in, said before the table."""
    found = [f"note: generated.{case.op} does not exist yet: {case.name} is timed without it"
             for case in cases if not hasattr(generated, case.op)]
    found += [note for _, note in classes.values() if note]
    found += [f"note: {name} is not installed (make bench installs it): its rows are left out"
              for name in frameworks.FRAMEWORKS if not frameworks.installed(name)]
    if any(frameworks.installed(name) for name in frameworks.FRAMEWORKS):
        found.append("note: torch and JAX allocate where tracemalloc cannot see: their memory is n/a")
    found.append(f"note: OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} (torch's and numba's threads)")
    return found


def main(argv=None):
    args = parser().parse_args(argv)
    for what, asked, known in (("group", args.only, GROUPS), ("case", args.cases, [c.name for c in CASES])):
        if set(asked) - set(known):
            raise SystemExit(f"unknown {what}(s) {sorted(set(asked) - set(known))}; they are {', '.join(known)}")
    cases = [case for case in CASES if case.name in args.cases] if "losses" in args.only else []
    sizes = args.sizes or (((4, 3),) if args.tiny else SIZES)
    classes = {case.name: layers.generated_class(case) for case in layers.LAYERS} if "layers" in args.only else {}
    notes = notes_of(cases, classes)
    # other work on the machine slows threaded contenders most: the load says how quiet it was
    load, host = {"before": os.getloadavg()[0]}, cpu()
    print("\n".join(notes + [f"host: {host.get('model', '?')}, {os.cpu_count()} CPUs, {' '.join(host.get('vector', ()))}",
                             f"load average before: {load['before']:.2f}"]))
    print(format_row([name for name, _ in COLUMNS]))
    rng = np.random.default_rng(0)
    units = itertools.chain(loss_units(cases, sizes, args.dtypes, rng),
                            layer_units({name: cls for name, (cls, _) in classes.items()}, args.tiny, rng)
                            if "layers" in args.only else (),
                            step_units(args.tiny, rng) if "steps" in args.only else ())
    records = bench(units, args.repeats, args.sample_ms / 1e3, args.contenders, args.short_repeats)
    load["after"] = os.getloadavg()[0]
    print(f"load average after: {load['after']:.2f}")
    missing = {case.name: f"generated.{case.op} is not in the catalog yet" for case in layers.LAYERS
               if case.name in classes and classes[case.name][0] is None}
    codegen = codegen_seconds() if "engine" in args.only else None
    summary = issue6(records, codegen) + issue25(records, missing, codegen)
    for entry in summary:
        status = {True: "met", False: "NOT MET", None: "-"}[entry["met"]]
        print(f"target {entry['target']}: {status}, {entry['figure']}")
    costs = variant_costs(records)
    for what, figure in costs.items():
        print(f"the cost of the NaN policy, {what}: {figure}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"versions": versions(), "cpu": host, "load_average": load, "notes": notes,
                                         "records": records, "targets": summary, "policy_costs": costs}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0
