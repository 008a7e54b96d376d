"""make docs' site: MkDocs (Material) over docs/*.md, plus the pages this module generates when MkDocs asks
(mkdocs.yml names it as a hook): the front page from README.md, one page per catalog operation from the
registry, the named derivations, and the command-line reference from symgrad's own parser. KaTeX is
copied in from the npm copy make builds (build/node), so that neither building nor reading the site
touches the network.

    python -m docsite.build [--out build/docs/site]      (make docs)
    python -m docsite.build --screenshots docsite/screenshots   (make screenshot: the README's pictures)
"""
import argparse
import inspect
import logging
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File
from sympy import IndexedBase, Sum

ROOT = Path(__file__).resolve().parent.parent
KATEX_FILES = ("katex.min.css", "katex.min.js", "fonts")
# the README's pictures of the site: {file: page}
SCREENSHOTS = {"catalog-page.png": "catalog/softmax_cross_entropy.html", "derivation-page.png": "derivations.html"}
# the repository's folders whose pictures the pages show (README's and docs' images), copied in at their paths
PICTURES = ("codegen/docs_assets", "codegen/demo_assets", "docsite/screenshots")
# each operation's PyTorch counterpart, as the tests compare them (tests/test_torch_parity.py, test_tensor_codegen.py)
PYTORCH = {
    "Sigmoid": "torch.sigmoid(x)", "Tanh": "torch.tanh(x)", "ReLU": "torch.relu(x)",
    "LeakyReLU": "F.leaky_relu(x, negative_slope)", "Softplus": "F.softplus(x)", "SiLU": "F.silu(x)",
    "GELU": "F.gelu(x)", "GELUTanh": 'F.gelu(x, approximate="tanh")', "ELU": "F.elu(x, alpha)", "SELU": "F.selu(x)",
    "Mish": "F.mish(x)", "Softsign": "F.softsign(x)", "HardTanh": "F.hardtanh(x, min_val, max_val)",
    "Softmax": "torch.softmax(x, -1)", "LogSoftmax": "F.log_softmax(x, -1)",
    "LayerNorm": "F.layer_norm(x, x.shape[-1:], gamma, beta, eps)",
    "RMSNorm": "F.rms_norm(x, x.shape[-1:], gamma, eps)",
    "BatchNorm1d": "nn.BatchNorm1d(num_features, eps, momentum, affine, track_running_stats)",
    "BatchNorm2d": "nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)",
    "GLU": "F.glu(x, dim=-1)", "Linear": "F.linear(x, W.T, b)  # W stored (in_features, out_features)",
    "Embedding": "F.embedding(x, weight)",
    "Conv1d": "F.conv1d(x, weight, b, stride, padding)", "Conv2d": "F.conv2d(x, weight, b, stride, padding)",
    "AvgPool2d": "F.avg_pool2d(x, kernel_size, stride, padding)",
    "MaxPool2d": "F.max_pool2d(x, kernel_size, stride, padding)",
    "ScaledDotProductAttention": "F.scaled_dot_product_attention(Q, K, V, is_causal=is_causal)",
    "MultiheadAttention": "nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)(query, key, value, "
                          "attn_mask=causal mask if is_causal, need_weights=False)[0]",
    "Dropout": "F.dropout(x, p, training)  # its law: a random mask cannot equal PyTorch's draw",
    "SoftmaxCrossEntropy": "F.cross_entropy(x, target, weight, ignore_index=ignore_index, "
                           "label_smoothing=label_smoothing, reduction=reduction)",
    "BinaryCrossEntropyWithLogits": "F.binary_cross_entropy_with_logits(x, target, weight, pos_weight=pos_weight, "
                                    "reduction=reduction)",
    "MeanSquaredError": "F.mse_loss(x, target, reduction=reduction)",
    "Huber": "F.huber_loss(x, target, reduction=reduction, delta=delta)",
    "NLLLoss": "F.nll_loss(x, target, weight, ignore_index=ignore_index, reduction=reduction)",
    "MulticlassHinge": "F.multi_margin_loss(x, target, margin=margin, reduction=reduction) * x.shape[1]"
                       "  # PyTorch divides by the class count",
    "KLDivLoss": "F.kl_div(x, target, reduction=reduction, log_target=log_target)",
    "SoftmaxFocalLoss": "-alpha[target] * (1 - log_p.exp())**gamma * log_p, log_p = F.log_softmax(x, -1)"
                        ".gather(1, target[:, None])[:, 0], reduced  # no PyTorch function: the formula",
}
WEIGHTS = {"class_weights": "an optional array over the classes, ones by default",
           "element_weights": "an optional array of x's shape, ones by default",
           "ignore_index": "the label whose rows count 0 (as a symbol: 0 on such a row, else 1)",
           "flag": "True or False, each derived and generated as kernels of its own"}


