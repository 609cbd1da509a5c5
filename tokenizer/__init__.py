"""kmodel's Korean-first tokenizer toolkit: training, encoding, Hugging Face export and evaluation.

from kmodel.tokenizer import Tokenizer, SHIPPED_TOKENIZER
tok = Tokenizer.load(SHIPPED_TOKENIZER)
ids = tok.encode("대화 상자를 엽니다.", add_bos=True)
"""

from kmodel.safe_path import defer_bare_import

defer_bare_import(__name__, __file__)  # `import tokenizer` from the repository root means another package

# Absolute imports: under a bare-name import the body goes on after another package has taken our place.
from kmodel.tokenizer.errors import TokenizerError
from kmodel.tokenizer.tokenizer import (
    PRODUCTION_TOKENIZER,
    SHIPPED_TOKENIZER,
    Tokenizer,
    normalize,
)
from kmodel.tokenizer.train import train_tokenizer

__all__ = [
    "PRODUCTION_TOKENIZER",
    "SHIPPED_TOKENIZER",
    "Tokenizer",
    "TokenizerError",
    "normalize",
    "train_tokenizer",
]
