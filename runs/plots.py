"""loss.png: a run's logged numbers against optimizer step, drawn with matplotlib from metrics.jsonl.

Top row: train loss (line) and eval loss (markers) | learning rate (every named optimizer group
with LLRD, from the embeddings up to the head). Below, three to a row: every other number the
trainer logs at training steps (grad norm, TRL's token counts and accuracies, DPO rewards and
margins, throughput, memory, and whatever a trainer adds to its logs later), each with its eval
value as markers when there is one. Nothing needs listing here for a new number to be drawn;
`PANELS` only gives known ones a readable title and a y-axis unit.

    python -m runs.plots ft-outputs/metrics.jsonl         # re-draw ft-outputs/loss.png from the file
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402

DPI = 100
WIDTH_IN, TOP_ROW_IN, ROW_IN = 15.0, 4.6, 3.0
COLUMNS = 3
# (panel title, y-axis label with the unit) of the numbers TRL, transformers and techniques/throughput.py
# log; others get their key. Also the order of the panels: the most telling first, then every other
# key as first logged.
PANELS = {
    "grad_norm": ("gradient norm", "L2 norm, before clipping"),
    "rewards/margins": ("reward margin (chosen - rejected)", "nats, beta-scaled"),
    "rewards/accuracies": ("reward accuracy", "fraction of pairs"),
    "rewards/chosen": ("reward of chosen answers", "nats, beta-scaled"),
    "rewards/rejected": ("reward of rejected answers", "nats, beta-scaled"),
    "logps/chosen": ("log-probability of chosen answers", "nats, summed"),
    "logps/rejected": ("log-probability of rejected answers", "nats, summed"),
    "mean_token_accuracy": ("next-token accuracy", "fraction of supervised tokens"),
    "entropy": ("prediction entropy", "nats per token"),
    "num_tokens": ("tokens seen", "tokens, cumulative"),
    "tokens_per_s": ("throughput, all tokens", "tokens/s, all processes"),
    "supervised_tokens_per_s": ("throughput, supervised tokens", "supervised tokens/s, all processes"),
    "mfu": ("model FLOPs utilization (MFU)", "fraction of peak FLOP/s"),
    "peak_mem_gib": ("peak memory", "GiB"),
    "logits/chosen": ("mean logit, chosen answers", "logit"),
    "logits/rejected": ("mean logit, rejected answers", "logit"),
}
NOT_PLOTTED = {"step", "epoch", "loss", "learning_rate", "total_flos"}
# Logged with evaluations too, but not a figure of the eval set: TRL's eval_num_tokens is the
# training count at that moment, a second copy of the train line.
NO_EVAL_LINE = {"num_tokens"}
# Drawn from 0: peak memory creeps up by kilobytes once it has settled, which an axis fitted to the
# data draws as a jump.
FROM_ZERO = {"peak_mem_gib"}
# LLRD groups, bottom to top: plasma's dark purple to orange (its last fifth is a pale yellow that
# vanishes on white, as viridis' end does).
LR_COLORMAP, LR_COLORMAP_END = plt.cm.plasma, 0.8


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl file (one JSON object per line)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def extra_keys(rows: list[dict]) -> list[str]:
    """Numeric keys logged at training steps besides loss and learning rates: those of `PANELS` in
    its order, then the others in first-seen order."""
    keys = {}
    for row in rows:
        if "loss" in row:
            keys.update({k: None for k, v in row.items() if k not in NOT_PLOTTED and not k.startswith("learning_rate/")
                         and isinstance(v, (int, float)) and not isinstance(v, bool)})
    return [k for k in PANELS if k in keys] + [k for k in keys if k not in PANELS]


def learning_rate_keys(rows: list[dict]) -> list[str]:
    """The `learning_rate/<group>` keys of the training rows (LLRD), from the bottom of the model
    up: embeddings, then the layers by number (layers.2 before layers.10, which a string sort puts
    first), then the head and any other group."""
    def depth(key: str) -> tuple:
        where = key.removeprefix("learning_rate/")
        parts = tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", where))  # str, int, str, ...
        return (0 if where == "embeddings" else 1 if len(parts) > 1 else 2), parts

    return sorted({k for r in rows if "loss" in r for k in r if k.startswith("learning_rate/")}, key=depth)


def figure_size_px(n_extra: int) -> tuple[int, int]:
    """(width, height) in pixels of the figure for `n_extra` extra panels."""
    rows = math.ceil(n_extra / COLUMNS)
    return round(WIDTH_IN * DPI), round((TOP_ROW_IN + rows * ROW_IN) * DPI)


def loss_label(rows: list[dict]) -> str:
    """The loss axis label with its unit: DPO's per pair (its runs log reward margins), else the
    cross-entropy per supervised token that SFT and full fine-tuning minimise."""
    if any("rewards/margins" in r for r in rows):
        return "DPO loss (nats per pair)"
    return "cross-entropy (nats per supervised token)"


def plot_metrics(rows: list[dict], path: str | Path, title: str = "") -> tuple[int, int]:
    """Draw `rows` (metrics.jsonl) into the PNG `path`; returns its (width, height) in pixels.

    Raises ValueError when `rows` hold no loss (nothing to draw).
    """
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not train and not evals:
        raise ValueError("no loss in the metrics: nothing to plot")
    extras = extra_keys(rows)
    width, height = figure_size_px(len(extras))
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    n_rows = 1 + math.ceil(len(extras) / COLUMNS)
    grid = fig.add_gridspec(n_rows, COLUMNS, height_ratios=[TOP_ROW_IN] + [ROW_IN] * (n_rows - 1))

    ax = fig.add_subplot(grid[0, :2])
    _series(ax, train, "loss", "train")
    _series(ax, evals, "eval_loss", "eval", linestyle="--", marker="s")
    for r in evals[-1:]:
        ax.annotate(f"{r['eval_loss']:.3f}", (r["step"], r["eval_loss"]), textcoords="offset points", xytext=(6, 6))
    _label(ax, "loss", loss_label(rows))
    ax.legend()

    ax = fig.add_subplot(grid[0, 2])
    groups = learning_rate_keys(rows)
    for i, key in enumerate(groups or ["learning_rate"]):
        color = LR_COLORMAP(LR_COLORMAP_END * i / max(1, len(groups) - 1)) if groups else None
        show = len(groups) <= 8 or i in (0, len(groups) - 1)  # many LLRD layers: label the ends only
        label = key.removeprefix("learning_rate/") if show and groups else None
        _series(ax, train, key, label, color=color)
    _label(ax, f"learning rate, {len(groups)} LLRD groups" if groups else "learning rate", "learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if groups:
        ax.legend(fontsize="small", title="bottom to top" if len(groups) > 2 else None, title_fontsize="small")

    for i, key in enumerate(extras):
        ax = fig.add_subplot(grid[1 + i // COLUMNS, i % COLUMNS])
        _series(ax, train, key, "train")
        if key not in NO_EVAL_LINE:
            _series(ax, evals, f"eval_{key}", "eval", linestyle="--", marker="s")
        _label(ax, *PANELS.get(key, (key.replace("_", " "), key)))
        if key in FROM_ZERO and ax.dataLim.y1 > 0:
            ax.set_ylim(0, 1.15 * ax.dataLim.y1)  # headroom: a flat line at the top edge hides in the frame
        if ax.get_legend_handles_labels()[1] == ["train", "eval"]:
            ax.legend(fontsize="small")

    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return width, height


def _series(ax, rows: list[dict], key: str, label: str | None, **style) -> None:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if points:
        style.setdefault("marker", "o" if len(points) <= 30 else None)  # few points: show where they are
        ax.plot(*zip(*points), label=label, markersize=4, **style)


def _label(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if isinstance(ax.yaxis.get_major_formatter(), ScalarFormatter):
        ax.yaxis.get_major_formatter().set_useOffset(False)  # 5.943 .. 5.944, not "1e-5 + 5.943"


if __name__ == "__main__":
    metrics = Path(sys.argv[1])
    out = metrics.with_name("loss.png")
    print(f"{out}: {plot_metrics(read_metrics(metrics), out, title=str(metrics.parent))} px")
