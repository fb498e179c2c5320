"""Generate the submitted `train_gpt.py`: one self-contained file whose size is `bytes_code`.

The file carries pgolf's runtime modules (model, optimizers, loaders, quantizer, scorer, TTT:
everything `ENTRY_MODULES` needs and nothing else) and the resolved recipe as JSON, like the
records' self-extracting scripts (pg_mechanics.md §4.2.2, regimes 2 and 3):

1. the top-level functions and classes, and the methods, that nothing in the bundle can name are
   dropped (pipeline.dead_code: pgolf's other commands use them), then each module is minified
   with python-minifier (docstrings, comments and annotations go; names,
   including locals, stay as written, so a traceback still reads);
2. the modules and the recipe are joined into one NUL-separated payload (`path, source, ...,
   recipe`), compressed with brotli (quality 11) or LZMA (preset 9e), whichever makes the smaller
   file (`package.code_codec: lzma` forces LZMA, for a machine without brotli);
3. the compressed bytes are written as a base-93 string of printable ASCII (13 characters per 85
   bits, about 2% smaller than base85).

At start the script decodes the payload, writes the modules into a temporary folder, puts it on
sys.path and runs `ENTRY_MODULES[0].main`. It needs torch, numpy, sentencepiece and zstandard,
plus brotli when that codec was chosen or the recipe packs its model with brotli, and the lrzip
program for `package.compressor: pergroup` (its header says which).

    write_train_gpt(recipe, Path("train_gpt.py"));  generated_code_bytes(recipe) -> int
    build_train_gpt(recipe) -> GeneratedScript(text, codec, source_bytes, minified_bytes)
    unpack_train_gpt(text) -> ({path: minified source}, recipe JSON)
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import json
import lzma
import re
from dataclasses import dataclass
from pathlib import Path

import brotli
import python_minifier

from pipeline.config import Recipe, to_dict
from pipeline.dead_code import prune
from pipeline.fileio import atomic_write

ROOT = Path(__file__).resolve().parent.parent

# The runtime is the import closure of the submission entry point and of the modules the recipe
# selects, found by reading `import` statements (`runtime_modules`). Code imported by name
# (importlib) is invisible to that scan, so it ships only when a selector names it for the recipe
# (`_selected_modules`): model parts reach the registry by name, so a recipe carries its own parts
# and no other's; the same holds for quantization schemes and packagers, which the codec imports
# by name (pipeline.export.codec.extension; `export_modules`), for TTT modes, and for the train
# stage's coprime loader and cpu_workers threads. pgolf run's checkpointer is imported by name and
# selected by nothing: the script never checkpoints. A test runs the generated file with all other
# third-party packages blocked.
ENTRY_MODULES = ("pipeline.script_entry",)
_PACKAGES = ("pipeline", "eval")

# python-minifier's options, every one spelled out so a new version's defaults cannot change what
# ships. The records minified with `--no-rename-locals --no-hoist-literals
# --remove-literal-statements` (pg_mechanics.md §4.2.2, R/2026-04-10_VarLenAttn); the rest is
# chosen for what the bundle relies on at run time. Measured on sidecar48 (275 KB of source):
# renaming locals would save another ~5% compressed and hoisting literals costs ~1%.
_MINIFY = {
    "remove_literal_statements": True,  # docstrings: no bundled module reads __doc__
    # Function annotations go; class-level ones stay: they are the dataclass fields that
    # config.from_dict rebuilds the recipe from (typing.get_type_hints).
    "remove_annotations": python_minifier.RemoveAnnotationsOptions(
        remove_variable_annotations=True, remove_return_annotations=True,
        remove_argument_annotations=True, remove_class_attribute_annotations=False),
    "rename_locals": False,  # readable tracebacks; arguments are keywords anyway
    "rename_globals": False,  # other modules import them by name
    "hoist_literals": False,  # `_a='...'` aliases compress worse than the repeated literal
    "convert_posargs_to_args": False,  # keeps `f(x, /)` semantics
    "remove_asserts": False, "remove_debug": False,  # both change behaviour
    "remove_pass": True, "combine_imports": True, "remove_object_base": True, "preserve_shebang": False,
    "remove_explicit_return_none": True, "remove_builtin_exception_brackets": True, "constant_folding": True,
    "remove_dead_branches": True, "prefer_single_line": False,
}

CODECS = ("lzma", "brotli")  # on a tie the first wins: LZMA needs only the standard library

# The wrapper is kept short: every byte of it counts. Base-93: the digits are the printable ASCII
# characters but `"` and `\`, so the payload is one plain string literal. Why not something
# denser: base85 (the records') spends 1.25 characters per byte, base-93 1.224; a bytes literal
# with escapes 2.9 (measured; a non-printable byte takes 4 characters); control characters would
# raise the base to 123 (1.15) but put terminal escapes and form feeds into a file people open,
# diff and paste; a non-ASCII character spends two UTF-8 bytes on at most 11 bits. A whole-payload
# base conversion is quadratic (seconds), so the digits go in blocks: 93**13 >= 2**85.
_TEMPLATE = """\
\"\"\"pgolf train_gpt.py, recipe @NAME@ (generated by pgolf; do not edit). Needs torch, numpy,
sentencepiece, zstandard@EXTRA@. pgolf's runtime modules (minified) and the recipe are @CODEC@-compressed
below, base-93 encoded; they unpack into a temporary folder. Paths, seed: DATA_PATH, TOKENIZER_PATH, SEED.
    torchrun --standalone --nproc_per_node=8 train_gpt.py\"\"\"
