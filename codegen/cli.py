"""The symgrad command: symgrad codegen, symgrad derive NAME, symgrad demo."""
import argparse
import importlib.util
import sys
from pathlib import Path

import sympy as sp

from codegen.render import ROOT

FORMATS = ("latex", "text")


def format_steps(steps, fmt):
    """A derivation as a LaTeX align* block or as pretty-printed text, one numbered step a line."""
    if fmt == "latex":
        rows = [rf"{sp.latex(s.lhs)} &= {sp.latex(s.rhs)} && \text{{({number}) {s.rule}}}"
                for number, s in enumerate(steps, 1)]
        return "\\begin{align*}\n" + " \\\\\n".join(rows) + "\n\\end{align*}"
    return "\n\n".join(f"({number}) {s.rule}\n{sp.pretty(sp.Eq(s.lhs, s.rhs, evaluate=False))}"
                       for number, s in enumerate(steps, 1))


def run_derive(args):
    from derive.derivations import DERIVATIONS
    if args.list or not args.name:
        print("\n".join(DERIVATIONS))
        return 0
    if args.name not in DERIVATIONS:
        print(f"symgrad derive: no derivation named {args.name!r}; try one of: {', '.join(DERIVATIONS)}",
              file=sys.stderr)
        return 2
    print(format_steps(DERIVATIONS[args.name](), args.format))
    return 0


def run_codegen(args):
    from codegen.pipeline import codegen, summary
    from derive.catalog import CATALOG
    reports, changed, seconds = codegen(CATALOG, Path(args.out))
    print(summary(reports))
    if changed is None:
        print(f"FAILED: {args.out} left untouched", file=sys.stderr)
        return 1
    print(f"{len(changed)} file(s) written in {args.out} ({seconds:.1f} s)" if changed
          else f"{args.out} up to date ({seconds:.1f} s)")
    return 0


def run_demo(args):
    missing = [name for name in ("sklearn", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"symgrad demo: {', '.join(missing)} missing; install the demo extra: pip install 'symgrad[demo]'",
              file=sys.stderr)
        return 2
    from codegen.demo import Config, run, summary
    results = run(Config(hidden=args.hidden, epochs=args.epochs), Path(args.out))
    print(summary(results))
    print(f"loss_curves.png, gradient_factor.png and results.json written in {args.out}")
    return 0


def parser():
    top = argparse.ArgumentParser(prog="symgrad", description="Derive, generate and verify gradient code.")
    commands = top.add_subparsers(dest="command", required=True)
    derive = commands.add_parser("derive", help="print a derivation")
    derive.add_argument("name", nargs="?", help="which derivation (see --list)")
    derive.add_argument("--list", action="store_true", help="list the derivations")
    derive.add_argument("--format", choices=FORMATS, default="latex")
    derive.set_defaults(run=run_derive)
    generate = commands.add_parser("codegen", help="derive, generate and verify the kernels")
    generate.add_argument("--out", default=str(ROOT / "generated"), help="the package folder to write")
    generate.set_defaults(run=run_codegen)
    demo = commands.add_parser("demo", help="train generated layers on the digits; plot MSE vs cross-entropy")
    demo.add_argument("--out", default="build/demo", help="the folder for the plots and results.json")
    demo.add_argument("--hidden", choices=("relu", "tanh"), default="relu", help="the hidden layer's activation")
    demo.add_argument("--epochs", type=int, default=20)
    demo.set_defaults(run=run_demo)
    return top


def main(argv=None):
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
