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
3. with `--executed`: a floor under any pruning of the shipped code. The script's modules run the
   recipe, shrunk to a CPU-sized model (`--set` adds or overrides shrinking settings), for a few
   steps on a synthetic corpus, with coverage.py recording the lines each thread runs; then every
   statement no traced line falls in is deleted and the rest is minified and compressed as the
   script would be, alone and with the three what-ifs above. No real pruning can ship less than
   the lines one run executes (a CUDA or multi-process run executes more), so a goal under this
   floor needs a smaller runtime, not a better pruner.

The script's size is about 1.22 x the compressed payload (base-93 text) plus its ~700-byte wrapper.

    python benchmarks/code_bytes.py sidecar48
    python benchmarks/code_bytes.py sidecar48 --executed        # + the floor (about a minute)
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

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


# A CPU-sized version of a unet_gpt recipe: its parts and their settings stay, the widths, lengths
# and step counts shrink (vocab_size is set to the synthetic corpus's own).
SHRINK = ("model.model_dim=32", "model.num_heads=2", "model.num_kv_heads=1", "train.seq_len=32",
          "train.batch_tokens=256", "train.reference_world_size=1", "train.max_steps=12", "train.warmdown_steps=4",
          "train.log_every=4", "train.max_wallclock_s=0", "eval.seq_len=32", "eval.stride=16", "eval.batch_seqs=32",
          "ttt.chunk_tokens=512", "data.max_val_tokens=2048")
SMALL_VOCAB = 320

# Runs in a child process (the shipped modules would otherwise meet this process's own `pipeline`).
# coverage.py, not the standard library's trace: trace decides to ignore a file by its base name
# and remembers the answer, so once a library's `config.py` is ignored so is pipeline/config.py.
_TRACED_RUN = """
import json, os, sys, coverage
src, out = sys.argv[1], sys.argv[2]
cov = coverage.Coverage(data_file=None, source=[src], concurrency=["thread"])
cov.start()
sys.path.insert(0, src)
try:
    from pipeline.script_entry import main
    main(open(sys.argv[3]).read(), sys.argv[4])
finally:
    cov.stop()
data = cov.get_data()
json.dump({os.path.relpath(f, src): sorted(data.lines(f)) for f in data.measured_files()}, open(out, "w"))
"""


def _synthetic_text(n_lines: int = 1500) -> str:
    rng = random.Random(0)
    words = "the king and queen of this realm shall speak to thee now my lord good night".split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(n_lines)) + "\n"


def executed_lines(recipe_name: str, sets: list[str], work: Path) -> tuple[dict[str, str], dict[str, set[int]]]:
    """({path: pruned source}, {path: executed line numbers}) of the script's modules for the shrunk
    recipe, from one traced run of them on a synthetic corpus in `work`."""
    from pipeline.data.prepare import prepare_text

    recipe = load_recipe(recipe_name, [*SHRINK, f"model.vocab_size={SMALL_VOCAB}", *sets])
    (work / "text.txt").write_text(_synthetic_text())
    prepare_text(work / "text.txt", work / "data", vocab_size=SMALL_VOCAB)
    sources = codegen.shipped_sources(recipe)
    for path, source in sources.items():
        (work / "src" / path).parent.mkdir(parents=True, exist_ok=True)
        (work / "src" / path).write_text(source)
    (work / "recipe.json").write_text(codegen._recipe_json(recipe))
    codegen.write_train_gpt(recipe, work / "train_gpt.py")
    env = {"DATA_PATH": str(work / "data"), "OUT_DIR": str(work / "out"), "PGOLF_DEVICE": "cpu"}
    subprocess.run([sys.executable, "-c", _TRACED_RUN, str(work / "src"), str(work / "lines.json"),
                    str(work / "recipe.json"), str(work / "train_gpt.py")],
                   env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)
    lines = json.loads((work / "lines.json").read_text())
    return sources, {path: set(lines.get(path, ())) for path in sources}


class _OnlyExecuted(ast.NodeTransformer):
    """Deletes every statement none of whose lines ran (a block left empty keeps a `pass`)."""

    def __init__(self, lines: set[int]):
        self.lines = lines

    def generic_visit(self, node):
        super().generic_visit(node)
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                kept = [s for s in block if any(n in self.lines for n in range(s.lineno, s.end_lineno + 1))]
                setattr(node, name, kept or ([ast.Pass()] if name == "body" else []))
        return node


def executed_floor(recipe_name: str, sets: list[str], script_nbytes: int, total: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sources, lines = executed_lines(recipe_name, sets, Path(tmp))
    only = {path: ast.unparse(_OnlyExecuted(lines[path]).visit(ast.parse(source))) for path, source in sources.items()}
    minified = {path: codegen.minify_module(source) for path, source in only.items()}
    renamed = {path: python_minifier.minify(source, **(codegen._MINIFY | {"rename_locals": True}))
               for path, source in only.items()}
    floors = {"executed lines only": minified,
              "executed lines only, all three": _transform(renamed, _BareRaises(), _NoLongStrings())}
    for what, modules in floors.items():
        packed = _packed(modules)
        print(f"floor={what!r} payload_brotli={packed} ({packed - total:+d}) "
              f"script_estimate={int(script_nbytes * packed / total)}")


def main(recipe_name: str, executed: bool = False, sets: tuple[str, ...] = ()) -> None:
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
    if executed:
        executed_floor(recipe_name, list(sets), script.nbytes, total)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="sidecar48")
    parser.add_argument("--executed", action="store_true", help="also measure the executed-lines floor")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="KEY=VALUE for the shrunk run (after the built-in shrinking)")
    args = parser.parse_args()
    main(args.recipe, args.executed, tuple(args.sets))
