"""Reward functions the PPO tests name in recipes as `ppo_reward_fns:<name>`."""

import math
import os
import signal

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


def killed_on_rank_1(prompts, completions):
    """0 everywhere; on rank 1 of a multi-process run the process is killed (as by the OOM killer)."""
    if os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return [0.0] * len(completions)


def sevens(prompts, completions):
    """A reward anyone can fool: how many times '7' appears in the answer (up to 12)."""
    return [min(12, c.count("7")) / 2 for c in completions]
