"""Evaluation: the held-out fast path (heldout.py); the lm-eval adapter arrives with issue 5."""
