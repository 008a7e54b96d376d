"""make bench-engine: the seconds symgrad codegen spends on each operation, stage by stage, for the whole catalog
and for the slowest declarations found so far, then the run's own figures (cold, no input changed, one declaration
changed) against issue 25's targets.

    .venv/bin/python -m codegen.bench.engine                    the catalog, then SLOWEST
    .venv/bin/python -m codegen.bench.engine --search 20        also 20 random depth-4 compositions, slowest first

A stage past its budget (codegen.stages.BUDGET, --budget) refuses its operation: the row says so."""
import argparse
import os
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import sympy as sp

from codegen.pipeline import codegen
from codegen.stages import BUDGET, recording
from derive.catalog import CATALOG
from derive.declare import DeclarationError, activation
from derive.ops import Op, build_catalog
from derive.symbols import i, x

# the columns, by the first word of a stage's name (codegen.render and codegen.pipeline name them)
COLUMNS = {"deriving": "derive", "lowering": "lower", "printing": "fused", "verification": "verify"}
ORDER = ("derive", "lower", "fused", "verify", "verify (fast)")
# issue 25's targets: make codegen from cold, and after one declaration changed
TARGETS = {"cold": 30.0, "one declaration changed": 3.0}
# the slowest declarations found (make bench-engine --search), each a depth-4 composition: of four of the catalog's
# activations (Slow1, 2, 3, 5, 6: Slow2 derives for more than 5 minutes) or of the fuzzer's grammar (Slow4, in
# tests/fuzz.py); seconds on this 2-core machine in docs/engine-cost.md
SLOWEST = (
    "sigmoid(sigmoid(sigmoid(x))*(1 + tanh(sqrt(2/pi)*(sigmoid(sigmoid(x)) + 0.044715*sigmoid(sigmoid(x))**3)))/2)",
    "sigmoid(x/(1 + Abs(x))*sigmoid(x/(1 + Abs(x)))/(1 + Abs(x/(1 + Abs(x))*sigmoid(x/(1 + Abs(x))))))",
    "Min(1.0, (tanh(sqrt(2)*(0.044715*sigmoid(x)**3 + sigmoid(x))/sqrt(pi)) + 1)*sigmoid(x)"
    "*sigmoid((tanh(sqrt(2)*(0.044715*sigmoid(x)**3 + sigmoid(x))/sqrt(pi)) + 1)*sigmoid(x)/2)/2)",
    "log((Abs(x) - log(sigmoid(x/(1 + Abs(x)))))**2 + 1)",
    "tanh(log(exp(sigmoid(Max(0, x*tanh(log(exp(x) + 1))))) + 1))*sigmoid(Max(0, x*tanh(log(exp(x) + 1))))",
    # GELU(sigmoid(SiLU(SELU(x))))
    "(erf(sqrt(2)*sigmoid(SELU*sigmoid(SELU))/2) + 1)*sigmoid(SELU*sigmoid(SELU))/2".replace(
        "SELU", "1.0507009873554804934193349852946*Piecewise((x, x > 0), (1.6732632423543772848170429916717*exp(x)"
                " - 1.6732632423543772848170429916717, True))"),
)


def column(stage):
    """The table's column of a stage, by its first word."""
    word = stage.split()[0]
    return COLUMNS.get(word, word)


def timed(catalog, out, **options):
    """(seconds per {operation: {column: seconds}}, seconds of the whole run, refusal or None) of codegen."""
    start, refusal = time.perf_counter(), None
    with recording() as stages:
        try:
            codegen(catalog, out, **options)
        except DeclarationError as error:
            refusal = str(error)
    table = {}
    for name, stage, seconds in stages:
        operation, fast = name.removesuffix(" (fast)"), name.endswith(" (fast)")
        key = column(stage) + (" (fast)" if fast else "")
        table.setdefault(operation, {}).setdefault(key, 0.0)
        table[operation][key] += seconds
    return table, time.perf_counter() - start, refusal


def rows(label, entries):
    """The table's lines: an operation a line (entries: [(operation, {column: seconds}, [notes under it])]),
    its seconds per stage and in all."""
    present = {key for _, stages, _ in entries for key in stages}
    columns = [key for key in ORDER if key in present] + sorted(present - set(ORDER))
    lines = [f"{label:<34}" + "".join(f"{key:>15}" for key in columns) + f"{'total':>9}"]
    for operation, stages, notes in entries:
        lines.append(f"{operation:<34}" + "".join(f"{stages[key]:>15.2f}" if key in stages else f"{'':>15}"
                                                 for key in columns) + f"{sum(stages.values()):>9.2f}")
        lines.extend(f"    {note}" for note in notes)
    return lines


def one_declaration_changed(catalog):
    """The catalog with its first layer's summary changed: a new declaration, the same kernels."""
    name = next(name for name, op in catalog.items() if op.kind == "layer")
    return dict(catalog, **{name: replace(catalog[name], summary=catalog[name].summary + " (changed)")})


