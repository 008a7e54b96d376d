"""generated.fast's index-notation classes (codegen.tensor_fused): the fused kernels run compiled against the NumPy
classes in float32 and float64, against finite differences, keeping the dtype and the NumPy classes' errors; the
ops the printer does not fuse say why; codegen refuses a wrong fused kernel."""
import dataclasses
import shutil

import numpy as np
import pytest
import sympy as sp

import generated
from codegen import accuracy, tensor_fused, tensor_lower
from codegen.pipeline import codegen, imported
from codegen.render import FAST, ROOT, operation_files
from codegen.tensor_fused import FusionError, fusion_error, row_scheme
from codegen.tensor_verify import sample
from codegen.verify import check_op
from derive.catalog import CATALOG
from derive.tensor import TensorOp

numba = pytest.importorskip("numba")
fast = pytest.importorskip("generated.fast")

TENSOR = [op for op in CATALOG.values() if isinstance(op, TensorOp)]
# the generator's own answer: the index-notation ops with a fused forward or backward
FUSED = [op for op in TENSOR if fusion_error(op) is None]
ids = lambda ops: [op.name for op in ops]  # noqa: E731
AGREE = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-12)}


def test_the_fused_classes_are_the_generators_answer():
    assert {op.name for op in FUSED} >= {"LayerNorm", "RMSNorm", "BatchNorm2d"}
    assert {op.name for op in FUSED} <= set(fast.__all__)
    assert not [op.name for op in TENSOR if op not in FUSED and hasattr(fast, op.name)]
    for op in FUSED:
        module = getattr(fast, op.module)
        assert isinstance(module._forward, numba.core.registry.CPUDispatcher), op.name
        assert isinstance(module._backward, numba.core.registry.CPUDispatcher), op.name


@pytest.mark.parametrize("name, why", [("GLU", "have not"), ("Conv2d", "window"), ("Dropout", "noise"),
                                       ("BatchNorm1d", "lacks its optional last axis: a row's entries are strided"),
                                       ("ScaledDotProductAttention", "row index")])
def test_an_op_outside_the_scheme_says_why(name, why):
    assert why in fusion_error(CATALOG[name])
    assert not hasattr(fast, name)


def instances(op, dtype, rng, rows=1):
    """(fast instance, NumPy instance, inputs, upstream g) at op's check sizes, params alike; a batched op's input
    with rows x the check batch in two leading axes (more rows than the kernels' chunks, not a multiple of them)."""
    constructor, arrays, params = sample(op, rng)
    made = []
    for cls in (getattr(fast, op.name), getattr(generated, op.name)):
        instance = cls(**constructor, dtype=dtype)
        for p, value in params.items():
            setattr(instance, p, value.astype(dtype))
        made.append(instance)
    inputs = [arrays[a] for a in op.inputs]
    if op.batch_index is not None and rows > 1:
        inputs = [rng.uniform(*op.domain, (rows, *x.shape)) for x in inputs]
    inputs = [x.astype(dtype) for x in inputs]
    return *made, inputs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", FUSED, ids=ids(FUSED))
def test_agrees_with_numpy_and_keeps_the_dtype(op, dtype):
    rng = np.random.default_rng(0)
    mine, theirs, inputs = instances(op, dtype, rng, rows=29)
    y = mine.forward(*inputs)
    g = rng.standard_normal(y.shape).astype(dtype)
    for input_grad in (True, False) if getattr(theirs, "params_alone", False) else (True,):
        results = []
        for instance in (mine, theirs):
            out = instance.forward(*inputs)
            grads = instance.backward(g, input_grad=input_grad) if input_grad is False else instance.backward(g)
            results.append([out, *(grads if isinstance(grads, tuple) else (grads,) * (grads is not None)),
                            *(getattr(instance, f"d{p}") for p in op.params)])
        for got, want in zip(*results):
            assert got.dtype == dtype and got.shape == want.shape
            scale = max(np.max(np.abs(want), initial=0.0), 1.0)
            np.testing.assert_allclose(got, want, rtol=AGREE[dtype]["rtol"], atol=AGREE[dtype]["atol"] * scale)


@pytest.mark.parametrize("op", FUSED, ids=ids(FUSED))
def test_gradients_match_finite_differences(op):
    for variant, check in check_op(op, getattr(fast, op.name), np.random.default_rng(1)):
        assert check.ok, f"{op.name} (fast) {variant}: {check.report()}"


