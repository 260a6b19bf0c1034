"""Greedy completions for evaluation and the demo: the HF rollout engine at temperature 0.

One generation path: the stages' before/after reports, `align eval` and PPO's periodic
evaluation all answer through `align.rollouts.hf.HFEngine` (left padding, KV cache, prompts
sorted by length, rows stopped at EOS), the same code that samples PPO's rollouts.
"""

from __future__ import annotations

from align.rollouts import Completion, Sampling
from align.rollouts.hf import HFEngine


def greedy_answers(model, tokenizer, prompts: list[str | list[dict]], max_new_tokens: int = 64,
                   batch_size: int = 8) -> list[Completion]:
    """One greedy completion per prompt (a string is a single user turn), rendered with the chat template;
    `Completion.finished` says whether it reached EOS within `max_new_tokens`."""
    engine = HFEngine(model, tokenizer, batch_size=batch_size)  # no bar: a stage shows one, its own
    groups = engine.generate(prompts, n=1, sampling=Sampling(max_new_tokens=max_new_tokens, temperature=0.0))
    return [group[0] for group in groups]


def greedy_completions(model, tokenizer, prompts: list[str | list[dict]], max_new_tokens: int = 64,
                       batch_size: int = 8) -> list[str]:
    """The text of `greedy_answers`."""
    return [c.text for c in greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)]
