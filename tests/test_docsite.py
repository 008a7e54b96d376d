"""make docs' site, built once and opened in headless Chromium: every page reachable from the front page, every
formula rendered by the bundled KaTeX with no error, no broken internal link, nothing loaded from the network;
and the derivations where people work: symgrad derive --format html's page, a notebook's _repr_latex_."""
import html
import json
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import pytest

from codegen.cli import KATEX_DIST, self_contained_html
from codegen.docs import CHROMIUM_FLAGS
from codegen.latex import format_derivation, format_latex
from derive.catalog import CATALOG
from derive.derivations import derivation
from docsite.build import build

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SELF_CONTAINED = "derive-sigmoid.html"   # symgrad derive sigmoid --format html, checked beside the site's pages
# 404.html is not checked: a web server shows it for any missing path, so its links start at the server's root
# one Chromium opens every page in turn (10-30 s here); a page that never finishes loading fails after this
PAGE_TIMEOUT_MS = 300_000


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if not (KATEX_DIST / "katex.min.js").exists():
        pytest.fail(f"KaTeX is not installed in {KATEX_DIST}: run make test, which installs it with npm ci")
    return build(tmp_path_factory.mktemp("docs") / "site")


def chromium_dom(page, ready, *options):
    """The DOM of page once the JavaScript expression ready is true, from the system's headless Chromium driven by
    Playwright. Waiting on a condition in real time, not on --dump-dom's virtual time budget: in full make test
    runs on the CI machine that Chromium hung past 40 s and then 120 s with the budget (it takes 10-30 s here)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium not found: make test installs it with apt-get")
    from playwright.sync_api import sync_playwright
    flags = [flag for flag in CHROMIUM_FLAGS if not flag.startswith(("--virtual-time-budget", "--headless"))]
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=[*flags, *options])
        try:
            tab = browser.new_page()
            tab.goto(page.as_uri())
            tab.wait_for_function(ready, timeout=PAGE_TIMEOUT_MS)
            return tab.content()
        finally:
            browser.close()


def opened(folder, pages):
    """{page: what tests/site_check.html found on it} of pages (paths relative to folder), all in one Chromium;
    file:// pages may read each other's DOM only with --allow-file-access-from-files."""
    check = folder / "site-check.html"
    check.write_text((HERE / "site_check.html").read_text().replace("PAGES", json.dumps(pages)))
    dom = chromium_dom(check, "document.getElementById('report').textContent !== ''",
                       "--allow-file-access-from-files")
    report = re.search(r'<pre id="report">(.*?)</pre>', dom, re.S)
    assert report and report[1], "Chromium finished before every page was opened"
    return json.loads(html.unescape(report[1]))


@pytest.fixture(scope="module")
def pages(site):
    (site / SELF_CONTAINED).write_text(self_contained_html("sigmoid", derivation("sigmoid"), KATEX_DIST))
    return opened(site, sorted(str(path.relative_to(site)) for path in site.rglob("*.html") if path.name != "404.html"))


def local_target(url, site):
    """(the file in site, its fragment) of a file:// URL into the site, None for any other URL."""
    address, fragment = urldefrag(url)
    parsed = urlparse(address)
    if parsed.scheme != "file" or not Path(unquote(parsed.path)).is_relative_to(site):
        return None
    return Path(unquote(parsed.path)), fragment


def test_every_page_opens_and_is_reached_from_the_front_page(site, pages):
    assert not {page: found["error"] for page, found in pages.items() if "error" in found}
    reached, todo = set(), ["index.html"]
    while todo:
        page = todo.pop()
        if page not in reached:
            reached.add(page)
            todo += [str(target.relative_to(site)) for target, _ in filter(None, (
                local_target(url, site) for url in pages[page]["links"])) if target.suffix == ".html"]
    assert reached == set(pages) - {SELF_CONTAINED, "site-check.html"}