def range_text(bounds):
    """A derive.ops.Range as a declaration writes it: "> 0", "[0, 1]", or any finite number."""
    low, high = (f"{end:g}" for end in bounds[:2])
    if bounds.low == -float("inf") and bounds.high == float("inf"):
        return "any finite number"
    if bounds.high == float("inf"):
        return f"{'>' if bounds.low_open else '>='} {low}"
    if bounds.low == -float("inf"):
        return f"{'<' if bounds.high_open else '<='} {high}"
    return f"{'(' if bounds.low_open else '['}{low}, {high}{')' if bounds.high_open else ']'}"


def option_rows(op):
    """[(name, default, what it accepts)] of an operation's constructor options, from the registry."""
    from derive.tensor import TensorOp
    if not isinstance(op, TensorOp):
        return [(p.name, repr(p.default), range_text(p.range) if p.kind == "scalar" else WEIGHTS[p.kind])
                for p in op.params]
    rows = [(o, "None: the input dtype's machine epsilon" if o in op.dtype_eps else repr(v), range_text(op.ranges[o]))
            for o, v in op.options.items()]
    rows += [(w, "None", f"an optional array over {', '.join(map(str, axes))}, ones by default")
             for w, axes in (op.weights or {}).items()]
    rows += [(flag, "True", f"False keeps {', '.join(params)} at their init, untrained")
             for flag, params in (op.switches or {}).items()]
    return rows


def formula(op):
    """The forward as LaTeX display math: an element-wise or row operation's one expression in x_i, an
    index-notation operation's steps."""
    from codegen.latex import latex
    from derive.tensor import TensorOp
    if isinstance(op, TensorOp):
        lines = [f"{latex(IndexedBase(s.name)[s.indices])} = {latex(s.expr)}" for s in op.steps]
        return "$$\n\\begin{aligned}\n" + " \\\\\n".join(f"&{line}" for line in lines) + "\n\\end{aligned}\n$$"
    what = "y_i" if op.kind == "layer" else "L_i" if op.granularity == "element" else "L"
    if op.kind == "loss" and op.granularity == "row":
        target = "$c$ its integer label" if op.targets == ("labels",) else "$t_k$ its target"
        scope = f"The loss of one row of $K$ classes: $x_k$ its entries, {target}"
    elif op.kind == "loss":
        scope = "Element-wise: $x_i$ and $t_i$ are an entry of $x$ and of the target"
    else:
        scope = "Over a row of $K$ entries $x_i$" if op.forward.has(Sum) else "Element-wise: $x_i$ is any entry of $x$"
    names = [f"${latex(p.symbol)}$ is `{p.name}`, {WEIGHTS[p.kind]}" for p in op.params if p.kind != "scalar"]
    return f"$$\n{what} = {latex(op.forward)}\n$$\n\n{'; '.join([scope, *names])}."


def catalog_page(op):
    """The Markdown page of one catalog operation: summary, formula, options, PyTorch, derivations, code."""
    from codegen.latex import format_markdown
    from derive.derivations import DERIVATIONS
    import generated
    cls = getattr(generated, op.name, None)
    signature = f"`{op.name}{inspect.signature(cls)}`" if cls is not None else f"`{op.name}`"
    rows = option_rows(op)
    table = ("| option | default | accepts |\n| --- | --- | --- |\n"
             + "\n".join(f"| `{name}` | `{default}` | {accepts} |" for name, default, accepts in rows)
             if rows else "No options.")
    if op.kind == "loss":
        table += ('\n\nLike every loss, it takes `reduction="mean"` (the default), `"sum"` or `"none"`'
                  + "".join(f', and `"{mean}"`, the sum divided by `{" * ".join(f"x.shape[{a}]" for a in axes)}`'
                            for mean, axes in getattr(op, "means", {}).items()) + ".")
    derivations = [name for name in (op.module, f"{op.module}_stable") if name in DERIVATIONS]
    sections = "\n\n".join(f"### {name}\n\n`symgrad derive {name}`: {d.title}\n\n{format_markdown(d)}"
                           for name in derivations for d in [DERIVATIONS[name]()])
    code = ROOT / "generated" / f"{op.module}.py"
    listing = (f"`generated/{op.module}.py`, as `make codegen` wrote it:\n\n```python\n{code.read_text()}```"
               if code.exists() else "Not generated yet: run `make codegen`.")
    return (f"# {op.name}\n\n{op.summary[:1].upper()}{op.summary[1:]}.\n\n{signature}, from `generated`.\n\n"
            f"## Formula\n\n{formula(op)}\n\n## Options\n\n{table}\n\n"
            f"## PyTorch\n\nThe tests compare it with `{PYTORCH.get(op.name, 'no counterpart')}` "
            f"(`F` is `torch.nn.functional`), values and gradients, in float64.\n\n"
            f"## Derivation\n\n{sections}\n\n## Generated code\n\n{listing}\n")


