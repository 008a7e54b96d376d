"""make codegen: derive and render the catalog, verify the staged kernels, then publish them."""
import hashlib
import importlib.util
import json
import math
import shutil
import time
import types
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

from codegen.render import FAST, ROOT, generator_digest, inputs_digest, render_package
from codegen.verify import check_agreement, check_op
from codegen.stages import in_stage
from codegen.write import import_package, modules, publish, stage
from derive.declare import DeclarationError
from derive.tensor import TensorOp

# the line under an index-notation op's "(fast)" row: codegen.fused prints element-wise and row kernels only
TENSOR_NOT_FUSED = "skipped: an index-notation op has no fused numba form; fast/ has no class for it (use the NumPy one)"


# the last run's inputs, output and reports: in a checkout's git-ignored build/, none in an installed package
CACHE = ROOT / "build" / "codegen-cache.json" if (ROOT / "pyproject.toml").exists() else None


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
    its budget fails its check, named."""
    rng = np.random.default_rng(seed)
    reports = []
    fast = getattr(package, FAST, None)
    classes = [(name, op, getattr(package, name), package) for name, op in catalog.items()]
    classes += [(f"{name} (fast)", op, getattr(fast, name), fast) for name, op in catalog.items()
                if fast is not None and hasattr(fast, name)]
    for name, op, cls, where in classes:
        module = getattr(where, op.module)
        kernels = sum(1 for attr in vars(module) if attr.startswith(("forward", "backward")))
        try:
            # np.where evaluates both branches: log(x) warns where x < 0 although that branch is not taken
            with in_stage(name, "verification"), np.errstate(all="ignore"):
                checks = check_op(op, cls, rng)
                if where is fast:  # the fused backend also computes what the NumPy one does
                    checks += [(f"against NumPy, {variant}", check)
                               for variant, check in check_agreement(op, getattr(package, op.name), cls, rng)]
        except DeclarationError as error:
            reports.append(OpReport(name, kernels, float("inf"), False, (str(error),)))
            continue
        failures = tuple(f"{variant}: {check.report()}" for variant, check in checks if not check.ok)
        reports.append(OpReport(name, kernels, max(check.error for _, check in checks), not failures, failures))
    # an index-notation op has no fused form (yet): the summary says so, rather than leave it out silently
    reports += [OpReport(f"{name} (fast)", 0, 0.0, True, (TENSOR_NOT_FUSED,)) for name, op in catalog.items()
                if fast is not None and isinstance(op, TensorOp)]
    return reports


def fused_backend(backend):
    """Whether codegen prints the fused numba kernels: --backend fast asks for them (numba needed to
    run, and so to verify, them), all where numba is installed, numpy never. A fused module is never
    written unverified."""
    if backend not in BACKENDS:
        raise DeclarationError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "fast" and not numba_installed():
        raise DeclarationError("--backend fast needs numba to verify the fused kernels: pip install 'symgrad[fast]'")
    return backend == "fast" or backend == "all" and numba_installed()


def cache_key(catalog, fused):
    """sha256 of every input of the generated package: the generator's files, the catalog, the backends."""
    return inputs_digest(generator_digest(), repr(list(catalog.values())), repr(fused))


def files_digest(out):
    """{file name: sha256} of the package in out, to tell whether it is still what was generated."""
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in modules(out)}


def cached_reports(cache, key, out):
    """The reports of the run that generated out from the same inputs, or None: the cache serves a
    run only when the inputs' digest and every file of out are as that run left them."""
    try:
        entry = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    if entry.get("key") != key or entry.get("files") != files_digest(out):
        return None
    return [OpReport(**dict(report, failures=tuple(report["failures"]))) for report in entry["reports"]]


def codegen(catalog, out, cache=CACHE, backend="all"):
    """Generate, verify and (only if every check passed) publish; returns (reports, changed, seconds).
    Nothing is derived when the inputs and out are those of the last run (see cached_reports)."""
    start = time.perf_counter()
    fused = fused_backend(backend)
    key = cache_key(catalog, fused)
    reports = cached_reports(cache, key, out) if cache else None
    if reports is not None:
        return reports, [], time.perf_counter() - start
    reports, changed = generate(catalog, out, fused)
    if changed is not None and cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "files": files_digest(out),
                                     "reports": [asdict(report) for report in reports]}))
    return reports, changed, time.perf_counter() - start


def generate(catalog, out, fused=True):
    """(reports, changed): the package staged, verified and published, or changed None on a failure.
    Without fused, the package has no fast/ (one left in out is removed: nothing verified it)."""
    staged = stage(render_package(catalog, fused), out.parent)
    try:
        if fused:
            with interpreted():
                package = import_package(staged, [FAST])
            with_compiled_math(getattr(package, FAST))
        else:
            package = import_package(staged)
        reports = verify_package(package, catalog)
    except BaseException:
        shutil.rmtree(staged)
        raise
    if not all(report.ok for report in reports):
        shutil.rmtree(staged)
        return reports, None
    return reports, publish(staged, out)


def summary(reports):
    """The table make codegen prints: one line per operation, each failure under it, and where only
    fused kernels failed, that their NumPy twins passed and how to write those alone."""
    lines = [f"{'operation':<30}{'kernels':>8}{'max rel error':>16}  status"]
    for report in reports:
        lines.append(f"{report.name:<30}{report.kernels:>8}{report.error:>16.2e}  {'OK' if report.ok else 'FAILED'}")
        lines.extend(f"    {failure}" for failure in report.failures)
    failed = [report.name for report in reports if not report.ok]
    if failed and all(name.endswith(" (fast)") for name in failed):
        lines.append(f"the NumPy kernels passed; the fused kernels of {', '.join(n[:-7] for n in failed)} did not, "
                     "so nothing was written: symgrad codegen --backend numpy writes the NumPy backend alone")
    return "\n".join(lines)
