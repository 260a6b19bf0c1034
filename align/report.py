"""`report.md`: what a run did, one section per stage, with training curves."""

from __future__ import annotations

from pathlib import Path

from align.artifacts import read_json, write_text
from align.config import Recipe


# Per-step series worth a plot, by stage type: what falls (loss) and what the stage is for.
PLOTTED = {"sft": ["loss", "eval_loss"], "reward": ["loss", "accuracy"], "kto": ["loss", "rewards/chosen"],
           "dpo": ["loss", "rewards/margins", "rewards/accuracies"], "ppo": ["reward", "kl", "value_loss"],
           "grpo": ["reward", "kl", "loss"], "rloo": ["reward", "kl", "loss"]}


def plot_stage(stage_dir: Path, stage_type: str) -> str | None:
    """`<stage>/curves.png` from log.jsonl; None when there is nothing to plot or no matplotlib."""
    from align.artifacts import StepLog

    rows = StepLog(stage_dir / "log.jsonl").read()
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
              for k in PLOTTED.get(stage_type, ["loss"])}
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
    """`report.md`: one section per stage with its status, final metrics and training curves."""
    lines = [f"# {recipe.name}", "", f"Output: `{recipe.output_dir}`", ""]
    for name in recipe.stages:
        d = recipe.stage_dir(name)
        manifest = read_json(d / "manifest.json") or {}
        metrics = read_json(d / "metrics.json") or {}
        lines += [f"## {name} ({recipe.stages[name].type})", "",
                  f"status: {manifest.get('status', 'not run')}; started {manifest.get('started_at')}, "
                  f"ended {manifest.get('ended_at')}", ""]
        image = plot_stage(d, recipe.stages[name].type) if metrics else None
        if image:
            lines += [f"![{name} curves]({image})", ""]
        if metrics:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
            lines.append("")
    write_text(Path(recipe.output_dir) / "report.md", "\n".join(lines))
