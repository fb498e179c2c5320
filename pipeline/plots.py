"""Pictures a person would rather look at than read.

    plot_run(report, history, "report.png")     # one run: training loss, bpb at each stage
    plot_records(seed_logs, records_folder)     # a submission: per-seed loss, bpb by stage, bytes by group
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.fileio import atomic_path  # noqa: E402


def plot_run(report: dict, history: list, out_path: Path) -> Path:
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4.2))
    steps = [h["step"] for h in history]
    ax_loss.plot(steps, [h["loss"] for h in history], lw=1.0, color="tab:blue", label="train loss")
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax_loss.plot(*zip(*val), "o-", color="tab:orange", label="val loss (non-overlapping)")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title=f"{report['recipe']} seed {report['seed']}")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()

    stages = [("pre-quant", report["val_bpb_prequant"]), ("roundtrip", report["val_bpb_roundtrip"])]
    if report.get("val_bpb_ttt") is not None:
        stages.append(("TTT" + ("" if report["ttt_compliant"] else " (non-compliant)"), report["val_bpb_ttt"]))
    names, values = zip(*stages)
    bars = ax_bpb.bar(names, values, color=["tab:gray", "tab:blue", "tab:green"][: len(values)])
    for bar, v in zip(bars, values):
        ax_bpb.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.4f}", ha="center", va="bottom")
    lo = min(values)
    ax_bpb.set_ylim(lo * 0.95, max(values) * 1.03)
    ax_bpb.set(ylabel="val bpb", title=f"{report['eval_mode']} eval; {report['bytes_total']:,} bytes total")
    ax_bpb.grid(axis="y", alpha=0.3)
    return _save(fig, out_path)


def _save(fig, out_path) -> Path:
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_path


def plot_records(logs, folder) -> list[Path]:
    """Three PNGs in a records folder, drawn from the seeds' own train_gpt.py logs
    (`pipeline.records.SeedLog`): train_loss.png, bpb_by_stage.png, artifact_bytes.png."""
    folder = Path(folder)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for log in logs:
        if log.losses:
            ax.plot(*zip(*log.losses), lw=1.0, label=f"seed {log.seed}")
    ax.set(xlabel="step", ylabel="training loss (nats/token)", title="training loss per seed (logged steps)")
    ax.grid(alpha=0.3)
    ax.legend()
    paths = [_save(fig, folder / "train_loss.png")]

    fig, ax = plt.subplots(figsize=(7, 4.2))
    stages = [("pre-quant", "val_bpb_prequant"), ("roundtrip", "val_bpb_roundtrip"), ("TTT", "val_bpb_ttt")]
    stages = [(label, key) for label, key in stages if all(log.figures.get(key) is not None for log in logs)]
    width = 0.8 / max(len(logs), 1)
    for i, log in enumerate(logs):
        xs = [j + i * width for j in range(len(stages))]
        ax.bar(xs, [log.figures[key] for _, key in stages], width, label=f"seed {log.seed}")
    ax.set_xticks([j + width * (len(logs) - 1) / 2 for j in range(len(stages))], [label for label, _ in stages])
    values = [log.figures[key] for log in logs for _, key in stages]
    ax.set_ylim(min(values) * 0.98, max(values) * 1.01)
    ax.set(ylabel="val bpb", title="bpb at each stage (read back from the artifact but pre-quant)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    paths.append(_save(fig, folder / "bpb_by_stage.png"))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    groups = sorted({g for log in logs for g in log.groups})
    for i, log in enumerate(logs):
        xs = [j + i * width for j in range(len(groups))]
        ax.bar(xs, [log.groups.get(g, 0) for g in groups], width, label=f"seed {log.seed}")
    ax.set_xticks([j + width * (len(logs) - 1) / 2 for j in range(len(groups))], groups)
    totals = ", ".join(f"{log.figures['bytes_total']:,}" for log in logs)
    ax.set(ylabel="bytes (each group compressed alone)", title=f"artifact bytes by tensor group; totals {totals}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    paths.append(_save(fig, folder / "artifact_bytes.png"))
    return paths
