"""generated/_special's erfc per dtype: each dtype's polynomial stops where its fit is below an eighth of its ulp (one
term fewer would not be), a float32 array takes the float32 kernel, the kernels keep three arrays at once in the
order derive.special.erfc_steps gives, and they are math.erfc at 0, near 0, past the clip, at +-inf and NaN."""
import math
from dataclasses import replace

import numpy as np
import pytest

import generated._special as special
from codegen.kernels import erfc_kernel, kernel_code
from derive.special import ERFC_DEGREE, ERFC_SHIFT, ERFC_UNDERFLOWS, FORMATS, erfc_tail_polynomial

DTYPES = ["float32", "float64"]


def tolerance(dtype):
    """An eighth of dtype's ulp, relatively: 2^-(p + 3)."""
    return 2.0 ** -(FORMATS[dtype][0] + 3)


def ulps(got, x, dtype):
    """The largest error of got, erfc at x, in ulps of math.erfc's value rounded to dtype."""
    truth = np.array([math.erfc(float(v)) for v in x]).astype(dtype)
    return np.max(np.abs(got.astype(float) - truth) / np.spacing(truth).astype(float))


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_dtype_fits_the_fewest_terms_that_reach_its_precision(dtype):
    assert erfc_tail_polynomial(dtype)[1] < tolerance(dtype)
    if dtype == "float32":   # float64's keeps the margin it was chosen with
        fewer = dict(ERFC_DEGREE, float32=ERFC_DEGREE["float32"] - 1)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("derive.special.ERFC_DEGREE", fewer)
            assert erfc_tail_polynomial.__wrapped__("float32")[1] >= tolerance(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_polynomials_terms_add_up_to_about_its_largest_value(dtype):
    # over |v| <= 1/2 a term is at most |c_k| 2^-k, and F(-1/2) = K is F's largest value, (z + K) erfc(z) at z = 0:
    # Horner's rule rounds no term larger than the value there, and at most K sqrt(pi) times it at v = 1/2
    coefficients, _ = erfc_tail_polynomial(dtype)
    assert sum(abs(float(c)) * 2.0 ** -k for k, c in enumerate(coefficients)) < 1.01 * ERFC_SHIFT[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_array_takes_its_dtypes_kernel_and_keeps_its_dtype(dtype):
    x = np.linspace(-5, 9, 301).astype(dtype)
    kernel = special.erfc_float32 if dtype == "float32" else special.erfc_float64
    assert special.erfc(x).dtype == dtype and np.array_equal(special.erfc(x), kernel(x))
    assert special.erfc(2.0) == special.erfc_float64(2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_kernels_keep_three_arrays_at_once_where_cse_kept_more(dtype):
    def allocations(kernel):
        return sum("out=" not in code for _, code in kernel_code(kernel)["lines"])
    assert allocations(erfc_kernel(dtype)) == 3
    # the same expression in cse's order: each new array costs a page fault per 4 KiB, thirty passes' time at 1e6
    assert allocations(replace(erfc_kernel(dtype), steps=())) > 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_near_zero_it_is_within_a_few_ulps(dtype):
    # erfc is near 1 there, where an ulp is least: 1 - 2K/(z + K) as the polynomial's variable was off by an ulp
    # of K, 9 ulps of erfc in float64
    x = np.concatenate([np.linspace(0, 0.02, 2001), np.linspace(-0.6, 0.6, 4001)]).astype(dtype)
    assert ulps(special.erfc(x), x, dtype) <= 6


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_the_clip_and_the_ends_are_maths_erfc(dtype):
    tiny = 5e-40 if dtype == "float32" else 5e-310
    end = ERFC_UNDERFLOWS[dtype]
    x = np.array([0.0, -0.0, tiny, -tiny, 1 / 256, -1 / 256, end, -end, 2 * end, -2 * end], dtype)
    got = special.erfc(x)
    assert got[0] == got[1] == got[2] == got[3] == 1 and ulps(got[4:6], x[4:6], dtype) <= 2
    assert (got[6::2] == 0).all() and (got[7::2] == 2).all()   # exp(-end^2) is 0 in dtype
    ends = special.erfc(np.array([np.inf, -np.inf, np.nan, np.finfo(dtype).max, -np.finfo(dtype).max], dtype))
    assert ends[0] == 0 and ends[1] == 2 and np.isnan(ends[2]) and ends[3] == 0 and ends[4] == 2
