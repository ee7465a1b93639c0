"""Shard specs, the one opener for every URL, and tar/sizes.json helpers."""
