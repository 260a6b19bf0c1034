"""The reward/KL frontier of controlled sentiment, the idea of the DPO paper's Figure 2 (Rafailov et al.
2023) at tiny scale, through align's own stages.

    python bench/frontier.py                      # ~5.5 min on 2 CPU cores: 5 betas, 6 kl_coefs
    python bench/frontier.py --quick              # ~35 s: two settings each, fewer steps (the test runs it)
    python bench/frontier.py --betas 0.1 1 --kl-coefs 0.02 0.5 --ppo-steps 60 --out /tmp/frontier

The data are `python recipes/data/make_sentiment_data.py`'s (deterministic, committed).

One run, seeded, no download:

1. SFT of the tiny model (`model: tiny`, a 2-layer random Llama) on `recipes/data/sentiment_sft.jsonl`:
   requests for a movie review, answered by positive, negative, neutral and mixed reviews alike.
2. Two answers per prompt sampled from the SFT policy (temperature 1) and labelled by the judge,
   `align.judges.sentiment` (VADER compound in [-1, 1]): the happier answer is chosen, ties are dropped.
   Written to `<out>/pairs.jsonl` as {"prompt", "chosen", "rejected"}.
3. A reward model (the proxy) trained on those pairs (`reward` stage).
4. DPO from the SFT model on the same judge-labelled pairs at each β, and align's PPO against the proxy
   at each `kl_coef`: one recipe, `<out>/frontier.yaml`, run by `align.runner.run_recipe`. A rerun into
   the same `--out` skips the stages already complete with the same inputs.
5. Every policy (and the SFT model) measured on the held-out prompts of
   `recipes/data/sentiment_eval_prompts.jsonl` (titles training never saw): the judge's mean score of
   answers sampled at temperature 1 (and of greedy answers), the proxy's mean score of the same samples,
   and KL(policy || SFT) from samples (`align.hacking.sequence_kl`, nats per answer).
6. `bench/results/frontier.json` (every point) and `docs/frontier.png`: left, judge reward against KL
   (the frontier; DPO and PPO, labelled by β / kl_coef, SFT at KL 0); right, proxy reward against judge
   reward (over-optimisation shows as proxy rising while judge does not). A table and a one-line finding
   are printed.

`--json` and `--png` move the two outputs (the test writes them into its tmp folder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "recipes" / "data"
SFT_DATA, PROMPTS, EVAL_PROMPTS = (DATA / "sentiment_sft.jsonl", DATA / "sentiment_prompts.jsonl",
                                   DATA / "sentiment_eval_prompts.jsonl")
BETAS, KL_COEFS = (0.05, 0.1, 0.3, 1.0, 3.0), (0.001, 0.01, 0.05, 0.2, 0.5, 1.0)
QUICK_BETAS, QUICK_KL_COEFS = (0.1, 1.0), (0.01, 0.5)
MAX_NEW = 40  # most answer tokens when sampling (SFT answers: 34 tokens at most with the stop token, ~21 on average)


@dataclass
class Plan:
    """The knobs --quick shrinks."""

    sft_epochs: float = 12
    pair_prompts: int = 736  # prompts sampled twice for pairs: PPO prompts, then SFT prompts
    rm_epochs: float = 3
    dpo_epochs: float = 3
    dpo_lr: float = 5e-4
    ppo_steps: int = 120
    eval_prompts: int = 64
    samples: int = 8  # sampled answers per held-out prompt for the judge and the proxy
    kl_samples: int = 8  # sampled answers per held-out prompt for the KL estimate


QUICK = Plan(sft_epochs=8, pair_prompts=256, rm_epochs=2, dpo_epochs=2, ppo_steps=16, eval_prompts=32, samples=2,
             kl_samples=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "frontier",
                   help="work folder: recipes, pairs and every stage's output (default: runs/frontier)")
    p.add_argument("--quick", action="store_true", help="fewest settings and steps: a smoke test (~35 s)")
    p.add_argument("--betas", type=float, nargs="+", help=f"DPO betas (default {BETAS}; quick {QUICK_BETAS})")
    p.add_argument("--kl-coefs", type=float, nargs="+",
                   help=f"PPO kl_coef values (default {KL_COEFS}; quick {QUICK_KL_COEFS})")
    p.add_argument("--ppo-steps", type=int, help="PPO steps per kl_coef (default: the plan's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine two threads per process made "
                        "steps 10-20x slower)")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "frontier.json",
                   help="where the points go (default bench/results/frontier.json)")
    p.add_argument("--png", type=Path, default=REPO / "docs" / "frontier.png",
                   help="where the figure goes (default docs/frontier.png)")
    args = p.parse_args(argv)
    args.plan = replace(QUICK if args.quick else Plan(), **({"ppo_steps": args.ppo_steps} if args.ppo_steps else {}))
    args.betas = args.betas or (QUICK_BETAS if args.quick else BETAS)
    args.kl_coefs = args.kl_coefs or (QUICK_KL_COEFS if args.quick else KL_COEFS)
    return args


def read_prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


# ---- recipes ---------------------------------------------------------------------------------------------------

def sft_section(plan: Plan) -> dict:
    return dict(model="tiny", data=str(SFT_DATA), eval_fraction=0.1, max_length=96, lr=3e-3, epochs=plan.sft_epochs,
                batch_size=16, warmup_ratio=0.05, lr_scheduler="cosine", eval_steps=0, save_steps=1000,
                logging_steps=10)


def reward_section(plan: Plan, pairs: Path) -> dict:
    return dict(model="${sft}", data=str(pairs), eval_fraction=0.1, max_length=96, lr=1e-3, epochs=plan.rm_epochs,
                batch_size=16, eval_steps=0, save_steps=1000, logging_steps=10)


def dpo_section(plan: Plan, pairs: Path, beta: float) -> dict:
    """Plain sigmoid DPO (no NLL term), as in the paper; no stage-side evaluation (the bench measures)."""
    return dict(type="dpo", model="${sft}", data=str(pairs), eval_fraction=0.1, max_length=96, beta=beta,
                loss_type="sigmoid", lr=plan.dpo_lr, epochs=plan.dpo_epochs, batch_size=16, eval_steps=0,
                save_steps=1000, logging_steps=10, eval_prompts=0)


def ppo_section(plan: Plan, kl_coef: float) -> dict:
    """PPO against the proxy (the `reward` stage), value model from the proxy's weights."""
    return dict(type="ppo", model="${sft}", data=str(PROMPTS), eval_fraction=0.0, max_length=96,
                response_length=MAX_NEW, rollout_batch_size=32, batch_size=16, ppo_epochs=4,
                max_steps=plan.ppo_steps, lr=5e-4, lr_scheduler="constant", kl_coef=kl_coef, kl_estimator="k1",
                missing_eos_penalty=1.0, value_model="reward", save_steps=1000, logging_steps=1, eval_prompts=0,
                reward_model="${reward}")


