"""The data pipeline: sources read with `datasets`, tokenized (and cached), packed into rows, mixed by weight
in a seed-determined, exactly resumable order; plus the data manifest that pins the bytes a run used."""

from kmodel.data.manifest import data_manifest, manifest_differences, merkle_root
from kmodel.data.packing import IGNORE_INDEX, Batch, Mixture, SourceStream, sequential_batches
from kmodel.data.pipeline import checkpoint_tokenizer, file_docs, load_tokenizer, source_docs, training_mixture
from kmodel.data.sources import DataError
from kmodel.data.tokenized import TokenizedDocs, check_vocab, default_cache_dir

__all__ = [
    "IGNORE_INDEX", "Batch", "DataError", "Mixture", "SourceStream", "TokenizedDocs", "check_vocab",
    "checkpoint_tokenizer", "data_manifest", "default_cache_dir", "file_docs", "load_tokenizer",
    "manifest_differences", "merkle_root", "sequential_batches", "source_docs", "training_mixture",
]
