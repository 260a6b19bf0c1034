"""`report.md`: what a run did. A summary table first (per stage the few numbers that say whether it
worked, before -> after), then one section per stage with its training curves and final metrics."""

from __future__ import annotations

from pathlib import Path

from align.artifacts import read_json, write_text
from align.config import Recipe
from align.stages import STAGES

LABELS = {"eval_reward": "reward-model score", "eval_win_rate": "win rate", "kl_last": "KL"}

# Trainer counters that stay in metrics.json but tell a reader nothing.
UNREAD = {"total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second", "epoch",
          "num_tokens", "num_input_tokens_seen"}


def _number(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_number(x) for x in v) + "]"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def headline(stage_type: str, metrics: dict) -> str:
    """The stage's few numbers in words, e.g. "loss 6.196 → 0.7269"; the train loss when it has none."""
    keys = list(STAGES[stage_type].headline)  # `X_before` then `X` or `X_after`: one "before -> after" pair
    parts = []
    for i, key in enumerate(keys):
        if key.endswith("_before") or metrics.get(key) is None:
            continue  # a "_before" key is shown with the key after it
        before = keys[i - 1] if i and keys[i - 1].endswith("_before") else None
        base = before.removesuffix("_before") if before else key
        value = _number(metrics[key])
        if before and metrics.get(before) is not None:
            value = f"{_number(metrics[before])} → {value}"
        parts.append(f"{LABELS.get(base, base.removeprefix('eval_').replace('_', ' '))} {value}")
    if not parts and isinstance(metrics.get("train_loss"), float):
        parts.append(f"train loss {metrics['train_loss']:.4g}")
    return "; ".join(parts)


def summary_line(stage_type: str, metrics: dict) -> str:
    """What the runner prints when a stage ends: minutes and the headline numbers."""
    minutes = f"{metrics['seconds'] / 60:.1f} min" if isinstance(metrics.get("seconds"), (int, float)) else ""
    line = ", ".join(p for p in (minutes, headline(stage_type, metrics)) if p)
    if metrics.get("hacking_suspected"):
        line += "; HACKING SUSPECTED: " + "; ".join(metrics.get("hacking_reasons") or [])
    return line


def last_logged(stage_dir: Path, key: str):
    """The last value of `key` in log.jsonl (GRPO and RLOO log a per-step KL but write no kl_last)."""
    from align.artifacts import StepLog

    values = [r[key] for r in StepLog(stage_dir / "log.jsonl").read() if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def plot_stage(stage_dir: Path, stage_type: str) -> str | None:
    """`<stage>/curves.png` from log.jsonl; None when there is nothing to plot or no matplotlib."""
    from align.artifacts import StepLog

    rows = StepLog(stage_dir / "log.jsonl").read()
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
              for k in STAGES[stage_type].plotted}
    series = {k: v for k, v in series.items() if len(v) > 1}
    if not series:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = stage_dir / ".curves.png.tmp"
    fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    tmp.replace(stage_dir / "curves.png")
    return f"{stage_dir.name}/curves.png"


def write_report(recipe: Recipe) -> None:
    """`report.md`: the summary table, then one section per stage with its curves and final metrics."""
    table = ["| stage | type | status | results (before → after) | minutes |", "|---|---|---|---|---|"]
    sections, alarms = [], []
    for name in recipe.stages:
        d, stage_type = recipe.stage_dir(name), recipe.stages[name].type
        manifest = read_json(d / "manifest.json") or {}
        metrics = read_json(d / "metrics.json") or {}
        if metrics and "kl_last" in STAGES[stage_type].headline and "kl_last" not in metrics:
            metrics["kl_last"] = last_logged(d, "kl")
        minutes = f"{metrics['seconds'] / 60:.1f}" if isinstance(metrics.get("seconds"), (int, float)) else ""
        if metrics.get("hacking_suspected"):
            alarms.append(f"> **Hacking suspected in {name}**: " + "; ".join(metrics.get("hacking_reasons") or []))
        table.append(f"| {name} | {stage_type} | {manifest.get('status', 'not run')} | "
                     f"{headline(stage_type, metrics) if metrics else ''} | {minutes} |")

        sections += [f"## {name} ({stage_type})", "",
                     (f"status: {manifest.get('status', 'not run')}; started {manifest.get('started_at')}, "
                      f"ended {manifest.get('ended_at')}"), ""]
        image = plot_stage(d, stage_type) if metrics else None
        if image:
            sections += [f"![{name} curves]({image})", ""]
        shown = {k: v for k, v in metrics.items() if k not in UNREAD and v is not None}
        if shown:
            sections += ["| metric | value |", "|---|---|"]
            sections += [f"| {k} | {_number(v)} |" for k, v in shown.items()]
            sections.append("")
    lines = [f"# {recipe.name}", "", *[line + "\n" for line in alarms], f"Output: `{recipe.output_dir}`", "", *table,
             "", *sections]
    write_text(Path(recipe.output_dir) / "report.md", "\n".join(lines))