def stage_names(betas, kl_coefs) -> tuple[dict, dict]:
    return {b: f"dpo_beta{b:g}" for b in betas}, {k: f"ppo_kl{k:g}" for k in kl_coefs}


def write_recipe(path: Path, out: Path, stages: dict, seed: int) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"output_dir": str(out), "seed": seed, "stages": stages}, sort_keys=False))
    return path


def run(recipe: Path) -> dict:
    from align.runner import run_recipe
    from align.stages import load_recipe

    return run_recipe(load_recipe(recipe))


# ---- judge-labelled pairs --------------------------------------------------------------------------------------

def label_pairs(model_dir: Path, prompts: list[str], seed: int, out: Path) -> dict:
    """Two answers per prompt from the SFT policy at temperature 1; the judge picks chosen and rejected, ties (and
    identical answers) dropped. Writes `out` and returns counts and the mean judge score of each side."""
    from align.judges import sentiment
    from align.models import load_model, load_tokenizer
    from align.rollouts import Sampling, make_engine

    tokenizer, model = load_tokenizer(str(model_dir)), load_model(str(model_dir))
    groups = make_engine("hf", model, tokenizer, batch_size=64).generate(
        prompts, n=2, sampling=Sampling(max_new_tokens=MAX_NEW, seed=seed))
    rows, chosen_scores, rejected_scores = [], [], []
    for prompt, (a, b) in zip(prompts, groups):
        sa, sb = sentiment([prompt, prompt], [a.text, b.text])
        if sa == sb or a.text.strip() == b.text.strip() or not a.text.strip() or not b.text.strip():
            continue
        (hi, shi), (lo, slo) = sorted([(a.text, sa), (b.text, sb)], key=lambda t: -t[1])
        rows.append({"prompt": prompt, "chosen": hi, "rejected": lo})
        chosen_scores.append(shi)
        rejected_scores.append(slo)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"prompts": len(prompts), "pairs": len(rows), "ties_dropped": len(prompts) - len(rows),  # or identical
            "chosen_judge_mean": statistics.mean(chosen_scores),
            "rejected_judge_mean": statistics.mean(rejected_scores)}


# ---- measuring a policy ----------------------------------------------------------------------------------------

