"""The held-out rule keys on the data set row as well as the text: identical texts are separate sequences.

Keyed on the text alone, a data set of repeated texts gave every sequence one hash, so the held-out set
was one sequence (the guard's pick) or everything but one.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from common.sequences import load_sequences
from trainer.data import heldout_hash, heldout_mask


def test_identical_texts_at_different_rows_are_judged_one_by_one():
    text = hashlib.sha256(b"the same text").hexdigest()
    hashes = np.array([heldout_hash(text, 0, row) for row in range(2000)])
    assert len(set(hashes.tolist())) == 2000
    assert 60 < heldout_mask(hashes, 0.05).sum() < 140  # about 5%, not 1 and not 1999


def test_the_key_is_text_row_and_window_as_documented():
    text = "ab" * 32
    by_hand = int(hashlib.sha256(f"{text}:7:3".encode()).hexdigest()[:8], 16)
    assert heldout_hash(text, 3, 7) == by_hand
    assert heldout_hash(text, 3, 7) != heldout_hash(text, 3, 8) != heldout_hash(text, 4, 7)


def test_a_data_set_of_repeated_texts_holds_out_a_fraction(tmp_path, tiny_tokenizer_dir):
    from common.tokenizers import load_tokenizer

    data = tmp_path / "repeated.jsonl"
    data.write_text("".join(json.dumps({"text": "To be, or not to be, that is the question."}) + "\n"
                            for _ in range(400)))
    sequences, _ = load_sequences(str(data), load_tokenizer(tiny_tokenizer_dir), max_length=64)
    assert len({s.text_sha256 for s in sequences}) == 1 and len(sequences) == 400
    held = heldout_mask(np.array([heldout_hash(s.text_sha256, s.window_index, s.source_index) for s in sequences]),
                        0.1)
    assert 20 < held.sum() < 70
