"""make codegen: derive and render the catalog, verify the staged kernels, then publish them."""
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np

from codegen.render import ROOT, generator_digest, inputs_digest, render_package
from codegen.verify import check_op
from codegen.write import import_package, publish, stage


# the last run's inputs, output and reports: in a checkout's git-ignored build/, none in an installed package
CACHE = ROOT / "build" / "codegen-cache.json" if (ROOT / "pyproject.toml").exists() else None


@dataclass(frozen=True)
class OpReport:
    """One row of the codegen summary."""

    name: str
    kernels: int
    error: float
    ok: bool
    failures: tuple


def verify_package(package, catalog, seed=0):
    """[OpReport] from the finite-difference checks of every op in the imported package."""
    rng = np.random.default_rng(seed)
    reports = []
    for name, op in catalog.items():
        checks = check_op(op, getattr(package, name), rng)
        module = getattr(package, op.module)
        kernels = sum(1 for attr in vars(module) if attr.startswith(("forward", "backward")))
        failures = tuple(f"{variant}: {check.report()}" for variant, check in checks if not check.ok)
        reports.append(OpReport(name, kernels, max(check.error for _, check in checks), not failures, failures))
    return reports


def cache_key(catalog):
    """sha256 of every input of the generated package: the generator's files and the catalog."""
    return inputs_digest(generator_digest(), repr(list(catalog.values())))


def files_digest(out):
    """{file name: sha256} of the package in out, to tell whether it is still what was generated."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(out.glob("*.py"))}


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


def codegen(catalog, out, cache=CACHE):
    """Generate, verify and (only if every check passed) publish; returns (reports, changed, seconds).
    Nothing is derived when the inputs and out are those of the last run (see cached_reports)."""
    start = time.perf_counter()
    key = cache_key(catalog)
    reports = cached_reports(cache, key, out) if cache else None
    if reports is not None:
        return reports, [], time.perf_counter() - start
    reports, changed = generate(catalog, out)
    if changed is not None and cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "files": files_digest(out),
                                     "reports": [asdict(report) for report in reports]}))
    return reports, changed, time.perf_counter() - start


def generate(catalog, out):
    """(reports, changed): the package staged, verified and published, or changed None on a failure."""
    staged = stage(render_package(catalog), out.parent)
    try:
        reports = verify_package(import_package(staged), catalog)
    except BaseException:
        shutil.rmtree(staged)
        raise
    if not all(report.ok for report in reports):
        shutil.rmtree(staged)
        return reports, None
    return reports, publish(staged, out)


def summary(reports):
    """The table make codegen prints: one line per operation."""
    lines = [f"{'operation':<30}{'kernels':>8}{'max rel error':>16}  status"]
    for report in reports:
        lines.append(f"{report.name:<30}{report.kernels:>8}{report.error:>16.2e}  {'OK' if report.ok else 'FAILED'}")
        lines.extend(f"    {failure}" for failure in report.failures)
    return "\n".join(lines)
