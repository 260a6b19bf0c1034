"""The RL math of align.losses against TRL 1.12.0's PPOTrainer, on the same random tensors.

    .bench-venvs/trl112/bin/python bench/compare_trl112_math.py     # bench/ppo_step.py makes the venv

TRL removed PPO after 1.12.0; there it lives in `trl/experimental/ppo/ppo_trainer.py`. Its
`masked_mean`, `masked_var` and `masked_whiten` are module-level functions and are imported.
GAE, the KL penalty and the two losses are inline in `PPOTrainer.train`; they are copied below
line for line, each with the line numbers of the 1.12.0 file, and checked against that file when
the script starts (so a copy that drifted from the installed source fails loudly).

Each item prints the largest absolute difference over several seeds, B = 4..8 rows, T = 5..12
tokens and right-padded masks (one row always fills T, one row is always a single token). A
difference that is a convention, not a bug, is printed as such with the reason.

The script is in two halves so that CI needs no TRL 1.12: `trl_outputs` (TRL's side, needs the
trl112 venv) and `align_diffs` + `compare` (align's side, needs only torch). `bench/make_trl112_fixture.py`
stores the inputs and TRL's outputs in `tests/fixtures/trl112_ppo_math.pt`, and
`tests/test_trl112_parity.py` runs align's side against that file.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import torch

REPO = Path(__file__).resolve().parents[1]


def load_align_losses():
    # By path: align/losses.py imports only torch, and the trl112 venv does not have align's other deps.
    spec = importlib.util.spec_from_file_location("align_losses", REPO / "align" / "losses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


L = load_align_losses()

INVALID_LOGPROB = 1.0  # what TRL writes into logprobs past the last real token; load_trl() checks it
T = None  # trl.experimental.ppo.ppo_trainer, set by load_trl(); only TRL's side uses it
GAMMA, LAM, KL_COEF, CLIP, VCLIP = 1.0, 0.95, 0.05, 0.2, 0.2
SEEDS = range(20)


def load_trl():
    """Import TRL 1.12.0's ppo_trainer module (only the trl112 venv has it) as the global T."""
    global T
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl
    from trl.experimental.ppo import ppo_trainer

    T = ppo_trainer
    assert T.INVALID_LOGPROB == INVALID_LOGPROB, T.INVALID_LOGPROB
    return trl


# Copies of TRL 1.12.0 trl/experimental/ppo/ppo_trainer.py, PPOTrainer.train. Each `# L<n>` marks the
# source line; check_copies() finds every marked line in the installed file.

def trl_rollout_tensors(args, logprobs, ref_logprobs, values, scores, sequence_lengths):
    """Lines 763-779: masks, INVALID_LOGPROB fill, value masking, KL penalty, score placement."""
    response_idxs = torch.arange(logprobs.shape[1], device=logprobs.device).repeat(logprobs.shape[0], 1)  # L763
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)  # L764
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)  # L765
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)  # L766
    sequence_lengths_p1 = sequence_lengths + 1  # L767
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))  # L768
    values = torch.masked_fill(values, padding_mask_p1, 0)  # L769
    logr = ref_logprobs - logprobs  # L773
    kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr  # Else statement is k3  # L774
    non_score_reward = -args.kl_coef * kl  # L775
    rewards = non_score_reward.clone()  # L776
    actual_start = torch.arange(rewards.size(0), device=rewards.device)  # L777
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)  # L778
    rewards[actual_start, actual_end] += scores  # L779
    return dict(logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, kl=kl, rewards=rewards,
                padding_mask=padding_mask, padding_mask_p1=padding_mask_p1)


def trl_gae(args, rewards, values):
    """Lines 787-796: reverse loop over the whole padded length, no mask (padding is handled by
    the zeros written into values and rewards beforehand)."""
    lastgaelam = 0  # L787
    advantages_reversed = []  # L788
    gen_length = rewards.shape[1]  # L789 (responses.shape[1] there)
    for t in reversed(range(gen_length)):  # L790
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0  # L791
        delta = rewards[:, t] + args.gamma * nextvalues - values[:, t]  # L792
        lastgaelam = delta + args.gamma * args.lam * lastgaelam  # L793
        advantages_reversed.append(lastgaelam)  # L794
    advantages = torch.stack(advantages_reversed[::-1], axis=1)  # L795
    returns = advantages + values  # L796
    return advantages, returns


