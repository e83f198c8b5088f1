"""Trainer: ``python -m train key=value ...`` (see ``train.config.TrainConfig`` for every option)."""
