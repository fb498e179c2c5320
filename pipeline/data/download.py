"""`pgolf data download`: the challenge's published FineWeb exports, through huggingface_hub.

    pgolf data download --variant sp1024 --train-shards 80 --out data
    pgolf data download --variant sp8192 --out data                     # from kevclark/parameter-golf
    pgolf data download --variant sp1024 --repo ./mirror --out data     # a local copy of a repository

Layout (the challenge's `data/cached_challenge_fineweb.py`, pg_mechanics.md §1.4): a Hugging Face
dataset repository holds, under the remote root `datasets/`, `manifest.json`, the shards at
`datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin` and the tokenizers at
`tokenizers/`. The manifest's dataset entry `fineweb10B_<variant>` gives the shard counts
(`stats.files_val`, `stats.files_train`), its tokenizer's name, and `val_bytes_glob` when the
export has byte sidecars; the tokenizer entry names its files (`model_path`, `vocab_path`,
`path`). Files land in the challenge's local layout, `<out>/manifest.json`,
`<out>/datasets/fineweb10B_<variant>/...`, `<out>/tokenizers/...`, plus what pgolf reads: a
hard link (or copy) of the SentencePiece model as `tokenizer.model` beside the shards, so that
`pgolf run --data <out>/datasets/fineweb10B_<variant>` works. sp1024 comes from the challenge's
repository `willdepueoai/parameter-golf`; sp4096 and sp8192 from the participant repository
`kevclark/parameter-golf` that their records used (`R/2026-04-01_Vocab4096_MLPMult4_WD085`,
`R/2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2`); `--repo` names any repository with the
same layout, or a local folder holding one.

Every file is checked: its size against the repository's listing, and each shard's header
(magic, version, token count matching the size), every shard but the last of a split holding
the manifest's shard size (10^8 tokens), the validation tokens summing to the manifest's
`stats.tokens_val`, each sidecar matching its shard, the tokenizer loading. A file already in
place and passing the checks is kept (a rerun fetches only what is missing); a transfer goes
to `<file>.part` and continues from there after an interruption (an HTTP range request), then
is renamed into place.

Offline, the first request fails at once (no retries) with the URL it tried and the paths the
files go to, so they can be fetched elsewhere and put there by hand, or mirrored into a folder
passed as `--repo`. Not bundled into the submission script (it imports huggingface_hub).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Optional, Protocol

from pipeline.data.shards import read_header
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import UserError

VARIANT_REPOS = {
    "sp1024": "willdepueoai/parameter-golf",
    "sp4096": "kevclark/parameter-golf",
    "sp8192": "kevclark/parameter-golf",
}
REMOTE_ROOT = "datasets"
DEFAULT_TRAIN_SHARDS = 80  # the challenge downloader's default (8B training tokens)
DEFAULT_SHARD_SIZE = 10**8
_COPY_CHUNK = 1 << 20


class Source(Protocol):
    """Where the repository's files come from."""

    name: str

    def url(self, remote: str) -> str:
        """The address of `remote` (a path inside the repository), for messages."""

    def sizes(self, remotes: list[str]) -> dict[str, int]:
        """Byte size of each of `remotes` that the repository has (missing ones left out)."""

    def fetch(self, remote: str, out: BinaryIO, start: int, size: int, label: str) -> None:
        """Append bytes `start`..`size` of `remote` to `out` (positioned at `start`)."""


class Offline(UserError):
    """The repository cannot be reached."""


class HubSource:
    """A Hugging Face dataset repository, through huggingface_hub (its HTTP client, auth
    token, redirects and retries; `HF_ENDPOINT` and `HF_HUB_OFFLINE` apply)."""

    def __init__(self, repo_id: str, revision: Optional[str] = None, bar: bool = False):
        self.repo_id, self.revision, self.name, self.bar = repo_id, revision, repo_id, bar

    def url(self, remote: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, remote, repo_type="dataset", revision=self.revision)

    def _failed(self, e: Exception, remote: str) -> UserError:
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(e, HfHubHTTPError):
            status = getattr(e.response, "status_code", "?")
            return UserError(f"{self.url(remote)}: HTTP {status} from the Hub ({str(e).splitlines()[0]}); check "
                             f"--repo {self.repo_id} (a dataset repository) and, for a gated or private one, "
                             f"`hf auth login`.")
        try:
            tried = str(e.request.url)  # the request that failed (httpx-style errors carry it)
        except (AttributeError, RuntimeError):
            tried = None
        via = f"; the request to {tried} failed" if tried and tried != self.url(remote) else ""
        return Offline(f"cannot reach {self.url(remote)}{via} ({type(e).__name__}: {e})")

    def sizes(self, remotes: list[str]) -> dict[str, int]:
        from huggingface_hub import HfApi

        try:
            infos = HfApi().get_paths_info(self.repo_id, remotes, repo_type="dataset", revision=self.revision)
        except Exception as e:  # noqa: BLE001 - the client's errors differ across versions; all are reported
            raise self._failed(e, remotes[0]) from None
        return {info.path: int(info.size) for info in infos if getattr(info, "size", None) is not None}

    def fetch(self, remote: str, out: BinaryIO, start: int, size: int, label: str) -> None:
        # http_get sends `Range: bytes=start-` and copes with a server that ignores it
        # (huggingface_hub.file_download); hf_hub_download would restart an interrupted file.
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        try:
            http_get(self.url(remote), out, resume_size=start, headers=build_hf_headers(), expected_size=size,
                     displayed_filename=label, tqdm_class=None if self.bar else _silent_tqdm())
        except Exception as e:  # noqa: BLE001
            raise self._failed(e, remote) from None


