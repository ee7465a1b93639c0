"""The Flamingo model: vision encoder, perceiver resampler, gated cross-attention, tokenizer.

Import from the modules themselves (`flamingo_cli.model.factory`, `.flamingo`, `.params`, ...);
the package imports nothing, so `flamingo_cli.model.tokenizer` loads without torch.
"""
