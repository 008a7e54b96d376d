"""The finite-difference checker must fail on wrong gradients, or it proves nothing."""
import numpy as np
import pytest

import codegen.verify as verify
import generated
from codegen.verify import check_gradient, check_op, numerical_gradient
from derive.catalog import CATALOG


def cubic(x):
    return float(np.sum(x ** 3))


@pytest.fixture
def point():
    return np.random.default_rng(0).normal(size=(3, 4))


def test_numerical_gradient_matches_known_derivatives(point):
    assert np.allclose(numerical_gradient(cubic, point), 3 * point ** 2, rtol=1e-8, atol=1e-8)
    assert np.allclose(numerical_gradient(lambda x: float(np.sum(np.sin(x))), point), np.cos(point), atol=1e-9)


def test_a_right_gradient_passes(point):
    result = check_gradient(cubic, point, 3 * point ** 2)
    assert result.ok, result.report()


@pytest.mark.parametrize("wrong", [lambda g: -g, lambda g: 8 * g, lambda g: g / 8, lambda g: g + 1e-3],
                         ids=["sign", "times N", "over N", "offset"])
def test_a_wrong_gradient_fails(point, wrong):
    result = check_gradient(cubic, point, wrong(3 * point ** 2))
    assert not result.ok
    assert "FAILED" in result.report()


def test_the_report_names_the_wrong_entry_with_both_values(point):
    analytic = 3 * point ** 2
    analytic[2, 1] += 0.5
    result = check_gradient(cubic, point, analytic)
    assert not result.ok and result.worst == (2, 1)
    assert f"analytic {analytic[2, 1]:.10g}" in result.report()
    assert f"numeric {3 * point[2, 1] ** 2:.6g}"[:16] in result.report()


def test_a_non_finite_gradient_fails(point):
    analytic = 3 * point ** 2
    analytic[0, 0] = np.nan
    assert not check_gradient(cubic, point, analytic).ok


def test_a_shape_mismatch_is_refused(point):
    with pytest.raises(ValueError, match="shape"):
        check_gradient(cubic, point, np.zeros(3))


def seed_001_numerical_gradient(f, x, h=1e-4):
    """Seed 001's numerical_gradient, sign bug included: (f(x+h) + f(x-h)) / 2h."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        saved = x[index]
        x[index] = saved + h
        fxh1 = f(x)
        x[index] = saved - h
        fxh2 = f(x)
        grad[index] = (fxh1 + fxh2) / (2 * h)
        x[index] = saved
    return grad


@pytest.mark.parametrize("name", list(CATALOG))
def test_the_seeds_sign_bug_in_the_differences_is_caught(monkeypatch, name):
    rng = np.random.default_rng(0)
    assert all(check.ok for _, check in check_op(CATALOG[name], getattr(generated, name), rng))
    monkeypatch.setattr(verify, "numerical_gradient", lambda f, x, eps: seed_001_numerical_gradient(f, x))
    assert not any(check.ok for _, check in check_op(CATALOG[name], getattr(generated, name), rng))


class HalfGradientSoftmax(generated.Softmax):
    """A layer whose backward is off by a factor: the op check must reject it."""

    def backward(self, g):
        return super().backward(g) / 2


def test_check_op_rejects_a_wrong_layer():
    checks = check_op(CATALOG["Softmax"], HalfGradientSoftmax, np.random.default_rng(0))
    assert not any(check.ok for _, check in checks)