def trl_whiten_advantages(advantages, padding_mask):
    """Lines 797-798."""
    advantages = T.masked_whiten(advantages, ~padding_mask)  # L797
    return torch.masked_fill(advantages, padding_mask, 0)  # L798


def trl_losses(args, new_logprobs, vpred, mb_logprobs, mb_values, mb_advantage, mb_return, padding_mask,
               padding_mask_p1):
    """Lines 824-846 and 852-857, with the model forward replaced by given new_logprobs and vpred."""
    new_logprobs = torch.masked_fill(new_logprobs, padding_mask, INVALID_LOGPROB)  # L824
    vpred = torch.masked_fill(vpred, padding_mask_p1, 0)  # L828
    vpredclipped = torch.clamp(vpred, mb_values - args.cliprange_value, mb_values + args.cliprange_value)  # L829
    vf_losses1 = torch.square(vpred - mb_return)  # L834
    vf_losses2 = torch.square(vpredclipped - mb_return)  # L835
    vf_loss_max = torch.max(vf_losses1, vf_losses2)  # L836
    vf_loss = 0.5 * T.masked_mean(vf_loss_max, ~padding_mask_p1)  # L837
    vf_clipfrac = T.masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)  # L838
    logprobs_diff = new_logprobs - mb_logprobs  # L841
    ratio = torch.exp(logprobs_diff)  # L842
    pg_losses = -mb_advantage * ratio  # L843
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)  # L844
    pg_loss_max = torch.max(pg_losses, pg_losses2)  # L845
    pg_loss = T.masked_mean(pg_loss_max, ~padding_mask)  # L846
    pg_clipfrac = T.masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)  # L852
    approxkl = 0.5 * (logprobs_diff**2).mean()  # L857
    return dict(vf_loss=vf_loss, vf_clipfrac=vf_clipfrac, pg_loss=pg_loss, pg_clipfrac=pg_clipfrac,
                approxkl=approxkl, new_logprobs=new_logprobs, vpred=vpred)


def trl_entropy(logits):
    """Line 856 (after the softmax of line 855)."""
    prob_dist = torch.nn.functional.softmax(logits, dim=-1)  # L855
    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)  # L856
    return entropy


def _statement(src: list[str], n: int) -> str:
    """Source line n (1-based) joined with its continuation lines, whitespace normalised."""
    text, depth, i = "", 0, n - 1
    while True:
        line = src[i].split("  # ")[0].strip()
        text += " " + line
        depth += line.count("(") + line.count("[") - line.count(")") - line.count("]")
        i += 1
        if depth <= 0:
            break
    text = " ".join(text.split()).replace("( ", "(").replace(" )", ")").replace(",)", ")")
    return text


def check_copies() -> None:
    """Every `# L<n>` line above must equal the statement at line n of the installed ppo_trainer.py, up to:
    TRL's module functions called as T.<name>, the mini-batch indexing `[micro_batch_inds]` dropped,
    and the renames listed in `renamed`."""
    src = Path(T.__file__).read_text().splitlines()
    mine = Path(__file__).read_text().splitlines()
    renamed = {
        "gen_length = rewards.shape[1]": "gen_length = responses.shape[1]",
        "return torch.masked_fill(advantages, padding_mask, 0)":
            "advantages = torch.masked_fill(advantages, padding_mask, 0)",
        "response_idxs = torch.arange(logprobs.shape[1], device=logprobs.device).repeat(logprobs.shape[0], 1)":
            "response_idxs = torch.arange(responses.shape[1], device=responses.device).repeat(responses.shape[0], 1)",
    }
    bad, checked = [], 0
    for line in mine:
        code, sep, tag = line.rpartition("# L")
        if not sep or not tag.strip().isdigit() or "def " in code or "renamed" in code:
            continue
        n = int(tag.strip())
        code = " ".join(code.split("  # ")[0].split()).replace("T.masked_", "masked_")
        code = renamed.get(code, code)
        want = _statement(src, n).replace("[micro_batch_inds]", "")
        checked += 1
        if code != want:
            bad.append(f"  L{n}: copy   {code}\n        source {want}")
    if bad or not checked:
        sys.exit("copies of TRL's PPOTrainer.train no longer match the installed source:\n" + "\n".join(bad))


