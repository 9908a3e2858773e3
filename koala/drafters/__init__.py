"""Trainable drafters: an independent draft model (draft_model.py) and KOALA draft heads (heads.py)."""
