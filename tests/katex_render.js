// Renders every LaTeX string of a JSON array read from stdin with KaTeX, as strictly as it allows,
// and writes a JSON array of the same length: null where a string rendered, else KaTeX's error.
// Usage: node katex_render.js PATH_TO_KATEX_PACKAGE < strings.json
const katex = require(process.argv[2]);

let input = "";
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  const errors = JSON.parse(input).map((tex) => {
    try {
      katex.renderToString(tex, { throwOnError: true, strict: "error", displayMode: true });
      return null;
    } catch (error) {
      return String(error.message);
    }
  });
  process.stdout.write(JSON.stringify(errors));
});
