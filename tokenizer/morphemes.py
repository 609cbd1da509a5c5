"""Optional morpheme-aware training for Korean: mark morpheme boundaries found by the Kiwi analyser.

Only vocabulary learning sees the marks (SentencePiece's `pretokenization_delimiter` keeps pieces from
crossing them); encoding stays plain, so the Hugging Face export still matches and no analyser is needed at
run time.
"""

from __future__ import annotations

from .errors import TokenizerError

# INVISIBLE SEPARATOR: never part of ordinary Korean, English or code text; refused if the corpus has one.
MORPHEME_DELIMITER = "\u2063"


def _is_hangul_syllable(character: str) -> bool:
    return "\uac00" <= character <= "\ud7a3"


def mark_morpheme_boundaries(texts: list[str]) -> list[str]:
    """Insert MORPHEME_DELIMITER at every morpheme boundary that falls between two Hangul syllables.

    Boundaries elsewhere are left out: SentencePiece already splits at spaces and script changes, and a
    contracted morpheme (했 = 하 + 었) has no boundary inside its syllable to mark."""
    try:
        from kiwipiepy import Kiwi
    except ImportError:
        raise TokenizerError("--morpheme-aware needs the kiwipiepy package: pip install kiwipiepy") from None
    for position, text in enumerate(texts):
        if MORPHEME_DELIMITER in text:
            raise TokenizerError(f"--morpheme-aware: training document {position} contains U+2063, the boundary marker")
    # Typo correction and multi-word entries would blur morpheme boundaries (and double the load time).
    analyser = Kiwi(load_typo_dict=False, load_multi_dict=False)
    marked = []
    for text, tokens in zip(texts, analyser.tokenize(texts)):
        cuts = set()
        for token in tokens:
            for cut in (token.start, token.start + token.len):
                if 0 < cut < len(text) and _is_hangul_syllable(text[cut - 1]) and _is_hangul_syllable(text[cut]):
                    cuts.add(cut)
        pieces, previous = [], 0
        for cut in sorted(cuts):
            pieces.append(text[previous:cut])
            previous = cut
        pieces.append(text[previous:])
        marked.append(MORPHEME_DELIMITER.join(pieces))
    return marked
