"""Judges that need no download: functions `f(prompts, completions) -> list[float]`, usable wherever a
recipe takes a Python reward (`reward_fn: align.judges:sentiment`) and as an independent judge of a
policy trained against a learned reward model.

- `sentiment`: VADER's compound score in [-1, 1] (Hutto & Gilbert 2014; `vaderSentiment`, a lexicon
  and rules shipped inside the package, so nothing is fetched). It is the classic stand-in for a
  human preference in the DPO paper's controlled-sentiment task (Rafailov et al. 2023, Figure 2).
- `well_formed`: a format judge in [0, 1]: the share of four checks an answer passes (it says
  something; it ends a sentence; no word three times in a row; at least half its word pairs are
  distinct). Degenerate text that fools a reward model ("7 7 7 7 7") fails most of them.
- `concise`: a length judge, 1 for an answer of at most `CONCISE_WORDS` words, falling linearly to 0
  at four times that; an empty answer scores 0.

Prompts are accepted (as TRL and align pass them) and ignored: these judge the answer alone.
Completions may be strings or message lists (the last message's content is judged).
"""

from __future__ import annotations

from functools import lru_cache

CONCISE_WORDS = 12


def _text(completion) -> str:
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(prompts, completions, **_) -> list[float]:
    """VADER compound sentiment of each answer, -1 (negative) to 1 (positive); 0 for an empty one."""
    analyzer = _vader()
    return [analyzer.polarity_scores(_text(c))["compound"] if _text(c).strip() else 0.0 for c in completions]


def well_formed_checks(text: str) -> dict[str, bool]:
    """The four checks `well_formed` averages, by name (for reports and tests)."""
    words = text.split()
    pairs = list(zip(words, words[1:]))
    return {
        "nonempty": bool(words),
        "ends_sentence": text.rstrip().endswith((".", "!", "?", '"', ")")),
        "no_triple_repeat": bool(words) and not any(a == b == c for a, b, c in zip(words, words[1:], words[2:])),
        "distinct_pairs": bool(words) and (not pairs or len(set(pairs)) / len(pairs) >= 0.5),
    }


def well_formed(prompts, completions, **_) -> list[float]:
    """The share of `well_formed_checks` each answer passes: 0, 0.25, 0.5, 0.75 or 1."""
    return [sum(well_formed_checks(_text(c)).values()) / 4 for c in completions]


def concise(prompts, completions, **_) -> list[float]:
    """1 up to CONCISE_WORDS words, linearly down to 0 at 4 x CONCISE_WORDS; 0 for an empty answer."""
    out = []
    for c in completions:
        n = len(_text(c).split())
        out.append(0.0 if n == 0 else max(0.0, min(1.0, (4 * CONCISE_WORDS - n) / (3 * CONCISE_WORDS))))
    return out