@pytest.mark.parametrize("op", FUSED, ids=ids(FUSED))
def test_an_empty_batch_and_a_constant_row_are_numpys(op):
    rng = np.random.default_rng(2)
    mine, theirs, (x,) = instances(op, np.float64, rng)
    for value in (np.full_like(x, 1.5), x[:0]):
        with np.errstate(all="ignore"):
            np.testing.assert_allclose(mine.forward(value), theirs.forward(value), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", FUSED, ids=ids(FUSED))
def test_bad_input_gives_the_numpy_classes_error(op):
    rng = np.random.default_rng(3)
    mine, theirs, (x,) = instances(op, np.float64, rng)

    def outcome(call):
        """The error's one line, or None where call returns."""
        try:
            call()
        except (ValueError, TypeError, RuntimeError) as error:
            return f"{type(error).__name__}: {error}"
        return None
    assert outcome(lambda: mine.backward(x)) == outcome(lambda: theirs.backward(x)) is not None  # before forward
    # one entry short on the axis of the first param (LayerNorm's k, BatchNorm's c)
    (axes, _), *_ = op.params.values()
    short = np.delete(x, 0, axis=op.inputs["x"].index(axes[0]))
    for bad in (short, "x", x.astype(np.int64), x[0]):
        assert outcome(lambda: mine.forward(bad)) == outcome(lambda: theirs.forward(bad))
    assert outcome(lambda: mine.forward(short)) is not None
    mine.forward(x)
    theirs.forward(x)
    assert outcome(lambda: mine.backward(short)) == outcome(lambda: theirs.backward(short)) is not None


@pytest.mark.parametrize("op", FUSED, ids=ids(FUSED))
def test_the_scheme_names_the_row_index(op):
    r, inner = row_scheme(op)
    assert r not in inner and {r, *inner} == set(op.steps[-1].indices)


def wrong(assignment_name):
    """tensor_fused.Kernel.assign with assignment_name's value 0.1% off: a wrong fused kernel."""
    assign = tensor_fused.Kernel.assign

    def assigned(self, a):
        return assign(self, a._replace(expr=a.expr * 1.001) if a.name == assignment_name else a)
    return assigned


@pytest.mark.parametrize("op, name", [("LayerNorm", "dx"), ("LayerNorm", "mu"), ("LayerNorm", "dgamma"),
                                      ("BatchNorm2d", "dx")])
def test_codegen_refuses_a_wrong_fused_kernel(tmp_path, monkeypatch, op, name):
    """A fused LayerNorm whose dx, saved mean or dgamma is 0.1% off (a BatchNorm2d whose dx is: its channels
    are the rows) fails verification, named, and nothing is written, while its NumPy twin passes."""
    monkeypatch.setattr(tensor_fused.Kernel, "assign", wrong(name))
    reports, changed, _ = codegen({op: CATALOG[op]}, tmp_path / "pkg", cache=None, backend="fast")
    assert changed is None and not (tmp_path / "pkg").exists()
    assert [report.name for report in reports if not report.ok] == [f"{op} (fast)"]
    failures = next(report.failures for report in reports if not report.ok)
    assert any("against NumPy" in failure for failure in failures)


def test_a_kernel_outside_the_scheme_is_a_fusion_error():
    op = CATALOG["LayerNorm"]
    r, inner = row_scheme(op)
    steps, programs = tensor_fused.programs(op)
    shifted = programs["forward"][-1]._replace(expr=programs["forward"][-1].expr.subs(inner[0], inner[0] + 1))
    with pytest.raises(FusionError, match="shifted"):
        tensor_fused.Kernel(op, (r, inner), "forward", (*programs["forward"][:-1], shifted), ["x", "gamma", "beta",
                                                                                             "eps"], ["y"], steps)


def test_the_axes_after_the_rows_are_one_loop_where_every_array_has_them_last():
    """BatchNorm2d's h, w (after its rows' c) are one loop over H*W, the arrays reshaped to (N, C, H*W); not
    where an array has one of them alone, nor LayerNorm's single k."""
    op = CATALOG["BatchNorm2d"]
    scheme = row_scheme(op)
    steps, programs = tensor_fused.programs(op)
    kernel = tensor_fused.Kernel(op, scheme, "forward", programs["forward"], ["x", "gamma", "beta", "eps"],
                                 ["y", "mu", "var"], steps)
    plain, arguments, jitted = kernel.lines()
    assert [str(i) for i in kernel.run] == ["h", "w"] and arguments[-2:] == ["H", "W"]
    assert "x.reshape((N, C, H*W))" in plain[-1] and any("range(H*W)" in line for line in jitted)
    assert not any("range(W)" in line for line in jitted)
    kernel.axes["gamma"] = kernel.axes["gamma"] + (kernel.run[-1],)
    assert kernel.merged_run(op.steps[-1].indices) == ()
    op = CATALOG["LayerNorm"]
    steps, programs = tensor_fused.programs(op)
    assert tensor_fused.Kernel(op, row_scheme(op), "forward", programs["forward"], ["x", "gamma", "beta", "eps"],
                               ["y", "mu", "var"], steps).run == ()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm2d_agrees_on_strided_arrays(dtype):
    """x and g every other column of larger arrays: the fused kernels' reshaped arguments are copies then, and
    their outputs (contiguous, reshaped as views) still receive every value."""
    rng = np.random.default_rng(4)
    op = CATALOG["BatchNorm2d"]
    mine, theirs, (x,) = instances(op, dtype, rng)
    x = np.repeat(x, 2, axis=-1)[..., ::2]
    g = rng.standard_normal((*x.shape[:-1], 2 * x.shape[-1])).astype(dtype)[..., ::2]
    assert not x.flags.c_contiguous and not g.flags.c_contiguous
    results = [(instance.forward(x), instance.backward(g), instance.dgamma, instance.dbeta, instance.running_var)
               for instance in (mine, theirs)]
    for got, want in zip(*results):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=AGREE[dtype]["rtol"], atol=AGREE[dtype]["atol"])


