"""The engine's own cost (issue 25, target 4): a cache per operation that serves what a cold run writes, byte for
byte, and is invalidated by a change to the operation's declaration or to any source of the engine; a budget per
stage that refuses a runaway derivation in one line naming the operation and the stage."""
import os
import shutil
import time
from dataclasses import replace

import pytest
import sympy as sp

import codegen.pipeline as pipeline
import codegen.render as render
from codegen.bench.engine import SLOWEST, declarations_figures
from codegen.cli import main
from codegen.pipeline import ENGINE, cache_key, codegen, engine_digest, fingerprint
from codegen.render import GENERATOR, NOT_GENERATOR, ROOT, render_package
from codegen.stages import budgeted, in_stage, recording
from derive.catalog import CATALOG
from derive.declare import DeclarationError, activation
from derive.ops import build_catalog

# a layer and a loss with fused modules, and an index-notation layer (_tensor.py) without: the cheapest of each
SMALL = build_catalog(*(CATALOG[name] for name in ("ReLU", "Dropout", "MeanSquaredError")))
# a declaration whose derivation runs for minutes (codegen.bench.engine.SLOWEST)
RUNAWAY = SLOWEST[1]


def tree(folder):
    """{relative path: text} of the package's modules in folder."""
    return {path.relative_to(folder).as_posix(): path.read_text() for path in sorted(folder.rglob("*.py"))}


@pytest.fixture
def derivations(monkeypatch):
    """(names of the operations derived, names of those verified) from here on."""
    derived, verified = [], []

    def spying(function):
        def spy(op, *args, **kwargs):
            derived.append(op.name)
            return function(op, *args, **kwargs)
        return spy
    monkeypatch.setattr(render, "op_context", spying(render.op_context))
    monkeypatch.setattr(render, "module_context", spying(render.module_context))
    verify = pipeline.verify_package
    monkeypatch.setattr(pipeline, "verify_package",
                        lambda package, catalog: verified.extend(catalog) or verify(package, catalog))
    return derived, verified


def test_only_what_changed_is_derived_and_verified_and_the_files_are_a_cold_runs(tmp_path, derivations):
    """An operation added, or one changed, is the only one derived and verified again; the files that list the
    operations are rendered from the list alone (codegen.render.package_files)."""
    derived, verified = derivations
    out, cache = tmp_path / "pkg", tmp_path / "cache"
    codegen(build_catalog(SMALL["ReLU"], SMALL["Dropout"]), out, cache)
    derived.clear(), verified.clear()
    reports, written, _ = codegen(SMALL, out, cache)
    assert derived == verified == ["MeanSquaredError"] and "__init__.py" in written
    assert [report.name for report in reports] == ["ReLU", "Dropout", "MeanSquaredError", "ReLU (fast)",
                                                   "Dropout (fast)", "MeanSquaredError (fast)"]
    before = tree(out)
    assert before == render_package(SMALL)
    derived.clear(), verified.clear()
    assert codegen(SMALL, out, cache)[:2] == (reports, []) and derived == verified == []  # served whole
    changed = dict(SMALL, ReLU=replace(SMALL["ReLU"], summary="max(0, x), changed"))
    assert codegen(changed, out, cache)[1] == ["fast/relu.py", "relu.py"] and derived == verified == ["ReLU"]
    after = tree(out)
    assert [name for name in after if after[name] != before[name]] == ["fast/relu.py", "relu.py"]
    assert "max(0, x), changed" in after["relu.py"]
    (out / "relu.py").write_text("# edited by hand\n")
    assert codegen(changed, out, cache)[1] == ["relu.py"] and tree(out) == after


def test_every_generator_source_and_the_verifier_are_in_the_engine_digest():
    engine = {path for pattern in ENGINE for path in ROOT.glob(pattern)}
    generator = {path for pattern in GENERATOR for path in ROOT.glob(pattern)} - {
        path for pattern in NOT_GENERATOR for path in ROOT.glob(pattern)}
    assert generator <= engine and {ROOT / "codegen" / "verify.py", ROOT / "codegen" / "pipeline.py"} <= engine


