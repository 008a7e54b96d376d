"""The rewrites that let a backward read what its forward saved (codegen.tensor_lower.steps_read_back), that mask
a softmax once (exponents_masked), and the buffer forms of codegen.inplace they make possible (a mask written
over its array, a scale moved onto a matrix product's smaller operand): each keeps every value, evaluated by
derive.tensor's loops at the check sizes, and each changes the kernels it is for."""
import re

import numpy as np
import pytest
import sympy as sp
from sympy.core.symbol import Str

import generated._tensor
from codegen.inplace import Filled
from codegen.tensor_lower import (TensorPrinter, View, adjoints_inlined, check_sizes, exponents_masked, factor_saved,
                                  lowered, max_shifted, names_of, program_of, steps_read_back)
from codegen.tensor_verify import sample
from derive.catalog import CATALOG
from derive.special import ExpToInf
from derive.stability import INDEX_REWRITES, rewritten_by
from derive.tensor import size_of, with_flags
from tests.references import evaluated_shifted
from tests.test_tensor_codegen import OPS

# every example and catalog op, the flagged ones at each setting (attention's causal mask)
PROGRAMS = {**OPS, "ScaledDotProductAttention": with_flags(CATALOG["ScaledDotProductAttention"], {}),
            "CausalScaledDotProductAttention": with_flags(CATALOG["ScaledDotProductAttention"], {"is_causal": True}),
            "MultiheadAttention": with_flags(CATALOG["MultiheadAttention"], {}),
            "CausalMultiheadAttention": with_flags(CATALOG["MultiheadAttention"], {"is_causal": True})}


def as_exp(expr):
    """ExpToInf as exp, which the loops evaluate."""
    return expr.replace(lambda e: isinstance(e, ExpToInf), lambda e: sp.exp(e.args[0]))


def before_read_back(op):
    """op's program as codegen.tensor_lower.rewritten has it just before steps_read_back."""
    program = max_shifted(program_of(op), set(names_of(op)))
    return program._replace(forward=tuple(a._replace(expr=rewritten_by(a.expr, INDEX_REWRITES)[0])
                                          for a in program.forward),
                            backward=tuple(a._replace(expr=rewritten_by(a.expr, INDEX_REWRITES)[0])
                                           for a in program.backward))


def values(op, program, seed):
    """{array: value} of program's forward and backward at op's check sizes, from one seed's inputs."""
    rng = np.random.default_rng(seed)
    _, arrays, params = sample(op, rng)
    scope = {**check_sizes(op), **{sp.Symbol(o, real=True): v for o, v in op.options.items()}}
    arrays = {**arrays, **params, "g": rng.standard_normal(tuple(scope[size_of(i)] for i in op.steps[-1].indices))}
    forward = [a._replace(expr=as_exp(a.expr)) for a in program.forward]
    backward = [a._replace(expr=as_exp(a.expr)) for a in program.backward]
    return evaluated_shifted(backward, evaluated_shifted(forward, arrays, scope), scope)


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_steps_read_back_keep_every_value(name):
    op = PROGRAMS[name]
    plain = before_read_back(op)
    read = steps_read_back(plain)
    before, after = values(op, plain, 3), values(op, read, 3)
    for array, value in before.items():
        scale = max(1.0, float(np.abs(value).max())) if np.size(value) else 1.0
        np.testing.assert_allclose(after[array], value, rtol=1e-11, atol=1e-12 * scale, err_msg=f"{name} {array}")


