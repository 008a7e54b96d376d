"""make codegen: derive and render the catalog, verify the staged kernels, then publish them. What each
operation came to (its modules' text, its verification reports) is kept per operation in build/, keyed by
everything it depends on, so that a run derives and verifies only the operations whose inputs changed."""
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import types
import zlib
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass

import numpy as np
import sympy as sp

from codegen import stages
from codegen.accuracy import figures
from codegen.render import CATALOG_SOURCE, FAST, ROOT, environment, generator_digest, operation_files, package_files
from codegen.verify import check_agreement, check_op
from codegen.stages import budgeted, in_stage
from codegen.tensor_fused import agreement, fusion_error
from codegen.write import differences, import_package, publish, stage
from derive.declare import DeclarationError
from derive.tensor import TensorOp

# seconds an operation's accuracy survey may take (or the stage budget, if less): past it, its figures are n/a
SURVEY_SECONDS = 10.0
# the line under the "(fast)" row of an index-notation op that codegen.tensor_fused does not fuse, with why
TENSOR_NOT_FUSED = "skipped: no fused numba form ({}); fast/ has no class for it (use the NumPy one)"


# one JSON file per operation and inputs (cache_key), in a checkout's git-ignored build/; none in an installed package
CACHE = ROOT / "build" / "codegen-cache" if (ROOT / "pyproject.toml").exists() else None
# entries CACHE keeps, the most recently used: a few versions of a few catalogs
KEPT = 400
# the engine's sources: a change to any one invalidates every entry (generator_digest's files are among them,
# and so are the verifier's); not the registry's file, whose entries are keyed one by one (cache_key)
ENGINE = ("codegen/*.py", "derive/*.py", "templates/*.jinja")
# the libraries whose version can change what is derived, printed or verified
LIBRARIES = ("sympy", "mpmath", "numpy", "jinja2", "numba")


# which kernels codegen prints and verifies: the NumPy ones alone, the fused numba ones too (numba needed),
# or every backend this environment can verify
BACKENDS = ("numpy", "fast", "all")


@dataclass(frozen=True)
class OpReport:
    """One row of the codegen summary."""

    name: str
    kernels: int
    error: float
    ok: bool
    failures: tuple
    # worst ulps (float32 forward, backward, float64 forward, backward) over codegen.accuracy's grid against
    # mpmath, each None where no point has a finite truth; or why there are none (str); None: not surveyed
    ulps: object = None

    @classmethod
    def restored(cls, entry):
        """The report a cache entry holds (JSON: lists where it had tuples)."""
        ulps = entry.get("ulps")
        return cls(**dict(entry, failures=tuple(entry["failures"]), ulps=tuple(ulps) if isinstance(ulps, list)
                          else ulps))


def numba_installed():
    return importlib.util.find_spec("numba") is not None


@contextmanager
def interpreted():
    """While active, numba.njit returns the Python function it decorates: codegen checks what the
    printed loops compute in seconds, rather than compiling each kernel (the tests run them compiled)."""
    import numba
    disabled = numba.config.DISABLE_JIT
    numba.config.DISABLE_JIT = True
    try:
        yield
    finally:
        numba.config.DISABLE_JIT = disabled


class CompiledMath:
    """math as numba compiles it, for the fused kernels run interpreted: a NaN or an infinity where
    Python's math raises (log(-1), log(0), sqrt(-1), exp(1000)), so that what verification runs is what
    the compiled loops compute."""

    def __getattr__(self, name):
        function = getattr(math, name)
        if not callable(function):
            return function

        def compiled(*args):
            try:
                return function(*args)
            except OverflowError:
                return math.inf
            except ValueError:  # a pole is its infinite limit (log 0, log1p(-1)), anything else NaN
                pole = {"log": 0, "log1p": -1}.get(name)
                return -math.inf if pole is not None and args[0] == pole else math.nan
        return compiled


def with_compiled_math(fast):
    """fast's modules with CompiledMath for math (the package as codegen verifies it interpreted)."""
    for module in vars(fast).values():
        if isinstance(module, types.ModuleType) and getattr(module, "math", None) is math:
            module.math = CompiledMath()
    return fast


