"""koala: drafters aligned to a chat LLM, and a lossless speculative decoding engine that measures them."""

__version__ = "0.2.0"
