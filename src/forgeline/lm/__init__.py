"""forgeline's own small language model: tokenizer, weights file and numpy inference.

Nothing here imports torch; training lives in :mod:`forgeline.training`.
"""
