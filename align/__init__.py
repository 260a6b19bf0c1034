"""align: an alignment trainer for preference optimization (SFT, reward models, DPO, PPO)."""

__version__ = "0.1.0"
