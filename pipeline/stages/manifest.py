"""Stage manifests: what a stage was run with, so a matching stage is skipped on the next run.

Each stage directory `artifacts/<recipe>/seed<seed>/<stage>/` holds `manifest.json` with the
stage's resolved config, the hashes of its inputs, a key over both, its outputs, the package
version and git SHA, library versions and wall time. `Stage.cached()` returns the recorded
outputs when the key matches and every output file still exists.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from pipeline.fileio import write_json_atomic

MANIFEST = "manifest.json"


def canonical_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


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


class Stage:
    def __init__(self, run_dir: Path, name: str, config: dict, inputs: dict):
        self.name = name
        self.dir = Path(run_dir) / name
        self.config, self.inputs = config, inputs
        self.key = canonical_hash({"stage": name, "config": config, "inputs": inputs})
        self._t0 = time.perf_counter()

    def cached(self) -> Optional[dict]:
        path = self.dir / MANIFEST
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        if manifest.get("key") != self.key:
            return None
        for f in manifest.get("files", []):
            if not (self.dir / f).exists():
                return None
        return manifest["outputs"]

    def start(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        stale = self.dir / MANIFEST
        if stale.exists():
            stale.unlink()  # a half-finished rerun must never look complete
        self._t0 = time.perf_counter()
        return self.dir

    def finish(self, outputs: dict, files: tuple[str, ...] = ()) -> dict:
        manifest = {"stage": self.name, "key": self.key, "config": self.config, "inputs": self.inputs,
                    "outputs": outputs, "files": list(files), "environment": environment(),
                    "wall_time_s": round(time.perf_counter() - self._t0, 3),
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json_atomic(self.dir / MANIFEST, manifest)
        return outputs