def verify_package(package, catalog, seed=0):
    """[OpReport] from the finite-difference checks of every op in the imported package, and of its
    fused numba classes (named "<op> (fast)") where it has them. A kernel that raises or runs past
    its budget fails its check, named. Each class draws from its own generator, seeded by its name: its
    report is the same whichever operations are verified with it."""
    reports, surveyed = [], accuracy_figures(package, catalog)
    fast = getattr(package, FAST, None)
    classes = [(name, op, getattr(package, name), package) for name, op in catalog.items()]
    classes += [(f"{name} (fast)", op, getattr(fast, name), fast) for name, op in catalog.items()
                if fast is not None and hasattr(fast, name)]
    for name, op, cls, where in classes:
        module = getattr(where, op.module)
        kernels = sum(1 for attr in vars(module) if attr.startswith(("forward", "backward")))
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        try:
            # np.where evaluates both branches: log(x) warns where x < 0 although that branch is not taken
            with in_stage(name, "verification"), np.errstate(all="ignore"):
                checks = check_op(op, cls, rng)
                if where is fast:  # the fused backend also computes what the NumPy one does
                    agree = agreement if isinstance(op, TensorOp) else check_agreement
                    checks += [(f"against NumPy, {variant}", check)
                               for variant, check in agree(op, getattr(package, op.name), cls, rng)]
        except DeclarationError as error:
            reports.append(OpReport(name, kernels, float("inf"), False, (str(error),)))
            continue
        failures = tuple(f"{variant}: {check.report()}" for variant, check in checks if not check.ok)
        found = surveyed[op.name]
        ulps = found if isinstance(found, str) else found.get("fused" if where is fast else "numpy")
        reports.append(OpReport(name, kernels, max(check.error for _, check in checks), not failures, failures, ulps))
    # an index-notation op codegen.tensor_fused does not fuse: the summary says why, rather than leave it out silently
    reports += [OpReport(f"{name} (fast)", 0, 0.0, True, (TENSOR_NOT_FUSED.format(fusion_error(op)),))
                for name, op in catalog.items() if fast is not None and isinstance(op, TensorOp) and not hasattr(fast, name)]
    return in_order(reports, catalog)


def accuracy_figures(package, catalog):
    """{name: codegen.accuracy.figures of its classes in package, or why it has none}, each op's survey within
    SURVEY_SECONDS (or the stage budget, if less): a survey that fails or runs past it leaves its op's figures
    n/a, and the op is not refused for it."""
    found = {}
    for name, op in catalog.items():
        try:
            with in_stage(name, "accuracy survey", min(stages.BUDGET, SURVEY_SECONDS)):
                found[name] = figures(op, package)
        except DeclarationError as error:
            found[name] = str(error).removeprefix(f"{name}: ")
    return found


def operation(report):
    """The name of the operation a report is about ("Tanh" of "Tanh (fast)")."""
    return report.name.removesuffix(" (fast)")


def in_order(reports, catalog):
    """reports as the summary lists them: the NumPy classes in catalog order, then the fused ones."""
    position = {name: index for index, name in enumerate(catalog)}
    return sorted(reports, key=lambda report: (report.name != operation(report), position[operation(report)]))


def fused_backend(backend):
    """Whether codegen prints the fused numba kernels: --backend fast asks for them (numba needed to
    run, and so to verify, them), all where numba is installed, numpy never. A fused module is never
    written unverified."""
    if backend not in BACKENDS:
        raise DeclarationError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "fast" and not numba_installed():
        raise DeclarationError("--backend fast needs numba to verify the fused kernels: pip install 'symgrad[fast]'")
    return backend == "fast" or backend == "all" and numba_installed()


def library_versions():
    """{library: version, None if it is not installed} of LIBRARIES."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def engine_digest(fused):
    """sha256 of all an operation's modules and reports depend on but its declaration: every source of the
    engine, Python's and the libraries' versions, and the backend."""
    digest = hashlib.sha256(repr((sys.version, library_versions(), fused)).encode())
    for path in sorted({path for pattern in ENGINE for path in ROOT.glob(pattern)} - {ROOT / CATALOG_SOURCE}):
        digest.update(b"\0" + path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def fingerprint(value):
    """Text that tells two declarations apart wherever their kernels may differ: every field of a dataclass,
    SymPy objects with their assumptions (srepr writes Symbol('x', real=True) where repr writes x)."""
    if isinstance(value, sp.Basic):
        return sp.srepr(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(f"{f.name}={fingerprint(getattr(value, f.name))}" for f in dataclasses.fields(value))
        return f"{type(value).__name__}({fields})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{fingerprint(key)}: {fingerprint(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(fingerprint(item) for item in value)) + "}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({', '.join(fingerprint(item) for item in value)})"
    return repr(value)


def cache_key(op, engine):
    """The name of op's cache entry: sha256 of its declaration and of engine (engine_digest)."""
    return hashlib.sha256(f"{engine}\0{fingerprint(op)}".encode()).hexdigest()