def test_the_fused_norms_guard_the_entry_alone_far_from_its_row():
    # dx at 1e4 in (1e4, 1, 1.5, -3) cancels in the derived form (175 ulps in float32 unguarded): forward's largest
    # x hat^2 of each row flags the row, and backward_isolated (derive.tensor.isolated_entry) writes that entry
    x = np.array([[1e4, 1, 1.5, -3]], np.float32)
    g = np.array([[0.3, -0.7, 0.2, 0.9]], np.float32)
    for name in ("LayerNorm", "RMSNorm"):
        truth = getattr(generated, name)(4, dtype=np.float64)
        truth.forward(x.astype(np.float64))
        expected = truth.backward(g.astype(np.float64))
        for guarded in (True, False):
            layer = getattr(fast, name)(4, dtype=np.float32)
            layer.forward(x)
            layer._largest[...] = layer._largest if guarded else 0   # 0: no row flagged, the derived form alone
            ulps = np.abs(layer.backward(g) - expected) / np.spacing(np.abs(expected).astype(np.float32))
            assert (ulps[0, 0] <= 4) == guarded and ulps[0, 1:].max() <= 4, (name, guarded, ulps)


def fused_layer_norm(folder, monkeypatch, factored):
    """generated's package copied into folder, its fast/layer_norm.py printed now, with the backward reading the
    factor x hat (factored) or, as it was printed before, x - mu; run interpreted, with math as numba compiles it."""
    shutil.copytree(ROOT / "generated", folder, ignore=shutil.ignore_patterns("__pycache__"))
    with monkeypatch.context() as patched:
        if not factored:
            patched.setattr(tensor_fused, "factor_saved", lambda op: op)
        text = operation_files(CATALOG["LayerNorm"])[f"{FAST}/layer_norm.py"]
    (folder / FAST / "layer_norm.py").write_text(text)
    return imported(folder, fused=True).fast.LayerNorm


def test_the_fused_layer_norm_backward_reads_x_hat_where_var_to_the_3_2_overflows(tmp_path, monkeypatch):
    # a float32 row of spread 3e13: var = 3.1e26 is finite, (eps + var)^(3/2) = 5.5e39 is not; the old g_var,
    # Sum((x - mu) g gamma) over that power, was 0 there, and dx lost a term. Four entries, none alone far from
    # the others (x hat^2 1.28, below the isolated entry's 3/2): at three, every entry of a row is the isolated
    # form's (derive.tensor.isolated_entry), which reads neither
    base = accuracy.tensor_subject(CATALOG["LayerNorm"])
    subject = dataclasses.replace(base, sizes={size: 4 if str(size) == "K" else n for size, n in base.sizes.items()})
    rng = np.random.default_rng(5)
    arrays = {"x": np.array([[2e13, -2e13, 1.5e13, -1.5e13], [0.3, -1.2, 2.0, 0.5]], np.float32),
              "gamma": rng.uniform(0.5, 2, 4).astype(np.float32), "beta": rng.uniform(-1, 1, 4).astype(np.float32),
              "g": rng.uniform(-1, 1, (2, 4)).astype(np.float32)}
    truth = accuracy.TensorTruth(subject, arrays, accuracy.tensor_options(subject, np.float32))
    for factored in (False, True):
        cls = fused_layer_norm(tmp_path / str(factored), monkeypatch, factored)
        tally = accuracy.judged(accuracy.Tally(), accuracy.run_tensor_class(cls, subject, arrays), truth, np.float32,
                                accuracy.bound("LayerNorm", np.float32))
        assert bool(tally.failures) != factored, (factored, tally.example)


