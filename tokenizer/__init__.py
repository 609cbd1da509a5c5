"""kmodel's Korean-first tokenizer toolkit: training, encoding, Hugging Face export and evaluation.

from kmodel.tokenizer import Tokenizer, SHIPPED_TOKENIZER
tok = Tokenizer.load(SHIPPED_TOKENIZER)
ids = tok.encode("대화 상자를 엽니다.", add_bos=True)
"""

from .errors import TokenizerError
from .tokenizer import SHIPPED_TOKENIZER, Tokenizer, normalize
from .train import train_tokenizer

__all__ = ["SHIPPED_TOKENIZER", "Tokenizer", "TokenizerError", "normalize", "train_tokenizer"]
