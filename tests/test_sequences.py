"""Padding, packing and completion log-probs against tensors written out by hand: the off-by-ones
(a 1-token completion, an empty one, prompts of different lengths, position ids after left padding,
which logits predict which token). No tokenizer, no weights on disk: milliseconds."""

import math
from types import SimpleNamespace

import pytest
import torch

from align.sequences import (
    completion_logits,
    last_token_index,
    left_pad,
    pack,
    position_ids_of,
    right_pad,
    rows_of,
    tempered,
    token_logps,
)

T = torch.tensor


def completion(prompt_ids, token_ids):
    return SimpleNamespace(prompt_ids=prompt_ids, token_ids=token_ids)


# Prompts of 3, 1 and 2 tokens; completions of 1, 3 and 0 tokens. P = 3, T = 3, pad = 0.
BATCH = [completion([5, 6, 7], [8]), completion([9], [10, 11, 12]), completion([13, 14], [])]


def test_left_and_right_padding_by_hand():
    ids, mask = left_pad([[1, 2], [3], []], pad=0)
    assert ids.tolist() == [[1, 2], [0, 3], [0, 0]]
    assert mask.tolist() == [[1, 1], [0, 1], [0, 0]]
    ids, mask = right_pad([[1, 2], [3], []], pad=-1, length=3)
    assert ids.tolist() == [[1, 2, -1], [3, -1, -1], [-1, -1, -1]]
    assert mask.tolist() == [[1, 1, 0], [1, 0, 0], [0, 0, 0]]
    values, _ = right_pad([[-0.5], [-1.25, -2.0]], pad=0.0, dtype=torch.float32)
    assert values.dtype == torch.float32 and values.tolist() == [[-0.5, 0.0], [-1.25, -2.0]]


def test_position_ids_count_real_tokens_only():
    """Left padding gets 0 and the first real token is 0 too, so a padded row sees the positions it would alone."""
    assert position_ids_of(T([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_pack_by_hand():
    batch = pack(BATCH, pad_id=0, device="cpu")
    assert (batch["P"], batch["T"]) == (3, 3)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 0, 0],
                                           [0, 0, 9, 10, 11, 12],
                                           [0, 13, 14, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0],
                                                [0, 0, 1, 1, 1, 1],
                                                [0, 1, 1, 0, 0, 0]]
    # Right padding repeats the last position; it is masked, so the value does not matter.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 3, 3],
                                              [0, 0, 0, 1, 2, 3],
                                              [0, 0, 1, 1, 1, 1]]
    assert batch["tokens"].tolist() == [[8, 0, 0], [10, 11, 12], [0, 0, 0]]
    assert batch["completion_mask"].tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert batch["completion_mask"].dtype == torch.float32
    assert batch["prompt_lengths"].tolist() == [3, 1, 2]
    # The score goes on the last real token: the 1-token row's only token, the empty row's (masked) column 0.
    assert last_token_index(batch["completion_mask"]).tolist() == [0, 2, 0]


def test_pack_of_empty_completions_keeps_one_masked_column():
    batch = pack([completion([1, 2], []), completion([3], [])], pad_id=0, device="cpu")
    assert batch["T"] == 1
    assert batch["input_ids"].tolist() == [[1, 2, 0], [0, 3, 0]]
    assert batch["completion_mask"].tolist() == [[0], [0]]


def test_rows_of_cuts_to_the_chosen_rows_own_lengths():
    batch = pack(BATCH, pad_id=0, device="cpu")
    per_token = {"advantages": T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])}
    mb, cut = rows_of(batch, T([1]), per_token)  # prompt of 1: 2 padding columns dropped; T' = 3
    assert mb["input_ids"].tolist() == [[9, 10, 11, 12]]
    assert mb["position_ids"].tolist() == [[0, 1, 2, 3]]
    assert mb["T"] == 3 and cut["advantages"].tolist() == [[4.0, 5.0, 6.0]]
    mb, cut = rows_of(batch, T([2, 0]), per_token)  # longest prompt 3, longest completion 1
    assert mb["input_ids"].tolist() == [[0, 13, 14, 0], [5, 6, 7, 8]]
    assert mb["tokens"].tolist() == [[0], [8]] and mb["completion_mask"].tolist() == [[0], [1]]
    assert mb["T"] == 1 and cut["advantages"].tolist() == [[7.0], [1.0]]
    mb, _ = rows_of(batch, T([2]), per_token)  # an empty completion alone still keeps one column
    assert mb["input_ids"].tolist() == [[13, 14, 0]] and mb["T"] == 1


class ColumnModel(torch.nn.Module):
    """A fake LM whose logits at column j are all j: shows which columns a slice reads."""

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, use_cache):
        B, L = input_ids.shape
        columns = torch.arange(L - logits_to_keep, L, dtype=torch.float32)
        return SimpleNamespace(logits=columns.view(1, -1, 1).expand(B, -1, 4))


def test_logits_to_keep_t_plus_1_gives_the_logits_that_predict_each_completion_token():
    """P = 3, T = 3, L = 6: token t of the completion (column P + t) is predicted at column P - 1 + t,
    so the kept columns are 2, 3, 4; column 5 (predicting past the end) is dropped."""
    batch = pack(BATCH, pad_id=0, device="cpu")
    logits = completion_logits(ColumnModel(), batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                               batch["T"], temperature=1.0)
    assert logits.shape == (3, 3, 4)
    assert logits[:, :, 0].tolist() == [[2.0, 3.0, 4.0]] * 3
    halved = completion_logits(ColumnModel(), batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                               batch["T"], temperature=2.0)
    assert halved[0, :, 0].tolist() == [1.0, 1.5, 2.0]


def test_token_logps_and_temperature_by_hand():
    """logits [0, ln 3] -> p = [1/4, 3/4]; token 1: ln .75 = -.287682, token 0: ln .25 = -1.386294."""
    logits = T([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    assert token_logps(logits, T([[1, 0]])).tolist()[0] == pytest.approx([-0.287682, -1.386294], abs=1e-6)
    assert tempered(T([2.0]), 2.0).item() == 1.0
    assert tempered(T([2.0]), 1.0).item() == 2.0 and tempered(T([2.0]), 0.0).item() == 2.0  # greedy reads raw logits


def test_completion_logps_of_a_packed_batch_equal_each_row_run_alone():
    """A 2-layer random Llama: the packed, left-padded batch with position ids gives every row the log-probs
    of a plain full forward over that row alone (unpadded, all logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                         pad_token_id=0)).eval()
    rows = [completion([5, 6, 7, 3], [8]), completion([9], [10, 11, 12, 2]), completion([13, 14], [15, 16])]
    batch = pack(rows, pad_id=0, device="cpu")
    with torch.no_grad():
        logps = token_logps(completion_logits(model, batch["input_ids"], batch["attention_mask"],
                                              batch["position_ids"], batch["T"]), batch["tokens"])
        for i, c in enumerate(rows):
            full = model(input_ids=T([c.prompt_ids + c.token_ids])).logits[0]  # (L, V)
            n = len(c.prompt_ids)
            alone = torch.log_softmax(full[n - 1:n - 1 + len(c.token_ids)], -1).gather(
                -1, T(c.token_ids).unsqueeze(-1)).squeeze(-1)
            assert logps[i, :len(c.token_ids)].tolist() == pytest.approx(alone.tolist(), abs=1e-5)
