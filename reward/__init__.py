"""Reward models: Bradley-Terry training, loading and batch scoring (see ARCHITECTURE.md).

`reward.RewardScorer(path).score(prompts, completions)` is the public scorer; it lives in `reward.score` and is
imported on first use, so `import reward` stays free of torch and transformers.
"""

__all__ = ["RewardScorer"]


def __getattr__(name: str):
    if name == "RewardScorer":
        from reward.score import RewardScorer

        return RewardScorer
    raise AttributeError(f"module 'reward' has no attribute {name!r}")
