"""Hand-offs between stages: every kind of model a stage saves, into every next stage, full and LoRA.

The previous stage saved a full model, a LoRA adapter, or a LoRA merged into its base. The next
stage must train from it (finite loss, a trainable weight moved) and its reference must be the
model it started from: before the first step the policy is the reference, so DPO's and KTO's
held-out rewards and the online stages' first KL are 0. A reference re-read from the merged
model's `config._name_or_path` (the pre-SFT base) fails here, as do merged weights left frozen.

The upstream models are trained once per module; each next stage runs one or two steps on a
handful of rows, called through its runner function, so the whole matrix takes a few minutes.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from align.config import LoraSettings
from align.models import adapter_base, load_model
from align.stages import STAGES
from conftest import REPO, TINY_PREFS

CHATTY_SFT = REPO / "recipes" / "data" / "tiny_chatty_sft.jsonl"
PROMPTS = REPO / "recipes" / "data" / "tiny_prompts.jsonl"
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
STEP0 = 1e-4  # policy == reference: rewards and KL are 0 up to float noise

UPSTREAM = ("full", "lora_adapter", "merged_lora")
NEXT = [(t, mode, cache) for t in ("reward", "dpo", "kto", "ppo", "grpo", "rloo") for mode in ("full", "lora")
        for cache in ((True, False) if t == "dpo" else (None,))]


def case_id(case) -> str:
    stage_type, mode, cache = case
    return f"{stage_type}-{mode}" + ("" if cache is None else "-ref_cache" if cache else "-no_ref_cache")


def stage_config(stage_type: str, **kwargs):
    """A stage's dataclass with the matrix's small settings: seconds per stage on 2 cores."""
    settings = {"type": stage_type, "seed": 0, "max_length": 64, "lr": 1e-3, "batch_size": 4, "logging_steps": 1,
                "eval_steps": 0, "save_steps": 50, "eval_fraction": 0.0}
    return STAGES[stage_type].config(**{**settings, **kwargs})


def first_lines(src: Path, dst: Path, start: int, n: int) -> str:
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[start:start + n]))
    return str(dst)


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model gains nothing from a second thread, and on a busy 2-core machine the two threads
    wait for each other: one thread runs this module several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_model, one_thread):
    """The three kinds of SFT output, a reward model for the online stages, and the small data files."""
    root = tmp_path_factory.mktemp("handoff")
    data = {"sft": first_lines(CHATTY_SFT, root / "sft.jsonl", 0, 32),
            "prefs": first_lines(TINY_PREFS, root / "prefs.jsonl", 0, 8),
            "prefs_eval": first_lines(TINY_PREFS, root / "prefs_eval.jsonl", 8, 4),
            "prompts": first_lines(PROMPTS, root / "prompts.jsonl", 0, 4)}
    # lr high enough that each SFT moves the weights well past STEP0: a reference that is the pre-SFT base shows.
    sft = {"data": data["sft"], "max_steps": 3, "batch_size": 8, "lr": 1e-2}
    models = {}
    for kind, extra in (("full", {}), ("lora_adapter", {"lora": LORA}),
                        ("merged_lora", {"lora": LORA, "merge_lora": True})):
        STAGES["sft"].run(stage_config("sft", model=str(tiny_model), **sft, **extra), "sft", root / kind,
                          str(tiny_model))
        models[kind] = str(root / kind / "model")
    assert (Path(models["lora_adapter"]) / "adapter_config.json").exists()
    assert not (Path(models["merged_lora"]) / "adapter_config.json").exists()
    STAGES["reward"].run(stage_config("reward", model=str(tiny_model), data=data["prefs"], max_steps=1), "reward",
                         root / "reward", str(tiny_model))
    return models, str(root / "reward" / "model"), data


def next_stage(stage_type: str, mode: str, model: str, data: dict, ref_cache):
    lora = {"lora": LORA} if mode == "lora" else {}
    if stage_type in ("reward", "dpo", "kto"):
        extra = {"ref_cache": ref_cache} if stage_type == "dpo" else {}
        return stage_config(stage_type, model=model, data=data["prefs"], eval_data=data["prefs_eval"], max_steps=1,
                            **lora, **extra)
    online = {"model": model, "data": data["prompts"], "response_length": 8, "max_steps": 1, **lora}
    if stage_type == "ppo":
        return stage_config("ppo", rollout_batch_size=4, ppo_epochs=1, **online)
    return stage_config(stage_type, num_generations=2, beta=0.1, **online)


def state(path: str) -> dict:
    return {k: v.clone() for k, v in load_model(path).state_dict().items()}


def moved(start: dict, after: dict) -> list[str]:
    common = [k for k in start if k in after]
    assert common, "the saved model shares no weight names with the starting model"
    return [k for k in common if not torch.equal(start[k], after[k])]


@pytest.mark.parametrize("case", NEXT, ids=case_id)
@pytest.mark.parametrize("source", UPSTREAM)
def test_next_stage_trains_against_the_model_it_started_from(upstream, source, case, tmp_path, monkeypatch):
    stage_type, mode, ref_cache = case
    models, reward_path, data = upstream
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))  # each DPO computes its own reference log-probs
    out = tmp_path / stage_type
    stage = next_stage(stage_type, mode, models[source], data, ref_cache)
    extra = {"reward_path": reward_path} if STAGES[stage_type].online else {}
    metrics = STAGES[stage_type].run(stage, stage_type, out, models[source], **extra)

    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r[k] for r in rows for k in ("loss", "policy_loss", "value_loss") if k in r]
    assert losses and all(math.isfinite(x) for x in losses), rows

    start = state(models[source])
    if stage_type == "reward":  # a sequence classifier: its body against the starting causal LM's
        from safetensors.torch import load_file

        after = load_file(out / "model" / "model.safetensors")
        assert moved({k: v for k, v in start.items() if k.startswith("model.")}, after)
    else:
        saved = str(out / "model")
        if mode == "lora":  # the adapter must name the starting model as its base, or the next stage loses it
            assert adapter_base(saved), "a LoRA stage saves an adapter"
            assert not moved(start, state(adapter_base(saved))), "the saved adapter's base is not the starting model"
        assert moved(start, state(saved)), "no trainable weight moved"

    if stage_type in ("dpo", "kto"):  # held-out rewards of the starting model, measured before the first step
        before = json.loads((out / "eval_before.json").read_text())
        for key in ("eval_rewards/chosen", "eval_rewards/rejected"):
            assert before[key] == pytest.approx(0.0, abs=STEP0), (key, before[key])
            assert metrics[f"{key}_before"] == before[key], "metrics.json reports the starting rewards"
    if stage_type in ("ppo", "grpo", "rloo"):
        first = next(r for r in rows if r["step"] == 1 and "kl" in r)
        assert first["kl"] == pytest.approx(0.0, abs=STEP0), first
