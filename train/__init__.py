"""Trainer: ``python -m densessl.train key=value ...`` (see ``train.config.TrainConfig`` for every option)."""
