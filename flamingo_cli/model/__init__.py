"""The Flamingo model: vision encoder, perceiver resampler, gated cross-attention, tokenizer."""
