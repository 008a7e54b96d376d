"""tests/tails_count.py's count (issue 23's closing figures) catches the failures it counts: a naive log(cosh(x))."""
import sys
from pathlib import Path
from types import SimpleNamespace

import mpmath
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tails_count  # noqa: E402


class NaiveLogCosh:
    """log(cosh(x)) as written: cosh overflows float32 beyond |x| = 89."""

    def forward(self, x):
        self.x = x
        with np.errstate(over="ignore"):
            return np.log(np.cosh(x))

    def backward(self, g):
        return g * np.tanh(self.x)


def test_failure_names_inf_nan_and_a_false_zero_only_at_a_normal_truth():
    f32 = np.float32
    assert tails_count.failure(f32(np.inf), mpmath.mpf(99), f32) == "inf"
    assert tails_count.failure(f32(np.nan), mpmath.mpf(1), f32) == "nan"
    assert tails_count.failure(f32(0), mpmath.mpf("1.7e-17"), f32) == "zero"
    assert tails_count.failure(f32(0), mpmath.mpf("1e-40"), f32) is None     # a subnormal truth may be flushed
    assert tails_count.failure(f32(99.3), mpmath.mpf("99.3068528"), f32) is None


def test_magnitude_prints_a_truth_beyond_float64_as_its_power_of_ten():
    with mpmath.workdps(50):
        assert tails_count.magnitude(mpmath.exp(-mpmath.exp(10 ** 4))) == "~10^-3.825e+4342"
    assert tails_count.magnitude(-mpmath.mpf(2) ** -2000) == "-~10^-602.1"
    assert tails_count.magnitude(mpmath.mpf("1.62e-27")) == "1.62e-27"


def test_count_finds_the_naive_log_cosh_overflowing_in_float32():
    accuracy, _ = tails_count.helpers()
    subject = accuracy.declared_subject("LogCoshActivation", "activation", "log(cosh(x))", {}, None)
    tally, examples = tails_count.count([subject], {"after": SimpleNamespace(LogCoshActivation=NaiveLogCosh)},
                                        (np.float32,))
    assert tally["after", "float32", "cases"] == 2 * len(tails_count.MAGNITUDES)
    # cosh overflows at |x| = 100, 500 and 1e4, both signs; tanh is exact there
    assert tally["after", "float32", "forward", "inf"] == 6 == tally["after", "float32", "failing"]
    assert tally["after", "float32", "backward", "inf"] == 0
    assert tally["torch", "float32", "failing"] == 6           # PyTorch's naive form too
    assert "x=100" in examples["after"]["LogCoshActivation"]