def catalog_index(catalog):
    """The catalog's contents: each operation, its kind and summary."""
    rows = "\n".join(f"| [{op.name}]({op.module}.md) | {op.kind} | {op.summary} |" for op in catalog.values())
    return ("# The catalog\n\nEvery operation `derive/catalog.py` declares, each importable from `generated`. "
            "Each page is generated from the registry entry: its formula, its options with their defaults and "
            "ranges, its PyTorch counterpart, its derivation and its generated code.\n\n"
            f"| operation | kind | what it is |\n| --- | --- | --- |\n{rows}\n")


def derivations_page():
    """Every named derivation (those not of a catalog entry), each step typeset."""
    from codegen.latex import format_markdown
    from derive.derivations import NAMED
    sections = "\n\n".join(f"## {name}\n\n`symgrad derive {name}`: {d.title}\n\n{format_markdown(d)}"
                           for name, build in NAMED.items() for d in [build()])
    return ("# Derivations\n\nThe named derivations of `symgrad derive`, beyond each catalog operation's own "
            "(on its catalog page). Each step is an equation and the rule that produced it; the tests check every "
            f"step.\n\n{sections}\n")


def cli_reference():
    """symgrad's parser, every command's help as argparse prints it."""
    from codegen.cli import parser
    top = parser()
    commands = next(action for action in top._actions if isinstance(action, argparse._SubParsersAction))
    helps = {action.dest: action.help for action in commands._choices_actions}
    sections = "\n\n".join(f"## symgrad {name}\n\n{helps.get(name, '')}\n\n```text\n{sub.format_help()}```"
                           for name, sub in commands.choices.items())
    return (f"# Command-line reference\n\nGenerated from the parser (`codegen.cli.parser`). Examples: "
            f"[the command line](cli.md).\n\n```text\n{top.format_help()}```\n\n{sections}\n")


def front_page():
    """README.md as the site's index: its links into docs/ made links between pages."""
    return re.sub(r"\]\(docs/", "](", (ROOT / "README.md").read_text())


def pages():
    """{path in the site: Markdown} of every generated page."""
    from derive.catalog import CATALOG
    return {"index.md": front_page(), "catalog/index.md": catalog_index(CATALOG),
            **{f"catalog/{op.module}.md": catalog_page(op) for op in CATALOG.values()},
            "derivations.md": derivations_page(), "cli-reference.md": cli_reference()}


def katex_dist():
    from codegen.cli import KATEX_DIST
    if not (KATEX_DIST / "katex.min.js").exists():
        raise FileNotFoundError(f"no KaTeX in {KATEX_DIST}: make docs installs it (npm ci in build/node)")
    return KATEX_DIST


# MkDocs hooks (mkdocs.yml: hooks: [docsite/build.py])

def on_config(config):
    """The catalog's pages into the nav, under its index."""
    from derive.catalog import CATALOG
    for entry in config.nav:
        if entry == {"Catalog": "catalog/index.md"}:
            entry["Catalog"] = ["catalog/index.md", *(f"catalog/{op.module}.md" for op in CATALOG.values())]
    return config


def on_files(files, config):
    """The generated pages, KaTeX and the repository's pictures, added to docs/'s own files."""
    for path, text in pages().items():
        files.append(File.generated(config, path, content=text))
    katex = katex_dist()
    for name in KATEX_FILES:
        for source in sorted((katex / name).rglob("*")) if (katex / name).is_dir() else [katex / name]:
            if source.is_file():
                files.append(File.generated(config, f"assets/katex/{source.relative_to(katex)}",
                                            abs_src_path=str(source)))
    for folder in PICTURES:
        for source in sorted((ROOT / folder).glob("*.png")):
            files.append(File.generated(config, str(source.relative_to(ROOT)), abs_src_path=str(source)))
    return files


def on_page_markdown(markdown, page, config, files):
    """A docs/ page's links to the repository's pictures (../codegen/...) as links inside the site."""
    if page.file.generated_by is None:
        markdown = re.sub(r"\]\(\.\./(" + "|".join(map(re.escape, PICTURES)) + ")/", r"](\1/", markdown)
    return markdown


def build(out):
    """Build the site into out, strict: a broken link or a missing page fails the build."""
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config
    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(Path(out).resolve()), strict=True)
    mkdocs_build(config)
    return Path(out)


def screenshots(site, folder):
    """PNGs of SCREENSHOTS' pages as headless Chromium renders them, into folder."""
    from codegen.docs import headless_chromium
    folder.mkdir(parents=True, exist_ok=True)
    for name, page in SCREENSHOTS.items():
        headless_chromium(site.resolve() / page, "--window-size=1400,1000", f"--screenshot={(folder / name).resolve()}")
        print(f"wrote {folder / name}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the documentation site.")
    parser.add_argument("--out", default=str(ROOT / "build" / "docs" / "site"), help="the site's folder")
    parser.add_argument("--screenshots", metavar="DIR", help="also save the README's pictures of the site into DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(message)s", level=logging.WARNING)  # MkDocs' warnings, shown
    out = build(args.out)
    print(f"wrote {out / 'index.html'}")
    if args.screenshots:
        screenshots(out, Path(args.screenshots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
