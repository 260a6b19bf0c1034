"""The RL math, as pure functions over tensors: masked statistics, KL estimators, the KL-shaped
per-token reward, GAE, and the PPO policy and value losses; plus the Bradley-Terry loss the
reward stage trains with.

Only torch is imported, so the tests (tests/test_losses.py, values worked out by hand) run
in milliseconds without a model. Shapes: B sequences, T completion tokens; `mask` is 1 on
real completion tokens and 0 on padding. Per-token tensors are `(B, T)`.
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over positions where mask is 1. An all-padding input gives 0, not NaN."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  sum_over=None) -> torch.Tensor:
    """(x - mean) / std over masked positions; padding stays 0. With shift_mean=False the mean is kept
    (used for advantages when only their scale should change). `sum_over`: a function summing a tensor
    over processes (`align.distributed.all_sum`), so that several ranks whiten with the global mean and
    variance of all their tokens; by default this rank's alone."""
    if sum_over is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        n = sum_over(mask.sum().to(torch.float64))
        mean = (sum_over(masked_sum(x, mask).to(torch.float64)) / n.clamp(min=1)).to(x.dtype)
        var = sum_over(masked_sum((x - mean) ** 2, mask).to(torch.float64)) / n.clamp(min=1)
        var = (var * n / (n - 1) if n > 1 else var).to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from samples of π (Schulman, "Approximating KL divergence").

    With r = ref_logps - logps:
      k1 = -r                 unbiased, can be negative per token
      k2 = r² / 2             biased, low variance
      k3 = (e^r - 1) - r      unbiased and never negative
    """
    log_ratio = ref_logps - logps
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; expected k1, k2 or k3")


def ppo_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                finished: torch.Tensor, kl_coef: float, estimator: str = "k1",
                missing_eos_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards of RLHF-PPO (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022, eq. 2), as in
    torchtune's `rlhf.get_rewards_ppo`.

    s' = s - penalty · [row did not reach EOS]
    kl_t = KL estimate at token t (`kl_estimate(logps, ref_logps, estimator)`), 0 on padding
    r_t = -β · kl_t, plus s' at the row's last real token

    scores, finished (bool): (B,); logps, ref_logps, mask: (B, T). Returns (rewards (B, T),
    kl (B, T), s' (B,)). A row with no real token gets no reward at all."""
    penalized = scores - missing_eos_penalty * (~finished).to(scores.dtype)
    kl = kl_estimate(logps, ref_logps, estimator) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(len(scores), device=scores.device)
    last = (mask.sum(1).long() - 1).clamp(min=0)  # right padding: the last real token
    rewards[rows, last] += penalized * mask[rows, last]
    return rewards, kl, penalized


def adaptive_kl_coef(coef: float, kl: float, target: float, n_samples: int, horizon: int) -> float:
    """Adaptive KL controller (Ziegler et al. 2019, eq. 2): nudge β towards the KL target.

    e = clip(KL / target - 1, -0.2, 0.2);  β ← β · (1 + e · n_samples / horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_samples / horizon)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16), per token.

    δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γλ A_{t+1},   returns_t = A_t + V_t,
    with V and A taken as 0 past the last real token of each row. rewards, values, mask: (B, T).
    Returns (advantages, returns), both (B, T) and 0 on padding.
    """
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_advantage = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # A padded position passes its successor's state through unchanged, so right padding is inert.
        next_value = torch.where(m.bool(), values[:, t], next_value)
        next_advantage = torch.where(m.bool(), advantage, next_advantage)
    returns = (advantages + values) * mask
    return advantages, returns


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (Schulman et al. 2017, eq. 7), averaged over real tokens.

    ratio = exp(logps - old_logps);  loss = mean(max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε))).
    Also returns clip_frac (share of tokens where the clipped term won) and approx_kl
    (mean of ½(logps - old_logps)², an estimate of KL(old || new))."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "clip_frac": masked_mean((clipped > unclipped).float(), mask),
        "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
    }
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_eps: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: ½ mean(max((V - R)², (clip(V, V_old ± ε) - R)²)) over real tokens."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, {"value_clip_frac": masked_mean((clipped_error > unclipped_error).float(), mask)}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R): 1 is a perfect value function, 0 no better than a constant."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of the categorical distribution: (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """-mean log σ(r_chosen - r_rejected - margin) (Bradley & Terry 1952; margin as in Llama 2)."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -torch.nn.functional.logsigmoid(diff).mean()
