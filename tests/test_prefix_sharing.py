"""Prefix sharing and packing (`align.prefix_sharing`): the layout worked out by hand, then parity with the
two-sequence path through TRL's own DPO loss code, for every loss type, with and without packing, LoRA and
a reference model; the fallback on a model that cannot take the layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from align import prefix_sharing
from align.config import DPO_LOSS_TYPES
from align.data import trainer_dataset
from align.errors import AlignError
from align.stages.dpo import make_trainer_class
from align.tiny import build_tokenizer

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "tiny_prefs.jsonl"


def test_layout_by_hand():
    # prompt [1,2,3], chosen [4,5], rejected [6]: one row 1 2 3 4 5 6, rejected's position restarts at 3.
    out = prefix_sharing.layout([[1, 2, 3]], [[4, 5]], [[6]], pad_id=0, seq_len=6)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3]]
    # Usual layout: row 0 = 1 2 3 4 5 (chosen), row 1 = 1 2 3 6 (rejected); their places in the shared row.
    assert out["index"][0, :5].tolist() == [0, 1, 2, 3, 4]
    assert out["index"][1, :4].tolist() == [0, 1, 2, 5]
    mask = prefix_sharing.allowed(out["segment"], out["kind"])[0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 0, 0],
                    [1, 1, 1, 1, 1, 0],
                    [1, 1, 1, 0, 0, 1]]  # rejected (last) sees the prompt and itself, not chosen


def test_packing_by_hand():
    # Pair lengths 6, 3, 3: packed into rows of 6, pair 0 alone, pairs 1 and 2 together, block-diagonal.
    out = prefix_sharing.layout([[1, 2, 3], [7], [9]], [[4, 5], [8], [10]], [[6], [11], [12]], pad_id=0,
                                seq_len=5, pack=True)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 11, 9, 10, 12]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 0, 1, 1]]
    assert out["segment"].tolist() == [[1, 1, 1, 1, 1, 1], [2, 2, 2, 3, 3, 3]]
    mask = prefix_sharing.allowed(out["segment"], out["kind"])[1].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0],
                    [1, 0, 1, 0, 0, 0],
                    [0, 0, 0, 1, 0, 0],
                    [0, 0, 0, 1, 1, 0],
                    [0, 0, 0, 1, 0, 1]]
    # Pair 2's rejected (usual row 3 + 2 = 5) is prompt 9 then 12: flat places 6 + 3 and 6 + 5.
    assert out["index"][5, :2].tolist() == [9, 11]
    # Unpacked: one pair per row, padded to the longest.
    assert prefix_sharing.layout([[1, 2, 3], [7]], [[4, 5], [8]], [[6], [11]], pad_id=0,
                                 seq_len=5)["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 11, 0, 0, 0]]


def test_packing_fills_rows_first_fit_decreasing():
    assert prefix_sharing.pack_segments([5, 2, 3, 4, 1], pack=True) == [[0], [3, 4], [2, 1]]
    assert prefix_sharing.pack_segments([5, 2, 3], pack=False) == [[0], [1], [2]]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Pairs with a shared multi-turn prompt of varied length, answers of varied length."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:24]]
    out = []
    for i, r in enumerate(rows):
        turns = [{"role": "user", "content": r["prompt"]}]
        for j in range(i % 3):
            turns += [{"role": "assistant", "content": rows[(i + j + 1) % 24]["chosen"]},
                      {"role": "user", "content": rows[(i + j + 2) % 24]["prompt"]}]
        out.append({"prompt": turns, "chosen": [{"role": "assistant", "content": r["chosen"]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"] + " " * (i % 2) + "ok" * (i % 4)}]})
    return out


def build(tiny_model, pairs, tmp_path, *, mode, packing=True, loss_type="sigmoid", lora=None, ref=False,
          max_length=128, dtype=torch.float32, **config):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from align.models import apply_lora, frozen_copy

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    ref_model = frozen_copy(model) if ref else None
    if lora:
        model = apply_lora(model, lora)
    args = DPOConfig(output_dir=str(tmp_path / "out"), bf16=False, report_to=[], per_device_train_batch_size=8,
                     max_length=max_length, loss_type=[loss_type], precompute_ref_log_probs=not ref and not lora,
                     dataset_num_proc=None, disable_tqdm=True, label_smoothing=0.1, **config)
    return make_trainer_class()(model=model, ref_model=ref_model, args=args, processing_class=tok,
                                train_dataset=trainer_dataset(pairs, tmp_path / f"ds-{mode}-{packing}"),
                                prefix_sharing=mode, packing=packing)


def loss_and_grads(trainer, loss_types):
    trainer.model.train()
    examples = [trainer.train_dataset[i] for i in range(8)]
    batch = trainer._prepare_inputs(trainer.data_collator(examples))
    out = {}
    for lt in loss_types:
        trainer.loss_types, trainer.loss_weights = [lt], [1.0]
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        out[lt] = (loss.detach(), grads, {k: list(v) for k, v in trainer._metrics["train"].items()})
        trainer._metrics["train"].clear()
    return out


def assert_same(a, b, what):
    for lt in a:
        (la, ga, ma), (lb, gb, mb) = a[lt], b[lt]
        assert torch.allclose(la, lb, atol=1e-5, rtol=0), (what, lt, la, lb)
        assert ga.keys() == gb.keys() and ga
        for n in ga:
            assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), (what, lt, n, (ga[n] - gb[n]).abs().max())
        for k in ("logps/chosen", "logps/rejected", "rewards/margins", "entropy"):
            assert abs(ma[k][0] - mb[k][0]) < 1e-5, (what, lt, k, ma[k], mb[k])


@pytest.mark.parametrize("packing", [True, False])
def test_every_loss_type_matches_the_two_sequence_path(tiny_model, pairs, tmp_path, packing):
    plain = build(tiny_model, pairs, tmp_path, mode=False)
    shared = build(tiny_model, pairs, tmp_path, mode=True, packing=packing)
    assert shared.prefix_sharing and not plain.prefix_sharing
    # The precomputed reference log-probs (one pass per pair through the shared layout) match too.
    def refs(trainer):
        ds = trainer.train_dataset
        return torch.tensor(list(ds["ref_chosen_logps"]) + list(ds["ref_rejected_logps"]))

    ref_plain, ref_shared = refs(plain), refs(shared)
    assert torch.allclose(ref_plain, ref_shared, atol=1e-5, rtol=0)
    assert_same(loss_and_grads(plain, DPO_LOSS_TYPES), loss_and_grads(shared, DPO_LOSS_TYPES), "full")


def test_shared_rows_are_fewer_and_shorter_than_two_sequences(tiny_model, pairs, tmp_path):
    trainer = build(tiny_model, pairs, tmp_path, mode=True)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    plain_tokens = batch["input_ids"].numel()
    shared_tokens = batch["shared_layout"]["input_ids"].numel()
    assert shared_tokens < 0.75 * plain_tokens, (shared_tokens, plain_tokens)


def test_lora_reference_and_weighting_match(tiny_model, pairs, tmp_path):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    from align.config import LoraSettings

    settings = LoraSettings(**lora)
    for what, kw in (("lora", dict(lora=settings)), ("ref_model", dict(ref=True)),
                     ("wpo+ld_alpha", dict(use_weighting=True, ld_alpha=0.5))):
        plain = build(tiny_model, pairs, tmp_path / what / "a", mode=False, **kw)
        shared = build(tiny_model, pairs, tmp_path / what / "b", mode=True, **kw)
        if what == "lora":  # the adapter must move away from zero for the reference to differ from the policy
            for m in (plain.model, shared.model):
                with torch.no_grad():
                    for n, p in m.named_parameters():
                        if "lora_B" in n:
                            p.copy_(torch.full_like(p, 0.01))
        assert_same(loss_and_grads(plain, ["sigmoid", "ipo"]), loss_and_grads(shared, ["sigmoid", "ipo"]), what)


def test_truncated_pairs_match(tiny_model, pairs, tmp_path):
    plain = build(tiny_model, pairs, tmp_path / "a", mode=False, max_length=40)
    shared = build(tiny_model, pairs, tmp_path / "b", mode=True, max_length=40)
    assert_same(loss_and_grads(plain, ["sigmoid"]), loss_and_grads(shared, ["sigmoid"]), "truncated")


@pytest.fixture(scope="module")
def bloom_model(tmp_path_factory):
    """A model whose attention (ALiBi from a 2D mask) cannot take the shared layout."""
    from transformers import AutoModelForCausalLM, BloomConfig

    tok = build_tokenizer()
    out = tmp_path_factory.mktemp("bloom")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=len(tok), hidden_size=64, n_layer=2, n_head=4,
                                                         pad_token_id=tok.pad_token_id))
    tok.save_pretrained(out)
    model.save_pretrained(out)
    return out


def test_auto_falls_back_with_one_line_and_true_refuses(bloom_model, pairs, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="align"):
        trainer = build(bloom_model, pairs, tmp_path / "a", mode="auto")
    assert trainer.prefix_sharing is False and trainer.prefix_note.startswith("off (")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prefix sharing off")]
    assert len(lines) == 1, lines
    assert "shared_layout" not in trainer.data_collator([trainer.train_dataset[0]])
    with pytest.raises(AlignError, match="prefix_sharing: true, but"):
        build(bloom_model, pairs, tmp_path / "b", mode=True)


def test_the_probe_tolerance_follows_the_dtype_the_forward_computes_in(tiny_model, pairs, tmp_path):
    """Issue #20 item 3. Under QLoRA the model reports float32 (norms, LoRA) while bitsandbytes' nf4 layers compute
    in bnb_4bit_compute_dtype: the probe gap measured there (1.1e-4 nats per token on an H200) was judged by the fp32
    bound and turned prefix sharing off. bitsandbytes does not run QLoRA on a CPU, so the config is read here; a
    bf16 model turns prefix sharing on (its gap on the tiny model, ~1.4e-5, is under either bound: the H200's
    0.76 B model is where bf16 rounding crossed the fp32 one)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from align.stages.dpo import PROBE_TOLERANCE, compute_dtype

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert compute_dtype(model) == torch.float32
    model.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    assert model.dtype == torch.float32 and compute_dtype(model) == torch.bfloat16
    model.config.quantization_config = model.config.quantization_config.to_dict()  # as a saved config holds it
    assert compute_dtype(model) == torch.bfloat16
    assert compute_dtype(model.to(torch.bfloat16)) == torch.bfloat16

    trainer = build(tiny_model, pairs, tmp_path, mode="auto", dtype=torch.bfloat16)
    gap, error = trainer.prefix_probe()
    assert not error and gap < PROBE_TOLERANCE[False]
    assert trainer.prefix_sharing is True


