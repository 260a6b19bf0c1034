"""TRL 1.12.0's PPOTrainer on the bench's models and prompts; run by bench/ppo_step.py inside
.bench-venvs/trl112 (TRL removed PPO after 1.12.0, so the main venv cannot run it).

    .bench-venvs/trl112/bin/python bench/trl112/run_ppo.py SETTINGS.json RESULT.json

Builds what TRL's own PPO example builds: policy and frozen reference from the policy folder,
value model and reward model from the reward folder (1-output sequence classifiers). Batch
sizes map onto ours as: rollout batch = per_device_train_batch_size (gradient accumulation 1),
mini-batch = rollout batch / num_mini_batches, so every mini-batch is one forward, one backward
and one optimizer step, as in ours. Per-update wall time is taken between TRL's on_step_end
callbacks (one per PPO update: rollouts, GAE, all PPO epochs, TRL's logging and cache clearing).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main(settings_path: str, result_path: str) -> None:
    s = json.loads(open(settings_path).read())
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(s["seed"])
    tok = AutoTokenizer.from_pretrained(s["model"])
    tok.padding_side = "left"  # TRL's generate() appends after the last column: prompts must be left-padded
    # The token ids align's engine samples from (its chat template, rendered by bench/ppo_step.py).
    ids = json.loads(open(s["prompt_ids"]).read())
    train = Dataset.from_dict({"input_ids": ids})

    policy = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32)
    peft_config = None
    if s.get("lora_r"):  # TRL's LoRA: the policy's adapter, reference = adapter disabled; the value model trains in full
        from peft import LoraConfig

        peft_config = LoraConfig(r=s["lora_r"], lora_alpha=2 * s["lora_r"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    ref_policy = None if peft_config else AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32)
    value_model = AutoModelForSequenceClassification.from_pretrained(s["reward"], num_labels=1, dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(s["reward"], num_labels=1, dtype=torch.float32)
    for m in (value_model, reward_model):
        m.config.pad_token_id = tok.pad_token_id

    R, M = s["rollout_batch_size"], s["mini_batch_size"]
    config = PPOConfig(
        output_dir=s["out"], report_to=[], save_strategy="no", eval_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=s["seed"], bf16=False, fp16=False,
        gradient_checkpointing=False,  # TRL's default is True; ours is off, so both run the same computation
        learning_rate=s["lr"], lr_scheduler_type="constant",
        per_device_train_batch_size=R, gradient_accumulation_steps=1, num_mini_batches=R // M,
        local_rollout_forward_batch_size=R, num_ppo_epochs=s["ppo_epochs"], response_length=s["response_length"],
        total_episodes=s["updates"] * R, stop_token="eos", temperature=s["temperature"],
        missing_eos_penalty=s["missing_eos_penalty"], kl_coef=s["kl_coef"], kl_estimator=s["kl_estimator"],
        vf_coef=s["vf_coef"], cliprange=s["clip_eps"], cliprange_value=s["clip_eps"], gamma=1.0, lam=0.95,
        num_sample_generations=0, max_grad_norm=s["max_grad_norm"],
    )
    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, value_model=value_model, train_dataset=train,
                         peft_config=peft_config)

    class UpdateClock(TrainerCallback):
        def __init__(self):
            self.marks, self.logs = [], []

        def on_train_begin(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

    clock = UpdateClock()
    trainer.add_callback(clock)
    # Time spent in generation and in TRL's two gc.collect() calls per update (both looked up at call time,
    # so wrapping them changes nothing else), summed over the same intervals as step_seconds.
    import gc

    from trl.experimental.ppo import ppo_trainer as ppo_module

    spent = {"gen": 0.0, "gc": 0.0}
    per_update = {"gen": [], "gc": []}

    def timed(key, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    ppo_module.batch_generation = timed("gen", ppo_module.batch_generation)
    ppo_module.gc = type("gc", (), {"collect": staticmethod(timed("gc", gc.collect))})
    original_on_step_end = clock.on_step_end

    def on_step_end(*a, **k):
        original_on_step_end(*a, **k)
        per_update["gen"].append(spent["gen"])
        per_update["gc"].append(spent["gc"])
        spent["gen"] = spent["gc"] = 0.0

    clock.on_step_end = on_step_end
    trainer.train()
    step_seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    rows = [r for r in clock.logs if "objective/scores" in r]
    result = {
        "step_seconds": step_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gen_seconds": per_update["gen"],
        "gc_seconds": per_update["gc"],
        "scores": [r["objective/scores"] for r in rows],
        "kl": [r["objective/kl"] for r in rows],
        "num_eos_tokens": [r["val/num_eos_tokens"] for r in rows],
        "torch_threads": torch.get_num_threads(),
        "versions": {"trl": __import__("trl").__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
