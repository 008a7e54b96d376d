"""Each operation goes through the generator's stages under a name and a time budget: whatever goes wrong
in one is a one-line error naming the operation and the stage, never a traceback or a hang."""
import signal
import threading
from contextlib import contextmanager

from derive.declare import DeclarationError

# seconds an operation may spend in one stage; a derivation that runs away (SymPy's simplification
# of a deep composition can take hours) is refused past it
BUDGET = 120


class BudgetExceeded(Exception):
    """A stage ran past its budget."""


def _expired(signum, frame):
    raise BudgetExceeded


@contextmanager
def in_stage(name, what, seconds=BUDGET):
    """Run a stage of operation name: an exception in it, or running past seconds, becomes a
    DeclarationError naming both. The budget needs SIGALRM, so it holds in the main thread alone."""
    timed = seconds and threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
    previous = signal.signal(signal.SIGALRM, _expired) if timed else None
    if timed:
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except DeclarationError:
        raise
    except BudgetExceeded:
        raise DeclarationError(f"{name}: {what} took more than {seconds:g} s; simplify the expression") from None
    except RecursionError:
        raise DeclarationError(f"{name}: {what}: the expression nests too deeply") from None
    except Exception as error:  # any failure of the generator on this operation is reported as its own
        raise DeclarationError(f"{name}: {what} failed: {one_line(error)}") from error
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def one_line(error):
    """The error's type and the first line of its message, at most 200 characters."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
