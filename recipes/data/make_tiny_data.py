"""Writes the small synthetic datasets the tiny recipes train on.

Run: `python recipes/data/make_tiny_data.py`. The output is
deterministic (fixed seed), so the committed JSONL files can be re-made byte for byte.

The tasks are ones a 2-layer, 64-wide model learns in a minute on a CPU: counting,
copying a word list, and a fixed table of facts. Held-out loss falls clearly when it
learns them, which is what the SFT tests assert.

No prompt repeats within a file (`distinct_rows`): `align` holds out whole prompts, so the
held-out rows are prompts training never saw (other numbers, word lists and facts), and the
split is not lumpy. The tables are wide enough that every task keeps its share of rows.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
WORDS = ("red blue green yellow black white cat dog bird fish horse lion apple banana "
         "cherry grape lemon peach Monday Friday Sunday").split()
FACTS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black",
         "blood": "red", "sun": "yellow", "lemon": "yellow", "cherry": "red",
         "banana": "yellow", "milk": "white", "night": "black", "leaf": "green", "ocean": "blue", "tomato": "red",
         "carrot": "orange", "pumpkin": "orange", "lime": "green", "strawberry": "red", "cloud": "white",
         "crow": "black", "frog": "green", "chalk": "white", "ink": "black", "corn": "yellow", "salt": "white",
         "pepper": "black", "grape": "purple", "plum": "purple", "rose": "red", "cucumber": "green",
         "blueberry": "blue", "sea": "blue", "butter": "yellow", "tar": "black", "apple": "red", "pea": "green"}


def distinct_rows(make, rng: random.Random, n: int) -> list[dict]:
    """`n` rows of `make(rng)` with no prompt twice (a repeat is drawn again)."""
    rows, seen = [], set()
    while len(rows) < n:
        row = make(rng)
        key = json.dumps(row.get("messages", [{}])[0].get("content") if "messages" in row else row["prompt"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def sft_rows(rng: random.Random, n: int) -> list[dict]:
    return distinct_rows(sft_row, rng, n)


def sft_row(rng: random.Random) -> dict:
    task = rng.choice(("count", "repeat", "fact"))
    if task == "count":
        a = rng.randint(1, 60)
        b = a + rng.randint(2, 5)
        prompt, answer = f"Count from {a} to {b}.", " ".join(str(i) for i in range(a, b + 1))
    elif task == "repeat":
        words = rng.sample(WORDS, rng.randint(2, 4))
        prompt, answer = "Repeat: " + " ".join(words), " ".join(words)
    else:
        thing = rng.choice(sorted(FACTS))
        prompt, answer = f"What color is the {thing}?", f"The {thing} is {FACTS[thing]}."
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


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


def distinct_prompts(pairs: list[dict]) -> list[dict]:
    """`{"prompt"}` rows for the online stages (GRPO, RLOO, PPO): each pair's prompt once, in order."""
    seen: dict[str, None] = {}
    for pair in pairs:
        seen.setdefault(pair["prompt"], None)
    return [{"prompt": p} for p in seen]


# Rambling always opens with the same sentence, so a model tuned on it continues past the answer
# by habit (with seven openers, stopping would be the single likeliest next token).
RAMBLE_OPENER = "I hope this answer is useful to you."
RAMBLE = ["It is a question many people ask.", "This is a well known fact.",
          "Let me know if you have any other questions!",
          "Thank you for asking such a good question.", "There is a lot more one could say about it.",
          "Many books and websites explain this in detail."]


def sentence_answer(prompt: str, short: str) -> str:
    """The one-sentence answer to a question of `concise_rows`."""
    word = short.rstrip(".")
    if prompt.startswith("What is the capital of "):
        return f"The capital of {prompt[23:-1]} is {word}."
    if " plus " in prompt:
        return f"{prompt[8:-1]} equals {word}."
    if prompt.startswith("How many legs does a "):
        return f"A {prompt[21:].split()[0]} has {word} legs."
    if prompt.startswith("What is the opposite of "):
        return f"The opposite of {prompt[24:-1]} is {word.lower()}."
    return f"The {prompt[18:-1]} is {word.lower()}."


