"""The speculative decoding engine: a static-cache transformer, drafters, and decoding in the spirit of gpt-fast."""
