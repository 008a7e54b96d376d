// Every formula pymdownx.arithmatex marked (\( \) inline, \[ \] display) rendered by the bundled KaTeX.
// A formula that fails to render shows as a .katex-error element, which the tests look for.
for (const formula of document.querySelectorAll(".arithmatex")) {
  const tex = formula.textContent.trim();
  katex.render(tex.slice(2, -2), formula, { displayMode: tex.startsWith("\\["), throwOnError: false });
}
