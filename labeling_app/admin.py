"""What the admin view shows: progress, annotator speed, agreement and position bias.

Built from the store's users, pairs and live votes as plain data (`AdminReport`), then
rendered as markdown, so tests can check the numbers without a browser.

- Cohen's κ for every two annotators who judged at least one pair in common: do they
  agree more than their own label habits would by chance?
- Krippendorff's α over all pairs with two or more verdicts: one number for the whole
  team that copes with each pair having a different set of annotators.
- Position bias: of the votes that picked a side, the share that picked the left one.
  Sides are randomised per presentation, so an unbiased team sits near 0.5; the 95%
  interval says whether a deviation is more than noise.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import combinations

from labeling_app.agreement import cohen_kappa, krippendorff_alpha, median, wilson_interval
from labeling_app.store import LabelStore


@dataclass
class AnnotatorRow:
    name: str
    admin: bool
    votes: int  # verdicts (skips not included)
    skips: int
    median_seconds: float | None
    left_share: float | None
    last_vote: float | None


@dataclass
class AdminReport:
    overlap: int
    pairs: int
    complete: int  # pairs with K verdicts
    started: int  # pairs with 1..K-1 verdicts
    verdicts: int
    skips: int
    annotators: list[AnnotatorRow]
    kappas: list[tuple[str, str, int, float | None]]  # (annotator, annotator, shared pairs, κ)
    alpha: float | None
    alpha_pairs: int
    left_votes: int
    side_votes: int

    @property
    def left_share(self) -> float | None:
        return self.left_votes / self.side_votes if self.side_votes else None


def build_report(store: LabelStore, overlap: int) -> AdminReport:
    votes = store.votes()
    pairs = store.pairs()
    verdicts = [v for v in votes if v.choice != "skip"]
    by_annotator = defaultdict(list)
    for vote in votes:
        by_annotator[vote.annotator].append(vote)
    admins = {u.name: u.is_admin for u in store.users()}
    rows = []
    for name in sorted(set(admins) | set(by_annotator)):
        mine = by_annotator.get(name, [])
        sided = [v.picked_side for v in mine if v.picked_side]
        rows.append(AnnotatorRow(
            name=name, admin=admins.get(name, False), votes=sum(v.choice != "skip" for v in mine),
            skips=sum(v.choice == "skip" for v in mine), median_seconds=median([v.seconds for v in mine]),
            left_share=sided.count("left") / len(sided) if sided else None,
            last_vote=max((v.voted_at for v in mine), default=None)))

    labels_by_pair: dict[int, dict[str, str]] = defaultdict(dict)
    for vote in verdicts:
        labels_by_pair[vote.pair_id][vote.annotator] = vote.choice
    kappas = []
    for first, second in combinations(sorted({v.annotator for v in verdicts}), 2):
        shared = [(labels[first], labels[second]) for labels in labels_by_pair.values()
                  if first in labels and second in labels]
        if shared:
            kappas.append((first, second, len(shared), cohen_kappa(shared)))
    units = [list(labels.values()) for labels in labels_by_pair.values()]
    sides = [v.picked_side for v in verdicts if v.picked_side]
    filled = Counter(len(labels) for labels in labels_by_pair.values())
    return AdminReport(
        overlap=overlap, pairs=len(pairs), complete=sum(n for k, n in filled.items() if k >= overlap),
        started=sum(n for k, n in filled.items() if 0 < k < overlap), verdicts=len(verdicts),
        skips=len(votes) - len(verdicts), annotators=rows, kappas=kappas, alpha=krippendorff_alpha(units),
        alpha_pairs=sum(len(u) >= 2 for u in units), left_votes=sides.count("left"), side_votes=len(sides))


def report_markdown(report: AdminReport) -> str:
    r = report
    lines = [
        f"**{r.pairs}** pairs · **{r.complete}** with all {r.overlap} votes · **{r.started}** started · "
        f"**{r.pairs - r.complete - r.started}** untouched · **{r.verdicts}** votes · **{r.skips}** skips",
        "",
        "### Annotators",
        "| annotator | votes | skips | median s/vote | left share | last vote (UTC) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for a in r.annotators:
        lines.append(f"| {a.name}{' (admin)' if a.admin else ''} | {a.votes} | {a.skips} | "
                     f"{_num(a.median_seconds, '.1f')} | {_num(a.left_share, '.2f')} | {_when(a.last_vote)} |")
    lines += ["", "### Agreement",
              f"Krippendorff's α (nominal) over {r.alpha_pairs} pairs with 2+ votes: **{_num(r.alpha, '.3f')}**", ""]
    if r.kappas:
        lines += ["| annotators | shared pairs | Cohen's κ |", "|---|---:|---:|"]
        lines += [f"| {a} · {b} | {n} | {_num(k, '.3f')} |" for a, b, n, k in r.kappas]
    else:
        lines.append("No two annotators have judged the same pair yet.")
    interval = wilson_interval(r.left_votes, r.side_votes)
    lines += ["", "### Position bias",
              f"Share of decisive votes for the left response: **{_num(r.left_share, '.3f')}** "
              f"({r.left_votes} of {r.side_votes}"
              + (f"; 95% interval {interval[0]:.2f}–{interval[1]:.2f}" if interval else "")
              + "). Sides are shuffled per presentation, so 0.5 means no bias."]
    return "\n".join(lines)


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _when(seconds: float | None) -> str:
    return "" if seconds is None else datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M")