import atexit,os,shutil,sys,tempfile,@CODEC@
L=@LEN@
S="@PAYLOAD@"
B=S.encode();V=[]
for i in range(0,len(B),13):
 v=0
 for c in B[i:i+13]:v=v*93+c-32-(c>34)-(c>92)
 V+=v,
*F,R=@CODEC@.decompress(int(''.join(f'{v:085b}'for v in V)[:8*L],2).to_bytes(L,'big')).split(b'\\0')
D=tempfile.mkdtemp();atexit.register(shutil.rmtree,D,True)
for n,s in zip(F[::2],F[1::2]):
 n=os.path.join(D,n.decode());os.makedirs(os.path.dirname(n),exist_ok=True)
 with open(n,'wb')as f:f.write(s)
sys.path.insert(0,D)
from @ENTRY@ import main
if __name__=='__main__':main(R.decode(),__file__)
"""


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def _imported_modules(path: Path) -> set[str]:
    """Project modules a source file imports (at any depth of the file, lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from pipeline import distributed` imports a module, not a name
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in _PACKAGES and _module_file(m) is not None}


def _compressors(recipe: Recipe) -> set[str]:
    package = recipe.package
    return {package.compressor, *package.compare_compressors, *(p.compressor for p in recipe.quant.compare)}


def export_modules(recipe: Recipe) -> list[str]:
    """Modules of the quantization schemes (those defining their functions), of LQER, of
    quant.fit_clip and of the packagers that `recipe` uses beyond the codec's own (zstd, zlib,
    int/fp schemes)."""
    from pipeline.export.codec import CLIP_FIT_MODULE, LQER_MODULE, PACKAGER_MODULE, get_scheme

    q = recipe.quant
    found: set[str] = set()
    for rule in [*q.rules, *(r for plan in q.compare for r in plan.rules)]:
        spec = get_scheme(rule.scheme)
        if spec is not None:
            found.update(getattr(f, "__module__", None) for f in (spec.encode, spec.decode, spec.layout,
                                                                  spec.calibrate, spec.stand_in) if f is not None)
    if q.lqer is not None:
        found.add(LQER_MODULE)
    if q.fit_clip is not None:
        found.add(CLIP_FIT_MODULE)
    if _compressors(recipe) - {"zstd", "zlib"}:
        found.add(PACKAGER_MODULE)
    found.discard("pipeline.export.codec")  # the built-in schemes: every script carries the codec
    return sorted(m for m in found if m and m.split(".")[0] in _PACKAGES and _module_file(m) is not None)


def _selected_modules(recipe: Recipe) -> list[str]:
    """The modules that pipeline code imports by name (importlib) and that `recipe` needs: each
    selector below names those of one mechanism, so a module imported by name ships exactly with
    the recipes that select it, and one no selector names (pgolf run's checkpointer) never does."""
    from pipeline.model.registry import part_modules
    from pipeline.stages.evaluate import ttt_modules
    from pipeline.stages.train import train_modules

    selectors = (lambda r: part_modules(r.model), ttt_modules, export_modules, train_modules)
    return [m for select in selectors for m in select(recipe)]


def runtime_modules(recipe: Recipe) -> list[str]:
    """Repository-relative paths of every module the submission for `recipe` imports."""
    todo = [*ENTRY_MODULES, *_selected_modules(recipe)]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages' __init__
        todo.extend(_imported_modules(_module_file(module)))
    return sorted(_module_file(m).relative_to(ROOT).as_posix() for m in seen)


@functools.cache
def minify_module(source: str) -> str:
    """`source` minified as it ships. python-minifier takes seconds for the bundle, so results are
    kept in memory and on disk under pgolf's cache, keyed by the source's content, the minifier's
    version and its options (the same key, the same output)."""
    from pipeline.provenance import cache_root

    version = importlib.metadata.version("python-minifier")
    key = hashlib.sha256(repr((source, version, sorted(_MINIFY.items()))).encode()).hexdigest()
    cached = cache_root() / "minified" / f"{key}.py"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    out = python_minifier.minify(source, **_MINIFY)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cached, out.encode("utf-8"))
    except OSError:
        pass  # a read-only cache only costs minifying again
    return out


@functools.lru_cache(maxsize=8)
def _compress(payload: bytes, codec: str) -> bytes:
    if codec == "brotli":
        return brotli.compress(payload, quality=11, lgwin=24)
    # FORMAT_ALONE: a 13-byte header (xz's framing costs ~60) that plain `lzma.decompress` still
    # recognises; pb=0 because source text has no 4-byte alignment (measured ~100 bytes smaller).
    return lzma.compress(payload, format=lzma.FORMAT_ALONE,
                         filters=[{"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "pb": 0}])


def _decompress(data: bytes, codec: str) -> bytes:
    return brotli.decompress(data) if codec == "brotli" else lzma.decompress(data)


_B93 = bytes(c for c in range(32, 127) if c not in b'"\\')  # digit d is the character _B93[d]


def b93encode(data: bytes) -> str:
    """`data` as base-93 text, 13 digits (most significant first) per 85 bits, zero-padded."""
    bits = bin(int.from_bytes(b"\1" + data, "big"))[3:]  # the leading 1 keeps leading zero bytes
    bits += "0" * (-len(bits) % 85)
    out = bytearray()
    for i in range(0, len(bits), 85):
        v, block = int(bits[i:i + 85], 2), bytearray(13)
        for j in range(12, -1, -1):
            v, block[j] = divmod(v, 93)
            block[j] = _B93[block[j]]
        out += block
    return out.decode("ascii")


def b93decode(text: str, nbytes: int) -> bytes:
    """Inverse of `b93encode` (the generated script inlines the same arithmetic)."""
    digits = {c: d for d, c in enumerate(_B93)}
    raw = text.encode("ascii")
    bits = []
    for i in range(0, len(raw), 13):
        v = 0
        for c in raw[i:i + 13]:
            v = v * 93 + digits[c]
        bits.append(f"{v:085b}")
    return int("".join(bits)[:8 * nbytes] or "0", 2).to_bytes(nbytes, "big")


@dataclass(frozen=True)
class GeneratedScript:
    text: str
    codec: str  # "brotli" | "lzma"
    source_bytes: int  # the bundled modules as they are in the repository
    minified_bytes: int  # the payload before compression: minified modules, their paths, the recipe

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))


def shipped_sources(recipe: Recipe) -> dict[str, str]:
    """{repository-relative path: source} of the modules the script for `recipe` carries, before
    minifying: each runtime module less the definitions nothing in the bundle can reach
    (pipeline.dead_code; the wrapper's `main` and the recipe's words are roots)."""
    sources = {rel: (ROOT / rel).read_text(encoding="utf-8") for rel in runtime_modules(recipe)}
    return prune(sources, _TEMPLATE + _recipe_json(recipe))


def _recipe_json(recipe: Recipe) -> str:
    return json.dumps(to_dict(recipe), sort_keys=True, separators=(",", ":"))


def _payload(recipe: Recipe) -> tuple[bytes, int]:
    parts: list[bytes] = []
    source_bytes = sum(len((ROOT / rel).read_bytes()) for rel in runtime_modules(recipe))
    for rel, source in sorted(shipped_sources(recipe).items()):  # sorted: reproducible bytes
        parts += [rel.encode(), minify_module(source).encode("utf-8")]
    parts.append(_recipe_json(recipe).encode())
    # NUL separates: Python source cannot contain it and JSON escapes it.
    return b"\0".join(parts), source_bytes


def extra_needs(recipe: Recipe, codec: str) -> str:
    """What the script for `recipe` in `codec` needs beyond torch, numpy, sentencepiece and
    zstandard, as its header says it: "", " and brotli", " and brotli (and the lrzip program)"."""
    packs = _compressors(recipe) - {"zstd", "zlib"}  # the packagers' brotli, pergroup's lrzip program
    extra = " and brotli" if codec == "brotli" or packs else ""
    return extra + (" (and the lrzip program)" if "pergroup" in packs else "")


def script_codec(text: str) -> str:
    """The codec ("brotli" or "lzma") a generated script's payload is compressed with."""
    return re.search(r"^import .*,(\w+)$", text, re.MULTILINE).group(1)


def _render(recipe: Recipe, codec: str, payload: bytes) -> str:
    packed = _compress(payload, codec)
    name = re.sub(r"[^\w.+-]", "_", recipe.name, flags=re.ASCII)  # keeps the header a plain docstring
    fields = {"@NAME@": name, "@CODEC@": codec, "@EXTRA@": extra_needs(recipe, codec),
              "@LEN@": str(len(packed)), "@ENTRY@": ENTRY_MODULES[0], "@PAYLOAD@": b93encode(packed)}
    return re.sub("|".join(fields), lambda m: fields[m.group(0)], _TEMPLATE)


def build_train_gpt(recipe: Recipe) -> GeneratedScript:
    """The script for `recipe` in the codec `package.code_codec` asks for ("auto": the one that
    makes the smaller file)."""
    payload, source_bytes = _payload(recipe)
    codecs = CODECS if recipe.package.code_codec == "auto" else (recipe.package.code_codec,)
    texts = {c: _render(recipe, c, payload) for c in codecs}
    codec = min(codecs, key=lambda c: len(texts[c].encode("utf-8")))
    return GeneratedScript(texts[codec], codec, source_bytes, len(payload))


def render_train_gpt(recipe: Recipe) -> str:
    return build_train_gpt(recipe).text


def generated_code_bytes(recipe: Recipe) -> int:
    return build_train_gpt(recipe).nbytes


def write_train_gpt(recipe: Recipe, path: Path) -> int:
    text = render_train_gpt(recipe).encode("utf-8")
    atomic_write(path, text)
    return len(text)


def unpack_train_gpt(text: str) -> tuple[dict[str, str], str]:
    """What a generated script carries: {module path: minified source} and the recipe JSON
    (for reading a shipped script; the script itself runs the same decoding)."""
    codec = script_codec(text)
    nbytes = int(re.search(r"^L=(\d+)$", text, re.MULTILINE).group(1))
    encoded = re.search(r'^S="([^"]*)"$', text, re.MULTILINE).group(1)
    *files, recipe_json = _decompress(b93decode(encoded, nbytes), codec).split(b"\0")
    return {p.decode(): s.decode("utf-8") for p, s in zip(files[::2], files[1::2])}, recipe_json.decode()
