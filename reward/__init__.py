"""Reward models: Bradley-Terry training, loading and batch scoring (see ARCHITECTURE.md)."""
