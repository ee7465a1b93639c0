"""flamingo: raw multimodal web data to a trained OpenFlamingo-style model."""

__version__ = "0.1.0"
