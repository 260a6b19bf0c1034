"""Votes out of the store, in the formats the training stages read unchanged.

- preferences (default): one `{"prompt", "chosen", "rejected"}` row per pair whose votes
  have a strict majority for A or for B, read by the reward and DPO stages as is.
- raw: every live vote with its annotator, the side each response was shown on, times
  and reason, for audits and for anyone who wants to aggregate differently.
- kto: unpaired `{"prompt", "completion", "label"}` rows for KTO: a majority for A makes
  A desirable and B undesirable; a majority for "both bad" makes both undesirable, which
  pairs alone cannot say.

Majority: the verdict ('a', 'b', 'tie', 'both_bad') with the most votes, if no other has
as many; agreement is its share of the pair's votes (skips are not votes). `min_votes`
and `min_agreement` drop pairs with too little or too divided a say. Every file is
written to a temporary name and renamed.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from align.artifacts import write_text
from align.errors import AlignError

from labeling_app.store import LabelStore, Pair, Vote

KINDS = ("preferences", "raw", "kto")  # what an export can be: the admin tab, its endpoint, the CLI's flags


@dataclass
class Verdict:
    pair: Pair
    winner: str | None  # None when the top verdicts are tied
    votes: int
    agreement: float


@dataclass
class ExportSummary:
    written: int = 0
    kept_pairs: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> pairs

    def line(self, out: Path, what: str) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        return f"wrote {self.written} {what} to {out} ({self.kept_pairs} pairs used; left out: {dropped})"


def verdicts(pairs: list[Pair], votes: list[Vote]) -> list[Verdict]:
    by_pair: dict[int, Counter] = defaultdict(Counter)
    for vote in votes:
        if vote.choice != "skip":
            by_pair[vote.pair_id][vote.choice] += 1
    out = []
    for pair in pairs:
        counts = by_pair.get(pair.id, Counter())
        total = sum(counts.values())
        ranked = counts.most_common(2)
        if not ranked:
            out.append(Verdict(pair, None, 0, 0.0))
            continue
        winner = ranked[0][0] if len(ranked) == 1 or ranked[0][1] > ranked[1][1] else None
        out.append(Verdict(pair, winner, total, ranked[0][1] / total))
    return out


def select(found: list[Verdict], wanted: set[str], min_votes: int, min_agreement: float,
           summary: ExportSummary) -> list[Verdict]:
    """The verdicts worth exporting; every other pair is counted in `summary.dropped` by reason."""
    kept = []
    for v in found:
        if v.votes == 0:
            summary.dropped["without votes"] += 1
        elif v.votes < min_votes:
            summary.dropped[f"under {min_votes} votes"] += 1
        elif v.winner is None:
            summary.dropped["without a majority"] += 1
        elif v.winner not in wanted:
            summary.dropped["judged a tie" if v.winner == "tie" else "judged both bad"] += 1
        elif v.agreement < min_agreement:
            summary.dropped[f"under {min_agreement:g} agreement"] += 1
        else:
            kept.append(v)
    summary.kept_pairs = len(kept)
    return kept


def trusted(store: LabelStore, min_gold_accuracy: float, summary: ExportSummary) -> tuple[list[Pair], list[Vote]]:
    """The pairs to aggregate (gold pairs are for checking annotators, not for training) and the votes to count:
    all, or those of annotators whose gold accuracy is at least `min_gold_accuracy` (an annotator who answered no
    gold pair is kept)."""
    from labeling_app.quality import gold_accuracy

    if not 0.0 <= min_gold_accuracy <= 1.0:
        raise AlignError(f"--min-gold-accuracy must be between 0 and 1, got {min_gold_accuracy}")
    pairs, votes = store.pairs(), store.votes()
    accuracy = gold_accuracy({p.id: p for p in pairs}, votes)
    below = {name for name, (right, total) in accuracy.items() if right / total < min_gold_accuracy}
    if below:
        summary.dropped[f"votes from {len(below)} annotators under {min_gold_accuracy:g} gold accuracy"] += sum(
            v.annotator in below for v in votes)
    return [p for p in pairs if "gold" not in p.metadata], [v for v in votes if v.annotator not in below]


def export_preferences(store: LabelStore, out: str | Path, min_votes: int = 1,
                       min_agreement: float = 0.0, min_gold_accuracy: float = 0.0) -> ExportSummary:
    _check_thresholds(min_votes, min_agreement)
    summary = ExportSummary()
    pairs, votes = trusted(store, min_gold_accuracy, summary)
    kept = select(verdicts(pairs, votes), {"a", "b"}, min_votes, min_agreement, summary)
    rows = []
    for v in kept:
        chosen, rejected = ((v.pair.response_a, v.pair.response_b) if v.winner == "a"
                            else (v.pair.response_b, v.pair.response_a))
        rows.append({"prompt": v.pair.prompt, "chosen": chosen, "rejected": rejected})
    return _write(out, rows, summary, "preference pairs")


def export_kto(store: LabelStore, out: str | Path, min_votes: int = 1, min_agreement: float = 0.0,
               min_gold_accuracy: float = 0.0) -> ExportSummary:
    _check_thresholds(min_votes, min_agreement)
    summary = ExportSummary()
    pairs, votes = trusted(store, min_gold_accuracy, summary)
    kept = select(verdicts(pairs, votes), {"a", "b", "both_bad"}, min_votes, min_agreement, summary)
    rows, seen = [], set()
    for v in kept:
        labels = {"a": [(v.pair.response_a, True), (v.pair.response_b, False)],
                  "b": [(v.pair.response_b, True), (v.pair.response_a, False)],
                  "both_bad": [(v.pair.response_a, False), (v.pair.response_b, False)]}[v.winner]
        for completion, label in labels:
            # Rollout pairs share completions: the same verdict on the same text is one row.
            key = json.dumps([v.pair.prompt, completion, label])
            if key not in seen:
                seen.add(key)
                rows.append({"prompt": v.pair.prompt, "completion": completion, "label": label})
    return _write(out, rows, summary, "KTO rows")


def export_raw(store: LabelStore, out: str | Path) -> ExportSummary:
    from labeling_app.quality import gold_accuracy

    pairs = {p.id: p for p in store.pairs()}
    rows = []
    votes = store.votes()
    accuracy = {name: right / total for name, (right, total) in gold_accuracy(pairs, votes).items()}
    for vote in votes:
        pair = pairs[vote.pair_id]
        rows.append({
            "vote_id": vote.vote_id, "pair_id": vote.pair_id, "annotator": vote.annotator, "choice": vote.choice,
            "shown_left": vote.left_side, "picked_side": vote.picked_side, "reason": vote.reason,
            "shown_at": _iso(vote.shown_at), "voted_at": _iso(vote.voted_at), "seconds": round(vote.seconds, 3),
            "prompt": pair.prompt, "response_a": pair.response_a, "response_b": pair.response_b,
            "metadata": pair.metadata, "gold_accuracy": accuracy.get(vote.annotator),
        })
    summary = ExportSummary(kept_pairs=len({r["pair_id"] for r in rows}))
    return _write(out, rows, summary, "votes")


def _write(out: str | Path, rows: list[dict], summary: ExportSummary, what: str) -> ExportSummary:
    if not rows:
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(summary.dropped.items())) or "the database has no votes"
        raise AlignError(f"nothing to export to {out}: no pair qualifies ({dropped}); nothing was written")
    write_text(out, "".join(json.dumps(row) + "\n" for row in rows))
    summary.written = len(rows)
    return summary


def _check_thresholds(min_votes: int, min_agreement: float) -> None:
    if min_votes < 1:
        raise AlignError(f"--min-votes must be at least 1, got {min_votes}")
    if not 0.0 <= min_agreement <= 1.0:
        raise AlignError(f"--min-agreement must be between 0 and 1 (a share of votes), got {min_agreement}")


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")
