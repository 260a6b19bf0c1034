"""Writes the small synthetic data of the controlled-sentiment bench (`bench/frontier.py`).

Run: `python recipes/data/make_sentiment_data.py`. Deterministic (fixed seed, no network); the word
lists are written here, so the files are ours to ship.

- `sentiment_sft.jsonl`: `{"prompt", "completion"}`, a request for a review of a (made-up) movie and a
  one- or two-sentence review. A quarter each of the reviews are positive, negative, neutral and mixed,
  and the title never hints which: the sentiment words are the main thing that varies, so a tuned tiny
  model writes all four kinds and a policy has something to learn when a judge prefers one.
- `sentiment_prompts.jsonl`: `{"prompt"}` rows for PPO and for the bench's judge-labelled pairs.
- `sentiment_eval_prompts.jsonl`: held-out `{"prompt"}` rows the bench measures every policy on.

Every prompt is unique and the three files share no title, so a held-out title was never trained on.
Title words are neutral under VADER (compound 0), so a title never moves the judge.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

TITLE_WORDS = ("Red Blue Golden Iron Hidden Northern Southern Winter Summer Midnight Quiet Silent Long Last Final "
               "Distant Secret Paper Glass Stone Silver Wooden Seventh Little").split()
TITLE_NOUNS = ("Harbor Garden River Mountain Road City House Window Letter Station Island Forest Bridge Tower Field "
               "Valley Train Door Lake Clock Mirror Shadow Horizon Lantern Compass Orchard Castle Canyon Meadow "
               "Voyage Kingdom Ocean Desert Village Signal Engine").split()
OPENERS = ("Write a review of the movie {t}.", "Review the film {t}.", "What did you think of {t}?",
           "Give a short review of {t}.")

# Short words (one to three tokens of the tiny model's 512-token BPE), so a 2-layer model learns them in a minute.
POSITIVE = "good great nice fun fine cool funny lovely".split()
NEGATIVE = "bad poor dull boring sad wrong awful weak".split()
NEUTRAL = "short long cold dark slow plain simple quiet".split()
ASPECTS = "acting plot cast pace music story ending".split()
FIRST = ("This film is {a}.", "{A} movie.", "The movie is {a}.", "What {an} film.")
SECOND = ("The {x} is {b}.", "The {x} is {b} and the {y} is {c}.", "The {x} was {b}.")

KINDS = {"positive": (POSITIVE, POSITIVE), "negative": (NEGATIVE, NEGATIVE), "neutral": (NEUTRAL, NEUTRAL),
         "mixed": (POSITIVE, NEGATIVE)}


def titles(rng: random.Random) -> list[str]:
    """Every 'The <word> <noun>' title, shuffled."""
    out = [f"The {w} {n}" for w in TITLE_WORDS for n in TITLE_NOUNS]
    rng.shuffle(out)
    return out


def prompt_for(rng: random.Random, title: str) -> str:
    return rng.choice(OPENERS).format(t=title)


def review(rng: random.Random, kind: str) -> str:
    """One or two sentences whose sentiment words all come from `kind`'s lists (mixed: one of each sign,
    in either order)."""
    first, second = KINDS[kind]
    if kind == "mixed" and rng.random() < 0.5:
        first, second = second, first
    word = rng.choice(first)
    article = "an" if word[0] in "aeiou" else "a"
    head = rng.choice(FIRST).format(a=word, A=f"{article} {word}".capitalize(), an=f"{article} {word}")
    if rng.random() < 0.25:
        return head
    x, y = rng.sample(ASPECTS, 2)
    b, c = rng.sample(second, 2)
    return head + " " + rng.choice(SECOND).format(x=x, y=y, b=b, c=c)


def sft_rows(rng: random.Random, pool: list[str]) -> list[dict]:
    kinds = list(KINDS)
    return [{"prompt": prompt_for(rng, t), "completion": review(rng, kinds[i % len(kinds)])}
            for i, t in enumerate(pool)]


def prompt_rows(rng: random.Random, pool: list[str]) -> list[dict]:
    return [{"prompt": prompt_for(rng, t)} for t in pool]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make(out: Path = HERE, seed: int = 0, n_sft: int = 480, n_prompts: int = 256, n_eval: int = 64) -> None:
    rng = random.Random(seed)
    pool = titles(rng)
    assert n_sft + n_prompts + n_eval <= len(pool), "not enough distinct titles"
    held, ppo, sft = pool[:n_eval], pool[n_eval:n_eval + n_prompts], pool[n_eval + n_prompts:][:n_sft]
    write_jsonl(out / "sentiment_sft.jsonl", sft_rows(rng, sft))
    write_jsonl(out / "sentiment_prompts.jsonl", prompt_rows(rng, ppo))
    write_jsonl(out / "sentiment_eval_prompts.jsonl", prompt_rows(rng, held))


if __name__ == "__main__":
    make()
