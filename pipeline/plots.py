"""The run's picture: training loss by step beside val bpb at each scoring stage (report.png)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402


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
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