def measure(model_dir: Path, reference, tokenizer, scorer, prompts: list[str], plan: Plan, seed: int) -> dict:
    """Judge (sampled and greedy) and proxy reward on held-out prompts, and KL(policy || SFT) from samples."""
    from align.hacking import distinct_n, sequence_kl
    from align.judges import sentiment
    from align.models import load_model
    from align.rollouts import Sampling, make_engine

    policy = load_model(str(model_dir)).eval()
    engine = make_engine("hf", policy, tokenizer, batch_size=64)
    sampled = engine.generate(prompts, n=plan.samples, sampling=Sampling(max_new_tokens=MAX_NEW, seed=seed + 1))
    flat_prompts = [p for p, g in zip(prompts, sampled) for _ in g]
    texts = [c.text for g in sampled for c in g]
    judged = sentiment(flat_prompts, texts)
    greedy = [g[0].text for g in engine.generate(prompts, n=1, sampling=Sampling(max_new_tokens=MAX_NEW,
                                                                                temperature=0.0))]
    kl = sequence_kl(policy, reference, tokenizer, prompts * plan.kl_samples, MAX_NEW, seed + 2)
    return {
        "kl": kl,
        "judge": statistics.mean(judged),
        "judge_se": statistics.stdev(judged) / math.sqrt(len(judged)),
        "judge_greedy": statistics.mean(sentiment(prompts, greedy)),
        "proxy": statistics.mean(scorer.score(flat_prompts, texts)),
        "proxy_greedy": statistics.mean(scorer.score(prompts, greedy)),
        "eos_rate": sum(c.finished for g in sampled for c in g) / len(texts),
        "distinct2": distinct_n(texts),
        "example": greedy[0],
    }


def measure_all(out: Path, points: list[dict], plan: Plan, seed: int) -> None:
    """Fills in each point's numbers in place; every policy against the same SFT reference and prompts."""
    from align.models import load_model, load_tokenizer
    from reward.score import RewardScorer

    sft = out / "sft" / "model"
    tokenizer, reference = load_tokenizer(str(sft)), load_model(str(sft)).eval()
    scorer = RewardScorer(out / "reward" / "model", device="cpu")
    prompts = read_prompts(EVAL_PROMPTS)[:plan.eval_prompts]
    for point in points:
        t0 = time.perf_counter()
        point.update(measure(out / point["stage"] / "model", reference, tokenizer, scorer, prompts, plan, seed))
        point["measure_s"] = round(time.perf_counter() - t0, 1)


# ---- the figure, the table, the finding ------------------------------------------------------------------------

def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"sft": ("*", "black", 14), "dpo": ("o", "tab:blue", 8), "ppo": ("s", "tab:red", 8)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for method, (marker, color, size) in style.items():
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["kl"])
        if not pts:
            continue
        label = {"sft": "SFT", "dpo": "DPO (β)", "ppo": "PPO vs proxy (kl_coef)"}[method]
        for ax, x, y in ((left, "kl", "judge"), (right, "judge", "proxy")):
            ax.plot([p[x] for p in pts], [p[y] for p in pts], marker=marker, color=color, ms=size,
                    ls="-" if method != "sft" else "", alpha=0.85, label=label)
            for i, p in enumerate(pts):
                if p["setting"] is not None:  # alternate above and below, so neighbours do not overlap
                    ax.annotate(f"{p['setting']:g}", (p[x], p[y]), textcoords="offset points",
                                xytext=(5, 4 if i % 2 == 0 else -11), fontsize=8, color=color)
    left.set(xlabel="KL(policy || SFT), nats per answer (from samples)", ylabel="judge reward (VADER, sampled)",
             title="Reward / KL frontier (held-out prompts)")
    right.set(xlabel="judge reward (VADER, sampled)", ylabel="proxy reward (reward model, same samples)",
              title="Proxy vs judge (over-optimisation)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(points: list[dict]) -> str:
    head = f"{'policy':<14}{'KL':>8}{'judge':>8}{'greedy':>8}{'proxy':>8}{'eos':>6}{'dist2':>7}  greedy answer"
    lines = [head, "-" * len(head)]
    for p in points:
        lines.append(f"{p['stage']:<14}{p['kl']:>8.2f}{p['judge']:>8.3f}{p['judge_greedy']:>8.3f}{p['proxy']:>8.2f}"
                     f"{p['eos_rate']:>6.2f}{p['distinct2'] or 0:>7.2f}  {p['example'][:60]!r}")
    return "\n".join(lines)


MIN_DROP = 0.02  # a judge drop smaller than this is called flat, however many samples make it significant


def significant_drop(hi: dict, lo: dict) -> bool:
    """`lo`'s judge is below `hi`'s by more than MIN_DROP and two standard errors of the difference."""
    gap = hi["judge"] - lo["judge"]
    return gap > MIN_DROP and gap > 2 * math.hypot(hi["judge_se"], lo["judge_se"])


def finding(points: list[dict]) -> str:
    sft = next(p for p in points if p["method"] == "sft")
    parts = [f"SFT judge {sft['judge']:+.2f}"]
    for method, knob in (("dpo", "beta"), ("ppo", "kl_coef")):
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["kl"])
        if not pts:
            continue
        best, last = max(pts, key=lambda p: p["judge"]), pts[-1]
        text = (f"{method.upper()} {pts[0]['judge']:+.2f} at KL {pts[0]['kl']:.1f} -> best {best['judge']:+.2f} at "
                f"KL {best['kl']:.1f} ({knob} {best['setting']:g})")
        if last is not best:
            text += (f", then {'down' if significant_drop(best, last) else 'flat'} at "
                     f"{last['judge']:+.2f} by KL {last['kl']:.1f}")
        parts.append(text)
    ppo = [p for p in points if p["method"] == "ppo"]
    if len(ppo) > 1:
        top_proxy, top_judge = max(ppo, key=lambda p: p["proxy"]), max(ppo, key=lambda p: p["judge"])
        parts.append(f"over-optimisation: PPO's top proxy ({top_proxy['proxy']:.2f}, kl_coef "
                     f"{top_proxy['setting']:g}) has judge {top_proxy['judge']:+.2f} vs best {top_judge['judge']:+.2f}"
                     + (" (a real drop)" if significant_drop(top_judge, top_proxy) else " (no real drop)"))
    return "; ".join(parts)


