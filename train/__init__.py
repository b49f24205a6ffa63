"""BYOL / DirectPred trainer around :class:`fastpred.DirectPredictor`.

Scripts, run from the repository root (this folder is not installed): ``python -m train.pretrain``,
``python -m train.linear_eval``, ``python -m train.export``.
Presets: ``train/configs/*.yaml`` (``digits`` is the default and needs no download).
"""
