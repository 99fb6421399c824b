"""The shared training and evaluation pipeline of the TiM4Rec codebase.

`run.py`, `test.py` and every `baseline/<Model>/run.py` are thin wrappers around
:mod:`pipeline.runner`.
"""