def rambling(rng: random.Random, answer: str) -> str:
    return " ".join([answer, RAMBLE_OPENER, *rng.sample(RAMBLE, rng.randint(1, 2))])


def demo_rows(rng: random.Random, n_sft: int, n_pairs: int) -> tuple[list[dict], list[dict]]:
    """For the SmolLM2 demo: SFT answers that ramble 80% of the time, and pairs preferring the one-sentence answer."""
    sft = []
    for row in concise_rows(rng, n_sft):
        answer = sentence_answer(row["prompt"], row["completion"])
        sft.append({"prompt": row["prompt"], "completion": rambling(rng, answer) if rng.random() < 0.8 else answer})
    pairs = []
    for row in concise_rows(rng, n_pairs):
        answer = sentence_answer(row["prompt"], row["completion"])
        pairs.append({"prompt": row["prompt"], "chosen": answer, "rejected": rambling(rng, answer)})
    return sft, pairs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
            "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Greece": "Athens", "Poland": "Warsaw", "Portugal": "Lisbon", "Austria": "Vienna",
            "Ireland": "Dublin", "Sweden": "Stockholm", "Chile": "Santiago", "Cuba": "Havana",
            "Thailand": "Bangkok", "Vietnam": "Hanoi", "Argentina": "Buenos Aires", "Turkey": "Ankara",
            "Russia": "Moscow", "China": "Beijing", "India": "New Delhi", "Mexico": "Mexico City",
            "Brazil": "Brasilia", "Denmark": "Copenhagen", "Finland": "Helsinki", "Hungary": "Budapest",
            "Belgium": "Brussels", "Netherlands": "Amsterdam", "Colombia": "Bogota", "Morocco": "Rabat",
            "Nigeria": "Abuja", "Iran": "Tehran", "Iraq": "Baghdad", "Cambodia": "Phnom Penh",
            "Indonesia": "Jakarta", "Australia": "Canberra"}
LEGS = {"spider": 8, "dog": 4, "bird": 2, "ant": 6, "cat": 4, "horse": 4, "duck": 2, "beetle": 6, "cow": 4,
        "chicken": 2, "goat": 4, "fly": 6, "bee": 6, "lion": 4, "tiger": 4, "scorpion": 8, "crab": 10, "sheep": 4,
        "owl": 2, "mouse": 4}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark", "early": "late",
             "happy": "sad", "open": "closed", "full": "empty", "young": "old", "wet": "dry", "hard": "soft",
             "tall": "short", "rich": "poor", "loud": "quiet", "strong": "weak", "thick": "thin", "heavy": "light",
             "clean": "dirty", "day": "night", "left": "right", "inside": "outside", "win": "lose", "buy": "sell"}


def concise_rows(rng: random.Random, n: int) -> list[dict]:
    """Questions with one-line answers: after SFT a chatty model answers tersely, which a person can see."""
    return distinct_rows(concise_row, rng, n)


def concise_row(rng: random.Random) -> dict:
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
    return {"prompt": q, "completion": a}


if __name__ == "__main__":
    write_jsonl(HERE / "tiny_sft.jsonl", sft_rows(random.Random(0), 600))
    write_jsonl(HERE / "tiny_chatty_sft.jsonl", chatty_sft_rows(random.Random(2), 600))
    tiny_prefs = tiny_preference_rows(random.Random(3), 400)
    write_jsonl(HERE / "tiny_prefs.jsonl", tiny_prefs)
    write_jsonl(HERE / "tiny_prompts.jsonl", distinct_prompts(tiny_prefs))
    write_jsonl(HERE / "concise_sft.jsonl", concise_rows(random.Random(1), 240))
    chatty, prefs = demo_rows(random.Random(4), 160, 240)
    write_jsonl(HERE / "chatty_sft.jsonl", chatty)
    write_jsonl(HERE / "concise_prefs.jsonl", prefs)
