"""The download-free judges, against values worked out by hand (VADER: its lexicon's signs)."""

import pytest

from align import judges
from align.stages.online import load_reward_fn


def test_sentiment_signs_and_empty():
    scores = judges.sentiment([None] * 4, ["I love this, it is wonderful!", "This is terrible and sad.", "  ",
                                           [{"role": "assistant", "content": "What a great day."}]])
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0 and scores[3] > 0.3


def test_well_formed_counts_its_four_checks():
    texts = ["The capital of France is Paris.", "7 7 7 7 7", "", "paris is the capital of france"]
    # 4/4; nonempty only (no end, triple repeat, 1 distinct pair of 4); nothing; all but the sentence end
    assert judges.well_formed([None] * 4, texts) == [1.0, 0.25, 0.0, 0.75]
    assert judges.well_formed_checks("a b a b a b a b a b.") == {"nonempty": True, "ends_sentence": True,
                                                                 "no_triple_repeat": True, "distinct_pairs": False}


@pytest.mark.parametrize("words, expected", [(0, 0.0), (1, 1.0), (12, 1.0), (30, 0.5), (48, 0.0), (60, 0.0)])
def test_concise_is_one_up_to_twelve_words_then_falls_to_zero_at_48(words, expected):
    assert judges.concise(["q"], [" ".join(["w"] * words)]) == [pytest.approx(expected)]


def test_judges_load_as_a_recipe_reward_fn():
    for name in ("sentiment", "well_formed", "concise"):
        assert load_reward_fn(f"align.judges:{name}", "ppo") is getattr(judges, name)
