"""Every LaTeX string symgrad prints renders in KaTeX (strict), and make docs' HTML renders offline in Chromium."""
import functools
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from codegen.cli import KATEX_DIST, expression_derivation
from codegen.docs import built, headless_chromium, write_docs
from codegen.latex import FORMATS, format_derivation
from derive.derivations import DERIVATIONS

HERE = Path(__file__).resolve().parent
KATEX = KATEX_DIST.parent
EXPRESSIONS = ["log(1 + exp(x))", "1/(1 + exp(-x))", "Max(0, x)", "sqrt(x**2 + 1)", "x*tanh(log(1 + exp(x)))"]
MATH = re.compile(r"^\$\$\n(.*?)\n\$\$$", re.S | re.M)


@functools.cache
def derivations():
    return built(DERIVATIONS)


@functools.cache
def printed():
    """{(what, format): text} of everything symgrad derive prints: every derivation, and --expr examples."""
    examples = [(f"--expr {e}", expression_derivation(e, "x")) for e in EXPRESSIONS]
    return {(name, fmt): format_derivation(d, fmt) for name, d in [*derivations(), *examples] for fmt in FORMATS}


def katex_errors(strings):
    """KaTeX's error for each string (None where it rendered), all rendered by one node process."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found: these tests render LaTeX with KaTeX and need Node.js 20 or newer (and npm)")
    if not (KATEX / "package.json").exists():
        pytest.fail(f"KaTeX is not installed in {KATEX}: run make test, which installs it with npm ci")
    result = subprocess.run([node, str(HERE / "katex_render.js"), str(KATEX)], input=json.dumps(strings),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_printed_latex_string_renders_in_katex_strict_mode():
    strings = {}
    for (name, fmt), text in printed().items():
        if fmt == "latex":
            strings[f"{name}, latex"] = text
        elif fmt == "markdown":
            strings.update((f"{name}, markdown formula {n}", tex) for n, tex in enumerate(MATH.findall(text), 1))
    errors = dict(zip(strings, katex_errors(list(strings.values()))))
    failed = [f"{what}: {error}\n{strings[what]}" for what, error in errors.items() if error]
    assert not failed, "\n\n".join(failed)
    assert len(strings) > 2 * len(printed()) / len(FORMATS)


def test_katex_is_strict_enough_to_refuse_what_would_not_render():
    assert katex_errors([r"\frac{1}{2}", r"\frac{1}{2", r"\text{a_b}"])[0] is None
    assert all(katex_errors([r"\frac{1}{2", r"\text{a_b}", r"\undefinedmacro x"]))


def test_the_text_format_is_pretty_printed_and_carries_no_latex():
    for (name, fmt), text in printed().items():
        if fmt == "text":
            assert "\\frac" not in text and "(1) definition" in text, name


class Classes(HTMLParser):
    """Counts elements by class."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def handle_starttag(self, tag, attrs):
        for name in dict(attrs).get("class", "").split():
            self.counts[name] = self.counts.get(name, 0) + 1


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs")
    write_docs(out, DERIVATIONS, KATEX_DIST)
    return out


def test_docs_writes_markdown_with_every_step_between_dollars(docs):
    text = (docs / "derivations.md").read_text()
    for name, _ in derivations():
        assert f"\n## {name}\n" in text
    assert len(MATH.findall(text)) == sum(len(d.steps) for _, d in derivations())


def test_the_html_is_self_contained(docs):
    html = (docs / "derivations.html").read_text()
    assert "http://" not in html and "https://" not in html
    assert 'href="katex/katex.min.css"' in html and 'src="katex/katex.min.js"' in html
    assert (docs / "katex" / "katex.min.js").exists() and list((docs / "katex" / "fonts").glob("*.woff2"))


def test_chromium_renders_every_formula_of_the_html_with_no_katex_error(docs):
    try:
        dom = headless_chromium(docs / "derivations.html", "--dump-dom").stdout
    except FileNotFoundError as error:
        pytest.fail(str(error))
    parsed = Classes()
    parsed.feed(dom)
    formulas = sum(len(d.steps) for _, d in derivations())
    assert parsed.counts.get("formula") == formulas
    assert parsed.counts.get("katex-error", 0) == 0
    assert parsed.counts.get("katex") == formulas
