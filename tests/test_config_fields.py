"""No recipe key is accepted and then ignored.

Every stage type runs once on the tiny model (a step or two each) with its config object
instrumented to record which fields are read while the pipeline runs it. A field that no
code reads is a knob that silently does nothing: it must be honoured, or removed from that
stage type's dataclass so the recipe loader refuses it as an unknown key. The only fields
allowed to stay unread here are the vLLM engine's (read when `engine: vllm`, which needs a
GPU), and the test checks that the stage's own code does read them on that path.
"""

import dataclasses
import inspect
import importlib
import sys

import pytest

from align.config import LoraSettings
from align.runner import run_recipe
from align.stages import STAGES, recipe_from_dict
from conftest import REPO, TINY_PREFS, TINY_SFT

PROMPTS = REPO / "recipes" / "data" / "tiny_prompts.jsonl"
VLLM_ONLY = {"gpu_memory_utilization", "tensor_parallel_size", "sync_timeout", "vllm_mode", "vllm_server_base_url",
             "vllm_server_host", "vllm_server_port", "vllm_server_timeout"}


def record_reads(obj, reads: set):
    """Make `obj` (a dataclass instance) add each field name it is asked for to `reads`, except for the
    generic walks of `dataclasses` itself (asdict for the manifest, repr, eq), which read every field."""
    names = {f.name for f in dataclasses.fields(obj)}
    base = type(obj)

    class Recorded(base):
        def __getattribute__(self, name):
            if name in names and not sys._getframe(1).f_code.co_filename.endswith("dataclasses.py"):
                reads.add(name)
            return object.__getattribute__(self, name)

    Recorded.__name__ = Recorded.__qualname__ = base.__name__
    obj.__class__ = Recorded
    return obj


def small(**kw) -> dict:
    kw.setdefault("max_steps", -1 if "epochs" in kw else 2)
    return dict( batch_size=4, eval_fraction=0.2, max_length=48, logging_steps=1, eval_steps=1,
                save_steps=1, **kw)


STAGE_SETTINGS = {
    "sft": small(model="tiny", data=str(TINY_SFT), lora={"r": 4, "alpha": 8}, merge_lora=True),
    "reward": small(model="${sft}", data=str(TINY_PREFS), center_rewards=0.01),
    "dpo": small(model="${sft}", data=str(TINY_PREFS), nll_weight=0.1, eval_prompts=4, max_new_tokens=4),
    "kto": small(model="${sft}", data=str(TINY_PREFS), eval_prompts=4, max_new_tokens=4),
    # max_steps off: PPO reads `epochs` only then (2 steps of 4 of the ~150 training prompts)
    "ppo": small(model="${sft}", data=str(PROMPTS), rollout_batch_size=4, ppo_epochs=1, response_length=8, epochs=0.05,
                 kl_target=6.0, entropy_coef=0.01, eval_prompts=4, max_new_tokens=4, top_k=50),
    "grpo": small(model="${sft}", data=str(PROMPTS), num_generations=2, response_length=8, beta=0.1,
                  eval_prompts=4, max_new_tokens=4),
    "rloo": small(model="${sft}", data=str(PROMPTS), num_generations=2, response_length=8, eval_prompts=4,
                  max_new_tokens=4),
}


@pytest.fixture(scope="module")
def reads(tmp_path_factory):
    assert set(STAGE_SETTINGS) == set(STAGES), "every stage type is exercised"
    out = tmp_path_factory.mktemp("fields")
    recipe = recipe_from_dict({"output_dir": str(out), "seed": 0, "stages": STAGE_SETTINGS})
    seen = {name: set() for name in recipe.stages}
    for name, stage in recipe.stages.items():
        record_reads(stage, seen[name])
    lora_reads = set()
    record_reads(recipe.stages["sft"].lora, lora_reads)
    run_recipe(recipe)
    return seen, lora_reads


@pytest.mark.parametrize("stage_type", sorted(STAGES))
def test_every_field_of_the_stage_type_is_read(reads, stage_type):
    seen, _ = reads
    fields = {f.name for f in dataclasses.fields(STAGES[stage_type].config)}
    unread = fields - seen[stage_type]
    assert unread - VLLM_ONLY == set(), f"{stage_type} accepts and ignores: {sorted(unread - VLLM_ONLY)}"
    module = importlib.import_module(STAGES[stage_type].runner.partition(":")[0])
    source = inspect.getsource(module)
    assert all(f"stage.{name}" in source for name in unread), f"{stage_type}: vLLM knobs not read on the vllm path"


def test_every_lora_field_is_read(reads):
    _, lora_reads = reads
    assert lora_reads == {f.name for f in dataclasses.fields(LoraSettings)}
