"""Content-keyed stage caching for `pgolf run`: a stage is skipped only when everything that
produced its outputs is unchanged and its output files are intact.

    cache = StageCache(run_dir / "export", key_doc)
    outputs, reason = cache.lookup()          # (None, why) when it must run
    cache.start(("model.bin",)); outputs = stage.run(ctx); cache.finish(outputs, ("model.bin",))

`key_doc` holds the stage's slice of the run's settings, the content hashes of the data it reads,
the code's identity and a hash of every upstream stage's outputs; the manifest stores it, its
hash (the key), the outputs, and the sha256 of each output file. `lookup` re-hashes every file
before reuse (integrity on every use: a flipped byte or a truncated blob makes the stage run
again, saying why in one line), and names which part of the key changed.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

from pipeline.fileio import canonical_hash, file_sha256, write_json_atomic

MANIFEST = "manifest.json"


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    import numpy
    import torch

    from pipeline import __version__

    return {"pgolf": __version__, "git_sha": git_sha(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": numpy.__version__,
            "cuda": torch.version.cuda, "device_count": torch.cuda.device_count()}


class StageCache:
    def __init__(self, stage_dir: Path, key_doc: dict):
        self.dir = Path(stage_dir)
        self.key_doc = key_doc
        self.key = canonical_hash(key_doc)
        self._t0 = time.perf_counter()

    def lookup(self) -> tuple[Optional[dict], str]:
        """(outputs, "") when the stage may be skipped, else (None, the reason; "" on a first run)."""
        path = self.dir / MANIFEST
        if not path.exists():
            return None, ""
        try:
            manifest = json.loads(path.read_text())
            recorded_key, files = manifest["key"], manifest.get("files", {})
        except (OSError, ValueError, KeyError, TypeError):
            return None, f"{path} is unreadable"
        if recorded_key != self.key:
            old = manifest.get("key_doc") or {}
            changed = sorted(k for k in set(old) | set(self.key_doc) if old.get(k) != self.key_doc.get(k))
            return None, f"its {', '.join(changed) or 'inputs'} changed since it last ran"
        if not isinstance(files, dict):
            return None, f"{path} lists no file hashes (written by an older pgolf)"
        for name, recorded in files.items():
            f = self.dir / name
            if not f.is_file():
                return None, f"{name} is missing"
            actual = file_sha256(f)
            if actual != recorded:
                return None, f"{name} does not match its manifest (sha256 {actual[:12]}…, recorded {recorded[:12]}…)"
        return manifest["outputs"], ""

    def start(self, files: tuple[str, ...] = ()) -> None:
        """Before the stage runs again: its manifest and its output `files` go, so a rerun that fails
        leaves nothing that looks complete or current (a stale blob beside a failed export)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in (MANIFEST, *files):
            stale = self.dir / name
            if stale.exists():
                stale.unlink()
        self._t0 = time.perf_counter()

    def finish(self, outputs: dict, files: tuple[str, ...] = ()) -> None:
        manifest = {"key": self.key, "key_doc": self.key_doc, "outputs": outputs,
                    "files": {name: file_sha256(self.dir / name) for name in files},
                    "environment": environment(), "wall_time_s": round(time.perf_counter() - self._t0, 3),
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json_atomic(self.dir / MANIFEST, manifest)
