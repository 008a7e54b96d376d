"""make test runs the suite on pytest-xdist workers. numba's on-disk cache is not safe for two processes that
compile the same function at once (each numbers its new entry .1.nbc from the index it read, and the last
index written wins, so one signature's index entry can name another's machine code): each worker keeps its
compiled kernels in a folder of its own (under build/, or under a NUMBA_CACHE_DIR of yours), instead of
generated/fast/__pycache__. It must be set before numba is imported, as it is when pytest loads this file."""
import os
import sys
from pathlib import Path

WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    assert "numba" not in sys.modules, "numba was imported before tests/conftest.py could set NUMBA_CACHE_DIR"
    shared = os.environ.get("NUMBA_CACHE_DIR") or Path(__file__).resolve().parent.parent / "build" / "numba-cache"
    os.environ["NUMBA_CACHE_DIR"] = str(Path(shared) / WORKER)
    # make test's workers fill the machine's cores one each: a BLAS or torch pool of its own in each would
    # oversubscribe them, and OpenMP threads that spin after each parallel region (torch's, numba's) take the
    # other worker's core (codegen/bench/__main__.py's note); numba keeps its own count, so its parallel loops
    # still run on more than one thread
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import pytest  # noqa: E402  (after NUMBA_CACHE_DIR, which must be set first)


@pytest.fixture(scope="module")
def unsurveyed():
    """codegen without its accuracy survey (about 10 s of a cold catalog run; every op's ulps figures read None,
    "not surveyed"), from the first test of a module that asks for it to the module's end: for the modules whose
    codegen runs test what is written, refused and kept, and read no figures."""
    from codegen import pipeline
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "figures", lambda op, package: {})
        yield