def package_key(catalog, modules, engine):
    """The name of the package files' entry: they list the operations, and which of them have a fused class."""
    listing = [(name, op.module, isinstance(op, TensorOp), f"{FAST}/{op.module}.py" in modules[name])
               for name, op in catalog.items()]
    return hashlib.sha256(f"{engine}\0package\0{listing!r}".encode()).hexdigest()


def load(cache, key):
    """The entry named key in the folder cache (marked as just used), or None."""
    path = cache / f"{key}.json"
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    with suppress(OSError):  # a read-only cache still serves
        os.utime(path)
    return entry


def save(cache, key, entry):
    """Write an entry atomically: a run reading it meanwhile sees the old one or the new one, whole."""
    cache.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=cache, prefix=".entry-")
    with os.fdopen(handle, "w") as file:
        json.dump(entry, file)
    os.replace(temporary, cache / f"{key}.json")


def prune(cache, kept=KEPT):
    """Remove all but the kept most recently used entries of cache; one that a run beside this one (make test's
    other worker, a make codegen) removed between listing and reading its time is passed over."""
    used = {}
    for path in cache.glob("*.json"):
        with suppress(FileNotFoundError):
            used[path] = path.stat().st_mtime
    for path in sorted(used, key=used.get, reverse=True)[kept:]:
        path.unlink(missing_ok=True)


def imported(staged, fused):
    """The package staged, its fast/ too if fused, run interpreted with numba's math (as codegen verifies it)."""
    if not fused:
        return import_package(staged)
    with interpreted():
        package = import_package(staged, [FAST])
    with_compiled_math(getattr(package, FAST))
    return package


def codegen(catalog, out, cache=CACHE, backend="all", budget=None, jobs=1):
    """Generate, verify and (only if every check passed) publish; returns (reports, changed, seconds).

    An operation found in cache (a folder of entries; None: no cache) is neither derived nor verified
    again: its modules and reports are those of the run that made them from the same inputs (cache_key).
    Every stage of an operation runs within budget seconds (codegen.stages.BUDGET by default). jobs processes
    derive and verify the operations not found, each its own (symgrad codegen: one per core); what is written
    and reported is the same whatever their number."""
    start = time.perf_counter()
    fused = fused_backend(backend)
    engine = engine_digest(fused) if cache else None
    keys = {name: cache_key(op, engine) for name, op in catalog.items()} if cache else {}
    found = {name: entry for name, key in keys.items() if (entry := load(cache, key)) is not None}
    missed = {name: op for name, op in catalog.items() if name not in found}
    with budgeted(budget), workers(missed, fused, jobs) as pool:
        derived = operations_files(missed, fused, pool)
        modules = {name: found[name]["files"] if name in found else derived[name] for name in catalog}
        package = served_package(catalog, modules, fused, cache, engine)
        own = {name: text for files in modules.values() for name, text in files.items()}
        reports, changed = verified({**package, **own}, catalog, missed, found, out, fused, pool)
    if cache:
        for name in missed:  # an operation is kept once all its checks passed
            checked = [report for report in reports if operation(report) == name]
            if all(report.ok for report in checked):
                save(cache, keys[name], {"files": modules[name], "reports": [asdict(report) for report in checked]})
        prune(cache)
    return reports, changed, time.perf_counter() - start


# what a pool's processes work on, set before they fork: (the operations, whether fused), and per process the
# staged package they verify, imported once
_shared = None
_imported = {}


@contextmanager
def workers(catalog, fused, jobs):
    """A pool of jobs processes (forked: each has the catalog and the stage budget as they are here) for the
    operations of catalog, or None where one process does (jobs 1, or one operation)."""
    global _shared
    jobs = min(jobs or os.cpu_count() or 1, len(catalog))
    if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield None
        return
    outer, _shared = _shared, (catalog, fused)
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            yield pool
    finally:
        _shared = outer


def in_worker(task, name, *args):
    """(task(name, *args), the stages it ran (stages.recording), the DeclarationError it raised or None), in a
    pool's process."""
    with stages.recording() as record:
        try:
            return task(name, *args), list(record), None
        except DeclarationError as error:
            return None, list(record), error