def _silent_tqdm():
    from tqdm import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


class FolderSource:
    """A local folder laid out as the repository (e.g. a `hf download --local-dir` mirror)."""

    def __init__(self, root: Path):
        self.root, self.name = Path(root), str(root)

    def url(self, remote: str) -> str:
        return str(self.root / remote)

    def sizes(self, remotes: list[str]) -> dict[str, int]:
        return {r: (self.root / r).stat().st_size for r in remotes if (self.root / r).is_file()}

    def fetch(self, remote: str, out: BinaryIO, start: int, size: int, label: str) -> None:
        with open(self.root / remote, "rb") as f:
            f.seek(start)
            left = size - start
            while left > 0:
                block = f.read(min(_COPY_CHUNK, left))
                if not block:
                    break
                out.write(block)
                left -= len(block)


def source_for(repo: Optional[str], variant: str) -> Source:
    """`repo` as a Source: an existing local folder, else a Hub dataset id (default by variant)."""
    if repo and Path(repo).is_dir():
        return FolderSource(Path(repo))
    if repo is None:
        if variant not in VARIANT_REPOS:
            raise UserError(f"no default repository for variant {variant!r}; pass --repo ID (known: "
                            f"{', '.join(f'{v} -> {r}' for v, r in VARIANT_REPOS.items())}).")
        repo = VARIANT_REPOS[variant]
    if repo.count("/") != 1 or repo.startswith(("/", ".")):
        raise UserError(f"--repo {repo!r} is neither an existing folder nor a Hub dataset id (owner/name).")
    return HubSource(repo, bar=sys.stderr.isatty())


@dataclass(frozen=True)
class Item:
    remote: str  # path inside the repository
    local: Path  # where it goes
    kind: str  # "manifest" | "val" | "train" | "val_bytes" | "tokenizer"
    index: int = 0  # shard index within its split


def local_path(out: Path, remote: str, root: str = REMOTE_ROOT) -> Path:
    """The challenge's local place for a repository path: the remote root is dropped."""
    rel = PurePosixPath(remote)
    if root and rel.parts[:1] == (root,):
        rel = rel.relative_to(root)
    return out.joinpath(*rel.parts)


@dataclass
class DownloadResult:
    data_dir: Path  # <out>/datasets/fineweb10B_<variant>: pass it to `pgolf run --data`
    dataset: str
    source: str
    files: dict  # status -> number of files ("fetched", "resumed", "present", "replaced")
    bytes_fetched: int
    val_shards: int
    train_shards: int
    val_tokens: int
    train_tokens: int
    sidecars: int

    def lines(self) -> list[str]:
        return [f"dataset={self.dataset} source={self.source}",
                f"val_shards={self.val_shards} val_tokens={self.val_tokens} train_shards={self.train_shards} "
                f"train_tokens={self.train_tokens} val_byte_sidecars={self.sidecars}",
                " ".join(f"files_{k}={v}" for k, v in sorted(self.files.items()))
                + f" bytes_fetched={self.bytes_fetched}",
                f"data_dir={self.data_dir}"]


def _by_hand(source: Source, variant: str, out: Path, root: str) -> str:
    """How to get the files without this machine reaching the repository."""
    dataset = f"fineweb10B_{variant}"
    repo = source.name
    return (f"Without internet here, on a machine with it run `hf download {repo} --repo-type dataset --include "
            f"'{root}/manifest.json' '{root}/datasets/{dataset}/*' '{root}/tokenizers/*' --local-dir MIRROR` (or fetch "
            f"each file from {source.url(f'{root}/...')}), copy MIRROR here and run `pgolf data download --variant "
            f"{variant} --repo MIRROR --out {out}`; the files then go to {out}/manifest.json, "
            f"{out}/datasets/{dataset}/fineweb_{{val,train}}_NNNNNN.bin and {out}/tokenizers/.")


