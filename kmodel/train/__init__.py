"""Training: the Trainer loop, optimizer and schedules, MFU, metrics, checkpoints, evaluation and generation."""

from kmodel.train.run import RunDirError, train
from kmodel.train.trainer import Trainer, TrainingDiverged

__all__ = ["RunDirError", "Trainer", "TrainingDiverged", "train"]
