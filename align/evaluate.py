"""`align eval`: a policy against a baseline on the same prompts, judged by a reward model.

Both models answer every prompt greedily; the reward model scores both answers (text, so
its tokenizer may differ from the policies'). Reported: mean reward of each, the policy's
win rate (ties count half), mean answer lengths in words and tokens, and KL(policy ||
baseline), estimated from completions sampled from the policy at temperature 1 as the mean
over sequences of Σ_t (log π - log π_base) (the k1 estimator, summed per sequence). KL
needs both models to share a tokenizer; when they do not, it is reported as null.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import torch

from align.artifacts import write_json, write_text
from align.data import unique_prompts, load_rows
from align.errors import AlignError
from align.forgetting import perplexity, read_texts
from align.hacking import answer_signals, bootstrap_ci, lc_win_rate, sequence_kl, verdict
from align.generate import greedy_answers
from align.models import load_model, load_tokenizer, resolve_model
from align.policy_eval import make_judges

log = logging.getLogger("align")


def evaluate(policy_spec: str, baseline_spec: str, reward_spec: str, prompts_path: str, max_prompts: int = 64,
             max_new_tokens: int = 64, seed: int = 0, judges: list = (),
             forgetting_texts: list[str] | None = None) -> tuple[dict, list[dict]]:
    from reward.score import RewardScorer

    prompts = unique_prompts(load_rows(prompts_path, "prompts").rows, max_prompts)
    paths = {"policy": resolve_model(policy_spec), "baseline": resolve_model(baseline_spec)}
    reward_path = resolve_model(reward_spec)
    if not (Path(reward_path) / "config.json").exists():
        raise AlignError(f"{reward_spec}: expected a reward model folder (the `model/` of a reward stage)")
    texts, finished, models, tokenizers = {}, {}, {}, {}
    for name, path in paths.items():
        tokenizers[name] = load_tokenizer(path)
        models[name] = load_model(path).to("cuda" if torch.cuda.is_available() else "cpu")  # bf16 only on GPU
        log.info("%s (%s): greedy answers to %d prompts", name, path, len(prompts))
        answers = greedy_answers(models[name], tokenizers[name], prompts, max_new_tokens=max_new_tokens)
        texts[name], finished[name] = [a.text for a in answers], [a.finished for a in answers]
    scorer = RewardScorer(reward_path)
    rewards = {name: scorer.score(prompts, texts[name]) for name in paths}
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards["policy"], rewards["baseline"])]
    same_vocab = tokenizers["policy"].get_vocab() == tokenizers["baseline"].get_vocab()
    kl = None
    if same_vocab:
        kl = sequence_kl(models["policy"], models["baseline"], tokenizers["policy"], prompts, max_new_tokens, seed)
    else:
        log.warning("policy and baseline tokenizers differ: KL is not reported")

    def tokens(name):
        return statistics.fmean(len(tokenizers[name](t, add_special_tokens=False)["input_ids"]) for t in texts[name])

    report = {
        "prompts": len(prompts),
        "reward_policy": statistics.fmean(rewards["policy"]),
        "reward_baseline": statistics.fmean(rewards["baseline"]),
        "win_rate": statistics.fmean(wins),
        "kl": kl,
        "words_policy": statistics.fmean(len(t.split()) for t in texts["policy"]),
        "words_baseline": statistics.fmean(len(t.split()) for t in texts["baseline"]),
        "tokens_policy": tokens("policy"),
        "tokens_baseline": tokens("baseline"),
        "policy": policy_spec, "baseline": baseline_spec, "reward_model": reward_spec,
    }
    report.update(signals(prompts, texts, models["baseline"], tokenizers["baseline"], wins, judges, finished))
    for name in paths if forgetting_texts else ():  # the models already loaded, on general text
        report[f"forgetting_ppl_{name}"] = perplexity(models[name], tokenizers[name], forgetting_texts)
    samples = [{"prompt": p, "policy": a, "baseline": b, "reward_policy": ra, "reward_baseline": rb}
               for p, a, b, ra, rb in zip(prompts, texts["policy"], texts["baseline"], rewards["policy"],
                                          rewards["baseline"])]
    return report, samples


def signals(prompts, texts: dict, reference, ref_tokenizer, wins: list[float], judges: list,
            finished: dict) -> dict:
    """What tells a real gain from a hacked one (align.hacking), the baseline taken as the reference: the win
    rate's bootstrap interval, the length-controlled win rate, and per side the judges' reward, the baseline's
    NLL of the answers, distinct-2 and repetition; the verdict reads baseline = before, policy = after."""
    words = {k: [len(t.split()) for t in v] for k, v in texts.items()}
    out = {"win_rate_ci": bootstrap_ci(wins), "lc_win_rate": lc_win_rate(wins, words["policy"], words["baseline"])}
    for side in ("policy", "baseline"):
        for key, value in answer_signals(prompts, texts[side], reference, ref_tokenizer, judges,
                                              finished[side]).items():
            out[f"{key}_{side}"] = value
    return out


def verdict_of(report: dict) -> tuple[bool, list[str]]:
    named = {f"eval_{key}_{when}": report.get(f"{key}_{side}") for key in ("reward", "judge_reward", "ref_nll",
                                                                           "distinct2")
             for when, side in (("before", "baseline"), ("after", "policy"))}
    return verdict(named)


def number(value: float | None) -> str:
    """A signal for the terminal; None (every answer empty: no tokens to take an NLL or distinct-2 of) is n/a."""
    return "n/a" if value is None else f"{value:.3f}"


def run_eval(args) -> int:
    texts = read_texts(args.forgetting_data, "--forgetting-data") if args.forgetting_data else None
    judges = make_judges(resolve_model(args.judge) if args.judge else None, args.judge_fn, "--judge-fn")
    report, samples = evaluate(args.policy, args.baseline, args.reward_model, args.prompts, args.max_prompts,
                               args.max_new_tokens, args.seed, judges=judges, forgetting_texts=texts)
    report["hacking_suspected"], report["hacking_reasons"] = verdict_of(report)
    if args.out:
        write_json(args.out, report)
    if args.samples:
        write_text(args.samples, "".join(json.dumps(s) + "\n" for s in samples))
    kl = "n/a (tokenizers differ)" if report["kl"] is None else f"{report['kl']:.3f}"
    print(f"prompts            {report['prompts']}\n"
          f"mean reward        policy {report['reward_policy']:.3f}   baseline {report['reward_baseline']:.3f}\n"
          f"win rate           {report['win_rate']:.3f}  (policy over baseline, ties count half)\n"
          f"KL(policy||base)   {kl}  (nats per answer)\n"
          f"answer length      policy {report['words_policy']:.1f} words / {report['tokens_policy']:.1f} tokens   "
          f"baseline {report['words_baseline']:.1f} / {report['tokens_baseline']:.1f}")
    lo, hi = report["win_rate_ci"]
    print(f"win rate 95% CI    {lo:.3f} - {hi:.3f}   length-controlled {number(report['lc_win_rate'])}\n"
          f"ref NLL (nats/tok) policy {number(report['ref_nll_policy'])}   "
          f"baseline {number(report['ref_nll_baseline'])}  (under the baseline)\n"
          f"distinct-2         policy {number(report['distinct2_policy'])}   "
          f"baseline {number(report['distinct2_baseline'])}\n"
          f"EOS rate           policy {number(report['eos_rate_policy'])}   "
          f"baseline {number(report['eos_rate_baseline'])}  (answers that ended within --max-new-tokens)")
    if "judge_reward_policy" in report:
        print(f"judge reward       policy {number(report['judge_reward_policy'])}   "
              f"baseline {number(report['judge_reward_baseline'])}")
    print("hacking suspected: " + ("; ".join(report["hacking_reasons"]) if report["hacking_suspected"] else "no"))
    if texts:
        print(f"general-text ppl   policy {report['forgetting_ppl_policy']:.3f}   "
              f"baseline {report['forgetting_ppl_baseline']:.3f}  ({len(texts)} texts; higher: more forgotten)")
    return 0