def test_a_changed_engine_source_library_or_backend_invalidates_every_operation(tmp_path, monkeypatch):
    for folder in ("codegen", "derive", "templates"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("bench", "__pycache__"))
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    before = engine_digest(True)
    assert engine_digest(False) != before
    with (tmp_path / "codegen" / "printer.py").open("a") as printer:
        printer.write("# a changed generator source\n")
    edited = engine_digest(True)
    monkeypatch.setattr(pipeline, "library_versions", lambda: {"sympy": "0.0"})
    for engine in (edited, engine_digest(True)):
        assert engine != before
        assert all(cache_key(op, engine) != cache_key(op, before) for op in CATALOG.values())


def test_a_declaration_is_told_apart_by_every_field_and_its_symbols_assumptions():
    assert fingerprint(sp.Symbol("x", real=True)) != fingerprint(sp.Symbol("x"))
    tanh = CATALOG["Tanh"]
    keys = {cache_key(op, "engine") for op in (tanh, replace(tanh, tol=1e-5), replace(tanh, domain=(-1.0, 1.0)))}
    assert len(keys) == 3 and cache_key(tanh, "engine") == cache_key(CATALOG["Tanh"], "engine")


def test_processes_write_report_and_refuse_what_one_process_does(tmp_path, monkeypatch):
    # codegen(jobs=2) derives and verifies each operation in one of two forked processes: the files, the reports,
    # the stages recorded here and a refusal (the first in the catalog's order) are one process's
    pids = tmp_path / "pids"
    files = pipeline.operation_files
    monkeypatch.setattr(pipeline, "operation_files", lambda op, *args: pids.open("a").write(f"{os.getpid()}\n")
                        and files(op, *args))
    runs = {}
    for jobs in (1, 2):
        pids.write_text("")
        with recording() as stages:
            reports, _, _ = codegen(SMALL, tmp_path / f"out{jobs}", None, jobs=jobs)
        ran = set(pids.read_text().split())
        runs[jobs] = (reports, tree(tmp_path / f"out{jobs}"), sorted((name, stage) for name, stage, _ in stages))
        assert (str(os.getpid()) in ran) == (jobs == 1)
    assert runs[1] == runs[2]
    runaway = build_catalog(*SMALL.values(), activation("Runaway", RUNAWAY), activation("Later", "x + x"))
    with budgeted(0.5), pytest.raises(DeclarationError, match="^Runaway: deriving and printing its NumPy kernels"):
        codegen(runaway, tmp_path / "out3", None, jobs=2)
    assert not (tmp_path / "out3").exists()


def test_a_runaway_derivation_is_refused_within_its_budget_in_one_line(tmp_path, capsys):
    (tmp_path / "ops.py").write_text(f"from derive.declare import activation\n"
                                     f"OPS = [activation('Runaway', {RUNAWAY!r})]\n")
    start = time.perf_counter()
    assert main(["codegen", "--ops", str(tmp_path / "ops.py"), "--out", str(tmp_path / "out"), "--budget", "0.5"]) == 1
    assert time.perf_counter() - start < 10
    error = capsys.readouterr().err
    assert error.startswith("symgrad codegen: Runaway: deriving and printing its NumPy kernels took more than 0.5 s")
    assert error.count("\n") == 1 and not (tmp_path / "out").exists()
    assert main(["codegen", "--ops", str(tmp_path / "ops.py"), "--out", str(tmp_path / "out"), "--budget", "-1"]) == 1
    assert capsys.readouterr().err == ("symgrad codegen: --budget '-1': expected a positive number of seconds, "
                                       "e.g. 60\n")


def test_a_stage_that_swallows_exceptions_still_ends_at_its_budget():
    start = time.perf_counter()
    with pytest.raises(DeclarationError, match="^Stubborn: deriving took more than 0.2 s"):
        with in_stage("Stubborn", "deriving", seconds=0.2):
            while time.perf_counter() - start < 5:
                try:
                    time.sleep(0.01)
                except Exception:  # noqa: BLE001 - what SymPy does in places
                    pass
    assert time.perf_counter() - start < 1


def test_stages_are_recorded_and_the_engine_bench_times_each_declaration():
    with recording() as stages:
        with in_stage("Quick", "deriving"):
            pass
    assert [(name, stage) for name, stage, _ in stages] == [("Quick", "deriving")]
    lines = declarations_figures([RUNAWAY], 0.5, "numpy", "slowest")
    assert lines[0].split()[:2] == ["slowest", "(budget"] and lines[1].startswith("Slow1")
    assert "refused: Slow1: deriving and printing its NumPy kernels took more than 0.5 s" in "\n".join(lines)
