"""`pgolf data download` against a local stand-in of the challenge's Hugging Face repository (a folder
with its layout: datasets/manifest.json, datasets/datasets/fineweb10B_sp1024/*, datasets/tokenizers/*),
through the same code path as the Hub: manifest parsing, size and header checks, keeping finished
files, resuming a partial one, the tokenizer beside the shards. The Hub source is exercised offline
(HF_HUB_OFFLINE): it fails at once with the URL and where to put the files. No test opens a socket."""

import json
import socket
import time

import pytest

import pipeline.data.download as dl
from pipeline.data.shards import read_header, write_shard
from pipeline.errors import UserError
from test_cli import cli_inprocess

SHARD = 50  # the manifest's shard_size (the challenge's is 10^8)
VAL = [SHARD, 20]  # tokens per val shard
TRAIN = [SHARD, SHARD, SHARD, 30]
DS = "fineweb10B_sp1024"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory):
    from conftest import small_text
    from pipeline.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "m.model"
    train_tokenizer(small_text()[:20000], 320, path)
    return path.read_bytes()


def _mirror(root, model_bytes, *, sidecars=False, manifest_edit=None):
    """A repository folder in the challenge's layout, with deterministic shards."""
    base = root / "datasets"
    shards = base / "datasets" / DS
    shards.mkdir(parents=True)
    for split, sizes in (("val", VAL), ("train", TRAIN)):
        for i, n in enumerate(sizes):
            toks = [1] + [(7 * i + j) % 300 + 4 for j in range(n - 1)]
            write_shard(shards / f"fineweb_{split}_{i:06d}.bin", toks)
            if sidecars and split == "val":
                write_shard(shards / f"fineweb_val_bytes_{i:06d}.bin", [0] + [2] * (n - 1))
    (base / "tokenizers").mkdir()
    (base / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(model_bytes)
    (base / "tokenizers" / "fineweb_1024_bpe.vocab").write_text("<unk>\t0\n")
    entry = {"name": DS, "tokenizer_name": "sp_bpe_1024", "stats": {
        "files_val": len(VAL), "files_train": len(TRAIN), "tokens_val": sum(VAL), "tokens_train": sum(TRAIN)}}
    if sidecars:
        entry["val_bytes_glob"] = f"datasets/{DS}/fineweb_val_bytes_*.bin"
    manifest = {"shard_size": SHARD, "datasets": [entry], "tokenizers": [
        {"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
         "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}]}
    if manifest_edit:
        manifest_edit(manifest)
    (base / "manifest.json").write_text(json.dumps(manifest))
    return root


class Counting(dl.FolderSource):
    """The folder source, counting the bytes it transfers per file."""

    def __init__(self, root):
        super().__init__(root)
        self.sent = {}

    def fetch(self, remote, out, start, size, label):
        self.sent[remote] = self.sent.get(remote, 0) + size - start
        super().fetch(remote, out, start, size, label)


def test_download_layout_checks_and_rerun(tmp_path, model_bytes):
    repo = _mirror(tmp_path / "repo", model_bytes)
    out = tmp_path / "data"
    lines = []
    r = dl.download("sp1024", out, train_shards=3, repo=str(repo), echo=lines.append)
    shards = out / "datasets" / DS
    assert r.data_dir == shards and (r.val_shards, r.train_shards) == (2, 3)
    assert (r.val_tokens, r.train_tokens) == (sum(VAL), 3 * SHARD)
    assert r.files == {"fetched": 8}  # manifest, 2 val, 3 train, .model, .vocab
    assert sorted(p.name for p in shards.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin",
        "fineweb_val_000000.bin", "fineweb_val_000001.bin", "tokenizer.model"]
    for name in ("fineweb_val_000001.bin", "fineweb_train_000002.bin"):
        assert (shards / name).read_bytes() == (repo / "datasets" / "datasets" / DS / name).read_bytes()
    assert (out / "tokenizers" / "fineweb_1024_bpe.model").samefile(shards / "tokenizer.model")
    assert (out / "manifest.json").is_file()
    assert f"download file=datasets/{DS}/fineweb_val_000000.bin bytes={1024 + 2 * SHARD} status=fetched" in lines
    again = dl.download("sp1024", out, train_shards=3, source=Counting(repo), echo=lambda s: None)
    assert again.files == {"fetched": 1, "present": 7} and again.bytes_fetched == (out / "manifest.json").stat().st_size


def test_partial_file_is_resumed_and_damaged_one_replaced(tmp_path, model_bytes):
    repo = _mirror(tmp_path / "repo", model_bytes)
    out = tmp_path / "data"
    shards = out / "datasets" / DS
    shards.mkdir(parents=True)
    name = "fineweb_train_000001.bin"
    full = (repo / "datasets" / "datasets" / DS / name).read_bytes()
    (shards / (name + ".part")).write_bytes(full[:700])  # an interrupted transfer
    (shards / "fineweb_val_000000.bin").write_bytes(b"\0" * 1124)  # right size, bad header
    src = Counting(repo)
    r = dl.download("sp1024", out, train_shards=2, source=src, echo=lambda s: None)
    assert r.files == {"fetched": 5, "resumed": 1, "replaced": 1}
    assert src.sent[f"datasets/datasets/{DS}/{name}"] == len(full) - 700
    assert (shards / name).read_bytes() == full and not (shards / (name + ".part")).exists()
    assert read_header(shards / "fineweb_val_000000.bin") == SHARD


def test_sidecars_come_with_their_shards(tmp_path, model_bytes):
    repo = _mirror(tmp_path / "repo", model_bytes, sidecars=True)
    r = dl.download("sp1024", tmp_path / "data", train_shards=0, repo=str(repo), echo=lambda s: None)
    assert r.sidecars == 2 and (r.data_dir / "fineweb_val_bytes_000001.bin").is_file()


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m["datasets"][0].update(name="fineweb10B_sp2048"), "has no dataset fineweb10B_sp1024"),
    (lambda m: m["datasets"][0]["stats"].update(tokens_val=71), "stats.tokens_val=71"),
    (lambda m: m.update(shard_size=40), "shard_size 40"),
    (lambda m: m["tokenizers"][0].pop("model_path"), "no SentencePiece .model"),
])
def test_inconsistent_exports_are_refused(tmp_path, model_bytes, edit, fragment):
    repo = _mirror(tmp_path / "repo", model_bytes, manifest_edit=edit)
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
        dl.download("sp1024", tmp_path / "data", train_shards=2, repo=str(repo), echo=lambda s: None)


def test_bad_shard_in_the_repository(tmp_path, model_bytes):
    repo = _mirror(tmp_path / "repo", model_bytes)
    bad = repo / "datasets" / "datasets" / DS / "fineweb_train_000000.bin"
    raw = bytearray(bad.read_bytes())
    raw[0] ^= 0xFF  # magic
    bad.write_bytes(bytes(raw))
    out = tmp_path / "data"
    with pytest.raises(UserError, match="fineweb_train_000000.bin fails its check.*bad shard magic"):
        dl.download("sp1024", out, train_shards=1, repo=str(repo), echo=lambda s: None)
    assert not list((out / "datasets" / DS).glob("fineweb_train_*"))
    with pytest.raises(UserError, match="--train-shards 4 or fewer"):
        dl.download("sp1024", out, train_shards=5, repo=str(repo), echo=lambda s: None)


def test_offline_hub_fails_at_once_with_the_url_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(dl.Offline) as e:
        dl.download("sp8192", tmp_path / "data", echo=lambda s: None)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "https://huggingface.co/datasets/kevclark/parameter-golf/resolve/main/datasets/manifest.json" in msg
    assert "hf download kevclark/parameter-golf --repo-type dataset" in msg and "--repo MIRROR" in msg
    assert f"{tmp_path / 'data'}/datasets/fineweb10B_sp8192/fineweb_{{val,train}}_NNNNNN.bin" in msg


def test_hub_source_resumes_with_a_range_request(tmp_path, monkeypatch):
    """HubSource hands huggingface_hub's http_get the bytes already on disk (it sends the Range)."""
    import huggingface_hub.file_download as fd

    calls = []

    def fake_http_get(url, temp_file, *, resume_size=0, headers=None, expected_size=None, **kw):
        calls.append((url, resume_size, expected_size))
        temp_file.write(b"x" * (expected_size - resume_size))

    monkeypatch.setattr(fd, "http_get", fake_http_get)
    src = dl.HubSource("willdepueoai/parameter-golf")
    part = tmp_path / "f.part"
    part.write_bytes(b"y" * 10)
    with open(part, "ab") as f:
        src.fetch("datasets/datasets/x/fineweb_val_000000.bin", f, 10, 25, "f")
    assert calls == [("https://huggingface.co/datasets/willdepueoai/parameter-golf/resolve/main/"
                      "datasets/datasets/x/fineweb_val_000000.bin", 10, 25)]
    assert part.read_bytes() == b"y" * 10 + b"x" * 15


def test_cli(tmp_path, model_bytes):
    repo = _mirror(tmp_path / "repo", model_bytes)
    proc = cli_inprocess("data", "download", "--repo", str(repo), "--train-shards", "1", "--out",
                         str(tmp_path / "data"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "val_shards=2 val_tokens=70 train_shards=1 train_tokens=50" in proc.stdout
    assert f"next: pgolf data audit {tmp_path / 'data' / 'datasets' / DS}" in proc.stdout
    audit = cli_inprocess("data", "audit", str(tmp_path / "data" / "datasets" / DS), cwd=tmp_path)
    assert "val_docs=2" in audit.stdout, audit.stdout + audit.stderr
    bad = cli_inprocess("data", "download", "--repo", "not a repo", "--out", str(tmp_path / "d2"), cwd=tmp_path)
    assert bad.returncode == 2 and "neither an existing folder nor a Hub dataset id" in bad.stderr
