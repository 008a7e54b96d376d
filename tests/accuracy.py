"""The accuracy survey of issue 23: generated kernels against mpmath across the whole range of a dtype.

    .venv/bin/python tests/accuracy.py --report build/accuracy.json          (the full grid)
    .venv/bin/python tests/accuracy.py --quick --only LogCosh,Softplus       (the test's grid)

The grid, the truth and the contract are codegen/accuracy.py's (make codegen prints its figures for each
operation). Here the subjects are every element-wise catalog operation, every row operation of the catalog (a
softmax, a loss over classes: a row of three entries, judged in units of its scale as an index-notation op's) and
the DECLARED list of realistic user expressions: their NumPy kernels, the fused ones where they exist (run interpreted, with math as numba compiles
it, as codegen verifies them) and the naive PyTorch form of the same expression (torch's functions as written,
autograd for the derivative; none for a row op), in float32 and float64. A kernel meets the contract where its bad, overflow and
inexact counts are all 0."""
import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

import sympy as sp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codegen import accuracy  # noqa: E402
from codegen.accuracy import (BOUNDS, DTYPES, QUANTITIES, T, X, Truth, bound, element_wise,  # noqa: E402,F401
                              subject)
from derive.functions import sigmoid  # noqa: E402

BACKENDS = ("numpy", "fused", "torch")

# ---- the subjects ---------------------------------------------------------------------------------

# (name, kind, expression, params, targets): realistic declarations a user writes, as written in papers
DECLARED = (
    ("Softplus", "activation", "log(1 + exp(x))", {}, None),
    ("SoftplusBeta", "activation", "log(1 + exp(beta*x))/beta", {"beta": 2.0}, None),
    ("LogSigmoid", "activation", "log(sigmoid(x))", {}, None),
    ("LogOneMinusSigmoid", "activation", "log(1 - sigmoid(x))", {}, None),
    ("Logistic", "activation", "1/(1 + exp(-x))", {}, None),
    ("Swish", "activation", "x/(1 + exp(-x))", {}, None),
    ("SwishBeta", "activation", "x*sigmoid(beta*x)", {"beta": 1.5}, None),
    ("Mish", "activation", "x*tanh(log(1 + exp(x)))", {}, None),
    ("GELU", "activation", "x*(1 + erf(x/sqrt(2)))/2", {}, None),
    ("GELUTanh", "activation", "x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x**3)))/2", {}, None),
    ("Gaussian", "activation", "exp(-x**2/2)", {}, None),
    ("Tanh", "activation", "tanh(x)", {}, None),
    ("LogCoshActivation", "activation", "log(cosh(x))", {}, None),
    ("LogSumExpPair", "activation", "log(exp(x) + exp(-x))", {}, None),
    ("ELU", "activation", "Piecewise((x, x > 0), (exp(x) - 1, True))", {}, None),
    ("Softsign", "activation", "x/(1 + Abs(x))", {}, None),
    ("ISRU", "activation", "x/sqrt(1 + x**2)", {}, None),
    ("BentIdentity", "activation", "(sqrt(x**2 + 1) - 1)/2 + x", {}, None),
    ("TanhExp", "activation", "x*tanh(exp(x))", {}, None),
    ("LiSHT", "activation", "x*tanh(x)", {}, None),
    ("Serf", "activation", "x*erf(log(1 + exp(x)))", {}, None),
    ("Sinh", "activation", "sinh(x)", {}, None),
    ("Cosh", "activation", "cosh(x)", {}, None),
    ("SiLUDerivative", "activation", "sigmoid(x)*(1 + x*(1 - sigmoid(x)))", {}, None),
    ("XLogX", "activation", "x*log(x)", {}, None),
    ("LogCosh", "loss", "log(cosh(x - t))", {}, (0.0, 0.5)),
    ("Cauchy", "loss", "log(1 + (x - t)**2)", {}, (0.0, 0.5)),
    ("Pinball", "loss", "Max(tau*(t - x), (tau - 1)*(t - x))", {"tau": 0.25}, (0.0, 0.5)),
    ("PseudoHuber", "loss", "sqrt(1 + (x - t)**2) - 1", {}, (0.0, 0.5)),
    ("Charbonnier", "loss", "sqrt((x - t)**2 + 0.001)", {}, (0.0, 0.5)),
    ("Welsch", "loss", "1 - exp(-(x - t)**2/2)", {}, (0.0, 0.5)),
    ("BCEWithLogits", "loss", "-(t*log(sigmoid(x)) + (1 - t)*log(1 - sigmoid(x)))", {}, (0.0, 0.25, 1.0)),
    ("LogisticMargin", "loss", "log(1 + exp(-t*x))", {}, (-1.0, 1.0)),
    ("ExponentialMargin", "loss", "exp(-t*x)", {}, (-1.0, 1.0)),
    ("SquaredHinge", "loss", "Max(0, 1 - t*x)**2", {}, (-1.0, 1.0)),
    ("PoissonLogInput", "loss", "exp(x) - t*x", {}, (0.0, 2.0)),
    ("PoissonRate", "loss", "x - t*log(x)", {}, (0.0, 2.0)),
    ("KLDivLogInput", "loss", "t*(log(t) - x)", {}, (0.0, 0.25)),
    ("FocalPositive", "loss", "-(1 - sigmoid(x))**2*log(sigmoid(x))*t", {}, (1.0,)),
    ("Huber", "loss", "Piecewise(((x - t)**2/2, Abs(x - t) < 1), (Abs(x - t) - 1/2, True))", {}, (0.0, 0.5)),
)