def _check_file(item: Item, path: Path, shard_size: int, n_shards: int) -> int:
    """Check a fetched file; return its token count (0 for non-shards). Raises UserError."""
    if item.kind in ("val", "train", "val_bytes"):
        n = read_header(path)  # magic, version, count vs size
        if item.index < n_shards - 1 and n != shard_size:
            raise UserError(f"{path}: {n} tokens, but every shard before the last of the export holds the manifest's "
                            f"shard_size {shard_size}; the export is inconsistent, re-download it.")
        return n
    if item.kind == "tokenizer" and item.local.suffix == ".model":
        load_tokenizer(path)  # a SentencePiece model that loads (`path` may be the .part file)
    if item.kind == "manifest":
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: the manifest is not JSON ({e}); the repository is not a challenge "
                            f"export.") from None
    return 0


def _get(source: Source, item: Item, size: int, shard_size: int, n_shards: int,
         always: bool = False) -> tuple[str, int, int]:
    """Bring one file into place; return (status, bytes transferred, tokens)."""
    status = "fetched"
    if item.local.exists() and not always:
        if item.local.stat().st_size == size:
            try:
                return "present", 0, _check_file(item, item.local, shard_size, n_shards)
            except UserError:
                pass  # a damaged local copy: replaced below
        status = "replaced"
    item.local.parent.mkdir(parents=True, exist_ok=True)
    part = item.local.with_name(item.local.name + ".part")
    start = part.stat().st_size if part.exists() and not always else 0
    if start > size:
        start = 0  # a leftover of another version of the file
    if start and status == "fetched":
        status = "resumed"
    with open(part, "ab" if start else "wb") as f:
        source.fetch(item.remote, f, start, size, item.local.name)
    got = part.stat().st_size
    if got != size:
        raise UserError(f"{source.url(item.remote)}: transfer ended at {got} of {size} bytes ({part} kept); rerun the "
                        f"same command to continue it.")
    try:
        tokens = _check_file(item, part, shard_size, n_shards)
    except UserError as e:
        part.unlink()
        raise UserError(f"{source.url(item.remote)} fails its check: {e}") from None
    os.replace(part, item.local)
    return status, size - start, tokens


def _link(target: Path, link: Path) -> None:
    """`link` as a hard link to `target` (a copy across file systems), replacing an older one."""
    if link.exists() and os.path.samefile(target, link):
        return
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    try:
        os.link(target, tmp)
    except OSError:
        shutil.copyfile(target, tmp)
    os.replace(tmp, link)