def test_auto_turns_on_for_llama(tiny_model, pairs, tmp_path):
    trainer = build(tiny_model, pairs, tmp_path, mode="auto")
    assert trainer.prefix_sharing is True and trainer.prefix_note == "on, pairs packed"
    json.dumps(trainer.prefix_note)


def shared_hidden(model_path, attn, layout_, grad=False):
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() and attn == "flex_attention" and grad else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation=attn, dtype=torch.float32).to(device)
    shared = {k: v.to(device) for k, v in layout_.items()}
    mask = prefix_sharing.attention_mask(shared, attn, torch.float32)
    with torch.set_grad_enabled(grad):
        hidden = model.model(input_ids=shared["input_ids"], position_ids=shared["position_ids"],
                             attention_mask=mask).last_hidden_state
    if grad:
        hidden.square().mean().backward()
        return hidden.detach().cpu(), model.model.layers[0].self_attn.q_proj.weight.grad.cpu()
    return hidden, None


PACKED = prefix_sharing.layout([[5, 6, 7, 8], [9, 10]], [[11, 12], [13]], [[14], [15, 16, 17]], pad_id=0, seq_len=7,
                               pack=True)


def test_flex_block_mask_matches_the_dense_mask(tiny_model):
    """FlexAttention (GPUs; on a CPU it runs forward only) gets a BlockMask with the same pattern."""
    dense, _ = shared_hidden(tiny_model, "sdpa", PACKED)
    flex, _ = shared_hidden(tiny_model, "flex_attention", PACKED)
    assert torch.allclose(dense, flex, atol=1e-5), (dense - flex).abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs a GPU")
def test_flex_backward_matches_the_dense_mask_on_gpu(tiny_model):
    dense, dense_grad = shared_hidden(tiny_model, "sdpa", PACKED, grad=True)
    flex, flex_grad = shared_hidden(tiny_model, "flex_attention", PACKED, grad=True)
    assert torch.allclose(dense, flex, atol=1e-4) and torch.allclose(dense_grad, flex_grad, atol=1e-4)


def test_what_cannot_take_the_layout_is_named(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert prefix_sharing.supports(model, 128) is None
    model.config.sliding_window = 64  # a window shorter than the sequences: the custom mask would lift it
    assert "sliding-window" in prefix_sharing.supports(model, 128)
    assert prefix_sharing.supports(model, 64) is None
    model.config.sliding_window = None
    model.config.final_logit_softcapping = 30.0
    assert "scales its logits" in prefix_sharing.supports(model, 128)
