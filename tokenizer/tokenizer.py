"""The Tokenizer: a trained SentencePiece model plus the metadata that describes it.

A tokenizer directory holds `tokenizer.model` (SentencePiece), `metadata.json` (vocab size, special-token
ids, model hash, training settings and corpus hashes) and `tokenizer.json` (the Hugging Face export).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece

from . import special_tokens
from .errors import TokenizerError

METADATA_FILE = "metadata.json"
MODEL_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
METADATA_FORMAT = "kmodel-tokenizer/1"
SHIPPED_TOKENIZER = Path(__file__).resolve().parent / "shipped" / "ko-8k"  # the tiny recipe's and the demo's
# The production tokenizer of the full-scale recipes: 131,072 pieces learned from the Debian-built corpus.
PRODUCTION_TOKENIZER = Path(__file__).resolve().parent / "shipped" / "ko-128k"

# SentencePiece writes a space as U+2581 and turns every U+2581 back into a space when decoding, so a literal
# U+2581 in the input would come back as a space. Encoding it as its three UTF-8 byte pieces keeps it intact.
SPACE_SYMBOL = "\u2581"
_SPACE_SYMBOL_BYTE_PIECES = tuple(f"<0x{byte:02X}>" for byte in SPACE_SYMBOL.encode("utf-8"))

_REQUIRED_METADATA_KEYS = ("format", "model_file", "model_sha256", "model_type", "vocab_size", "special_tokens")


def normalize(text: str) -> str:
    """The normalisation applied before training and encoding: Unicode NFC, nothing else.

    NFC composes conjoining jamo into syllables and leaves compatibility characters (ㅋㅋ, ㈜, ①, full-width
    forms) untouched, unlike NFKC, which rewrites them irreversibly."""
    return unicodedata.normalize("NFC", text)


class Tokenizer:
    """Encode text to ids and back with a trained kmodel tokenizer; see `Tokenizer.load`."""

    def __init__(self, directory: Path, metadata: dict, model_bytes: bytes):
        self.directory = directory
        self.metadata = metadata
        self._model_bytes = model_bytes
        self._check_model_hash()
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.LoadFromSerializedProto(model_bytes)
        except RuntimeError as error:
            raise TokenizerError(
                f"{directory / metadata['model_file']} is not a SentencePiece model: {error}"
            ) from None
        self._check_against_metadata()
        self._special_tokens = {token: int(index) for token, index in metadata["special_tokens"].items()}
        self._special_ids = frozenset(self._special_tokens.values())
        self._space_symbol_ids = [self._processor.PieceToId(piece) for piece in _SPACE_SYMBOL_BYTE_PIECES]

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer directory (metadata.json + the SentencePiece model it names)."""
        directory = Path(path)
        if not directory.exists():
            raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
        if not directory.is_dir():
            raise TokenizerError(
                f"{directory} is not a tokenizer directory (expected a directory with {METADATA_FILE})"
            )
        metadata_path = directory / METADATA_FILE
        if not metadata_path.is_file():
            raise FileNotFoundError(f"tokenizer directory {directory} has no {METADATA_FILE}")
        try:
            metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise TokenizerError(f"{metadata_path} is not valid JSON: {error}") from None
        missing = [key for key in _REQUIRED_METADATA_KEYS if key not in metadata]
        if missing:
            raise TokenizerError(f"{metadata_path} lacks key(s) {', '.join(missing)}")
        if metadata["format"] != METADATA_FORMAT:
            raise TokenizerError(f"{metadata_path}: format {metadata['format']!r} is not {METADATA_FORMAT!r}")
        model_path = directory / metadata["model_file"]
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer model {model_path} (named in {metadata_path}) does not exist")
        return cls(directory, metadata, model_path.read_bytes())

    def _check_model_hash(self) -> None:
        """Refuse a model that is not the one the metadata describes: ids would silently mean other tokens."""
        digest = hashlib.sha256(self._model_bytes).hexdigest()
        if digest != self.metadata["model_sha256"]:
            raise TokenizerError(
                f"{self.directory / self.metadata['model_file']} does not match {self.directory / METADATA_FILE}: "
                f"its sha256 is {digest}, the metadata records {self.metadata['model_sha256']}"
            )

    def _check_against_metadata(self) -> None:
        """The vocabulary size and special-token ids the metadata records must be the model's."""
        metadata_path = self.directory / METADATA_FILE
        model_path = self.directory / self.metadata["model_file"]
        size = self._processor.GetPieceSize()
        if size != self.metadata["vocab_size"]:
            raise TokenizerError(
                f"{model_path} has {size} pieces but {metadata_path} records vocab_size {self.metadata['vocab_size']}"
            )
        for token, index in self.metadata["special_tokens"].items():
            if not (isinstance(index, int) and 0 <= index < size and self._processor.IdToPiece(index) == token):
                raise TokenizerError(f"{metadata_path}: special token {token!r} is not id {index!r} in {model_path}")

    # Encoding and decoding.

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """NFC-normalise `text` and encode it. Special-token text (e.g. "<|user|>") maps to its token."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return self._with_bos_eos(self._encode_normalized(normalize(text)), add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """Encode many texts; SentencePiece spreads the batch over `num_threads` (-1: all cores)."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer.encode_batch expects a list of str, got a single str (use encode)")
        for position, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"Tokenizer.encode_batch: item {position} is a {type(text).__name__}, not a str")
        normalized = [normalize(text) for text in texts]
        plain = [position for position, text in enumerate(normalized) if SPACE_SYMBOL not in text]
        encoded: list[list[int]] = [[] for _ in normalized]
        if plain:
            batch = self._processor.Encode([normalized[position] for position in plain], num_threads=num_threads)
            for position, ids in zip(plain, batch):
                encoded[position] = ids
        for position, text in enumerate(normalized):
            if SPACE_SYMBOL in text:
                encoded[position] = self._encode_normalized(text)
        return [self._with_bos_eos(ids, add_bos, add_eos) for ids in encoded]

    def _encode_normalized(self, text: str) -> list[int]:
        if SPACE_SYMBOL not in text:
            return self._processor.Encode(text)
        ids: list[int] = []
        for position, part in enumerate(text.split(SPACE_SYMBOL)):
            if position:
                ids.extend(self._space_symbol_ids)
            ids.extend(self._processor.Encode(part))
        return ids

    def _with_bos_eos(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Turn ids back into text; special tokens appear as their text unless skip_special_tokens."""
        ids = [int(index) for index in ids]
        size = self.vocab_size
        for index in ids:
            if not 0 <= index < size:
                raise TokenizerError(f"token id {index} is out of range for vocab_size {size} ({self.directory})")
        if skip_special_tokens:
            ids = [index for index in ids if index not in self._special_ids]
        return self._processor.Decode(ids)

    # Vocabulary.

    @property
    def vocab_size(self) -> int:
        return self._processor.GetPieceSize()

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special-token text -> id, e.g. {"<|bos|>": 1, "<|user|>": 5, ...}."""
        return dict(self._special_tokens)

    @property
    def bos_id(self) -> int:
        return self._special_tokens[special_tokens.BOS]

    @property
    def eos_id(self) -> int:
        return self._special_tokens[special_tokens.EOS]

    @property
    def pad_id(self) -> int:
        return self._special_tokens[special_tokens.PAD]

    @property
    def unk_id(self) -> int:
        return self._special_tokens[special_tokens.UNK]

    @property
    def model_type(self) -> str:
        return self.metadata["model_type"]

    def id_to_piece(self, index: int) -> str:
        return self._processor.IdToPiece(index)

    def score(self, index: int) -> float:
        return self._processor.GetScore(index)

    def is_byte(self, index: int) -> bool:
        """Whether `index` is one of the 256 byte-fallback pieces <0x00>..<0xFF>."""
        return self._processor.IsByte(index)

    def is_special(self, index: int) -> bool:
        return index in self._special_ids

    # Persistence and identity.

    def fingerprint(self) -> str:
        """sha256 (hex) of the SentencePiece model bytes: equal fingerprints mean identical id mappings."""
        return hashlib.sha256(self._model_bytes).hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write model, metadata.json and tokenizer.json into `directory` (e.g. inside a checkpoint)."""
        from .hf_export import write_tokenizer_json  # hf_export imports this module

        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        (target / self.metadata["model_file"]).write_bytes(self._model_bytes)
        (target / METADATA_FILE).write_text(
            json.dumps(self.metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        # Regenerated rather than copied: it is a pure function of the model, so it can never go stale.
        write_tokenizer_json(self, target / HF_TOKENIZER_FILE)
        return target

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.directory)!r}, {self.model_type}, vocab_size={self.vocab_size})"