def test_every_formula_renders_with_no_katex_error(site, pages):
    assert not [problem for problem in problems(pages, site) if "formula" in problem[1] or "KaTeX" in problem[1]]
    assert pages[SELF_CONTAINED]["formulas"] == len(derivation("sigmoid").steps)
    assert pages["derivations.html"]["formulas"] > 100 and pages["stability.html"]["formulas"] > 20


def problems(pages, folder):
    """What is wrong on pages (as opened() found them) in folder: [(page, what, where)] of each formula not
    rendered or in error, each link into folder to a missing file or id, each resource or file:// link from
    outside it."""
    ids = {folder / page: set(found["ids"]) for page, found in pages.items()}
    wrong = [(page, "formulas not rendered", found["formulas"] - found["rendered"])
             for page, found in pages.items() if found["rendered"] != found["formulas"]]
    wrong += [(page, "KaTeX errors", found["errors"]) for page, found in pages.items() if found["errors"]]
    for page, found in pages.items():
        for url in found["links"] + found["resources"]:
            target = local_target(url, folder)
            if target is None and (url in found["resources"] or url.startswith("file:")):
                wrong.append((page, "outside the site", url))
            elif target and (not target[0].exists() or target[1] and target[1] not in ids.get(target[0], {target[1]})):
                wrong.append((page, "broken link", url))
    return wrong


def test_no_internal_link_is_broken_and_nothing_comes_from_the_network(site, pages):
    assert not problems(pages, site)


def test_the_checks_find_a_bad_formula_a_broken_link_and_a_resource_from_the_network(tmp_path):
    katex = KATEX_DIST.as_uri()
    (tmp_path / "b.html").write_text('<p id="here">b</p>')
    (tmp_path / "a.html").write_text(
        f'<!DOCTYPE html><script src="{katex}/katex.min.js"></script>'
        '<link rel="stylesheet" href="http://127.0.0.1:9/x.css">'
        '<a href="b.html#here">fine</a><a href="b.html#gone">no id</a><a href="c.html">no page</a>'
        '<div class="arithmatex">\\[\\frac{1}{2}\\]</div><div class="arithmatex">\\[\\frac{1}{2\\]</div>'
        f'<script>{(ROOT / "docs" / "assets" / "render-math.js").read_text()}</script>')
    found = opened(tmp_path, ["a.html", "b.html"])
    assert found["a.html"]["formulas"] == 2 and found["a.html"]["rendered"] == 1
    assert sorted((what, where if isinstance(where, int) else where.rsplit("/", 1)[1])
                  for _, what, where in problems(found, tmp_path)) == [
        ("KaTeX errors", 1), ("broken link", "b.html#gone"), ("broken link", "c.html"),
        ("formulas not rendered", 1), ("outside the site", "katex.min.js"), ("outside the site", "x.css")]


def test_the_catalog_has_a_page_per_operation_with_its_derivation_and_code(site, pages):
    for op in CATALOG.values():
        page = site / "catalog" / f"{op.module}.html"
        text = page.read_text()
        assert pages[f"catalog/{op.module}.html"]["formulas"] > 1, op.name
        assert f"symgrad derive {op.module}" in text and "generated/" in text, op.name
    assert "symgrad derive" in (site / "cli-reference.html").read_text()
    assert "check_gradient" in (site / "api.html").read_text()


def test_the_self_contained_page_needs_no_other_file(pages):
    assert not pages[SELF_CONTAINED]["resources"] and not pages[SELF_CONTAINED]["links"][1:]


def test_a_derivation_shows_itself_typeset_in_a_notebook():
    from tests.test_docs import katex_errors
    steps = derivation("softmax_cross_entropy")
    latex = steps._repr_latex_()   # what Jupyter's display calls for text/latex
    assert latex == format_latex(steps) and latex in format_derivation(steps, "latex")
    assert katex_errors([latex]) == [None]


def test_every_catalog_operation_has_its_pytorch_counterpart_on_its_page():
    from docsite.build import PYTORCH
    assert set(PYTORCH) == set(CATALOG)