def test_steps_read_back_make_the_softmax_adjoint_read_p_alone():
    """Attention's g_A from the saved P (no exponential, no mask, no A), the common factor P taken out; a test that
    fails where a rule is missing: without read_back the adjoints read A."""
    for name in ("ScaledDotProductAttention", "CausalScaledDotProductAttention", "CausalMultiheadAttention"):
        read = steps_read_back(before_read_back(PROGRAMS[name]))
        g_A = next(a for a in read.backward if a.name == "g_A")
        assert "steps read back" in read.rewrites
        assert not any(a.expr.has(sp.exp, ExpToInf, sp.Piecewise) for a in read.backward), name
        assert not any("A" in {r.base.name for r in a.expr.atoms(sp.Indexed)} for a in read.backward), name
        assert isinstance(g_A.expr, sp.Mul) and sp.IndexedBase("P", real=True)[g_A.indices] in g_A.expr.args


def test_a_step_is_read_back_only_where_its_condition_holds():
    """exp(A) at an entry the causal mask drops is no P Z (P is 0 there): read outside the branch that keeps it,
    it stays as it is."""
    op = PROGRAMS["CausalAttention"]
    plain = before_read_back(op)
    n, t, s = sp.symbols("n t s", integer=True)
    A, g_P = sp.IndexedBase("A", real=True), sp.IndexedBase("g_P", real=True)
    unmasked = sp.exp(A[n, t, s] - sp.IndexedBase("Z_max", real=True)[n, t]) * g_P[n, t, s]
    program = plain._replace(backward=(plain.backward[0]._replace(name="probe", expr=unmasked),))
    assert steps_read_back(program) == program
    kept = sp.Piecewise((0, s > t), (unmasked, True))
    read = steps_read_back(program._replace(backward=(program.backward[0]._replace(expr=kept),)))
    assert read.backward[0].expr.has(sp.IndexedBase("P", real=True)) and not read.backward[0].expr.has(sp.exp)


@pytest.mark.parametrize("name", ["CausalAttention", "CausalScaledDotProductAttention", "CausalMultiheadAttention"])
def test_exponents_masked_keep_every_value_and_mask_once(name):
    op = PROGRAMS[name]
    plain = steps_read_back(before_read_back(op))
    masked = plain._replace(forward=tuple(a._replace(expr=exponents_masked(a.expr)) for a in plain.forward))
    assert masked != plain
    before, after = values(op, plain, 4), values(op, masked, 4)
    for array, value in before.items():
        np.testing.assert_allclose(after[array], value, rtol=1e-12, atol=1e-14, err_msg=f"{name} {array}")
    # the max, the sum and the quotient read one masked array, -oo where masked
    pieces = {p for a in masked.forward for p in a.expr.atoms(sp.Piecewise)}
    assert len(pieces) == 1 and pieces.pop().args[1] == (-sp.oo, True)


@pytest.mark.parametrize("order", ["value first", "fill first"])
def test_a_filled_mask_is_the_where_it_replaces_in_place_or_not(order):
    rng = np.random.default_rng(5)
    u, m = rng.standard_normal((3, 4, 5)), rng.uniform(size=(4, 5)) > 0.5
    printer = TensorPrinter()
    where = View("m") if order == "fill first" else sp.Not(View("m"))
    expected = np.where(m, -np.inf, u) if order == "fill first" else np.where(~m, -np.inf, u)
    fresh = Filled(Str("where"), Str(""), View("u"), where, -sp.oo).lines(printer, "r")
    in_place = Filled(Str("where"), Str("u"), View("u"), where, -sp.oo).lines(printer, "r")
    namespace = {"np": np, "u": u.copy(), "m": m}
    exec("\n".join(fresh), namespace)
    np.testing.assert_array_equal(namespace["r"], expected)
    assert (namespace["u"] == u).all()           # the new array leaves u as it was
    exec("\n".join(in_place), namespace)
    assert namespace["r"] is namespace["u"] and "np.where" not in "\n".join(in_place)
    np.testing.assert_array_equal(namespace["r"], expected)


