class TokenizerError(ValueError):
    """Bad tokenizer input: a corpus, option, or tokenizer directory that cannot be used as given.

    The message always names the culprit (file and line, option and value, or directory)."""
