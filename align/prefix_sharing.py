"""Shared-prompt forward for preference pairs (prefix sharing, Wang & Hegde 2024, arXiv 2410.20305), with packing.

A preference pair is usually computed as two sequences, `prompt + chosen` and `prompt + rejected`, so the
prompt (a system turn, earlier turns) goes through the model twice. Here a pair is one segment
`prompt + chosen + rejected` whose attention mask lets rejected tokens see the prompt but not the chosen
answer, and whose position ids restart at the prompt's end for rejected. Every token then sees exactly
what it sees in its own sequence, so the log-probs are the same (to float rounding) while the prompt is
computed once. With `pack=True`, several segments share a row (block-diagonal masks, positions restarting
per segment), so short pairs fill the padding that long ones leave.

`layout(...)` turns token-id lists into integer tensors (built by the data collator, on the CPU);
`attention_mask(...)` makes the mask the model's attention needs from them (a dense additive mask for
`sdpa`/`eager`, a FlexAttention `BlockMask` for `flex_attention`); `install(model)` wraps a model whose
forward already carries TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`) so that a call with a
`shared_layout=` keyword runs the backbone once over the shared rows and returns the per-token outputs
in the usual two-sequences layout (`[chosen rows; rejected rows] x (T - 1)`). Everything downstream
(TRL's loss types, metrics, the reference pass) reads them unchanged. Only completion positions go
through the LM head.
"""

from __future__ import annotations

import types

import torch

