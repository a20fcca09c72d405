"""Training forgeline's own language model (the ``[train]`` extra: torch).

Only :mod:`forgeline.training.corpus`, :mod:`forgeline.training.bpe` and
:mod:`forgeline.training.rdata` work without torch. The rest is reusable for
fine-tuning on a user's text files: :func:`forgeline.training.train.train`
takes a list of texts and an output folder.
"""