def random_case(seed: int) -> dict:
    """The inputs of one case: float64 tensors, right-padded rows (`last`: each row's last real index)."""
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(4, 9, (1,), generator=g))
    Tn = int(torch.randint(5, 13, (1,), generator=g))
    # Index of the last real token per row (TRL's sequence_lengths); row 0 fills T, row 1 is one token.
    last = torch.randint(0, Tn, (B,), generator=g)
    last[0], last[1] = Tn - 1, 0
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    case = dict(seed=seed, B=B, T=Tn, last=last, logps=-r(B, Tn).abs() - 0.5, ref_logps=-r(B, Tn).abs() - 0.5,
                new_logps=-r(B, Tn).abs() - 0.5, values=r(B, Tn), new_values=r(B, Tn), scores=r(B),
                advantages=r(B, Tn), returns=r(B, Tn), logits=3 * r(B, Tn, 11))
    real = torch.arange(Tn).unsqueeze(0) <= last.unsqueeze(1)
    case["rewards0"] = torch.randn(B, Tn, generator=torch.Generator().manual_seed(1000 + seed),
                                   dtype=torch.float64) * real.double()
    return case


def masks(c: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """real (B, T) bool: our completion mask; real_p1: TRL's ~padding_mask_p1 (one token longer); mask: real as float."""
    Tn, last = c["T"], c["last"]
    real = torch.arange(Tn).unsqueeze(0) <= last.unsqueeze(1)
    real_p1 = torch.arange(Tn).unsqueeze(0) <= (last + 1).unsqueeze(1)
    return real, real_p1, real.double()


def trl_outputs(c: dict) -> dict:
    """Everything TRL 1.12.0 computes for case c (its copied inline code and its imported functions).
    Needs load_trl(). Every value is a tensor, so the dict can be stored with torch.save."""
    real, real_p1, mask = masks(c)
    out = {}
    # (d) KL, both estimators, after TRL's INVALID_LOGPROB fill.
    for est in ("k1", "k3"):
        t = trl_rollout_tensors(NS(kl_estimator=est, kl_coef=KL_COEF), c["logps"], c["ref_logps"], c["values"],
                                c["scores"], c["last"])
        out[f"kl_{est}"] = t["kl"]
    # The k1 pipeline's tensors feed GAE and the losses below.
    t = trl_rollout_tensors(NS(kl_estimator="k1", kl_coef=KL_COEF), c["logps"], c["ref_logps"], c["values"],
                            c["scores"], c["last"])
    for k in ("logprobs", "values", "rewards", "padding_mask", "padding_mask_p1"):
        out[f"rollout_{k}"] = t[k]
    # (a) GAE: same inputs (zero past the end); values not zeroed; TRL's own pipeline at lam and at lam = 1.
    gl = NS(gamma=GAMMA, lam=LAM)
    out["gae_same_adv"], out["gae_same_ret"] = trl_gae(gl, c["rewards0"], c["values"] * mask)
    out["gae_unzeroed_adv"], _ = trl_gae(gl, c["rewards0"], c["values"])
    out["gae_pipeline_adv"], out["gae_pipeline_ret"] = trl_gae(gl, out["rollout_rewards"], out["rollout_values"])
    out["gae_pipeline_lam1_adv"], _ = trl_gae(NS(gamma=GAMMA, lam=1.0), out["rollout_rewards"], out["rollout_values"])
    # (c) whitening.
    out["whiten_adv"] = trl_whiten_advantages(out["gae_pipeline_adv"], out["rollout_padding_mask"])
    x = c["returns"]
    out["whiten_noshift"] = T.masked_whiten(x, real, shift_mean=False)
    out["whiten_raw"] = T.masked_whiten(x, real)
    out["masked_mean"] = T.masked_mean(x, real)
    out["masked_var"] = T.masked_var(x, real)
    # (b) losses, on TRL-processed rollout tensors.
    tl = trl_losses(NS(cliprange=CLIP, cliprange_value=VCLIP), c["new_logps"], c["new_values"],
                    out["rollout_logprobs"], out["rollout_values"], c["advantages"] * mask, c["returns"] * real_p1,
                    out["rollout_padding_mask"], out["rollout_padding_mask_p1"])
    for k in ("vf_loss", "vf_clipfrac", "pg_loss", "pg_clipfrac", "approxkl"):
        out[k] = tl[k]
    out["entropy"] = trl_entropy(c["logits"])
    return {k: v.detach() for k, v in out.items()}


def trl_edge_outputs() -> dict:
    """Two edge cases that differ by construction (printed, not compared)."""
    one = torch.tensor([[0.7, 0.0, 0.0]], dtype=torch.float64)
    one_mask = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        return {"whiten_one": T.masked_whiten(one, one_mask.bool()),
                "mean_empty": T.masked_mean(one, torch.zeros_like(one_mask).bool())}


def pack(dicts: list[dict]) -> tuple[torch.Tensor, list[dict]]:
    """Many small dicts of tensors as one flat float64 tensor plus a layout (for a small fixture file:
    one storage instead of hundreds). Bool and int64 values are exact in float64; other values (ints)
    go into the layout as they are."""
    flat, layout = [], []
    for d in dicts:
        entry = {}
        for k, v in d.items():
            if torch.is_tensor(v):
                entry[k] = ("tensor", tuple(v.shape), str(v.dtype).removeprefix("torch."))
                flat.append(v.detach().reshape(-1).to(torch.float64))
            else:
                entry[k] = ("value", v)
        layout.append(entry)
    return torch.cat(flat), layout


def unpack(flat: torch.Tensor, layout: list[dict]) -> list[dict]:
    out, i = [], 0
    for entry in layout:
        d = {}
        for k, spec in entry.items():
            if spec[0] == "value":
                d[k] = spec[1]
                continue
            shape, dtype = tuple(spec[1]), getattr(torch, spec[2])
            n = math.prod(shape)
            d[k] = flat[i:i + n].reshape(shape).to(dtype)
            i += n
        out.append(d)
    assert i == flat.numel(), (i, flat.numel())
    return out


def maxdiff(a, b, where=None) -> float:
    d = (a - b).abs()
    if where is not None:
        d = d[where]
    return float(d.max()) if d.numel() else 0.0


def align_diffs(c: dict, t: dict) -> dict[str, float]:
    """align.losses on case c against TRL's outputs t (from trl_outputs, live or stored): the largest
    absolute difference per item. Needs only torch and align/losses.py."""
    real, real_p1, mask = masks(c)
    last = c["last"]
    d = {}
    # (d) KL: TRL's per-token kl (0 on padding after its INVALID_LOGPROB fill) vs kl_estimate.
    for est in ("k1", "k3"):
        ours = L.kl_estimate(c["logps"], c["ref_logps"], est) * mask
        d[f"kl_{est}"] = maxdiff(t[f"kl_{est}"], ours)
        d[f"kl_{est}_pad"] = float(t[f"kl_{est}"][~real].abs().max()) if (~real).any() else 0.0
    assert torch.equal(~t["rollout_padding_mask"], real) and torch.equal(~t["rollout_padding_mask_p1"], real_p1)

    # (a1) Same inputs, zero past the last real token: TRL's unmasked loop and ours agree on real tokens.
    adv_o, ret_o = L.gae(c["rewards0"], c["values"] * mask, mask, GAMMA, LAM)
    d["gae_same_inputs_adv"] = maxdiff(t["gae_same_adv"], adv_o, real)
    d["gae_same_inputs_ret"] = maxdiff(t["gae_same_ret"], ret_o, real)
    d["gae_same_inputs_pad"] = maxdiff(t["gae_same_adv"], adv_o, ~real)
    # (a2) Values NOT zeroed past the end: TRL bootstraps from V at the first padded position; ours treats it as 0.
    adv_o2, _ = L.gae(c["rewards0"], c["values"], mask, GAMMA, LAM)
    d["gae_unzeroed_values"] = maxdiff(t["gae_unzeroed_adv"], adv_o2, real)
    # (a3) TRL's own pipeline: score one step past the last token (actual_end), values kept there. Ours, given
    # TRL's rewards and values and a mask one token longer (~padding_mask_p1), reproduces it exactly.
    adv_o3, ret_o3 = L.gae(t["rollout_rewards"], t["rollout_values"], real_p1.double(), GAMMA, LAM)
    d["gae_trl_pipeline_p1_mask"] = max(maxdiff(t["gae_pipeline_adv"], adv_o3, real_p1),
                                        maxdiff(t["gae_pipeline_ret"], ret_o3, real_p1))
    # (a4) ...whereas the natural align convention (score on the last real token, mask = real tokens, V past
    # the end = 0) gives different advantages on real tokens unless lam = 1 and V(s_end+1) = score.
    rewards_ours = -KL_COEF * L.kl_estimate(c["logps"], c["ref_logps"], "k1") * mask
    rewards_ours[torch.arange(c["B"]), last] += c["scores"]
    adv_o4, _ = L.gae(rewards_ours, c["values"], mask, GAMMA, LAM)
    d["gae_trl_vs_align_convention"] = maxdiff(t["gae_pipeline_adv"], adv_o4, real)
    # With lam = 1, TRL's A_t = sum of rewards to the end - V_t; the same as ours when the p1 reward is moved back.
    adv_o5, _ = L.gae(rewards_ours, c["values"], mask, GAMMA, 1.0)
    d["gae_trl_vs_align_lam1"] = maxdiff(t["gae_pipeline_lam1_adv"], adv_o5, real)

    # (c) masked_whiten: TRL's whitening of advantages (then zero on padding) vs ours.
    w_o = L.masked_whiten(t["gae_pipeline_adv"], mask)
    d["whiten_real"] = maxdiff(t["whiten_adv"], w_o, real)
    d["whiten_pad"] = maxdiff(t["whiten_adv"], w_o, ~real)
    x = c["returns"]
    d["whiten_noshift_real"] = maxdiff(t["whiten_noshift"], L.masked_whiten(x, mask, shift_mean=False), real)
    d["whiten_raw_pad"] = maxdiff(t["whiten_raw"], L.masked_whiten(x, mask), ~real)
    d["masked_mean"] = abs(float(t["masked_mean"] - L.masked_mean(x, mask)))
    d["masked_var"] = abs(float(t["masked_var"] - L.masked_var(x, mask)))

    # (b) Losses, on TRL-processed rollout tensors (INVALID_LOGPROB on padding, values zero past p1).
    pg, pg_stats = L.ppo_policy_loss(c["new_logps"], c["logps"], c["advantages"] * mask, mask, CLIP)
    d["pg_loss"] = abs(float(t["pg_loss"] - pg))
    d["pg_clipfrac"] = abs(float(t["pg_clipfrac"] - pg_stats["clip_frac"]))
    d["approxkl"] = abs(float(t["approxkl"] - pg_stats["approx_kl"]))
    d["approxkl_times_real_share"] = abs(float(t["approxkl"] - pg_stats["approx_kl"] * mask.mean()))
    # Value loss with TRL's mask (one token past the end) and with ours (real tokens only).
    vf_p1, vf_p1_stats = L.ppo_value_loss(c["new_values"] * real_p1, t["rollout_values"], c["returns"] * real_p1,
                                          real_p1.double(), VCLIP)
    d["vf_loss_p1_mask"] = abs(float(t["vf_loss"] - vf_p1))
    d["vf_clipfrac_p1_mask"] = abs(float(t["vf_clipfrac"] - vf_p1_stats["value_clip_frac"]))
    vf_real, _ = L.ppo_value_loss(c["new_values"], t["rollout_values"], c["returns"], mask, VCLIP)
    d["vf_loss_real_mask"] = abs(float(t["vf_loss"] - vf_real))

    # Entropy (a logged stat in TRL, a loss term in ours when entropy_coef > 0).
    d["entropy"] = maxdiff(t["entropy"], L.entropy_from_logits(c["logits"]).double())
    return d


class Report:
    def __init__(self):
        self.rows = []

    def add(self, item: str, diff: float, note: str = "", tol: float = 1e-10):
        self.rows.append((item, diff, note, tol))

    def print(self) -> bool:
        width = max(len(r[0]) for r in self.rows)
        ok_all = True
        for item, diff, note, tol in self.rows:
            if note.startswith("CONVENTION"):
                status = "differs by design"
            else:
                ok = diff <= tol
                ok_all &= ok
                status = "match" if ok else "MISMATCH"
            print(f"  {item:<{width}}  max|diff| = {diff:9.2e}  {status}")
            if note:
                for line in note.split("\n"):
                    print(f"  {'':<{width}}    {line}")
        return ok_all


def compare(cases: list[dict], trl_out: list[dict], edge: dict) -> bool:
    """align's side of every case against TRL's outputs; prints the report; True when every item that is
    not a documented convention is within its tolerance."""
    worst: dict[str, float] = {}
    for c, t in zip(cases, trl_out, strict=True):
        for k, v in align_diffs(c, t).items():
            worst[k] = max(worst.get(k, 0.0), v)
    shapes = [(c["B"], c["T"]) for c in cases]
    one = torch.tensor([[0.7, 0.0, 0.0]], dtype=torch.float64)
    one_mask = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    ours_one = L.masked_whiten(one, one_mask)
    ours_empty = L.masked_mean(one, torch.zeros_like(one_mask))

    print(f"{len(shapes)} seeds, (B, T) from {min(shapes)} to {max(shapes)}, float64, "
          f"gamma={GAMMA} lam={LAM} kl_coef={KL_COEF} cliprange={CLIP} cliprange_value={VCLIP}\n")
    r = Report()
    print("(d) KL penalty, TRL L773-774 (after the L765-766 INVALID_LOGPROB fill) vs kl_estimate(logps, ref_logps)")
    r.add("k1 on all positions", worst["kl_k1"])
    r.add("k3 on all positions", worst["kl_k3"],
          "TRL's padding is 0 because logprobs and ref_logprobs are both filled with 1.0 there;\n"
          "ours is 0 there because we multiply by the mask.")
    print_and_reset = lambda: (r.print(), r.rows.clear())[0]  # noqa: E731
    ok = print_and_reset()

    print("\n(a) GAE, TRL L787-796 (copied) vs align.losses.gae")
    r.add("same rewards/values (0 past end): adv on real", worst["gae_same_inputs_adv"])
    r.add("same rewards/values (0 past end): returns on real", worst["gae_same_inputs_ret"])
    r.add("same rewards/values (0 past end): on padding", worst["gae_same_inputs_pad"],
          "both 0 there: with zero rewards and values past the end TRL's unmasked loop stays at 0.")
    r.add("values not zeroed past end: adv on real", worst["gae_unzeroed_values"],
          "CONVENTION: TRL's loop has no mask; at the last real token it bootstraps from V[t+1] even if\n"
          "that is padding. TRL itself zeroes values past the end first (L769), so inside TRL this never\n"
          "happens; ours needs no such pre-zeroing.")
    r.add("TRL pipeline, ours with mask = ~padding_mask_p1", worst["gae_trl_pipeline_p1_mask"],
          "ours reproduces TRL exactly when given TRL's rewards/values and its one-longer mask.")
    r.add("TRL pipeline vs align convention (lam=0.95)", worst["gae_trl_vs_align_convention"],
          "CONVENTION: TRL adds the score at actual_end = last+1 (L778-779; at last only when the row\n"
          "fills T) and trains V there too (padding_mask_p1), so the score reaches real tokens through\n"
          "V[last+1] and lam: A_last = kl_r + V[last+1] - V[last] + lam*(score - V[last+1]).\n"
          "The align convention (score on the last real token, V=0 past it) gives A_last = kl_r + score - V[last].")
    r.add("TRL pipeline vs align convention (lam=1)", worst["gae_trl_vs_align_lam1"],
          "with lam=1, V[last+1] cancels and the two conventions agree on every real token.")
    ok &= print_and_reset()

    print("\n(c) whitening, TRL masked_whiten / masked_mean / masked_var (imported) vs ours")
    r.add("masked_mean", worst["masked_mean"])
    r.add("masked_var (unbiased)", worst["masked_var"], tol=1e-6,
          note="float32 rounding: TRL's Bessel factor mask_sum / (mask_sum - 1) divides two int64 tensors,\n"
               "which gives float32 even for float64 inputs; ours stays in the input dtype.")
    r.add("masked_whiten on real tokens", worst["whiten_real"], tol=1e-6, note="same float32 Bessel factor.")
    r.add("masked_whiten(shift_mean=False) on real", worst["whiten_noshift_real"], tol=1e-6)
    r.add("advantages whitened, L797-798, on padding", worst["whiten_pad"])
    r.add("raw masked_whiten on padding", worst["whiten_raw_pad"],
          "CONVENTION: TRL's masked_whiten returns whitened values on padding too (L797 is followed by a\n"
          "masked_fill, L798); ours returns 0 on padding.")
    ok &= print_and_reset()

    print("\n(b) losses, TRL L824-846, L852, L857 (copied) vs ppo_policy_loss / ppo_value_loss")
    r.add("pg_loss", worst["pg_loss"])
    r.add("pg_clipfrac vs clip_frac", worst["pg_clipfrac"], tol=1e-6,
          note="float32 rounding: both take .float() of a bool; TRL averages it in float32 (bool mask),\n"
               "ours in float64 (float64 mask).")
    r.add("vf_loss, ours given TRL's mask (~padding_mask_p1)", worst["vf_loss_p1_mask"],
          "both have the 0.5 factor: 0.5 * mean(max(...)).")
    r.add("vf_clipfrac vs value_clip_frac (same mask)", worst["vf_clipfrac_p1_mask"], tol=1e-6,
          note="float32 rounding, as for pg_clipfrac.")
    r.add("vf_loss, ours with the real-token mask", worst["vf_loss_real_mask"],
          "CONVENTION: TRL's value loss also covers one position past the last real token (where it put\n"
          "the score); with the real-token mask ours averages over one token fewer per row.")
    r.add("approxkl vs approx_kl", worst["approxkl"],
          "CONVENTION (logged stat only): TRL's approxkl is .mean() over all B*T positions, padding\n"
          "(diff 0) included, so it is diluted by padding; ours is the mean over real tokens.")
    r.add("approxkl vs approx_kl * (real tokens / B*T)", worst["approxkl_times_real_share"],
          "rescaling ours by the share of real tokens recovers TRL's number.")
    r.add("entropy, TRL L855-856 vs entropy_from_logits", worst["entropy"], tol=1e-5,
          note="ours computes in float32 (logits.float()); TRL in the input dtype (float64 here).")
    ok &= print_and_reset()

    print("\nedge cases (by construction, not sampled)")
    print(f"  one real token, masked_whiten: TRL {edge['whiten_one'][0, 0].item()!r} (Bessel n/(n-1) with n=1), "
          f"ours {ours_one[0, 0].item()!r}")
    print(f"  no real token, masked_mean:    TRL {edge['mean_empty'].item()!r}, ours {ours_empty.item()!r}")
    print("  TRL's masked_var raises ValueError when the mask is empty; ours returns 0.")
    print("\nall non-convention items match" if ok else "\nSOME NON-CONVENTION ITEMS DIFFER (see MISMATCH above)")
    return ok


def main() -> None:
    trl = load_trl()
    check_copies()
    print(f"TRL {trl.__version__} ({Path(T.__file__).relative_to(Path(trl.__file__).parents[1])}), torch {torch.__version__}")
    print("align.losses from", REPO / "align" / "losses.py")
    cases = [random_case(seed) for seed in SEEDS]
    ok = compare(cases, [trl_outputs(c) for c in cases], trl_edge_outputs())
    sys.exit(0 if ok else 1)

if __name__ == "__main__":
    main()
