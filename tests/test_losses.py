"""The RL math against values worked out by hand (shown in each docstring). No model, milliseconds."""

import math

import pytest
import torch

from align.losses import (
    bradley_terry_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_rewards,
    ppo_value_loss,
)

T = torch.tensor


def test_gae_gamma_1_lambda_1_is_reward_to_go_minus_value():
    """r = [0, 0, 1], V = [.5, .6, .7]: A_t = 1 - V_t = [.5, .4, .3], returns all 1."""
    adv, ret = gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1.0, 1.0, 1.0]]), gamma=1.0, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([0.5, 0.4, 0.3])
    assert ret.tolist()[0] == pytest.approx([1.0, 1.0, 1.0])


def test_gae_discounted():
    """γ=.9, λ=.5: δ2 = 1-.7 = .3 = A2; δ1 = .9·.7-.6 = .03, A1 = .03+.45·.3 = .165;
    δ0 = .9·.6-.5 = .04, A0 = .04+.45·.165 = .11425."""
    adv, _ = gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1.0, 1.0, 1.0]]), gamma=0.9, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.11425, 0.165, 0.3])


def test_gae_ignores_right_padding():
    """mask [1,1,0], r = [0,2,junk], V = [1,1,junk]: A1 = 2-1 = 1, A0 = (0+1-1)+1 = 1, padded A = 0."""
    adv, ret = gae(T([[0.0, 2.0, 5.0]]), T([[1.0, 1.0, 9.0]]), T([[1.0, 1.0, 0.0]]), gamma=1.0, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([1.0, 1.0, 0.0])
    assert ret.tolist()[0] == pytest.approx([2.0, 2.0, 0.0])


def test_gae_matches_a_plain_reverse_loop_per_row():
    torch.manual_seed(0)
    B, L = 5, 7
    rewards, values = torch.randn(B, L), torch.randn(B, L)
    lengths = [7, 1, 4, 6, 3]
    mask = torch.tensor([[1.0] * n + [0.0] * (L - n) for n in lengths])
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    for b, n in enumerate(lengths):
        expected, running = [0.0] * L, 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + 0.99 * next_v - values[b, t].item()
            running = delta + 0.99 * 0.95 * running
            expected[t] = running
        assert adv[b].tolist() == pytest.approx(expected, abs=1e-5)
        assert ret[b, :n].tolist() == pytest.approx([e + v for e, v in zip(expected, values[b, :n].tolist())],
                                                    abs=1e-5)


def test_policy_loss_by_hand():
    """ratio = [1.5, .5, 1], A = [1, 1, -2], ε = .2: per token max(-A·r, -A·clip(r)) =
    [max(-1.5, -1.2), max(-.5, -.8), 2] = [-1.2, -.5, 2] -> mean .1; only token 0 is clipped;
    approx_kl = ½(ln²1.5 + ln².5 + 0)/3 = .107476."""
    logps = T([[math.log(1.5), math.log(0.5), 0.0]])
    loss, stats = ppo_policy_loss(logps, torch.zeros(1, 3), T([[1.0, 1.0, -2.0]]), torch.ones(1, 3), clip_eps=0.2)
    assert loss.item() == pytest.approx(0.1)
    assert stats["clip_frac"].item() == pytest.approx(1 / 3)
    assert stats["approx_kl"].item() == pytest.approx(0.107476, abs=1e-6)


def test_policy_loss_gradient_vanishes_where_clipped():
    logps = T([[math.log(1.5), math.log(0.5)]]).requires_grad_()
    loss, _ = ppo_policy_loss(logps, torch.zeros(1, 2), T([[1.0, 1.0]]), torch.ones(1, 2))
    loss.backward()
    # token 0 (ratio 1.5 > 1.2, A > 0) is clipped: no gradient; token 1: d(-A·r/2)/dlogp = -r/2 = -.25
    assert logps.grad.tolist()[0] == pytest.approx([0.0, -0.25])


def test_policy_loss_on_policy_is_minus_mean_advantage():
    adv = T([[0.5, -1.0, 2.0, 7.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = ppo_policy_loss(torch.zeros(1, 4), torch.zeros(1, 4), adv, mask)
    assert loss.item() == pytest.approx(-(0.5 - 1.0 + 2.0) / 3)
    assert stats["clip_frac"].item() == 0 and stats["approx_kl"].item() == 0


def test_value_loss_by_hand():
    """V = [1, 0], V_old = [.5, .5], R = [2, 0], ε = .2: clipped V = [.7, .3];
    errors max((1-2)², (.7-2)²) = 1.69 and max(0, .09) = .09 -> ½·mean = .445."""
    loss, stats = ppo_value_loss(T([[1.0, 0.0]]), T([[0.5, 0.5]]), T([[2.0, 0.0]]), torch.ones(1, 2), clip_eps=0.2)
    assert loss.item() == pytest.approx(0.445)
    assert stats["value_clip_frac"].item() == pytest.approx(1.0)


def test_kl_estimators_by_hand():
    """π = .5, π_ref = .25: r = ln .5; k1 = ln 2 = .693147, k2 = ½ln²2 = .240227, k3 = (.5-1) + ln 2 = .193147."""
    logps, ref = T([math.log(0.5)]), T([math.log(0.25)])
    assert kl_estimate(logps, ref, "k1").item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_estimate(logps, ref, "k2").item() == pytest.approx(0.240227, abs=1e-6)
    assert kl_estimate(logps, ref, "k3").item() == pytest.approx(0.193147, abs=1e-6)
    same = kl_estimate(ref, ref, "k3")
    assert same.item() == 0.0
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_estimate(logps, ref, "k4")


def test_k3_is_never_negative_and_k1_k3_agree_in_expectation():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), 0)
    q = torch.softmax(torch.randn(6), 0)
    samples = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[samples], q.log()[samples]
    exact = (p * (p.log() - q.log())).sum().item()
    assert (kl_estimate(logp, logq, "k3") >= 0).all()
    assert kl_estimate(logp, logq, "k1").mean().item() == pytest.approx(exact, abs=0.01)
    assert kl_estimate(logp, logq, "k3").mean().item() == pytest.approx(exact, abs=0.01)


def test_masked_statistics_edge_cases():
    x, mask = T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1.0, 1.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    # mean 2, unbiased variance 1: whitened values are x - 2, padding stays 0
    assert masked_whiten(x, mask).tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert masked_whiten(x, mask, shift_mean=False).tolist()[0] == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)
    assert masked_mean(x, torch.zeros_like(x)).item() == 0.0  # all padding: 0, not NaN
    assert masked_mean(T([[4.0]]), T([[1.0]])).item() == 4.0  # one token
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0])


