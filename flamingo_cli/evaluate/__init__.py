"""Held-out loss: exact token-weighted loss per dataset, with image ablations, on any ranks."""
