"""Pretraining: the options (`arguments`), the parts a run is built from (`builders`), the Accelerate loop (`loop`),
the training budget and learning-rate schedule (`schedule`), model selection on held-out data (`selection`) and
atomic checkpoints (`checkpointing`)."""
