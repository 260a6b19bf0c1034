"""GRPO and RLOO over TRL's `GRPOTrainer` and `RLOOTrainer`: sample, score, update.

Each step samples `num_generations` completions for each of `batch_size * grad_accum /
num_generations` prompts (TRL's `per_device_train_batch_size` counts completions, not
prompts), scores every completion, and pushes the policy towards the completions that
beat their group: GRPO normalises each reward by its group's mean (and std, per
`scale_rewards`); RLOO subtracts the mean of the other samples of the same prompt. The
loss is TRL's (one copy of the math).

Rewards. The recipe's reward model (`reward_model`, else the latest earlier reward stage)
scores each completion's text with `RewardScorer`, so the policy and the reward model may
use different tokenizers. `reward_fn: module:function` adds a Python function called as
`function(prompts, completions) -> list[float]`, prompts as message lists, completions as
text; with both, TRL sums the two. A NaN or infinite reward becomes `None`, TRL's "this
function does not score this completion": the other reward function alone scores it, and a
completion no function scores gets advantage 0 (TRL's nan-aware means leave it out of the
group baseline). Every such reward is counted (`rewards/<fn>/non_finite` per step,
`reward_non_finite` in metrics.json) and warned about, so a broken reward shows instead of
quietly flattening the advantages.

Reference (beta > 0): the starting model (`models.reference_model`); under LoRA the same
model with its adapter disabled (TRL would otherwise keep a copy of the fresh adapter as
"ref" and save it too). TRL's GRPO and RLOO trainers take no `ref_model`: `with_ref_model`
gives them one.

Prompts longer than `max_length - response_length` tokens (after the chat template) follow
`too_long`: dropped, or cut from the left so the end of the conversation (the question
just asked) stays. Evaluation: greedy completions of up to `eval_prompts` held-out prompts,
before and after, scored by the reward model (`eval_reward_before/after`, `eval_win_rate`,
as for DPO) and by `reward_fn` when given (`eval_reward_fn_before/after`).

Engine: `hf` samples with `generate` (CPU or GPU); `vllm` is TRL's vLLM (`use_vllm`): colocated in
the training process(es) by default, on a CUDA GPU or on vLLM's CPU build (where TRL's per-parameter
weight load fails and `align.rollouts.vllm_internals.sync_trl_colocate_on_cpu` loads them in one
reload), or with `vllm_mode: server` a running `trl vllm-serve` on other GPUs (`engine_settings`;
CUDA only: TRL sends the weights over NCCL).
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

from align.artifacts import StepLog, Timer
from align.config import GRPOStage, RLOOStage
from align.errors import AlignError
from align.rollouts import vllm_build
from align.models import apply_lora, drop_ref_adapter, load_model, load_tokenizer, reference_model
from align.stages.checks import check_groups, check_vllm
from align.stages.online import load_reward_fn, prompt_rows

log = logging.getLogger("align")


def run_grpo(stage: GRPOStage, name: str, out_dir: Path, model_path: str, reward_path: str | None = None) -> dict:
    checked = preflight(stage, name, reward_path)  # before TRL's slow import: a bad recipe fails in a second
    from trl import GRPOConfig, GRPOTrainer

    return _run(stage, name, out_dir, model_path, reward_path, checked, GRPOConfig, with_ref_model(GRPOTrainer),
                dict(loss_type=stage.loss_type, scale_rewards=stage.scale_rewards))


def run_rloo(stage: RLOOStage, name: str, out_dir: Path, model_path: str, reward_path: str | None = None) -> dict:
    checked = preflight(stage, name, reward_path)
    from trl import RLOOConfig, RLOOTrainer

    return _run(stage, name, out_dir, model_path, reward_path, checked, RLOOConfig, with_ref_model(RLOOTrainer), {})


def preflight(stage, name: str, reward_path: str | None) -> tuple[dict, object]:
    """(TRL's engine settings, the reward_fn or None). `align run` made these checks before the first stage;
    they run again here for a caller of this function alone (a test, a script)."""
    if stage.engine == "vllm":
        check_vllm(f"stages.{name}.engine", server=stage.vllm_mode == "server")
    check_groups(stage, f"stages.{name}")
    engine_args = engine_settings(stage)
    user_fn = load_reward_fn(stage.reward_fn, name) if stage.reward_fn else None
    if reward_path is None and user_fn is None:
        raise AlignError(f"stages.{name}: no reward: set 'reward_fn: module:function' or add a reward stage before it")
    return engine_args, user_fn


def _run(stage, name: str, out_dir: Path, model_path: str, reward_path: str | None, checked: tuple,
         config_cls, trainer_cls, method_args: dict) -> dict:
    from datasets import Dataset

    from align.policy_eval import BeforeAfter, periodic_eval_callback
    from align.training import AlignCallback, save_model, train_with_resume, trainer_args

    timer = Timer()
    engine_args, user_fn = checked
    tokenizer = load_tokenizer(model_path)
    train, held, too_long = prompt_rows(stage, name, tokenizer, out_dir)
    log.info("%s: %d training prompts, %d held out; %d completions per prompt", name, len(train), len(held),
             stage.num_generations)

    reward_funcs, scorer = [], None
    if reward_path:
        from reward.score import RewardScorer

        scorer = RewardScorer(reward_path)  # loaded once, reused by every step and the evaluation
        reward_funcs.append(CheckedReward("reward_model", scorer.score))
    if user_fn is not None:
        reward_funcs.append(CheckedReward(stage.reward_fn.rpartition(":")[2], user_fn))

    model = load_model(model_path)
    report = BeforeAfter(stage, name, held, out_dir, reward_path, scorer=scorer, reward_fn=user_fn,
                         start_path=model_path)
    report.before(model, tokenizer)
    ref_model = reference_model(model, stage.lora) if stage.beta > 0 else None
    if stage.lora:
        model = apply_lora(model, stage.lora)

    step_log = StepLog(out_dir / "log.jsonl")
    config = config_cls(
        **{**trainer_args(stage, out_dir, has_eval=False),  # held-out prompts: scored greedily by our callback
           # TRL counts prompt + completion tokens itself; transformers' own count finds no input_ids and warns per step
           "include_num_input_tokens_seen": "no"},
        num_generations=stage.num_generations,
        max_completion_length=stage.response_length,
        temperature=stage.temperature,
        top_p=stage.top_p,
        top_k=stage.top_k,
        beta=stage.beta,
        epsilon=stage.epsilon,
        disable_dropout=True,  # dropout would make the ratio and KL of identical weights differ from 1 and 0
        **method_args,
        **engine_args,
    )
    trainer = trainer_cls(model=model, ref_model=ref_model, reward_funcs=reward_funcs, args=config,
                          train_dataset=Dataset.from_list(train), processing_class=tokenizer,
                          callbacks=[AlignCallback(step_log),
                                     periodic_eval_callback(report, tokenizer, step_log, stage.eval_steps)])
    drop_ref_adapter(trainer.model)
    if stage.engine == "vllm" and vllm_build() == "cpu":
        from align.rollouts.vllm_internals import sync_trl_colocate_on_cpu

        sync_trl_colocate_on_cpu(trainer)

    metrics = train_with_resume(trainer, out_dir, step_log)
    save_model(trainer.model, tokenizer, out_dir / "model", stage.merge_lora, trainer=trainer)

    metrics.update(report.after(trainer.model, tokenizer))
    history = [r for r in trainer.state.log_history if isinstance(r.get("reward"), (int, float))]
    if history:
        metrics.update(train_reward_first=history[0]["reward"], train_reward_last=history[-1]["reward"])
    non_finite, scored = sum(f.non_finite for f in reward_funcs), sum(f.scored for f in reward_funcs)
    if non_finite:
        per_fn = ", ".join(f"{f.__name__}: {f.non_finite}" for f in reward_funcs)
        log.warning("%s: %d of %d rewards were NaN or infinite, left out (%s)", name, non_finite, scored, per_fn)
    metrics.update(train_prompts=len(train), eval_prompts_held_out=len(held), prompts_too_long=too_long,
                   reward_non_finite=non_finite, reward_scored=scored,
                   seconds=round(timer.seconds(), 1))
    return metrics


def with_ref_model(trainer_cls):
    """TRL's `GRPOTrainer` or `RLOOTrainer`, taking `ref_model=` as its DPO and KTO trainers do.

    TRL 1.16 gives these two no such argument: with full fine-tuning and beta > 0 they load their
    reference with `create_model_from_path(config._name_or_path)`, which after an adapter merge is the
    pre-SFT base, not the starting model. While the trainer is built, that one call hands back
    `ref_model`, so TRL prepares it as it would its own (dropout off, fused LM head, device)."""
    module = sys.modules[trainer_cls.__module__]

    class WithRefModel(trainer_cls):
        def __init__(self, *args, ref_model=None, **kwargs):
            if ref_model is None:
                super().__init__(*args, **kwargs)
                return
            load = module.create_model_from_path  # an upgrade that renames it fails here, not silently
            asked = []

            def the_reference(model_id, *_, **__):
                asked.append(model_id)
                return ref_model

            module.create_model_from_path = the_reference
            try:
                super().__init__(*args, **kwargs)
            finally:
                module.create_model_from_path = load
            if len(asked) != 1 or self.accelerator.unwrap_model(self.ref_model) is not ref_model:
                raise AlignError(f"TRL's {trainer_cls.__name__} no longer loads its reference through "
                                 f"create_model_from_path ({len(asked)} calls); align/stages/grpo.py must hand it "
                                 "the starting model another way")

    WithRefModel.__name__ = WithRefModel.__qualname__ = trainer_cls.__name__
    return WithRefModel


def engine_settings(stage) -> dict:
    """TRL's generation settings for `engine` and `vllm_mode` (checked by `align.stages.checks` before anything loads).

    colocate: vLLM inside each training process, sharing its GPU (`gpu_memory_utilization`), its context
    `max_length`, sharded over groups of `tensor_parallel_size` processes. server: a `trl vllm-serve` started
    beforehand, at `vllm_server_base_url` or else `vllm_server_host`:`vllm_server_port`, waited for up to
    `vllm_server_timeout` seconds; TRL sends it the new weights after each step, and the server's own flags set
    its GPUs, tensor parallelism and memory."""
    if stage.engine == "hf":
        return {}
    if stage.vllm_mode == "server":
        return dict(use_vllm=True, vllm_mode="server", vllm_server_base_url=stage.vllm_server_base_url,
                    vllm_server_host=stage.vllm_server_host, vllm_server_port=stage.vllm_server_port,
                    vllm_server_timeout=stage.vllm_server_timeout)
    return dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=stage.gpu_memory_utilization,
                vllm_tensor_parallel_size=stage.tensor_parallel_size, vllm_max_model_length=stage.max_length)


class CheckedReward:
    """A reward function as TRL calls it: completion texts in, one float (or None) per completion out.

    A NaN or infinite reward becomes None (TRL: not scored by this function) and is counted."""

    def __init__(self, name: str, score):
        self.__name__ = name  # TRL names the per-function metrics after it
        self.score = score
        self.scored = 0
        self.non_finite = 0

    def __call__(self, prompts, completions, log_metric=None, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards = list(self.score(prompts, texts))
        if len(rewards) != len(texts):
            raise AlignError(f"reward function '{self.__name__}' returned {len(rewards)} rewards for {len(texts)} "
                             "completions; expected one per completion")
        out = [_finite_or_none(r, self.__name__) for r in rewards]
        bad = out.count(None)
        self.scored += len(out)
        self.non_finite += bad
        if log_metric is not None:
            log_metric(f"rewards/{self.__name__}/non_finite", float(bad))
        if bad:
            log.warning("reward function '%s' gave %d NaN or infinite rewards out of %d; those completions are left "
                        "out of its score (%d so far)", self.__name__, bad, len(out), self.non_finite)
        return out


def _finite_or_none(value, fn_name: str) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise AlignError(f"reward function '{fn_name}' returned {value!r}; expected a number per completion") from None
    return value if math.isfinite(value) else None
