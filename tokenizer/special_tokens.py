"""The special tokens every kmodel tokenizer registers, in id order.

`<unk>` is SentencePiece's mandatory unknown piece and always gets id 0; with byte fallback, encoding never
produces it. The others are registered as user-defined symbols, so they get ids 1.. in the order below and
their literal text maps to the token on both the SentencePiece and the Hugging Face side (the rule Hugging
Face applies to added tokens), which keeps the two exports id-identical on every input.
"""

UNK = "<unk>"
BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"

# A chat turn is `<|role|>` content `<|end|>`.
CHAT_ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
END_OF_TURN = "<|end|>"

# Fill-in-the-middle, prefix-suffix-middle order: `<|fim_prefix|>`pre`<|fim_suffix|>`suf`<|fim_middle|>`mid.
FIM_PREFIX = "<|fim_prefix|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_MIDDLE = "<|fim_middle|>"

USER_DEFINED = (BOS, EOS, PAD, *CHAT_ROLE_MARKERS, END_OF_TURN, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)
ALL = (UNK, *USER_DEFINED)
