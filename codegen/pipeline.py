"""make codegen: derive and render the catalog, verify the staged kernels, then publish them."""
import shutil
import time
from dataclasses import dataclass

import numpy as np

from codegen.render import render_package
from codegen.verify import check_op
from codegen.write import import_package, publish, stage


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


def codegen(catalog, out):
    """Generate, verify and (only if every check passed) publish; returns (reports, changed, seconds)."""
    start = time.perf_counter()
    staged = stage(render_package(catalog), out.parent)
    try:
        reports = verify_package(import_package(staged), catalog)
    except BaseException:
        shutil.rmtree(staged)
        raise
    if not all(report.ok for report in reports):
        shutil.rmtree(staged)
        return reports, None, time.perf_counter() - start
    return reports, publish(staged, out), time.perf_counter() - start


def summary(reports):
    """The table make codegen prints: one line per operation."""
    lines = [f"{'operation':<30}{'kernels':>8}{'max rel error':>16}  status"]
    for report in reports:
        lines.append(f"{report.name:<30}{report.kernels:>8}{report.error:>16.2e}  {'OK' if report.ok else 'FAILED'}")
        lines.extend(f"    {failure}" for failure in report.failures)
    return "\n".join(lines)
