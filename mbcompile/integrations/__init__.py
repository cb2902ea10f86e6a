"""Integrations, each an optional extra imported on its own (nothing here imports them):

- ``mbcompile.integrations.hf``: ``BatchedTrainer``, a transformers ``Trainer`` for a batch (``[hf]``);
- ``mbcompile.integrations.lightning``: ``BatchedLightningModule`` and per-model callbacks (``[lightning]``);
- ``mbcompile.integrations.optuna``: ``optimize`` runs trials as batches, prunes inside a batch (``[optuna]``);
- ``mbcompile.integrations.distributed``: shards a batch over ``torch.distributed`` ranks (no extra).
"""