def each(pool, task, names, *args):
    """{name: task(name, *args)} of each of names, in this process or spread over pool's; the stages run in the
    pool are recorded here as if run here, and the first operation's DeclarationError (in names' order) raised."""
    if pool is None:
        return {name: task(name, *args) for name in names}
    done = list(pool.map(in_worker, [task] * len(names), names, *([arg] * len(names) for arg in args)))
    stages.replay([stage for _, record, _ in done for stage in record])
    for _, _, error in done:
        if error is not None:
            raise error
    return {name: result for name, (result, _, _) in zip(names, done)}


def files_of(name):
    """operation_files of the operation name of the pool's catalog."""
    catalog, fused = _shared
    return operation_files(catalog[name], fused)


def reports_of(name, staged):
    """[OpReport] of the operation name of the pool's catalog, verified in the package staged."""
    catalog, fused = _shared
    if staged not in _imported:
        _imported[staged] = imported(staged, fused)
    return verify_package(_imported[staged], {name: catalog[name]})


def operations_files(catalog, fused, pool=None):
    """{name: operation_files} of every operation of catalog, in this process or pool's."""
    if pool is None:
        env, generator = environment(), generator_digest()
        return {name: operation_files(op, fused, env, generator) for name, op in catalog.items()}
    return each(pool, files_of, list(catalog))


def served_package(catalog, modules, fused, cache, engine):
    """The package files (render.package_files) of catalog, from cache or rendered (and kept there)."""
    key = package_key(catalog, modules, engine) if cache else None
    entry = load(cache, key) if cache else None
    if entry is None:
        entry = {"files": package_files(catalog, modules, fused)}
        if cache:
            save(cache, key, entry)
    return entry["files"]


def verified(files, catalog, missed, found, out, fused, pool=None):
    """(reports, changed): files staged, the missed operations verified (in this process or pool's), the
    others' reports as found, and files published only if every check passed (changed None otherwise)."""
    reports = [OpReport.restored(report) for entry in found.values() for report in entry["reports"]]
    if not missed:  # all verified before: written only where out differs
        return in_order(reports, catalog), publish(stage(files, out.parent), out) if differences(files, out) else []
    staged = stage(files, out.parent)
    try:
        checked = (verify_package(imported(staged, fused), missed) if pool is None else
                   [report for op_reports in each(pool, reports_of, list(missed), staged).values() for report in op_reports])
        reports = in_order(reports + checked, catalog)
    except BaseException:
        shutil.rmtree(staged)
        raise
    if not all(report.ok for report in reports):
        shutil.rmtree(staged)
        return reports, None
    return reports, publish(staged, out)


ULPS_NOTE = ("ulps: the worst error, in units in the last place, of forward/backward against mpmath over each "
             "dtype's whole range where the truth is a normal number; inf: NaN or inf where the truth is finite, "
             "or no inf where it overflows (docs/stability.md)")


def ulps_cells(ulps):
    """The two ulps cells of a summary row: "forward/backward" of float32 and of float64 ("n/a", or blank)."""
    if ulps is None or isinstance(ulps, str):
        return ("", "") if ulps is None else ("n/a", "n/a")
    text = ["-" if value is None else f"{value:.2g}" for value in ulps]
    return f"{text[0]}/{text[1]}", f"{text[2]}/{text[3]}"


def summary(reports):
    """The table make codegen prints: one line per operation, each failure under it, and where only
    fused kernels failed, that their NumPy twins passed and how to write those alone; the ulps columns'
    meaning, and why an operation has none."""
    lines = [f"{'operation':<36}{'kernels':>8}{'max rel error':>16}{'ulps f32 fwd/bwd':>20}{'ulps f64 fwd/bwd':>20}"
             "  status"]
    for report in reports:
        f32, f64 = ulps_cells(report.ulps)
        lines.append(f"{report.name:<36}{report.kernels:>8}{report.error:>16.2e}{f32:>20}{f64:>20}  "
                     f"{'OK' if report.ok else 'FAILED'}")
        lines.extend(f"    {failure}" for failure in report.failures)
    missing = {}
    for report in reports:
        if isinstance(report.ulps, str):
            missing.setdefault(report.ulps, []).append(report.name)
    lines.extend(f"ulps n/a for {', '.join(names)}: {reason}" for reason, names in missing.items())
    lines.append(ULPS_NOTE)
    failed = [report.name for report in reports if not report.ok]
    if failed and all(name.endswith(" (fast)") for name in failed):
        lines.append(f"the NumPy kernels passed; the fused kernels of {', '.join(n[:-7] for n in failed)} did not, "
                     "so nothing was written: symgrad codegen --backend numpy writes the NumPy backend alone")
    return "\n".join(lines)
