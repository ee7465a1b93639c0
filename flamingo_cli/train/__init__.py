"""Training: launch under torchrun, distributed set-up, the dual-dataset loop, checkpoints."""
