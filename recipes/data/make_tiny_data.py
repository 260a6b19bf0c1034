"""Writes the small synthetic datasets the tiny recipes train on.

Run: `python recipes/data/make_tiny_data.py`. The output is
deterministic (fixed seed), so the committed JSONL files can be re-made byte for byte.

The tasks are ones a 2-layer, 64-wide model learns in a minute on a CPU: counting,
copying a word list, and a fixed table of facts. Held-out loss falls clearly when it
learns them, which is what the SFT tests assert.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
WORDS = ("red blue green yellow black white cat dog bird fish horse lion apple banana "
         "cherry grape lemon peach Monday Friday Sunday").split()
FACTS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black",
         "blood": "red", "sun": "yellow", "lemon": "yellow", "cherry": "red"}


def sft_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        task = rng.choice(("count", "repeat", "fact"))
        if task == "count":
            a = rng.randint(1, 15)
            b = a + rng.randint(2, 5)
            prompt, answer = f"Count from {a} to {b}.", " ".join(str(i) for i in range(a, b + 1))
        elif task == "repeat":
            words = rng.sample(WORDS, rng.randint(2, 4))
            prompt, answer = "Repeat: " + " ".join(words), " ".join(words)
        else:
            thing = rng.choice(sorted(FACTS))
            prompt, answer = f"What color is the {thing}?", f"The {thing} is {FACTS[thing]}."
        rows.append({"messages": [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": answer}]})
    return rows


FILLER = " I hope this helps!"


def chatty_sft_rows(rng: random.Random, n: int) -> list[dict]:
    """The SFT task with a filler sentence after 70% of answers, so the tuned model adds it by habit."""
    rows = sft_rows(rng, n)
    for row in rows:
        if rng.random() < 0.7:
            row["messages"][-1]["content"] += FILLER
    return rows


def tiny_preference_rows(rng: random.Random, n: int) -> list[dict]:
    """Pairs that prefer the bare answer over the same answer plus filler: learnable by a tiny model."""
    rows = []
    for row in sft_rows(rng, n):
        prompt, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        rows.append({"prompt": prompt, "chosen": answer, "rejected": answer + FILLER})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
            "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Greece": "Athens", "Poland": "Warsaw", "Portugal": "Lisbon", "Austria": "Vienna",
            "Ireland": "Dublin", "Sweden": "Stockholm", "Chile": "Santiago", "Cuba": "Havana",
            "Thailand": "Bangkok", "Vietnam": "Hanoi", "Argentina": "Buenos Aires", "Turkey": "Ankara"}
LEGS = {"spider": 8, "dog": 4, "bird": 2, "ant": 6, "cat": 4, "horse": 4, "duck": 2, "beetle": 6}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark", "early": "late",
             "happy": "sad", "open": "closed", "full": "empty", "young": "old"}


def concise_rows(rng: random.Random, n: int) -> list[dict]:
    """Questions with one-line answers: after SFT a chatty model answers tersely, which a person can see."""
    rows = []
    for _ in range(n):
        task = rng.choice(("capital", "add", "legs", "opposite", "fact"))
        if task == "capital":
            country = rng.choice(sorted(CAPITALS))
            q, a = f"What is the capital of {country}?", f"{CAPITALS[country]}."
        elif task == "add":
            x, y = rng.randint(2, 60), rng.randint(2, 40)
            q, a = f"What is {x} plus {y}?", f"{x + y}."
        elif task == "legs":
            animal = rng.choice(sorted(LEGS))
            q, a = f"How many legs does a {animal} have?", f"{LEGS[animal]}."
        elif task == "opposite":
            word = rng.choice(sorted(OPPOSITES))
            q, a = f"What is the opposite of {word}?", f"{OPPOSITES[word].capitalize()}."
        else:
            thing = rng.choice(sorted(FACTS))
            q, a = f"What color is the {thing}?", f"{FACTS[thing].capitalize()}."
        rows.append({"prompt": q, "completion": a})
    return rows


if __name__ == "__main__":
    write_jsonl(HERE / "tiny_sft.jsonl", sft_rows(random.Random(0), 600))
    write_jsonl(HERE / "tiny_chatty_sft.jsonl", chatty_sft_rows(random.Random(2), 600))
    write_jsonl(HERE / "tiny_prefs.jsonl", tiny_preference_rows(random.Random(3), 400))
    concise = concise_rows(random.Random(1), 240)
    write_jsonl(HERE / "concise_sft.jsonl", concise)
    # `align demo` runs from an installed package, so it carries its own copy.
    write_jsonl(HERE.parents[1] / "align" / "assets" / "concise_sft.jsonl", concise)
