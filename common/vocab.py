"""The fingerprint of a tokenizer's vocabulary: what makes two tokenizers the same for a cache.

A pure function of a loaded tokenizer (its vocabulary and special tokens); knows nothing of model folders, so
that common.smollm2 (which common.models imports) can fingerprint the tokenizer it converts without a cycle.
"""

from __future__ import annotations

import hashlib
import json


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of the sorted (token, id) vocabulary plus the special tokens.

    Two tokenizers that map the same strings to the same ids, with the same special tokens, hash the
    same, whatever their class or file layout.
    """
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(set(tokenizer.all_special_tokens))
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