def declared_subjects(names=None):
    """Subjects of DECLARED (those named, if names)."""
    return [declared_subject(name, kind, text, params, targets)
            for name, kind, text, params, targets in DECLARED if not names or name in names]


def declared_subject(name, kind, text, params, targets, op=None, source="declared"):
    """The Subject of one declaration, kind "activation" or "loss" (op: its Op if it is declared already), its
    forward as parsed with the options' values exact (what the kernels hold)."""
    from derive.declare import activation, elementwise_loss, parse
    if op is None:
        op = (activation if kind == "activation" else elementwise_loss)(name, text, params=params or None)
    symbols = {p: sp.Symbol(p, real=True) for p in params}
    variables = {"x": X, **({"t": T} if kind == "loss" else {}), **symbols}
    forward = parse(name, text, variables).xreplace({symbols[p]: accuracy.exact(v) for p, v in params.items()})
    return accuracy.Subject(name, op, (forward,), targets or (None,), source, target=(T,) if kind == "loss" else ())


def catalog_subjects(names=None):
    """Subjects of every element-wise catalog op (those named, if names): x[i] read as x, weights as 1."""
    from derive.catalog import CATALOG
    return [subject(op) for name, op in CATALOG.items() if element_wise(op) and (not names or name in names)]


def row_subjects(names=None):
    """Subjects of every row op of the catalog (those named, if names): a derive.ops.Op whose forward sums over
    a row, over a row of accuracy.ROW's entries."""
    from derive.catalog import CATALOG
    from derive.ops import Op
    return [subject(op) for name, op in CATALOG.items()
            if type(op) is Op and not element_wise(op) and (not names or name in names)]


# ---- the kernels ----------------------------------------------------------------------------------

GENERATED = Path(__file__).resolve().parent.parent / "generated"


def imported(folder):
    """The package in folder, its fused kernels interpreted with math as numba compiles it (as codegen verifies)."""
    from codegen.pipeline import imported
    return imported(Path(folder), True)


def rendered(ops, folder):
    """The package of ops rendered into folder (no verification: the survey measures what it prints) and
    imported, its fused kernels interpreted with math as numba compiles it."""
    from codegen.render import render_package
    from codegen.write import stage
    from derive.ops import build_catalog
    return imported(stage(render_package(build_catalog(*ops), True), Path(folder)))


def torch_function(expr):
    """A function (x, t) of torch tensors evaluating expr as written with torch's functions: the naive form."""
    import torch
    unary = {sp.exp: torch.exp, sp.log: torch.log, sp.tanh: torch.tanh, sp.sinh: torch.sinh, sp.cosh: torch.cosh,
             sp.erf: torch.erf, sp.atan: torch.atan, sp.Abs: torch.abs, sp.sign: torch.sign, sigmoid: torch.sigmoid}

    def build(e):
        if e == X:
            return lambda x, t: x
        if e == T:
            return lambda x, t: t
        if e.is_number:
            value = float(e)
            return lambda x, t: torch.full_like(x, value)
        if isinstance(e, sp.Piecewise):
            pieces = [(build(value), build(condition) if condition is not sp.true else None) for value, condition in e.args]

            def chosen(x, t):
                result = pieces[-1][0](x, t)
                for value, condition in reversed(pieces[:-1]):
                    result = torch.where(condition(x, t), value(x, t), result)
                return result
            return chosen
        args = [build(a) for a in e.args]
        if e.func in unary:
            f, (a,) = unary[e.func], args
            return lambda x, t: f(a(x, t))
        if isinstance(e, sp.Add):
            return lambda x, t: functools.reduce(lambda p, q: p + q, (a(x, t) for a in args))
        if isinstance(e, sp.Mul):
            return lambda x, t: functools.reduce(lambda p, q: p * q, (a(x, t) for a in args))
        if isinstance(e, sp.Pow):
            base, exponent = args[0], float(e.exp) if e.exp.is_number else None
            if exponent == 0.5:
                return lambda x, t: torch.sqrt(base(x, t))
            if exponent is not None and exponent == int(exponent):
                return lambda x, t: base(x, t) ** int(exponent)
            return lambda x, t: base(x, t) ** (exponent if exponent is not None else args[1](x, t))
        if isinstance(e, (sp.Max, sp.Min)):
            f = torch.maximum if isinstance(e, sp.Max) else torch.minimum
            return lambda x, t: functools.reduce(f, (a(x, t) for a in args))
        if isinstance(e, sp.core.relational.Relational):
            import operator
            compare = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}[e.rel_op]
            return lambda x, t: compare(args[0](x, t), args[1](x, t))
        raise NotImplementedError(f"no torch form of {e.func.__name__}: {e}")
    return build(expr)


