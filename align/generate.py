"""Greedy completions for evaluation and the demo: the HF rollout engine at temperature 0.

One generation path: the stages' before/after reports, `align eval` and PPO's periodic
evaluation all answer through `align.rollouts.hf.HFEngine` (left padding, KV cache, prompts
sorted by length, rows stopped at EOS), the same code that samples PPO's rollouts.
"""

from __future__ import annotations

from align.rollouts import Sampling
from align.rollouts.hf import HFEngine


def greedy_completions(model, tokenizer, prompts: list[str | list[dict]], max_new_tokens: int = 64,
                       batch_size: int = 8) -> list[str]:
    """One greedy completion per prompt (a string is a single user turn), rendered with the chat template."""
    engine = HFEngine(model, tokenizer, batch_size=batch_size)  # no bar: a stage shows one, its own
    groups = engine.generate(prompts, n=1, sampling=Sampling(max_new_tokens=max_new_tokens, temperature=0.0))
    return [group[0].text for group in groups]
