"""Training the MoE language model: data, the trainer loop, checkpoints, metrics and reports."""

from sparsemoe.train.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from sparsemoe.train.config import TRAIN_PRESETS, TrainConfig
from sparsemoe.train.data import ByteTokenizer, Corpus, DataError, RandomBatches, eval_batches, load_corpus
from sparsemoe.train.run import run_training
from sparsemoe.train.trainer import Trainer, build_optimizer, lr_factor

__all__ = [
    "TRAIN_PRESETS",
    "ByteTokenizer",
    "CheckpointError",
    "Corpus",
    "DataError",
    "RandomBatches",
    "TrainConfig",
    "Trainer",
    "build_optimizer",
    "eval_batches",
    "load_checkpoint",
    "load_corpus",
    "load_model",
    "lr_factor",
    "run_training",
    "save_checkpoint",
]
