"""Are the labels worth training on? Annotator quality, and a model leaderboard from the votes.

- **Agreement with the majority**, per annotator, leave-one-out: on each pair where the annotator
  and at least two others gave a verdict, does theirs match the others' majority (a tie among the
  others counts as no majority and the pair is left out)? An annotator far below the team is
  careless, adversarial or reading the guidelines differently.
- **Median seconds per vote** (shown to voted), with a `too_fast` mark under `TOO_FAST` seconds:
  nobody reads two answers in that time.
- **Length bias**: of the votes that picked A or B where the answers differ in length, the share
  that picked the longer one. Near 0.5 is neutral; a team near 0.8 teaches the reward model that
  longer is better (the bias the DPO/RLHF literature keeps finding).
- **Gold accuracy**: the share of gold pairs (known answer, mixed into the queue unmarked) an
  annotator answered as known; `export --min-gold-accuracy X` leaves out the votes of those below X.
- **Leaderboard**: when pairs carry `model_a` / `model_b` (rollouts of several checkpoints), a
  Bradley-Terry fit of the verdicts (a tie is half a win each; "both bad" and skips carry no
  preference), as Chatbot Arena reports it: a score per model on the Elo scale (400 points = 10x
  the odds of winning, mean 1000) with a percentile bootstrap 95% interval over votes.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

from labeling_app.agreement import median
from labeling_app.store import LabelStore

TOO_FAST = 2.0  # seconds
ELO = 400 / math.log(10)


def gold_accuracy(pairs: dict, votes: list) -> dict[str, tuple[int, int]]:
    """annotator -> (gold pairs answered as known, gold pairs answered): verdicts on pairs whose metadata holds
    `gold` ('a' or 'b'; `align label import --gold`). A tie or "both bad" on a gold pair counts as wrong."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for v in votes:
        gold = pairs[v.pair_id].metadata.get("gold")
        if gold is not None and v.choice != "skip":
            out[v.annotator][1] += 1
            out[v.annotator][0] += v.choice == gold
    return {name: (right, total) for name, (right, total) in out.items()}


def majority_agreement(votes: list) -> dict[str, tuple[int, int]]:
    """annotator -> (pairs where they agreed with the others' majority, pairs counted)."""
    by_pair: dict[int, list] = defaultdict(list)
    for v in votes:
        if v.choice != "skip":
            by_pair[v.pair_id].append(v)
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for verdicts in by_pair.values():
        for v in verdicts:
            others = Counter(o.choice for o in verdicts if o.annotator != v.annotator)
            if sum(others.values()) < 2:
                continue
            (top, n), *rest = others.most_common(2) + [(None, 0)]
            if rest and rest[0][1] == n:
                continue  # the others split evenly: no majority to agree with
            out[v.annotator][1] += 1
            out[v.annotator][0] += v.choice == top
    return {name: (agree, total) for name, (agree, total) in out.items()}


def length_bias(votes: list, pairs: dict) -> tuple[int, int]:
    """(votes that picked the longer answer, votes that picked A or B where the lengths differ)."""
    longer = counted = 0
    for v in votes:
        pair = pairs[v.pair_id]
        la, lb = len(pair.response_a.split()), len(pair.response_b.split())
        if v.choice in ("a", "b") and la != lb:
            counted += 1
            longer += (v.choice == "a") == (la > lb)
    return longer, counted


def annotator_stats(store: LabelStore) -> dict:
    """The numbers `align label stats --json` prints and the admin view shows."""
    votes, pairs = store.votes(), {p.id: p for p in store.pairs()}
    agreement, gold = majority_agreement(votes), gold_accuracy(pairs, votes)
    by_annotator: dict[str, list] = defaultdict(list)
    for v in votes:
        by_annotator[v.annotator].append(v)
    rows = []
    for name, mine in sorted(by_annotator.items()):
        seconds = median([v.seconds for v in mine])
        agree, counted = agreement.get(name, (0, 0))
        longer, sided = length_bias(mine, pairs)
        rows.append({"annotator": name, "votes": len(mine), "median_seconds": seconds,
                     "too_fast": seconds is not None and seconds < TOO_FAST,
                     "majority_agreement": agree / counted if counted else None, "majority_pairs": counted,
                     "longer_wins": longer / sided if sided else None, "length_votes": sided,
                     "gold_accuracy": gold[name][0] / gold[name][1] if name in gold else None,
                     "gold_votes": gold.get(name, (0, 0))[1]})
    longer, sided = length_bias(votes, pairs)
    return {"annotators": rows, "longer_wins": longer / sided if sided else None, "length_votes": sided,
            "too_fast_seconds": TOO_FAST}


