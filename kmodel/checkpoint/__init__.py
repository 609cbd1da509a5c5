"""Checkpoint directories: what a saved model is, how it is written, and how it is verified and read back.

    step_0000100/
        model.safetensors      global parameter names (and global expert indices), the router biases
        config.yaml            the fully resolved recipe
        tokenizer/             the tokenizer the model was trained with, when there is one
        state.pt               trainer state (optimizer steps and hyper-parameters, scheduler, RNG, data
                               position): tensors and plain containers only, loaded with weights_only=True
        optimizer.safetensors  the optimizer's per-parameter tensors, `state.<parameter index>.<key>` (the torch
                               state_dict layout, split out of state.pt; `read_state` merges them back)
        manifest.json          format, step, run id, sha256 and size of every file above, Merkle root of the
                               tensor files (written last; a format-1 manifest, file -> sha256, still reads)

A checkpoint is written under a temporary name, every file hashed as it is written, and renamed into place,
so a kill at any moment leaves either the old set of checkpoints or the new one. Nothing is used unverified:
every reader (resume, `load_model`, eval, generate, export, provenance) checks the files it reads against the
manifest, and `latest_valid_checkpoint` picks the newest checkpoint of a run that verifies, naming why newer
ones were skipped (missing, truncated or corrupt file, no manifest, written by another run).

Tensor files are written one tensor at a time (`TensorStream`, `write_safetensors`) and read one tensor, a block
of rows or a range of elements at a time (`LazyTensor`): each rank of a distributed engine writes the pieces of the
global tensors it holds and restores the ones it owns in its own layout (kmodel.checkpoint.sharded,
kmodel.parallel.engine).
"""

from kmodel.checkpoint.directory import (
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    TOKENIZER_DIR,
    Manifest,
    SharedVerification,
    latest_valid_checkpoint,
    list_checkpoints,
    load_config_from_checkpoint,
    load_model,
    load_weights_into,
    model_state,
    move_aside,
    read_state,
    read_weights,
    resolve_checkpoint,
    save_checkpoint,
    split_moments,
    tensor_files_of,
    verify_checkpoint,
    verify_manifest,
)
from kmodel.checkpoint.files import (
    SAFETENSORS_DTYPES,
    TORCH_DTYPES,
    CheckpointError,
    FileRecord,
    LazyTensor,
    TensorStream,
    lazy_tensors,
    write_safetensors,
)
from kmodel.checkpoint.index import INDEX_FILE

__all__ = [
    "INDEX_FILE", "MANIFEST_FILE", "MODEL_FILE", "OPTIMIZER_FILE", "SAFETENSORS_DTYPES", "STATE_FILE",
    "TOKENIZER_DIR", "TORCH_DTYPES", "CheckpointError", "FileRecord", "LazyTensor", "Manifest", "SharedVerification",
    "TensorStream", "latest_valid_checkpoint", "lazy_tensors", "list_checkpoints", "load_config_from_checkpoint",
    "load_model", "load_weights_into", "model_state", "move_aside", "read_state", "read_weights", "resolve_checkpoint",
    "save_checkpoint", "split_moments", "tensor_files_of", "verify_checkpoint", "verify_manifest", "write_safetensors",
]
