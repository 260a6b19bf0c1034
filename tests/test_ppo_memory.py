"""PPO's memory savings compute what the plain paths compute: the reward model read through the LoRA value
model with its adapter disabled scores what a reward model of its own scores, and the policy's and value
model's forward and backward run in turn give the gradients and statistics of the one combined pass."""

from types import SimpleNamespace

import pytest
import torch

from align.config import LoraSettings
from align.sequences import pack, rows_of

PROMPTS = ["Say hi.", "What is two plus two?", "Name a colour."]
ANSWERS = ["Hi there, nice to meet you.", "Four.", "Blue, like the sky on a clear day."]


@pytest.fixture(scope="module")
def reward_dir(tiny_model, tmp_path_factory):
    """A random 1-output sequence classifier of the tiny model's architecture, saved with its tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from align.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    config = AutoConfig.from_pretrained(tiny_model, num_labels=1)
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("reward")
    AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def lora_stage():
    return SimpleNamespace(value_model="reward", lora=LoraSettings(r=4, alpha=8, dropout=0.0))


def test_adapter_off_scorer_scores_what_the_reward_model_scores(tiny_model, reward_dir):
    """After the value model's adapter and its copy of the score head have moved away from the reward model,
    the scorer over it still gives RewardScorer's scores (1e-5), and leaves the adapter on and the mode as it was."""
    from align.models import apply_lora, load_tokenizer
    from align.stages.ppo import shared_scorer, value_model_for
    from reward.score import RewardScorer

    stage = lora_stage()
    value_model, source = value_model_for(stage, "ppo", str(tiny_model), reward_dir, load_tokenizer(str(tiny_model)))
    assert source == "reward"
    value_model = apply_lora(value_model, stage.lora, task_type="SEQ_CLS").train()
    torch.manual_seed(0)
    with torch.no_grad():  # training moved every trainable weight: LoRA B and the score head's trained copy
        for p in value_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    scorer = shared_scorer(stage, value_model, source, reward_dir, "cpu")
    assert scorer is not None
    expected = RewardScorer(reward_dir, device="cpu").score(PROMPTS, ANSWERS)
    got = scorer.score(PROMPTS, ANSWERS)
    assert got == pytest.approx(expected, abs=1e-5)
    assert value_model.training
    ids = [scorer.tokenizer(p + a)["input_ids"] for p, a in zip(PROMPTS, ANSWERS)]
    with torch.no_grad():  # the adapter is back on: the value model's own head no longer gives the reward
        on = value_model(input_ids=torch.tensor([ids[1]])).logits[0, 0].item()
    assert abs(on - scorer.score_ids([ids[1]])[0]) > 1e-3

    # No sharing without LoRA, with another value model source, or without a reward model.
    assert shared_scorer(SimpleNamespace(value_model="reward", lora=None), value_model, source, reward_dir,
                         "cpu") is None
    assert shared_scorer(stage, value_model, "policy", reward_dir, "cpu") is None
    assert shared_scorer(stage, value_model, source, None, "cpu") is None


@pytest.mark.parametrize("lora", [False, True])
def test_policy_then_value_backward_matches_the_combined_pass(tiny_model, reward_dir, lora):
    """`minibatch_backward` (policy forward+backward, then the value model's) leaves the same gradient on every
    trainable weight as `minibatch_loss` + one backward, within 1e-5, and the same statistics, entropy term on."""
    from align.models import apply_lora, load_model, load_tokenizer
    from align.stages.ppo import Models, PolicyAndValue, disable_dropout, minibatch_backward, minibatch_loss
    from align.stages.ppo import value_model_for

    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    policy = load_model(str(tiny_model), dtype=torch.float32)
    stage = SimpleNamespace(value_model="reward", lora=LoraSettings(r=4, alpha=8, dropout=0.0) if lora else None,
                            temperature=1.0, clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.1, entropy_coef=0.01)
    value_model, _ = value_model_for(stage, "ppo", str(tiny_model), reward_dir, tok)
    if lora:
        policy = apply_lora(policy, stage.lora)
        value_model = apply_lora(value_model, stage.lora, task_type="SEQ_CLS")
    for m in (policy, value_model):
        disable_dropout(m)
        m.train()
    models = Models(policy, None, value_model, "reward", tok, None, None, "cpu",
                    trainable=PolicyAndValue(policy, value_model))

    completions = [SimpleNamespace(prompt_ids=tok(p)["input_ids"], token_ids=tok(a)["input_ids"][:6])
                   for p, a in zip(PROMPTS, ANSWERS)]
    batch = pack(completions, tok.pad_token_id, "cpu")
    B, T = batch["tokens"].shape
    gen = torch.Generator().manual_seed(3)
    per_token = {"old_logps": -torch.rand(B, T, generator=gen) * 6, "old_values": torch.randn(B, T, generator=gen),
                 "advantages": torch.randn(B, T, generator=gen), "returns": torch.randn(B, T, generator=gen)}
    mb, old = rows_of(batch, torch.tensor([2, 0, 1]), per_token)
    weight = torch.tensor(0.75)
    params = {n: p for n, p in models.trainable.named_parameters() if p.requires_grad}

    split_stats = minibatch_backward(stage, models, mb, old, True, weight)
    split = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    loss, stats = minibatch_loss(stage, models, mb, old, True)
    (loss * weight).backward()

    assert split_stats.keys() == stats.keys() and "entropy" in stats
    assert [split_stats[k] for k in stats] == pytest.approx(list(stats.values()), abs=1e-6)
    assert all(split[n] is not None for n in params)
    for n, p in params.items():
        torch.testing.assert_close(split[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)
