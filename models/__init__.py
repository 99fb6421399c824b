"""Baseline models implemented by this project as RecBole sequential recommenders.

Mamba4Rec (`models.mamba4rec`), TiSASRec (`models.tisasrec`) and LRURec
(`models.lrurec`); `models.selective_scan` holds the PyTorch scans they run on.
SSD4Rec lives with TiM4Rec in `tim4rec.py`. Names map to classes in pipeline/registry.py.
"""
