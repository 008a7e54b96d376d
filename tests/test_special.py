"""generated/_special's erfc per dtype: each dtype's series and polynomial stop where their truncation is below an
eighth of its ulp (one term fewer would not be), a float32 array takes the float32 kernel, and its branches,
chosen by products with steps rather than np.where, give math.erfc at their edges, at +-inf and NaN."""
import math

import mpmath
import numpy as np
import pytest
import sympy as sp

import generated._special as special
from derive.special import ERFC_DEGREE, ERFC_SERIES_BELOW, ERFC_SERIES_TERMS, FORMATS, chosen, erfc_tail_polynomial

DTYPES = ["float32", "float64"]


def tolerance(dtype):
    """An eighth of dtype's ulp, relatively: 2^-(p + 3)."""
    return 2.0 ** -(FORMATS[dtype][0] + 3)


def first_series_term_left_out(terms):
    """|erf's Taylor term number terms| at |z| = 1/2, relative to erfc(1/2): what 1 - erf's series leaves out."""
    z = mpmath.mpf(ERFC_SERIES_BELOW.p) / ERFC_SERIES_BELOW.q
    term = 2 / mpmath.sqrt(mpmath.pi) * z ** (2 * terms + 1) / (mpmath.factorial(terms) * (2 * terms + 1))
    return float(term / mpmath.erfc(z))


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_dtype_sums_the_fewest_terms_that_reach_its_precision(dtype):
    terms = ERFC_SERIES_TERMS[dtype]
    assert first_series_term_left_out(terms) < tolerance(dtype)
    assert erfc_tail_polynomial(dtype)[1] < tolerance(dtype)
    if dtype == "float32":   # float64's keep the margin they were chosen with
        assert first_series_term_left_out(terms - 1) >= tolerance(dtype)
        fewer = dict(ERFC_DEGREE, float32=ERFC_DEGREE["float32"] - 1)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("derive.special.ERFC_DEGREE", fewer)
            assert erfc_tail_polynomial.__wrapped__("float32")[1] >= tolerance(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_array_takes_its_dtypes_kernel_and_keeps_its_dtype(dtype):
    x = np.linspace(-5, 9, 301).astype(dtype)
    kernel = special.erfc_float32 if dtype == "float32" else special.erfc_float64
    assert special.erfc(x).dtype == dtype and np.array_equal(special.erfc(x), kernel(x))
    assert special.erfc(2.0) == special.erfc_float64(2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_branches_edges_and_ends_are_maths_erfc(dtype):
    half = np.array(0.5, dtype)
    edges = [half, np.nextafter(half, 0), np.nextafter(half, 1), 0.0, 5e-40 if dtype == "float32" else 5e-310]
    x = np.array(edges + [-e for e in edges] + [30.0, -30.0], dtype)
    truth = np.array([math.erfc(float(v)) for v in x]).astype(dtype)
    assert np.max(np.abs(special.erfc(x) - truth) / np.spacing(truth)) <= 2
    ends = special.erfc(np.array([np.inf, -np.inf, np.nan], dtype))
    assert ends[0] == 0 and ends[1] == 2 and np.isnan(ends[2])


def test_a_choice_by_steps_is_either_branch_exactly_where_both_are_finite():
    step, a, b = sp.symbols("s a b")
    choice = sp.lambdify((step, a, b), chosen(step, a, b), "numpy")
    big, small = np.float32(3e38), np.float32(1e-30)
    assert choice(np.float32(1), small, big) == small and choice(np.float32(0), big, small) == small
    assert np.isnan(choice(np.float32(np.nan), small, big))
    # the sum a difference would make, b + s (a - b), loses small beside big: the test above catches it
    assert big + np.float32(1) * (small - big) != small
