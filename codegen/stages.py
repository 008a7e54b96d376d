"""Each operation goes through the generator's stages under a name and a time budget: whatever goes wrong
in one is a one-line error naming the operation and the stage, never a traceback or a hang."""
import signal
import threading
import time
from contextlib import contextmanager

from derive.declare import DeclarationError

# seconds an operation may spend in one stage (symgrad codegen --budget): the whole catalog's slowest stage
# takes under 1 s, and SymPy's rewriting of a deep composition can take hours; a stage past it is refused
BUDGET = 30.0
# once expired, the alarm repeats this often, in case the stage's code swallowed it
REPEAT = 0.5

# while recording(): (operation, stage, seconds) of every stage run, in order
_record = None


class BudgetExceeded(BaseException):
    """A stage ran past its budget: a BaseException, so that SymPy's own `except Exception` cannot swallow it."""


def _expired(signum, frame):
    raise BudgetExceeded


@contextmanager
def recording():
    """[(operation, stage, seconds)] of the stages run while active (make bench-engine's table)."""
    global _record
    outer, _record = _record, []
    try:
        yield _record
    finally:
        if outer is not None:  # an enclosing recording() sees them too
            outer.extend(_record)
        _record = outer


def replay(record):
    """Add record, stages another process ran ([(operation, stage, seconds)]), to the active recording()."""
    if _record is not None:
        _record.extend(record)


@contextmanager
def budgeted(seconds):
    """While active, a stage's default budget is seconds (None: BUDGET as it is)."""
    global BUDGET
    outer = BUDGET
    BUDGET = outer if seconds is None else seconds
    try:
        yield
    finally:
        BUDGET = outer


@contextmanager
def in_stage(name, what, seconds=None):
    """Run a stage of operation name within seconds (default BUDGET, 0: none): an exception in it, or
    running past seconds, becomes a DeclarationError naming both. The budget needs SIGALRM, so it holds
    in the main thread alone."""
    seconds = BUDGET if seconds is None else seconds
    timed = bool(seconds) and threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
    previous = signal.signal(signal.SIGALRM, _expired) if timed else None
    if timed:
        signal.setitimer(signal.ITIMER_REAL, seconds, REPEAT)
    start = time.perf_counter()
    try:
        yield
    except BudgetExceeded:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
        raise DeclarationError(f"{name}: {what} took more than {seconds:g} s (the budget of a stage: symgrad codegen "
                               f"--budget SECONDS); simplify the expression") from None
    except DeclarationError:
        raise
    except RecursionError:
        raise DeclarationError(f"{name}: {what}: the expression nests too deeply") from None
    except Exception as error:  # any failure of the generator on this operation is reported as its own
        raise DeclarationError(f"{name}: {what} failed: {one_line(error)}") from error
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if _record is not None:
            _record.append((name, what, time.perf_counter() - start))


def one_line(error):
    """The error's type and the first line of its message, at most 200 characters."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