def test_explained_variance_extremes():
    returns, mask = T([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), returns, mask).item() == pytest.approx(0.0)


def test_entropy_of_uniform_and_certain():
    logits = torch.zeros(1, 2, 4)
    logits[0, 1] = T([100.0, 0.0, 0.0, 0.0])
    assert entropy_from_logits(logits).tolist()[0] == pytest.approx([math.log(4), 0.0], abs=1e-6)


def test_bradley_terry_by_hand():
    """-log σ(2) = .126928, -log σ(0) = .693147 -> mean .410038; margin 1 on the first: -log σ(1) = .313262."""
    assert bradley_terry_loss(T([2.0, 0.0]), T([0.0, 0.0])).item() == pytest.approx(0.410038, abs=1e-6)
    assert bradley_terry_loss(T([2.0, 0.0]), T([0.0, 0.0]), T([1.0, 0.0])).item() == pytest.approx(
        (0.313262 + 0.693147) / 2, abs=1e-6)


def test_adaptive_kl_coef_by_hand():
    """β = .1, target 6, 64 samples, horizon 10000: KL 6.6 -> e = .1 -> β·(1 + .1·.0064) = .100064;
    KL 9 -> e = .5 clipped to .2 -> .100128; KL 3 -> e = -.5 clipped to -.2 -> .099872; KL 6 -> unchanged."""
    from align.losses import adaptive_kl_coef

    assert adaptive_kl_coef(0.1, 6.6, 6.0, 64, 10000) == pytest.approx(0.100064)
    assert adaptive_kl_coef(0.1, 9.0, 6.0, 64, 10000) == pytest.approx(0.100128)
    assert adaptive_kl_coef(0.1, 3.0, 6.0, 64, 10000) == pytest.approx(0.099872)
    assert adaptive_kl_coef(0.1, 6.0, 6.0, 64, 10000) == 0.1