# ---- the run ---------------------------------------------------------------------------------------------------

def train(args, out: Path) -> tuple[dict, dict, list[dict]]:
    """SFT, the judge-labelled pairs, then the proxy, DPO at each β and PPO at each kl_coef, through
    `run_recipe`. Returns (pair stats, every stage's metrics, the points to measure)."""
    plan, pairs = args.plan, out / "pairs.jsonl"
    sft = {"sft": sft_section(plan)}
    run(write_recipe(out / "sft.yaml", out, sft, args.seed))
    sft_prompts = [json.loads(line)["prompt"] for line in SFT_DATA.read_text().splitlines() if line.strip()]
    pair_stats = label_pairs(out / "sft" / "model", (read_prompts(PROMPTS) + sft_prompts)[:plan.pair_prompts],
                             args.seed, pairs)
    print(f"pairs: {pair_stats['pairs']} of {pair_stats['prompts']} prompts (ties dropped), judge chosen "
          f"{pair_stats['chosen_judge_mean']:+.3f} vs rejected {pair_stats['rejected_judge_mean']:+.3f}", flush=True)
    dpo_names, ppo_names = stage_names(args.betas, args.kl_coefs)
    stages = {**sft, "reward": reward_section(plan, pairs),
              **{name: dpo_section(plan, pairs, b) for b, name in dpo_names.items()},
              **{name: ppo_section(plan, k) for k, name in ppo_names.items()}}
    import torch

    torch.manual_seed(args.seed)  # the reward model's new score head is drawn from the global RNG (see the report)
    metrics = run(write_recipe(out / "frontier.yaml", out, stages, args.seed))
    points = [{"method": "sft", "setting": None, "stage": "sft"}]
    points += [{"method": "dpo", "setting": b, "stage": name} for b, name in dpo_names.items()]
    points += [{"method": "ppo", "setting": k, "stage": name} for k, name in ppo_names.items()]
    return pair_stats, metrics, points


def stage_numbers(metrics: dict, point: dict) -> dict:
    """What the stage itself reported, for the JSON: DPO's last reward accuracy and margin, PPO's last KL and
    proxy reward during training."""
    m = metrics.get(point["stage"], {})
    keys = {"dpo": ("train_loss", "eval_rewards/accuracies", "eval_rewards/margins"),
            "ppo": ("train_reward_first", "train_reward_last", "kl_last", "kl_coef_final")}.get(point["method"], ())
    return {k: m[k] for k in keys if k in m}


def main(argv=None) -> dict:
    args = parse_args(argv)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("OMP_NUM_THREADS", str(args.threads))):
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pair_stats, metrics, points = train(args, out)
    t_train = time.perf_counter() - t0
    measure_all(out, points, args.plan, args.seed)
    for point in points:
        point["stage_metrics"] = stage_numbers(metrics, point)
    result = {"quick": args.quick, "seed": args.seed, "plan": asdict(args.plan), "betas": list(args.betas),
              "kl_coefs": list(args.kl_coefs), "pairs": pair_stats,
              "proxy_eval_accuracy": metrics.get("reward", {}).get("eval_accuracy"),
              "points": points, "finding": finding(points),
              "seconds": {"train": round(t_train, 1), "total": round(time.perf_counter() - t0, 1)}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    plot(points, args.png)
    print(table(points))
    print(f"proxy accuracy on held-out pairs: {result['proxy_eval_accuracy']}")
    print("finding:", result["finding"])
    print(f"wrote {args.json} and {args.png} in {result['seconds']['total']:.0f} s")
    return result


if __name__ == "__main__":
    main()
