"""The data pipeline: sources streamed and tokenized in parallel into memory-mapped shards (`kmodel data
prepare`, or on the fly into the token cache), rows mixed by weight in a seed-determined order computed from
token counts alone, packed into batches; plus the data manifest that pins the bytes a run used."""

from kmodel.data.manifest import data_manifest, manifest_differences, relocations
from kmodel.data.order import Mixture
from kmodel.data.packing import IGNORE_INDEX, Batch, sequential_batches
from kmodel.data.pipeline import checkpoint_tokenizer, file_docs, prepared_data, training_mixture
from kmodel.data.prepare import load_tokenizer, prepare
from kmodel.data.shards import PreparedData
from kmodel.data.sources import DataError
from kmodel.data.tokenized import TokenizedDocs, check_vocab, default_cache_dir
from kmodel.hashing import merkle_root

__all__ = [
    "IGNORE_INDEX", "Batch", "DataError", "Mixture", "PreparedData", "TokenizedDocs", "check_vocab",
    "checkpoint_tokenizer", "data_manifest", "default_cache_dir", "file_docs", "load_tokenizer",
    "manifest_differences", "merkle_root", "prepare", "prepared_data", "relocations", "sequential_batches",
    "training_mixture",
]