def catalog_figures(backend):
    """Lines of the catalog's table (one process: each stage's own seconds), and of cold, no-input-changed and
    one-changed runs as make codegen does them (a process per core) against the targets."""
    with tempfile.TemporaryDirectory() as folder:
        out, cache = Path(folder) / "generated", Path(folder) / "cache"
        table, serial, refusal = timed(CATALOG, out, cache=None, backend=backend, jobs=1)
        staged = sum(sum(stages.values()) for stages in table.values())
        lines = rows(f"catalog ({len(CATALOG)} operations)", [(name, stages, []) for name, stages in table.items()])
        lines.append(f"{'(the package: imports, rendering, staging)':<34}{serial - staged:>9.2f}")
        if refusal:
            return lines + [f"refused: {refusal}"]
        figures = {"cold, one process": serial}
        start = time.perf_counter()
        codegen(CATALOG, Path(folder) / "again", cache=None, backend=backend, jobs=None)
        figures["cold"] = time.perf_counter() - start
        codegen(CATALOG, out, cache=cache, backend=backend, jobs=None)  # fills the cache
        changed = one_declaration_changed(CATALOG)
        for what, catalog in (("no input changed", CATALOG), ("one declaration changed", changed)):
            start = time.perf_counter()
            codegen(catalog, out, cache=cache, backend=backend, jobs=None)
            figures[what] = time.perf_counter() - start
    lines.append("")
    for what, seconds in figures.items():
        target = TARGETS.get(what)
        verdict = f" (target {target:g} s: {'met' if seconds <= target else 'NOT met'})" if target else ""
        jobs = " (one process)" if what.endswith("one process") else f" ({os.cpu_count()} processes)"
        lines.append(f"make codegen, {what.removesuffix(', one process')}: {seconds:.2f} s in process{jobs}{verdict}")
    lines.append("(add Python's start and the imports, about 1 s: python -X importtime -m codegen codegen)")
    return lines


def compositions(count, seed):
    """count random depth-4 compositions: of four of the catalog's activations, or a depth-4 expression of the
    fuzzer's grammar (tests/fuzz.py, in a checkout)."""
    scalar = sp.Symbol("x", real=True)
    functions = [op.forward.subs({p.symbol: p.default for p in op.params}).subs(x[i], scalar)
                 for op in CATALOG.values() if isinstance(op, Op) and op.kind == "layer" and not op.forward.has(sp.Sum)]
    rng = random.Random(seed)
    try:
        from tests import fuzz
    except ImportError:
        fuzz = None
    found = []
    for _ in range(count):
        if fuzz is not None and rng.random() < 0.5:
            found.append(fuzz.expression(fuzz.RandomChooser(rng), 4, "x", ("x",), ()))
            continue
        expr = scalar
        for _ in range(4):
            expr = rng.choice(functions).subs(scalar, expr)
        found.append(sp.sstr(expr))
    return found


def declarations_figures(texts, budget, backend, label, prefix="Slow"):
    """Lines of the table of each declaration alone (each its own codegen run, its operation named prefix and
    its number), slowest first."""
    entries = []
    for number, text in enumerate(texts, 1):
        name, shown = f"{prefix}{number}", f"{text[:110]}{'...' if len(text) > 110 else ''}"
        try:
            op = activation(name, text)
        except DeclarationError as error:  # constant, or underivable: nothing for the engine to do
            entries.append((name, {}, [shown, f"refused on declaring: {error}"]))
            continue
        with tempfile.TemporaryDirectory() as folder:
            table, total, refusal = timed(build_catalog(op), Path(folder) / "out", cache=None, backend=backend,
                                          budget=budget)
        entries.append((name, table.get(name, {}), [shown] + ([f"refused: {refusal}"] if refusal else [])))
    entries.sort(key=lambda entry: -sum(entry[1].values()))
    return rows(f"{label} (budget {budget:g} s a stage)", entries)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Seconds per operation and stage of symgrad codegen.")
    parser.add_argument("--backend", choices=("numpy", "fast", "all"), default="all")
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds a stage may take (default %(default)g)")
    parser.add_argument("--search", type=int, default=0, metavar="COUNT",
                        help="also time COUNT random depth-4 compositions (the slowest go in SLOWEST)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"symgrad codegen's own cost, {os.cpu_count()} cores, backend {args.backend}, no cache unless said")
    print("\n".join(catalog_figures(args.backend)))
    print()
    print("\n".join(declarations_figures(SLOWEST, args.budget, args.backend, "the slowest declarations found")))
    if args.search:
        print()
        print("\n".join(declarations_figures(compositions(args.search, args.seed), args.budget, args.backend,
                                             f"{args.search} random depth-4 compositions, seed {args.seed}",
                                             "Random")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
