"""Reward functions the PPO tests name in recipes as `ppo_reward_fns:<name>`."""

import math

calls = {"n": 0}


def nan_on_second_batch(prompts, completions):
    """0 everywhere, except one NaN in the second batch it scores."""
    calls["n"] += 1
    out = [0.0] * len(completions)
    if calls["n"] == 2:
        out[0] = math.nan
    return out


def always_nan(prompts, completions):
    return [math.nan] * len(completions)


not_a_function = 3
