"""Scoring a policy stage with the recipe's reward model: before, after, and win rate.

Before training, the starting policy writes greedy completions for up to `eval_prompts`
held-out prompts; after training, the trained policy does the same; the reward model
scores both. `metrics.json` gets `eval_reward_before`, `eval_reward_after` and
`eval_win_rate` (share of prompts where the trained completion scores higher, ties
counted half), and `samples.jsonl` keeps every prompt, completion and score.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

from align.artifacts import read_json, write_json, write_text
from align.distributed import decide
from align.hacking import answer_signals, bootstrap_ci, lc_win_rate, mean_finite, sequence_kl, verdict
from align.generate import greedy_answers

log = logging.getLogger("align")


def completions_before(model, tokenizer, prompts: list, out_dir: Path, max_new_tokens: int) -> list:
    """Greedy answers (`Completion`s, or saved `{"text", "finished"}` records) of the starting policy, saved so
    a resumed run reuses them."""
    path = out_dir / "eval_completions_before.json"
    saved = decide(lambda: read_json(path))  # several processes: each answers every prompt; rank 0 writes
    if isinstance(saved, dict) and len(saved.get("texts", ())) == len(prompts):
        return [SimpleNamespace(text=t, finished=f) for t, f in zip(saved["texts"], saved["finished"])]
    log.info("scoring set: greedy completions of %d held-out prompts from the starting policy", len(prompts))
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    write_json(path, {"texts": [a.text for a in answers], "finished": [a.finished for a in answers]})
    return answers


def reward_report(reward_path: str, prompts: list, before: list[str], after: list[str], out_dir: Path,
                  scorer=None) -> dict:
    """`scorer`: a `RewardScorer` of `reward_path` the stage already holds (else one is loaded)."""
    from reward.score import RewardScorer

    scorer = scorer or RewardScorer(reward_path)
    r_before = scorer.score(prompts, before)
    r_after = scorer.score(prompts, after)
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(r_after, r_before)]
    len_before, len_after = [len(b.split()) for b in before], [len(a.split()) for a in after]
    rows = [{"prompt": p, "before": b, "after": a, "reward_before": rb, "reward_after": ra}
            for p, b, a, rb, ra in zip(prompts, before, after, r_before, r_after)]
    write_text(out_dir / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    n = len(prompts)
    return {
        "eval_reward_before": sum(r_before) / n,
        "eval_reward_after": sum(r_after) / n,
        "eval_win_rate": sum(wins) / n,
        "eval_win_rate_ci": bootstrap_ci(wins),
        "eval_lc_win_rate": lc_win_rate(wins, len_after, len_before),
        "eval_len_before": sum(len_before) / n,
        "eval_len_after": sum(len_after) / n,
        "eval_prompts": n,
    }


class BeforeAfter:
    """The before/after report of a policy stage, in one place for DPO, KTO, PPO, GRPO and RLOO.

        report = BeforeAfter(stage, name, held_rows, out_dir, reward_path)
        report.before(model, tokenizer)            # the starting policy, before any update
        ...train...
        metrics.update(report.after(model, tokenizer))

    Greedy answers to up to `stage.eval_prompts` distinct held-out prompts, scored by the recipe's
    reward model (`scorer`: one the stage already holds) and, when given, by `reward_fn`."""

    def __init__(self, stage, name: str, held_rows: list[dict], out_dir: Path, reward_path: str | None,
                 scorer=None, reward_fn=None, start_path: str | None = None):
        from align.data import unique_prompts

        self.prompts = unique_prompts(held_rows, stage.eval_prompts)
        self.max_new_tokens = stage.max_new_tokens
        self.out_dir, self.reward_path, self.scorer, self.reward_fn = out_dir, reward_path, scorer, reward_fn
        self.start_path = start_path  # the model the stage started from: the reference of `eval_ref_nll_*`
        self.judges = make_judges(getattr(stage, "judge", None), getattr(stage, "judge_fn", None),
                                  f"stages.{name}.judge_fn")
        self.active = bool(self.prompts) and (reward_path is not None or reward_fn is not None)
        self.before_answers: list | None = None
        self.seed = stage.seed or 0
        if not self.prompts and (reward_path or reward_fn) and stage.eval_prompts > 0:
            log.warning("%s: no held-out prompts, so no before/after reward evaluation (set eval_fraction > 0 or "
                        "give eval_data)", name)

    def before(self, model, tokenizer) -> None:
        if self.active:
            self.before_answers = completions_before(model, tokenizer, self.prompts, self.out_dir,
                                                     self.max_new_tokens)

    def after(self, model, tokenizer, answers: list | None = None) -> dict:
        """The report's metrics; `answers`: the trained policy's greedy answers (`Completion`s) when the stage
        already has them."""
        if not self.active or self.before_answers is None:
            return {}
        if answers is None:
            answers = greedy_answers(model, tokenizer, self.prompts, max_new_tokens=self.max_new_tokens)
        before, after = [a.text for a in self.before_answers], [a.text for a in answers]
        metrics = {}
        if self.reward_path:
            metrics.update(reward_report(self.reward_path, self.prompts, before, after, self.out_dir,
                                         scorer=self.scorer))
        if self.reward_fn is not None:
            metrics["eval_reward_fn_before"] = mean_finite(self.reward_fn(self.prompts, before))
            metrics["eval_reward_fn_after"] = mean_finite(self.reward_fn(self.prompts, after))
        metrics.update(self.hacking_signals(model, tokenizer, answers))
        suspected, reasons = verdict(metrics)
        metrics.update(hacking_suspected=suspected, hacking_reasons=reasons)
        if suspected:
            log.warning("hacking suspected: %s", "; ".join(reasons))
        return metrics

    def hacking_signals(self, model, tokenizer, answers: list) -> dict:
        """Judge reward, the starting model's NLL of the answers, distinct-2, repetition and EOS rate, before and
        after; `eval_kl`: KL(trained || starting model) from answers sampled at temperature 1."""
        reference = None
        if self.start_path:
            from align.models import load_model

            reference = load_model(self.start_path).to(next(model.parameters()).device)
        out = {f"eval_{key}_{label}": value
               for label, side in (("before", self.before_answers), ("after", answers))
               for key, value in answer_signals(self.prompts, [a.text for a in side], reference, tokenizer,
                                                self.judges, [a.finished for a in side]).items()}
        if reference is not None:
            out["eval_kl"] = sequence_kl(model, reference, tokenizer, self.prompts, self.max_new_tokens, self.seed)
        return out

    def held_out_rewards(self, model, tokenizer) -> tuple[dict, list]:
        """Mean reward of the policy's greedy answers now (`eval_reward` from the reward model, `eval_reward_fn`),
        and the answers (a stage evaluating at its last step passes them to `after`)."""
        answers = greedy_answers(model, tokenizer, self.prompts, max_new_tokens=self.max_new_tokens)
        texts = [a.text for a in answers]
        out = {}
        if self.reward_path:
            from reward.score import RewardScorer

            self.scorer = self.scorer or RewardScorer(self.reward_path)
            out["eval_reward"] = mean_finite(self.scorer.score(self.prompts, texts))
        if self.reward_fn is not None:
            out["eval_reward_fn"] = mean_finite(self.reward_fn(self.prompts, texts))
        return out, answers


def make_judges(judge: str | None, judge_fn: str | None, fn_key: str) -> list:
    """The independent judges as functions `f(prompts, completions) -> list[float]`: a reward model folder's
    scorer and/or a `module:function` (`fn_key` names it in errors)."""
    judges = []
    if judge:
        from reward.score import RewardScorer

        judges.append(RewardScorer(judge).score)
    if judge_fn:
        from align.stages.online import load_reward_fn

        judges.append(load_reward_fn(judge_fn, "", key=fn_key))
    return judges


def periodic_eval_callback(report: BeforeAfter, tokenizer, step_log, every: int):
    """A TRL/transformers callback adding `held_out_rewards` to `log.jsonl` every `every` optimizer steps
    (online stages over TRL, whose trainers have no held-out set of their own: `eval_steps`)."""
    from transformers import TrainerCallback

    class PeriodicEval(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if report.active and every > 0 and state.global_step % every == 0:
                step_log.append({"step": state.global_step, **report.held_out_rewards(model, tokenizer)[0]})

    return PeriodicEval()
