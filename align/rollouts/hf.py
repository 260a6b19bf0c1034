"""The Hugging Face engine: `model.generate`, batched with left padding and the KV cache.

It samples from the live model object, so during training it always sees the current
weights (`load_weights` has nothing to do). Rows stop at EOS; a finished row's later
positions are padding and are cut off. Prompts are sorted by length before batching, so
a batch holds prompts of similar length and little padding, then put back in order.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from align.rollouts import Completion, Sampling, encode_prompts
from align.sequences import left_pad


class HFEngine:
    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 32, progress: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # sequences (prompts x n) per generate call
        self.progress = progress
        self.last_stats = {"tokens": 0, "seconds": 0.0}

    def load_weights(self, model) -> None:
        self.model = model

    def max_context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def generate(self, prompts: list, n: int = 1, sampling: Sampling | None = None,
                 return_logps: bool = False) -> list[list[Completion]]:
        sampling = sampling or Sampling()
        tok = self.tokenizer
        encoded = encode_prompts(tok, prompts, sampling.max_new_tokens, self.max_context())
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        per_call = max(1, self.batch_size // n)
        out: list[list[Completion] | None] = [None] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        start, new_tokens = time.perf_counter(), 0
        with torch.random.fork_rng(devices=[self.model.device] if self.model.device.type == "cuda" else []):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            try:
                chunks = range(0, len(order), per_call)
                for s in tqdm(chunks, desc=f"rollouts ({len(prompts)} prompts x {n})", unit="batch",
                              disable=not self.progress):
                    idx = order[s:s + per_call]
                    groups = self._generate_batch([encoded[i] for i in idx], n, sampling, return_logps)
                    for i, group in zip(idx, groups):
                        out[i] = group
                        new_tokens += sum(len(c.token_ids) for c in group)
            finally:
                self.model.train(was_training)
        self.last_stats = {"tokens": new_tokens, "seconds": time.perf_counter() - start}
        return out

    def _generate_batch(self, prompt_ids: list[list[int]], n: int, sampling: Sampling,
                        return_logps: bool) -> list[list[Completion]]:
        tok = self.tokenizer
        pad, eos = tok.pad_token_id, tok.eos_token_id
        device = self.model.device
        # Left padding: every prompt ends at the same column, where generation appends.
        input_ids, attention_mask = left_pad(prompt_ids, pad)  # (B, T_prompt)
        width = input_ids.shape[1]
        # Each prompt repeated n times in place (row i*n + j is completion j of prompt i), rather than
        # num_return_sequences, which HF refuses for greedy decoding with n > 1.
        input_ids = input_ids.repeat_interleave(n, dim=0)  # (B*n, T_prompt)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
        greedy = sampling.temperature <= 0
        # repetition_penalty pinned to 1: a value in the model's generation_config would otherwise
        # reshape the sampling distribution behind the caller's back.
        kwargs = dict(do_sample=not greedy, max_new_tokens=sampling.max_new_tokens, repetition_penalty=1.0,
                      eos_token_id=eos, pad_token_id=pad, use_cache=True, return_dict_in_generate=True,
                      output_logits=return_logps)
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        result = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     **kwargs)
        new = result.sequences[:, width:].cpu()  # (B*n, T_new)
        logps = None
        if return_logps:
            # Raw logits, one (B*n, V) tensor per step; gathered step by step to never hold (B, T, V).
            logps = torch.stack([torch.log_softmax(step.float(), -1).gather(-1, new[:, t:t + 1].to(step.device))
                                 .squeeze(-1).cpu() for t, step in enumerate(result.logits)], dim=1)
        groups = []
        for i, ids in enumerate(prompt_ids):
            group = []
            for j in range(n):
                row = new[i * n + j].tolist()
                finished = eos in row
                length = row.index(eos) + 1 if finished else len(row)
                tokens = row[:length]
                group.append(Completion(
                    prompt_ids=list(ids), token_ids=tokens, finished=finished,
                    text=tok.decode(tokens, skip_special_tokens=True).strip(),
                    logps=logps[i * n + j, :length].tolist() if logps is not None else None))
            groups.append(group)
        return groups