def matches(store: LabelStore) -> list[tuple[str, str, float]]:
    """(model_a, model_b, score of model_a: 1, 0.5 or 0) per live verdict on a pair naming both models."""
    pairs = {p.id: p for p in store.pairs()}
    out = []
    for v in store.votes():
        meta = pairs[v.pair_id].metadata
        a, b = meta.get("model_a"), meta.get("model_b")
        if not (isinstance(a, str) and isinstance(b, str)) or a == b or v.choice not in ("a", "b", "tie"):
            continue
        out.append((a, b, {"a": 1.0, "b": 0.0, "tie": 0.5}[v.choice]))
    return out


def bradley_terry(games: list[tuple[str, str, float]], iters: int = 200) -> dict[str, float]:
    """Log-strengths θ (mean 0) maximising Π P(i beats j)^s (1 - P)^(1 - s), P = σ(θ_i - θ_j), by Hunter's MM
    updates on half-win counts; a tiny prior (half a win and half a loss against the average) keeps a model
    that won or lost everything finite."""
    models = sorted({m for a, b, _ in games for m in (a, b)})
    wins = Counter()
    met: Counter = Counter()
    for a, b, s in games:
        wins[a] += s
        wins[b] += 1 - s
        met[frozenset((a, b))] += 1
    strength = dict.fromkeys(models, 1.0)
    for _ in range(iters):
        new = {}
        for m in models:
            denominator = 1.0 / (strength[m] + 1.0)  # the prior's game against strength 1
            for pair, n in met.items():
                if m in pair:
                    (other,) = pair - {m}
                    denominator += n / (strength[m] + strength[other])
            new[m] = (wins[m] + 0.5) / denominator
        mean_log = sum(math.log(v) for v in new.values()) / len(new)
        strength = {m: v / math.exp(mean_log) for m, v in new.items()}
    return {m: math.log(v) for m, v in strength.items()}


def leaderboard(store: LabelStore, rounds: int = 1000, seed: int = 0) -> list[dict]:
    """Models by Bradley-Terry score (Elo scale, mean 1000) with a bootstrap 95% interval over the verdicts."""
    games = matches(store)
    if not games:
        return []
    fit = bradley_terry(games)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        resampled = bradley_terry([rng.choice(games) for _ in games], iters=60)
        for m in fit:
            samples[m].append(resampled.get(m, 0.0))
    played = Counter(m for a, b, _ in games for m in (a, b))
    rows = []
    for m, theta in sorted(fit.items(), key=lambda kv: -kv[1]):
        s = sorted(samples[m])
        lo, hi = s[int(0.025 * (len(s) - 1))], s[int(0.975 * (len(s) - 1))]
        rows.append({"model": m, "score": round(1000 + ELO * theta, 1), "ci": [round(1000 + ELO * lo, 1),
                                                                                round(1000 + ELO * hi, 1)],
                     "votes": played[m]})
    return rows


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def stats_markdown(stats: dict) -> str:
    """The admin view's annotator-quality section (and `align label stats`)."""
    lines = ["### Annotator quality", "",
             "| annotator | votes | agrees with majority | median s/vote | longer answer wins | gold right |",
             "|---|---|---|---|---|---|"]
    for r in stats["annotators"]:
        seconds = "n/a" if r["median_seconds"] is None else f"{r['median_seconds']:.1f}"
        fast = " **too fast**" if r["too_fast"] else ""
        lines.append(f"| {r['annotator']} | {r['votes']} | {_pct(r['majority_agreement'])} "
                     f"({r['majority_pairs']} pairs) | {seconds}{fast} | {_pct(r['longer_wins'])} | "
                     f"{_pct(r['gold_accuracy'])} ({r['gold_votes']}) |")
    lines += ["", f"Length bias: the longer answer won {_pct(stats['longer_wins'])} of {stats['length_votes']} "
                  "votes between answers of different length (near 50% is neutral)."]
    return "\n".join(lines)


def leaderboard_markdown(board: list[dict]) -> str:
    """The admin view's leaderboard section (and `align label leaderboard`)."""
    if not board:
        return "No pairs name `model_a` and `model_b` with a verdict: no leaderboard."
    lines = ["### Model leaderboard (Bradley-Terry, Elo scale, bootstrap 95% interval)", "",
             "| model | score | 95% interval | votes |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['score']:.0f} | {r['ci'][0]:.0f} - {r['ci'][1]:.0f} | {r['votes']} |"
              for r in board]
    return "\n".join(lines)