def test_ppo_rewards_by_hand():
    """β = .1, k1, penalty .5. Row 0 finished, 3 tokens: kl = logps - ref = [.5, 0, -1], rewards
    -β·kl = [-.05, 0, .1] plus s = 1 at token 2 -> [-.05, 0, 1.1]. Row 1 never reached EOS, 2 tokens and
    one padding column (junk log-probs there): s' = 2 - .5 = 1.5, kl = [-.5, 0, 0], rewards [.05, 1.5, 0]."""
    logps = T([[-1.0, -2.0, -3.0], [-1.0, -1.0, 5.0]])
    ref = T([[-1.5, -2.0, -2.0], [-0.5, -1.0, -5.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl, scores = ppo_rewards(T([1.0, 2.0]), logps, ref, mask, T([True, False]), kl_coef=0.1,
                                      estimator="k1", missing_eos_penalty=0.5)
    assert scores.tolist() == pytest.approx([1.0, 1.5])
    assert kl.tolist() == [pytest.approx([0.5, 0.0, -1.0]), pytest.approx([-0.5, 0.0, 0.0])]
    assert rewards.tolist() == [pytest.approx([-0.05, 0.0, 1.1]), pytest.approx([0.05, 1.5, 0.0])]


def test_ppo_rewards_k3_one_token_row():
    """One token, log π = -1, log π_ref = -1.5: r = -.5, k3 = e^-.5 - 1 + .5 = .106531; β = .2:
    reward = -.2·.106531 + s (= 3) = 2.978694."""
    rewards, kl, scores = ppo_rewards(T([3.0]), T([[-1.0]]), T([[-1.5]]), T([[1.0]]), T([True]), kl_coef=0.2,
                                      estimator="k3", missing_eos_penalty=1.0)
    assert kl.item() == pytest.approx(0.106531, abs=1e-6)
    assert rewards.item() == pytest.approx(2.978694, abs=1e-6)
    assert scores.tolist() == [3.0]


def test_ppo_rewards_all_masked_row_gets_nothing():
    """A row with no real token: no KL, no reward anywhere (its score is still returned, penalized)."""
    rewards, kl, scores = ppo_rewards(T([3.0]), T([[-1.0, -2.0]]), T([[-4.0, 0.0]]), torch.zeros(1, 2), T([False]),
                                      kl_coef=0.1, missing_eos_penalty=1.0)
    assert rewards.tolist() == [[0.0, 0.0]] and kl.tolist() == [[0.0, 0.0]]
    assert scores.tolist() == [2.0]


def test_missing_eos_penalty_hits_only_unfinished_rows():
    """s = [1, 1, 1], finished [yes, no, yes], penalty 2 -> s' = [1, -1, 1]; with logps = ref the KL term is 0,
    so each row's reward is s' at its last token. Penalty 0 leaves the scores alone."""
    zeros, mask = torch.zeros(3, 2), T([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    finished = T([True, False, True])
    rewards, _, scores = ppo_rewards(T([1.0, 1.0, 1.0]), zeros, zeros, mask, finished, 0.1, missing_eos_penalty=2.0)
    assert scores.tolist() == [1.0, -1.0, 1.0]
    assert rewards.tolist() == [[0.0, 1.0], [-1.0, 0.0], [0.0, 1.0]]
    _, _, scores = ppo_rewards(T([1.0, 1.0, 1.0]), zeros, zeros, mask, finished, 0.1, missing_eos_penalty=0.0)
    assert scores.tolist() == [1.0, 1.0, 1.0]
