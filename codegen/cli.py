"""The symgrad command: symgrad codegen, symgrad derive NAME, symgrad docs, symgrad demo."""
import argparse
import importlib.util
import sys
import tokenize
from pathlib import Path

import numpy as np
import sympy as sp

from codegen.latex import FORMATS
from codegen.render import ROOT

KATEX_DIST = ROOT / "build" / "node" / "node_modules" / "katex" / "dist"


def run_derive(args):
    from codegen.latex import format_derivation
    from derive.derivations import DERIVATIONS
    if args.expr is not None and args.name:
        print("symgrad derive: give a derivation's name or --expr, not both", file=sys.stderr)
        return 2
    if args.expr is not None:
        derivation = expression_derivation(args.expr, args.wrt)
        if derivation is None:
            return 2
    elif args.list or not args.name:
        print("\n".join(DERIVATIONS))
        return 0
    elif args.name not in DERIVATIONS:
        print(f"symgrad derive: no derivation named {args.name!r}; try one of: {', '.join(DERIVATIONS)}",
              file=sys.stderr)
        return 2
    else:
        derivation = DERIVATIONS[args.name]()
    # an --expr derivation is always checked (quietly unless asked): no test has seen its input
    if (args.check or args.expr is not None) and not checked(derivation, args.check):
        return 1
    print(format_derivation(derivation, args.format))
    return 0


def expression_derivation(text, wrt):
    """The element-wise derivation of text by wrt, or None after saying what is wrong with them."""
    from derive.derivation_steps import elementwise_derivation
    try:
        expr = sp.parse_expr(text)
        return elementwise_derivation(expr, sp.Symbol(wrt), f"y = {text}")
    except (SyntaxError, tokenize.TokenError, TypeError, ValueError, sp.SympifyError) as error:
        print(f"symgrad derive: cannot derive --expr {text!r} by {wrt}: {error}", file=sys.stderr)
        return None


def checked(derivation, verbose):
    """Check every step, report on stderr each one (if verbose) or each that fails; whether all hold."""
    from derive.derivation_check import check_derivation
    checks = check_derivation(derivation)
    for check in checks:
        if verbose or not check.ok:
            print(check.report(), file=sys.stderr)
    if not all(check.ok for check in checks):
        print("symgrad derive: a step does not hold; nothing printed", file=sys.stderr)
        return False
    return True


def run_docs(args):
    from codegen.docs import headless_chromium, write_docs
    from derive.derivations import DERIVATIONS
    katex = Path(args.katex)
    if not (katex / "katex.min.js").exists():
        print(f"symgrad docs: no KaTeX in {katex}; make docs installs it (npm ci in build/node)", file=sys.stderr)
        return 1
    for path in write_docs(Path(args.out), DERIVATIONS, katex):
        print(f"wrote {path}")
    if args.screenshot:
        headless_chromium(Path(args.out).resolve() / "derivations.html", "--window-size=1000,1250",
                          f"--screenshot={Path(args.screenshot).resolve()}")
        print(f"wrote {args.screenshot}")
    return 0


def run_codegen(args):
    from codegen.pipeline import codegen, summary
    from derive.catalog import CATALOG
    from derive.declare import DeclarationError, load_ops
    from derive.ops import build_catalog
    if args.ops and not args.out:
        print("symgrad codegen: --ops needs --out (the folder of the package to generate)", file=sys.stderr)
        return 2
    out = Path(args.out or ROOT / "generated")
    try:
        catalog = build_catalog(*load_ops(args.ops), taken=CATALOG) if args.ops else CATALOG
        reports, changed, seconds = codegen(catalog, out)
    except (DeclarationError, ValueError, SyntaxError, NameError, ImportError) as error:
        print(f"symgrad codegen: {error}\n{out} left untouched", file=sys.stderr)
        return 1
    print(summary(reports))
    if changed is None:
        print(f"FAILED: {out} left untouched", file=sys.stderr)
        return 1
    print(f"{len(changed)} file(s) written in {out} ({seconds:.1f} s)" if changed
          else f"{out} up to date ({seconds:.1f} s)")
    return 0


def run_new(args):
    from derive.declare import DeclarationError, add_declaration, declaration_source
    name = args.name[:1].upper() + args.name[1:]  # a class name: swish -> Swish
    try:
        line = declaration_source(name, args.expr)
    except DeclarationError as error:
        print(f"symgrad new: {error}", file=sys.stderr)
        return 1
    if args.write:
        Path(args.write).write_text(add_declaration(Path(args.write).read_text() if Path(args.write).exists()
                                                    else None, line))
        print(f"{name} declared in {args.write}; generate it with: symgrad codegen --ops {args.write} --out DIR")
    else:
        print(line)
    return 0


def run_check(args):
    from codegen.verify import check_class, load_class
    try:
        cls = load_class(args.target)
        shape = tuple(int(v) for v in args.shape.split(","))
    except (ValueError, ImportError, AttributeError, FileNotFoundError, SyntaxError) as error:
        print(f"symgrad check: {error}", file=sys.stderr)
        return 2
    result = check_class(cls, shape, np.random.default_rng(args.seed), target=args.kind, tol=args.tol)
    print(f"{args.target}: {result.report()}")
    return 0 if result.ok else 1


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
    derive = commands.add_parser("derive", help="print a derivation, every step with the rule that produced it")
    derive.add_argument("name", nargs="?", help="which derivation (see --list)")
    derive.add_argument("--list", action="store_true", help="list the derivations")
    derive.add_argument("--format", choices=FORMATS, default="latex",
                        help="latex: an align* block; markdown: math between $$; text: for a terminal")
    derive.add_argument("--expr", help="derive this element-wise expression instead, e.g. 'log(1 + exp(x))'")
    derive.add_argument("--wrt", default="x", help="the variable of --expr (default x)")
    derive.add_argument("--check", action="store_true", help="check every step first, reporting on stderr")
    derive.set_defaults(run=run_derive)
    docs = commands.add_parser("docs", help="write every derivation as Markdown and as HTML rendered by KaTeX")
    docs.add_argument("--out", default=str(ROOT / "build" / "docs"), help="the folder to write")
    docs.add_argument("--katex", default=str(KATEX_DIST), help="KaTeX's dist folder, bundled beside the HTML")
    docs.add_argument("--screenshot", help="also save a PNG of the HTML as headless Chromium renders it")
    docs.set_defaults(run=run_docs)
    generate = commands.add_parser("codegen", help="derive, generate and verify the kernels")
    generate.add_argument("--out", help="the package folder to write (default: generated/ of this checkout)")
    generate.add_argument("--ops", help="a declaration file of your own (a Python file defining OPS)")
    generate.set_defaults(run=run_codegen)
    new = commands.add_parser("new", help="print (or --write) the declaration of an element-wise operation")
    new.add_argument("name", help="the class name, e.g. Swish")
    new.add_argument("expr", help="its forward in x, e.g. 'x*sigmoid(x)'")
    new.add_argument("--write", help="add the declaration to this file (created if missing)")
    new.set_defaults(run=run_new)
    check = commands.add_parser("check", help="finite-difference check of any layer or loss class")
    check.add_argument("target", help="path/to/module.py:ClassName")
    check.add_argument("--shape", default="4,5", help="the input's shape (default 4,5)")
    check.add_argument("--kind", choices=("labels", "dense"), default="dense",
                       help="a loss's target: integer labels or a float array of the input's shape")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--tol", type=float, default=1e-6, help="the largest relative error accepted")
    check.set_defaults(run=run_check)
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
