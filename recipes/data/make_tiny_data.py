"""Writes the small synthetic datasets the tiny recipes train on.

Run from the repository root: `python recipes/data/make_tiny_data.py`. The output is
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


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write_jsonl(HERE / "tiny_sft.jsonl", sft_rows(random.Random(0), 600))
