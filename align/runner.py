"""`align run`: the stages of a recipe, in order, each skipped when already done.

For each stage the runner hashes its inputs (resolved config, data files, the starting
model or the upstream stage's saved model). A stage whose manifest says `complete` with
the same hash is skipped, and the runner says so. A stage whose manifest says `running`
with the same hash was killed: it resumes from its last complete checkpoint. A stage
whose inputs changed starts over in a clean folder.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from align import distributed
from align.artifacts import hash_json, library_versions, now, peak_rss_mb, read_json, write_json
from align.config import STAGE_REF, Recipe, config_dict
from align.console import capture_stage_output
from align.data import fingerprint
from align.errors import AlignError
from align.forgetting import forgetting_report
from align.models import TINY_DEFAULTS, resolve_model, weights_fingerprint
from align.report import summary_line, write_report
from align.stages import STAGES, check_recipe

log = logging.getLogger("align")


def model_input(recipe: Recipe, spec: str) -> tuple[str, dict]:
    """(the folder to load, what identifies it for the input hash)."""
    ref = STAGE_REF.match(spec)
    if ref:
        upstream = recipe.stage_dir(ref.group(1))
        manifest = read_json(upstream / "manifest.json") or {}
        if manifest.get("status") != "complete" or not (upstream / "model").is_dir():
            raise AlignError(f"stage '{ref.group(1)}' has no complete output in {upstream}; run it first")
        return str(upstream / "model"), {"stage": ref.group(1), "weights": weights_fingerprint(str(upstream / "model"))}
    path = resolve_model(spec)
    # The tiny model is built into each cache byte for byte the same (`align tiny-model`, seeded): its identity
    # is its bytes, so a stage trained from it is complete wherever the folder is copied and whichever cache
    # built it; any other folder is known by its files' names, sizes and mtimes.
    ident = {"spec": spec, "weights": weights_fingerprint(path, content=spec == "tiny")}
    if spec == "tiny":
        ident["tiny"] = TINY_DEFAULTS
    return path, ident


def reward_stage_for(recipe: Recipe, name: str) -> str | None:
    """The reward stage a policy stage is scored with: its `reward_model`, else the latest earlier one."""
    stage = recipe.stages[name]
    explicit = getattr(stage, "reward_model", None)
    if explicit:
        return STAGE_REF.match(explicit).group(1)
    if not hasattr(stage, "reward_model"):
        return None
    earlier = list(recipe.stages)[: list(recipe.stages).index(name)]
    rewards = [n for n in earlier if recipe.stages[n].type == "reward"]
    return rewards[-1] if rewards else None


def stage_inputs(recipe: Recipe, name: str) -> tuple[str, str | None, dict]:
    stage = recipe.stages[name]
    model_path, model_id = model_input(recipe, stage.model)
    inputs = {
        "config": config_dict(stage),
        "model": model_id,
        "data": fingerprint(stage.data),
        "eval_data": fingerprint(stage.eval_data) if stage.eval_data else None,
    }
    reward_path = None
    reward_stage = reward_stage_for(recipe, name)
    if reward_stage:
        reward_path, inputs["reward_model"] = model_input(recipe, "${" + reward_stage + "}")
    return model_path, reward_path, inputs


def run_recipe(recipe: Recipe, only: list[str] | None = None) -> dict[str, dict]:
    """Every stage of `recipe` in order. Under a launcher every rank calls this; rank 0 alone writes."""
    unknown = [s for s in (only or []) if s not in recipe.stages]
    if unknown:
        raise AlignError(f"--stage {unknown[0]}: no such stage; the recipe has: {', '.join(recipe.stages)}")
    distributed.setup()
    check_recipe(recipe)  # every stage, before the first one trains or anything is written
    out = Path(recipe.output_dir)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
    write_json(out / "recipe.json", {"name": recipe.name, "seed": recipe.seed, "output_dir": recipe.output_dir,
                                     "stages": {n: config_dict(s) for n, s in recipe.stages.items()}})
    results = {}
    for name, stage in recipe.stages.items():
        if only and name not in only:
            continue
        results[name] = run_stage(recipe, name)
    if distributed.is_main():
        write_report(recipe)
    return results


def open_stage(recipe: Recipe, name: str, inputs: dict, model_path: str) -> dict | None:
    """Rank 0's decision for one stage: None to skip it (complete with the same inputs), else the
    `running` manifest it wrote (a stale folder removed, an unfinished run's attempts counted)."""
    stage = recipe.stages[name]
    out_dir = recipe.stage_dir(name)
    input_hash = hash_json(inputs)
    manifest_path = out_dir / "manifest.json"
    manifest = read_json(manifest_path) or {}

    if manifest.get("input_hash") == input_hash and manifest.get("status") == "complete" \
            and (out_dir / "model").is_dir():
        log.info("stage %s: complete with the same inputs (%s); skipping", name, input_hash[:12])
        return None
    if manifest and manifest.get("input_hash") != input_hash:
        log.info("stage %s: inputs changed since the last run; starting it over in %s", name, out_dir)
        shutil.rmtree(out_dir)
        manifest = {}
    elif manifest.get("status") in ("running", "failed"):
        log.info("stage %s: found an unfinished run; resuming it", name)

    manifest = {
        "stage": name,
        "type": stage.type,
        "status": "running",
        "input_hash": input_hash,
        "inputs": inputs,
        "config": config_dict(stage),
        "model_path": model_path,
        "versions": library_versions(),
        "world_size": distributed.world_size(),
        "launcher": distributed.launcher(),
        "started_at": manifest.get("started_at") or now(),
        "attempts": manifest.get("attempts", 0) + 1,
        "ended_at": None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(manifest_path, manifest)
    log.info("stage %s (%s): model %s, data %s -> %s%s", name, stage.type, stage.model, stage.data, out_dir,
             f", {manifest['world_size']} processes ({manifest['launcher']})" if manifest["world_size"] > 1 else "")
    return manifest


def run_stage(recipe: Recipe, name: str) -> dict:
    stage = recipe.stages[name]
    out_dir = recipe.stage_dir(name)
    # Decided once, on rank 0, and handed to every rank: no rank reads a manifest another is writing.
    model_path, reward_path, inputs = distributed.decide(lambda: stage_inputs(recipe, name))
    manifest = distributed.decide(lambda: open_stage(recipe, name, inputs, model_path))
    if manifest is None:
        return distributed.decide(lambda: read_json(out_dir / "metrics.json") or {})
    manifest_path = out_dir / "manifest.json"
    try:
        extra = {"reward_path": reward_path} if reward_path else {}
        with capture_stage_output(out_dir):  # library logs, warnings and per-step dicts -> out_dir/run.log
            metrics = STAGES[stage.type].run(stage, name, out_dir, model_path, **extra)
    except BaseException as e:
        if distributed.peer_lost(e):
            raise  # another rank failed: it, or `align run --nproc`, records why
        where = f"rank {distributed.rank()}: " if distributed.world_size() > 1 else ""
        # Any rank records its own failure: the others may already be gone.
        manifest.update(status="failed", error=f"{where}{e.__class__.__name__}: {e}"[:500], ended_at=now())
        write_json(manifest_path, manifest, any_rank=True)
        raise
    if getattr(stage, "forgetting_data", None):  # rank 0 loads both models; the others wait for its numbers
        metrics.update(distributed.decide(lambda: forgetting_report(model_path, str(out_dir / "model"),
                                                                    stage.forgetting_data, stage.max_length)))
    manifest["peak_memory_mb_per_rank"] = distributed.gather(peak_memory_mb())
    manifest["tokens_per_s"] = metrics.get("tokens_per_s")  # every rank's tokens (TRL gathers them; PPO sums them)
    metrics.setdefault("world_size", distributed.world_size())
    write_json(out_dir / "metrics.json", metrics)
    manifest.update(status="complete", ended_at=now())
    write_json(manifest_path, manifest)
    log.info("stage %s: complete, %s", name, summary_line(stage.type, metrics))
    distributed.barrier()  # the next stage's rank 0 decision reads what was just written
    return metrics


def peak_memory_mb() -> dict:
    """This process's peak resident memory, and its peak GPU memory when it has a GPU."""
    import torch

    peaks = {"rss": round(peak_rss_mb(), 1)}
    if torch.cuda.is_available():
        peaks["gpu"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peaks


def plan(recipe: Recipe, processes: int | None = None) -> str:
    """What `align run` would do, after every check that needs no weights (`--dry-run`), on `processes` ranks."""
    rows = check_recipe(recipe, processes)
    lines = [f"recipe {recipe.name}: output_dir {recipe.output_dir}, seed {recipe.seed}"
             + (f", {processes} processes" if processes and processes > 1 else "")]
    for name, stage in recipe.stages.items():
        manifest = read_json(recipe.stage_dir(name) / "manifest.json") or {}
        lines.append(f"  {name} ({stage.type}): model {stage.model}, data {stage.data} ({rows[name]} rows), "
                     f"status {manifest.get('status', 'not run')}")
    return "\n".join(lines)