# Segment kinds in a shared row.
PAD, PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3
# Attention implementations that take a custom 4D mask (dense) or a BlockMask (flex) with position ids.
DENSE_MASK_ATTENTION = ("sdpa", "eager")
FUSED_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def pack_segments(lengths: list[int], pack: bool) -> list[list[int]]:
    """Rows of segment indices. Without `pack`, one segment per row, in order. With it, first-fit decreasing
    into rows as long as the longest segment, so no row is longer than it would be unpacked."""
    if not pack:
        return [[i] for i in range(len(lengths))]
    capacity = max(lengths, default=0)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def layout(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], *, pad_id: int,
           seq_len: int, pack: bool = False) -> dict[str, torch.Tensor]:
    """Integer tensors of the shared rows for B pairs.

    `input_ids`, `position_ids`, `segment` (1 + the pair's index, 0 on padding) and `kind` (PAD, PROMPT,
    CHOSEN, REJECTED) are `[rows, L]`. `index` is `[2B, seq_len]`: for row b < B of the usual layout
    (`prompt + chosen[b]`) and row B + b (`prompt + rejected[b]`), position t's flat position in the
    shared rows (`row * L + column`); padding positions point at 0 and must be masked by the caller.
    """
    n = len(prompts)
    lengths = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)]
    rows = pack_segments(lengths, pack)
    width = max((sum(lengths[i] for i in row) for row in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.zeros((len(rows), width), dtype=torch.long)
    kind = torch.zeros((len(rows), width), dtype=torch.long)
    index = torch.zeros((2 * n, seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        off = 0
        for i in row:
            p, c, j = len(prompts[i]), len(chosen[i]), len(rejected[i])
            ids[r, off:off + lengths[i]] = torch.tensor(prompts[i] + chosen[i] + rejected[i], dtype=torch.long)
            pos[r, off:off + p + c] = torch.arange(p + c)
            pos[r, off + p + c:off + lengths[i]] = torch.arange(p, p + j)
            segment[r, off:off + lengths[i]] = i + 1
            kind[r, off:off + p], kind[r, off + p:off + p + c], kind[r, off + p + c:off + lengths[i]] = (
                PROMPT, CHOSEN, REJECTED)
            base = r * width + off
            index[i, :p + c] = torch.arange(base, base + p + c)
            index[n + i, :p] = torch.arange(base, base + p)
            index[n + i, p:p + j] = torch.arange(base + p + c, base + p + c + j)
            off += lengths[i]
    return {"input_ids": ids, "position_ids": pos, "segment": segment, "kind": kind, "index": index}


def visible(segment_q, segment_k, kind_q, kind_k, q, k):
    """The one attention rule, over broadcastable tensors: query q may attend key k when both are in the same
    segment, k <= q, and never a rejected query on a chosen key; every position sees itself (padding too, so
    no softmax row is empty). The dense mask and FlexAttention's `mask_mod` both call it."""
    same = (segment_q == segment_k) & (segment_q > 0)
    return (same & (k <= q) & ~((kind_q == REJECTED) & (kind_k == CHOSEN))) | (q == k)


def allowed(segment: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
    """`[rows, L, L]` bool: query i may attend key j (`visible`)."""
    pos = torch.arange(segment.size(1), device=segment.device)
    return visible(segment[:, :, None], segment[:, None, :], kind[:, :, None], kind[:, None, :], pos[:, None],
                   pos[None, :])


def attention_mask(shared: dict, attn_implementation: str, dtype: torch.dtype):
    """The mask the model's attention takes: additive `[rows, 1, L, L]` for sdpa/eager, a BlockMask for flex."""
    segment, kind = shared["segment"], shared["kind"]
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            return visible(segment[b, q], segment[b, k], kind[b, q], kind[b, k], q, k)

        rows, width = segment.shape
        return create_block_mask(mask_mod, rows, None, width, width, device=segment.device)
    mask = torch.zeros(segment.shape[0], 1, segment.shape[1], segment.shape[1], dtype=dtype, device=segment.device)
    return mask.masked_fill_(~allowed(segment, kind)[:, None], torch.finfo(dtype).min)


def supports(model, max_length: int | None = None) -> str | None:
    """None if the model can take a shared layout for sequences of up to `max_length` tokens, else why not
    (one phrase)."""
    config = model.config.get_text_config()
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in DENSE_MASK_ATTENTION + ("flex_attention",):
        return f"attention '{impl}' takes no custom 4D mask"
    if impl == "flex_attention" and model.device.type == "cpu":
        return "FlexAttention has no backward pass on a CPU"
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(config, attr, None) not in (None, 1.0):
            return f"the model scales its logits ({attr})"
    if getattr(config, "output_router_logits", False):
        return "mixture-of-experts router losses are not gathered in the shared layout"
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window and (max_length is None or max_length > window):  # a custom mask would lift the window
        return f"sliding-window attention ({window} tokens) builds its own mask for sequences this long"
    return None


def install(model, outputs: tuple[str, ...]) -> None:
    """Wrap `model.forward` (already given TRL's fused LM head) so that `shared_layout=` runs the shared rows.

    `outputs` are the fused per-token fields to compute (TRL's DPO asks for log_probs, entropy, mean_logits,
    is_top1, and log_sum_sq_probs with WPO weighting). Calls without `shared_layout` go to the wrapped forward
    unchanged. Installing twice is a no-op.
    """
    if getattr(model, "_align_shared_prefix", False):
        return
    inner = model.forward

    def forward(self, *args, shared_layout=None, **kwargs):
        if shared_layout is None:
            return inner(*args, **kwargs)
        return shared_forward(self, shared_layout, kwargs, outputs)

    model.forward = types.MethodType(forward, model)
    model._align_shared_prefix = True


def shared_forward(model, shared: dict, kwargs: dict, outputs: tuple[str, ...]):
    from torch.distributed.tensor import DTensor
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, FusedCausalLMOutput, maybe_gather_lm_head_ctx

    labels = kwargs.pop("labels")
    if not kwargs.pop("fused_lm_head", False):
        raise ValueError("a shared layout is only computed through the fused LM head (fused_lm_head=True)")
    for key in ("input_ids", "attention_mask", "use_cache", "num_items_in_batch"):
        kwargs.pop(key, None)
    lm_head = model.get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias
    if isinstance(weight, DTensor):  # FSDP2 shards the head: gather it once, as TRL's fused head does
        weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
    mask_dtype = weight.dtype if weight.is_floating_point() else torch.float32
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    hidden = model.base_model(input_ids=shared["input_ids"], position_ids=shared["position_ids"],
                              attention_mask=attention_mask(shared, impl, mask_dtype), use_cache=False,
                              **kwargs).last_hidden_state
    hidden = hidden.reshape(-1, hidden.size(-1))
    targets = labels[:, 1:].to(weight.device)
    valid = targets != -100
    picked = hidden.index_select(0, shared["index"][:, :-1][valid].to(hidden.device)).to(weight.device)
    with maybe_gather_lm_head_ctx(weight, bias):
        per_token = ChunkedLogProbFunction.apply(picked, weight, bias, targets[valid], 1.0,
                                                 _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs)
    # masked_scatter keeps an all-masked batch connected to the graph (a differentiable zero), as TRL does.
    fields = {name: (None if x is None else x.new_zeros(valid.shape).masked_scatter(valid, x))
              for name, x in zip(FUSED_FIELDS, per_token)}
    loss = -fields["log_probs"].sum() / valid.sum().clamp(min=1)
    return FusedCausalLMOutput(loss=loss, label_mask=valid, **fields)
