"""The stage types a recipe may use: one table, `STAGES`, and the checks that run before any stage trains.

Each `StageSpec` says, for one type: its config dataclass (`align.config`), the data kind it
reads (`align.data`), the function that runs it (imported only when the stage runs: TRL
takes seconds to import), whether it samples completions online (and so needs a reward),
which per-step series `report.md` plots, and which final numbers head the report's summary
table. A new stage type is one module under `align/stages/` plus one row here.

`check_recipe` runs every check that needs no model weights (data files and their rows,
references between stages, rewards for online stages, batch shapes, the rollout engine) for
every stage, so `align run --dry-run` and the start of every `align run` fail in seconds on a
bad third stage instead of after the first two have trained.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from align.config import (DPOStage, GRPOStage, KTOStage, PPOStage, Recipe, RewardStage, RLOOStage, SFTStage,
                          TrainStage)
from align.config import load_recipe as _load_recipe
from align.config import recipe_from_dict as _recipe_from_dict


@dataclass(frozen=True)
class StageSpec:
    config: type[TrainStage]  # the recipe section's dataclass
    data: str  # the row kind align.data validates: sft, preference, kto, prompts
    runner: str  # "module:function", called as function(stage, name, out_dir, model_path[, reward_path])
    online: bool = False  # samples completions and learns from a reward model or reward_fn
    plotted: tuple[str, ...] = ("loss",)  # log.jsonl series drawn in report.md
    headline: tuple[str, ...] = ()  # metrics.json keys in report.md's summary table, in order

    def run(self, *args, **kwargs) -> dict:
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)(*args, **kwargs)


_POLICY_EVAL = ("eval_reward_before", "eval_reward_after", "eval_win_rate")

STAGES: dict[str, StageSpec] = {
    "sft": StageSpec(SFTStage, "sft", "align.stages.sft:run", plotted=("loss", "eval_loss"),
                     headline=("eval_loss_before", "eval_loss")),
    "reward": StageSpec(RewardStage, "preference", "align.stages.reward:run", plotted=("loss", "accuracy"),
                        headline=("eval_accuracy_before", "eval_accuracy", "eval_loss_before", "eval_loss")),
    "dpo": StageSpec(DPOStage, "preference", "align.stages.dpo:run",
                     plotted=("loss", "rewards/margins", "rewards/accuracies"),
                     headline=("eval_rewards/accuracies_before", "eval_rewards/accuracies", "eval_loss_before",
                               "eval_loss", *_POLICY_EVAL)),
    "kto": StageSpec(KTOStage, "kto", "align.stages.kto:run", plotted=("loss", "rewards/chosen"),
                     headline=("eval_loss_before", "eval_loss", *_POLICY_EVAL)),
    "ppo": StageSpec(PPOStage, "prompts", "align.stages.ppo:run", online=True, plotted=("reward", "kl", "value_loss"),
                     headline=(*_POLICY_EVAL, "kl_last")),
    "grpo": StageSpec(GRPOStage, "prompts", "align.stages.grpo:run_grpo", online=True,
                      plotted=("reward", "kl", "loss"), headline=(*_POLICY_EVAL, "kl_last")),
    "rloo": StageSpec(RLOOStage, "prompts", "align.stages.grpo:run_rloo", online=True,
                      plotted=("reward", "kl", "loss"), headline=(*_POLICY_EVAL, "kl_last")),
}

STAGE_TYPES = {name: spec.config for name, spec in STAGES.items()}


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """A recipe file with `a.b=c` overrides, every key and value checked against the stage types above."""
    return _load_recipe(path, overrides, stage_types=STAGE_TYPES)


def recipe_from_dict(raw: dict, **kwargs) -> Recipe:
    return _recipe_from_dict(raw, stage_types=STAGE_TYPES, **kwargs)


def check_recipe(recipe: Recipe, processes: int | None = None) -> dict[str, int]:
    """Every weight-free check of every stage, in recipe order; returns the row count of each stage's data.
    `processes`: the ranks that will train (default: this launch's WORLD_SIZE).

    Raises `AlignError` naming the stage and key at the first problem."""
    from align.stages.checks import check_stage

    return {name: check_stage(recipe, name, processes) for name in recipe.stages}