def test_the_causal_kernels_mask_once_in_place_and_scale_the_smaller_operand():
    """The generated attention's forward: no np.where (the mask written over the scores), Q scaled, not Q K^T; the
    backward reads P and Z alone of the forward's arrays."""
    forward, backward = lowered(PROGRAMS["CausalScaledDotProductAttention"])[:2]
    source = "\n".join(line for line in str(forward).split("\n") if not line.startswith(" " * 8))  # the usual path:
    assert "np.where" not in source                                    # the guard's rare one aside (rescaled_scores) and source.count("np.copyto(A, -np.inf, where=") == 1
    assert re.search(r"np\.multiply(\(|, )Q, 1/math\.sqrt\(D\)\)", source)   # a new array, or a kept one
    assert forward.returns == ("y", "Z", "P")
    assert [a for a in backward.args if a not in ("Q", "K", "V", "g")] == ["Z", "P"]


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_adjoints_inlined_keep_every_value(name):
    op = factor_saved(PROGRAMS[name])
    plain = steps_read_back(before_read_back(op))
    inlined = adjoints_inlined(plain)
    before, after = values(op, plain, 6), values(op, inlined, 6)
    for array, value in after.items():
        scale = max(1.0, float(np.abs(value).max())) if np.size(value) else 1.0
        np.testing.assert_allclose(value, before[array], rtol=1e-11, atol=1e-12 * scale, err_msg=f"{name} {array}")


def test_batch_norm_reads_its_sums_once_and_layer_norm_keeps_its_adjoint():
    """BatchNorm's g_y_gamma = g gamma[c] leaves its sums over n, h, w (gamma times dgamma's and dbeta's sums);
    LayerNorm's g gamma[k] in a sum over k stays an array (inlined, each sum would multiply by gamma again)."""
    batch = adjoints_inlined(steps_read_back(before_read_back(factor_saved(CATALOG["BatchNorm2d"]))))
    assert "adjoints inlined" in batch.rewrites and "g_y_gamma" not in {a.name for a in batch.backward}
    layer = adjoints_inlined(steps_read_back(before_read_back(factor_saved(CATALOG["LayerNorm"]))))
    assert "g_y_gamma" in {a.name for a in layer.backward}


@pytest.mark.parametrize("name", sorted(n for n, op in PROGRAMS.items() if factor_saved(op) != op))
def test_a_saved_factor_keeps_the_output_and_every_gradient(name):
    """factor_saved's op (y = y_gamma gamma + beta, y_gamma a step) has the declared op's output and gradients."""
    op = PROGRAMS[name]
    split = factor_saved(op)
    assert len(split.steps) == len(op.steps) + 1
    before, after = values(op, program_of(op), 7), values(op, program_of(split), 7)
    for array in [op.steps[-1].name, *program_of(op).returns]:
        np.testing.assert_allclose(after[array], before[array], rtol=1e-11, atol=1e-13, err_msg=f"{name} {array}")


def test_layer_norm_saves_its_normalised_x_and_not_x():
    forward, backward = lowered(CATALOG["LayerNorm"])[:2]
    assert forward.returns == ("y", "var", "y_gamma")
    assert "x" not in backward.args and "y_gamma" in backward.args


def test_a_mask_on_data_is_written_in_place_with_np_where_s_value_at_nan():
    """A guard on an array's values: fill copied where the condition fails, ~(x > 0), which holds at NaN as
    np.where's other branch does (the flipped comparison x <= 0 would keep NaN)."""
    from derive.declare import tensor_op
    op = tensor_op("Clipped", inputs={"x": "n k"},
                   steps=["y[n, k] = Piecewise((x[n, k] * x[n, k] + 1, x[n, k] > 0), (0, True))"])
    forward = lowered(op)[0]
    assert "np.copyto(" in str(forward) and "np.where" not in str(forward)
    namespace = {"np": np, "kept": generated._tensor.kept}
    exec(str(forward), namespace)
    x = np.array([[1.5, -2.0, np.nan], [0.0, 3.0, -np.inf]])
    np.testing.assert_array_equal(namespace["forward"](x), np.where(x > 0, x * x + 1, 0))
