"""Training the MoE language model: data, the trainer loop, checkpoints, metrics and reports."""

from sparsemoe.train.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from sparsemoe.train.config import TRAIN_PRESETS, TrainConfig
from sparsemoe.train.data import Corpus, DataError, RandomBatches, eval_batches, iter_documents, load_corpus
from sparsemoe.train.shards import open_shards, prepare_data
from sparsemoe.train.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer, train_bpe
from sparsemoe.train.run import run_training
from sparsemoe.train.trainer import Trainer, build_optimizer, lr_factor

__all__ = [
    "TRAIN_PRESETS",
    "BPETokenizer",
    "ByteTokenizer",
    "CheckpointError",
    "Corpus",
    "DataError",
    "RandomBatches",
    "TrainConfig",
    "Trainer",
    "build_optimizer",
    "eval_batches",
    "iter_documents",
    "load_checkpoint",
    "load_corpus",
    "load_model",
    "load_tokenizer",
    "lr_factor",
    "open_shards",
    "prepare_data",
    "run_training",
    "save_checkpoint",
    "train_bpe",
]