def run_torch(function, points, t):
    """(forward, backward) of the naive torch form at points (n, 1) (and t), each (n, 1), by autograd with upstream
    gradient 1."""
    import torch
    inputs = torch.tensor(points[:, 0], requires_grad=True)
    target = torch.full_like(inputs, 0.0 if t is None else t).detach()
    y = function(inputs, target)
    (dx,) = torch.autograd.grad(y, inputs, torch.ones_like(y), allow_unused=True)
    dx = torch.zeros_like(inputs) if dx is None else dx
    return (y.detach().numpy().astype(points.dtype)[:, None], dx.numpy().astype(points.dtype)[:, None])


class Survey(accuracy.Survey):
    """codegen.accuracy's survey, with the naive PyTorch form of each subject beside its kernels (torch=True)."""

    def __init__(self, subjects, package, quick=False, torch=True, dtypes=DTYPES):
        super().__init__(subjects, package, quick, dtypes)
        self.torch = torch

    def runners(self, subject):
        found = super().runners(subject)
        if self.torch and not subject.row:
            found["torch"] = functools.partial(run_torch, torch_function(subject.forward[0]))
        return found


# ---- the command ----------------------------------------------------------------------------------

def counts(tallies, backends=("numpy", "fused")):
    """(cases, failing) over the tallies of backends: points and points that break the contract."""
    chosen = [tally for key, tally in tallies.items() if key[1] in backends]
    return sum(t.cases for t in chosen), sum(t.failures for t in chosen)


def table(tallies):
    """One line per subject and backend: failures by dtype and quantity, worst ulps."""
    rows = {}
    for (name, backend, dtype, quantity), tally in tallies.items():
        rows.setdefault((name, backend), {})[(dtype, quantity)] = tally
    header = f"{'subject':<34}{'backend':<8}" + "".join(
        f"{d[5:]}/{q[:3]:<10}" for d in ("float32", "float64") for q in QUANTITIES) + "  worst ulps (f32, f64)"
    lines = [header, "  (bad+overflow+inexact failures of finite-truth points / the points)"]
    for (name, backend), cells in rows.items():
        text = "".join(f"{(f'{c.failures}/{c.cases}' if c else '-'):<13}"
                       for c in (cells.get((d, q)) for d in ("float32", "float64") for q in QUANTITIES))
        worst = [max((c.worst_ulps for (d, _), c in cells.items() if d == dtype), default=0.0)
                 for dtype in ("float32", "float64")]
        lines.append(f"{name:<34}{backend:<8}{text}  {worst[0]:.3g}, {worst[1]:.3g}")
    for backends in (("numpy", "fused"), ("torch",)):
        cases, failing = counts(tallies, backends)
        lines.append(f"{' and '.join(backends)}: {failing} of {cases} points break the contract")
    return "\n".join(lines)


def survey(names=None, quick=False, torch=True):
    """{(subject, backend, dtype, quantity): Tally} of the catalog's element-wise and row ops and DECLARED."""
    catalog = catalog_subjects(names) + row_subjects(names)
    declared = declared_subjects(names)
    tallies = {}
    if catalog:
        tallies.update(Survey([replace_name(s, "catalog") for s in catalog], imported(GENERATED),
                              quick, torch).run())
    if declared:
        with tempfile.TemporaryDirectory(prefix="symgrad-accuracy-") as folder:
            package = rendered([s.op for s in declared], folder)
            tallies.update(Survey(declared, package, quick, torch).run())
    return tallies


def replace_name(subject, prefix):
    """subject named prefix:name in the report (a declared subject may share a catalog name)."""
    from dataclasses import replace
    return replace(subject, name=f"{prefix}:{subject.name}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="The accuracy survey of issue 23: kernels against mpmath.")
    parser.add_argument("--report", help="write every tally as JSON here")
    parser.add_argument("--only", help="comma-separated subject names (catalog or declared)")
    parser.add_argument("--quick", action="store_true", help="the sparser grid tests/test_accuracy.py uses")
    parser.add_argument("--no-torch", action="store_true", help="leave out the naive PyTorch forms")
    args = parser.parse_args(argv)
    names = set(args.only.split(",")) if args.only else None
    tallies = survey(names, args.quick, not args.no_torch)
    print(table(tallies))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(
            [dict(subject=k[0], backend=k[1], dtype=k[2], quantity=k[3], **vars(v)) for k, v in tallies.items()],
            indent=1))
        print(f"report written in {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