def test_the_fused_backward_computes_what_the_derivation_does():
    # SymPy, every Sum written out at N = 1, K = 3: the fused program's dx, g_var and dgamma (x hat computed again
    # from its definition, read back by codegen.tensor_lower.steps_read_back) are the derived ones
    op = CATALOG["LayerNorm"]
    steps, assignments = tensor_fused.programs(op)
    derived = tensor_lower.program_of(op)
    eps = sp.Symbol("eps", positive=True)

    def value(program, name, at):
        """Assignment name of program at integer indices at, every step by its value."""
        step = {a.name: a for a in program}[name]
        sizes = {sp.Symbol("K", integer=True, positive=True): 3, sp.Symbol("N", integer=True, positive=True): 1}
        expr = step.expr.xreplace(sizes).xreplace(dict(zip(step.indices, at)))
        expr = expr.xreplace({s: eps for s in expr.free_symbols if s.name == "eps"})
        expr = expr.replace(lambda e: isinstance(e, sp.Sum), lambda e: sp.Sum(e.function, *e.limits).doit())
        return expr.replace(lambda e: isinstance(e, sp.Indexed) and all(i.is_Integer for i in e.indices),
                            lambda e: value(program, e.base.name, e.indices) if e.base.name in {a.name for a in program}
                            else sp.Symbol(f"{e.base.name}_{'_'.join(map(str, e.indices))}", real=True))

    def canonical(expr):
        return sp.simplify(expr.replace(lambda e: e.is_Pow and e.exp.is_Rational and e.exp.q == 2,
                                        lambda e: sp.Pow(sp.factor(sp.expand(e.base)), e.exp)))
    fused, plain = (*steps, *assignments["backward"]), (*derived.forward, *derived.backward)
    for name, at in (("g_var", (0,)), ("dx", (0, 0)), ("dx", (0, 2)), ("dgamma", (1,))):
        assert canonical(value(fused, name, at) - value(plain, name, at)) == 0, (name, at)


def test_an_output_is_written_again_only_once_nothing_else_holds_it(monkeypatch):
    # _runtime.kept_empty spares a fresh mmap per large output (LayerNorm's y and dx): an array it returned comes
    # back only once nothing holds it but the pool, a view holding its base; a pool that ignored the references
    # would write a y still held
    kept_empty = fast._runtime.kept_empty
    a = kept_empty("test.a", (3, 4), np.float64)
    b = kept_empty("test.a", (3, 4), np.float64)
    assert b is not a
    view, kept = b[1:], id(a)
    del a, b
    c = kept_empty("test.a", (3, 4), np.float64)
    assert id(c) == kept and c is not view.base
    assert kept_empty("test.a", (3, 5), np.float64).shape == (3, 5)   # held: none free, one more array
    rng = np.random.default_rng(6)
    xs = rng.standard_normal((4, 29, 8))
    for ignoring in (False, True):
        if ignoring:
            monkeypatch.setattr(generated._kept, "_ALONE", 1 << 30)
        layer = fast.LayerNorm(8, dtype=np.float64)
        y = layer.forward(xs[0])
        first, dx = y.copy(), layer.backward(xs[1])
        grad = dx.copy()
        for x in xs[2:]:
            layer.forward(x)
            layer.backward(x)
        assert (np.array_equal(y, first) and np.array_equal(dx, grad)) != ignoring


@pytest.mark.parametrize("op", FUSED, ids=ids(FUSED))
def test_the_params_gradients_are_each_calls_own(op):
    # the chunks' partial sums are kept across calls (_runtime.kept_empty) and zeroed by each chunk's thread: a
    # second call adds nothing of the first's (a kernel that did not zero them would double dgamma), and an empty
    # batch, one chunk of no rows, gives the NumPy class's gradients too
    rng = np.random.default_rng(7)
    mine, theirs, (x,) = instances(op, np.float64, rng, rows=29)
    g = rng.standard_normal(x.shape)
    for value, upstream in ((x, g), (x, g), (x[:0], g[:0])):
        with np.errstate(all="ignore"):
            for instance in (mine, theirs):
                instance.forward(value)
                instance.backward(upstream)
        for p in op.params:
            np.testing.assert_allclose(getattr(mine, f"d{p}"), getattr(theirs, f"d{p}"), rtol=1e-11, atol=1e-12)