def download(variant: str, out, *, train_shards: int = DEFAULT_TRAIN_SHARDS, repo: Optional[str] = None,
             remote_root: str = REMOTE_ROOT, source: Optional[Source] = None,
             echo: Callable[[str], None] = print, bar=None) -> DownloadResult:
    """Download (or complete) the export `fineweb10B_<variant>` into `out` (module docstring).

    `source` overrides `repo` (tests pass a FolderSource). `echo` gets one key=value line per
    file; `bar`, if given, is a tqdm-like object advanced once per file. Returns a DownloadResult;
    raises UserError (Offline when the repository cannot be reached) naming the fix."""
    out = Path(out)
    if train_shards < 0:
        raise UserError(f"--train-shards must be 0 or more, got {train_shards}.")
    source = source or source_for(repo, variant)
    dataset = f"fineweb10B_{variant}"
    root = remote_root.strip("/")

    def remote(rel: str) -> str:  # a path under the remote root
        return f"{root}/{rel}" if root else rel

    manifest_item = Item(remote("manifest.json"), out / "manifest.json", "manifest")
    files: dict[str, int] = {}
    fetched = 0

    def count(it: Item, size: int, status: str, nbytes: int) -> None:
        nonlocal fetched
        files[status] = files.get(status, 0) + 1
        fetched += nbytes
        echo(f"download file={it.local.relative_to(out)} bytes={size} status={status}")
        if bar is not None:
            bar.update(1)

    try:
        msize = source.sizes([manifest_item.remote]).get(manifest_item.remote)
        if msize is None:
            raise UserError(f"{source.url(manifest_item.remote)} does not exist: {source.name} is not laid out as the "
                            f"challenge's export (remote root {root!r}); check --repo.")
        # Always the source's manifest: a stale one from another repository lacks its variants.
        status, nbytes, _ = _get(source, manifest_item, msize, 0, 0, always=True)
        count(manifest_item, msize, status, nbytes)
    except Offline as e:
        raise Offline(f"{e}. {_by_hand(source, variant, out, root)}") from None
    manifest = json.loads(manifest_item.local.read_text())
    if not isinstance(manifest, dict):
        raise UserError(f"{source.url(manifest_item.remote)} is not a JSON object; the repository is not a challenge "
                        f"export.")
    entry = next((d for d in manifest.get("datasets", []) if isinstance(d, dict) and d.get("name") == dataset), None)
    if entry is None:
        names = [d.get("name") for d in manifest.get("datasets", []) if isinstance(d, dict)]
        home = VARIANT_REPOS.get(variant)
        hint = f"; {variant} is in {home} (--repo {home})" if home and home != source.name else ""
        raise UserError(f"{source.name}'s manifest has no dataset {dataset} (it has: "
                        f"{', '.join(map(str, names)) or 'none'}){hint}.")
    stats = entry.get("stats") or {}
    try:
        files_val, files_train = int(stats["files_val"]), int(stats["files_train"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{source.url(manifest_item.remote)}: dataset {dataset} has no stats.files_val/files_train; "
                        f"the manifest is not the challenge exporter's.") from None
    if train_shards > files_train:
        raise UserError(f"{dataset} has {files_train} training shards in {source.name}; pass --train-shards "
                        f"{files_train} or fewer.")
    tok_entry = next((t for t in manifest.get("tokenizers", []) if isinstance(t, dict)
                      and t.get("name") == entry.get("tokenizer_name")), None)
    artifacts = [str(tok_entry[k]) for k in ("model_path", "vocab_path", "path") if tok_entry and tok_entry.get(k)]
    models = [a for a in artifacts if a.endswith(".model")]
    if not models:
        raise UserError(f"{dataset}'s tokenizer {entry.get('tokenizer_name')!r} has no SentencePiece .model in the "
                        f"manifest ({artifacts or 'no files'}); pgolf reads sp<N> exports only.")
    shard_size = int(manifest.get("shard_size") or DEFAULT_SHARD_SIZE)

    wanted = [(f"datasets/{dataset}/fineweb_val_{i:06d}.bin", "val", i) for i in range(files_val)]
    if entry.get("val_bytes_glob"):  # the CaseOps exports' byte sidecars (§2.7)
        wanted += [(f"datasets/{dataset}/fineweb_val_bytes_{i:06d}.bin", "val_bytes", i) for i in range(files_val)]
    wanted += [(f"datasets/{dataset}/fineweb_train_{i:06d}.bin", "train", i) for i in range(train_shards)]
    wanted += [(a, "tokenizer", 0) for a in artifacts]
    items = [Item(remote(rel), local_path(out, remote(rel), root), kind, i) for rel, kind, i in wanted]
    sizes = source.sizes([it.remote for it in items])
    absent = [it.remote for it in items if it.remote not in sizes]
    if absent:
        raise UserError(f"{source.name} lacks {len(absent)} file(s) its manifest lists, first {source.url(absent[0])}; "
                        f"the repository is incomplete: use another --repo or fewer --train-shards.")

    if bar is not None:
        bar.total = len(items) + 1  # and the manifest
        bar.refresh()
    tokens = {"val": [], "train": [], "val_bytes": []}
    counts = {"val": files_val, "train": files_train, "val_bytes": files_val}
    for it in items:
        try:
            status, nbytes, n = _get(source, it, sizes[it.remote], shard_size, counts.get(it.kind, 0))
        except Offline as e:
            raise Offline(f"{e}; rerun the same command to continue (finished files are kept). "
                          f"{_by_hand(source, variant, out, root)}") from None
        count(it, sizes[it.remote], status, nbytes)
        if it.kind in tokens:
            tokens[it.kind].append(n)

    if tokens["val_bytes"] and tokens["val_bytes"] != tokens["val"]:
        raise UserError(f"{dataset}: the byte sidecars' counts {tokens['val_bytes']} differ from the val shards' "
                        f"{tokens['val']}; the export is inconsistent.")
    if stats.get("tokens_val") is not None and sum(tokens["val"]) != int(stats["tokens_val"]):
        raise UserError(f"{dataset}: the val shards hold {sum(tokens['val'])} tokens but the manifest records "
                        f"stats.tokens_val={stats['tokens_val']}; the export is inconsistent, re-download it.")
    data_dir = out / "datasets" / dataset
    _link(local_path(out, remote(models[0]), root), data_dir / "tokenizer.model")
    return DownloadResult(data_dir, dataset, source.name, files, fetched, files_val, train_shards,
                          sum(tokens["val"]), sum(tokens["train"]), len(tokens["val_bytes"]))
