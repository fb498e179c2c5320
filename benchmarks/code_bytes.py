"""Where the generated train_gpt.py's bytes go (issue 14's `bytes_code`), and what some cuts would buy.

For RECIPE it builds the script's payload as pipeline.codegen does (the bundled modules after dead-code
pruning and minifying), then prints:

1. each module's marginal compressed bytes (the brotli-11 payload with and without it), minified and
   source sizes, largest first;
2. what-ifs on the whole payload, each compressed the same way: every `raise` reduced to a bare
   exception (no messages), every string constant over 25 characters and every f-string emptied,
   locals renamed by python-minifier, and those together. These are measurements of what the
   readable, explained runtime costs, not options pgolf takes: the messages are the product's
   errors and the locals its tracebacks.

The script's size is about 1.22 x the compressed payload (base-93 text) plus its ~700-byte wrapper.

    python benchmarks/code_bytes.py sidecar48
"""

from __future__ import annotations

import ast
import sys

import brotli
import python_minifier

from pipeline import codegen
from pipeline.recipe import load_recipe


def _packed(modules: dict[str, str]) -> int:
    parts = []
    for path, source in sorted(modules.items()):
        parts += [path.encode(), source.encode()]
    return len(brotli.compress(b"\0".join(parts), quality=11, lgwin=24))


class _BareRaises(ast.NodeTransformer):
    def visit_Raise(self, node):
        return ast.Raise(exc=ast.Call(func=ast.Name("ValueError"), args=[], keywords=[]), cause=None)


class _NoLongStrings(ast.NodeTransformer):
    def visit_JoinedStr(self, node):
        return ast.Constant("")

    def visit_Constant(self, node):
        return ast.Constant("") if isinstance(node.value, str) and len(node.value) > 25 else node


def _transform(modules: dict[str, str], *transformers) -> dict[str, str]:
    out = {}
    for path, source in modules.items():
        tree = ast.parse(source)
        for t in transformers:
            tree = t.visit(tree)
        out[path] = ast.unparse(tree)
    return out


def main(recipe_name: str) -> None:
    recipe = load_recipe(recipe_name)
    sources = codegen.shipped_sources(recipe)
    minified = {path: codegen.minify_module(source) for path, source in sources.items()}
    total = _packed(minified)
    script = codegen.build_train_gpt(recipe)
    print(f"recipe={recipe_name} bytes_code={script.nbytes} codec={script.codec} modules={len(minified)} "
          f"payload_brotli={total} (modules only, no recipe JSON)")
    rows = []
    for path in minified:
        rest = {p: s for p, s in minified.items() if p != path}
        rows.append((total - _packed(rest), len(minified[path]), len(sources[path]), path))
    print(f"{'marginal':>9} {'minified':>9} {'source':>7}  module")
    for row in sorted(rows, reverse=True):
        print(f"{row[0]:>9} {row[1]:>9} {row[2]:>7}  {row[3]}")
    renamed = {path: python_minifier.minify(source, **(codegen._MINIFY | {"rename_locals": True}))
               for path, source in sources.items()}
    whatifs = {
        "no raise messages": _transform(minified, _BareRaises()),
        "no long strings or f-strings": _transform(minified, _NoLongStrings()),
        "locals renamed": renamed,
        "all three": _transform(renamed, _BareRaises(), _NoLongStrings()),
    }
    for what, modules in whatifs.items():
        packed = _packed(modules)
        print(f"what_if={what!r} payload_brotli={packed} ({packed - total:+d}) "
              f"script_estimate={int(script.nbytes * packed / total)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sidecar48")
