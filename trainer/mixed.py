"""Training batches drawn from two caches at a stated ratio (`kdtrain run --cache A --mix-cache B --mix 0.5`).

On-policy distillation mixes the student's own samples (scored by the teacher) with the teacher's or the
data's text: GKD's lambda is the share of on-policy batches. Here `--cache` is one source and `--mix-cache`
the other, and batch i (counted from the start of the run, over all micro-batches) comes from the mix cache
when `mix_draw(seed, i) < mix`, a pure function of the seed and i, so the sequence of sources is the same on
every rank, after a resume and whatever the data workers. Each source keeps its own order, epochs and cursor
(trainer/loader.py's Batcher), so a source that runs out starts its next epoch on its own. A batch always
comes from one cache (its teacher rows have that cache's K).

Both caches must share the tokenizer (the same vocabulary fingerprint); the mix cache's held-out sequences
(trainer/data.py's rule) are left out of training as the main cache's are. The resume state is
{"epoch" (the main source's), "draws", "from_mix", "main": cursor, "mix": cursor}.

Knows the data path's sources and the Batcher; nothing about models or losses.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from shared.reader import CacheReader
from trainer.data import Source, cache_index, cache_source, heldout_mask
from trainer.errors import TrainError

MIX_STREAM = 0x6D6978  # "mix": keeps these draws apart from the data order's, which use [seed, epoch]


def mix_draw(seed: int, index: int) -> float:
    """The uniform number in [0, 1) that decides the source of batch `index` (a pure function)."""
    return float(np.random.default_rng([seed, MIX_STREAM, index]).random())


def mix_source(mix: CacheReader, main: CacheReader, eval_fraction: float, *, has_teacher: bool, tail_samples: bool,
               window_blocks: int) -> Source:
    """The training sequences of the mix cache (its held-out ones left out). TrainError when its tokenizer is not
    the main cache's, or when nothing is left to train on."""
    ours, theirs = mix.manifest.tokenizer, main.manifest.tokenizer
    if ours.get("vocab_sha256") != theirs.get("vocab_sha256") or ours.get("vocab_size") != theirs.get("vocab_size"):
        raise TrainError(f"{{mix_cache}} {mix.url} was built with another tokenizer than {{cache}} {main.url} "
                         f"(vocabulary {str(ours.get('vocab_sha256'))[:12]} of {ours.get('vocab_size')} ids vs "
                         f"{str(theirs.get('vocab_sha256'))[:12]} of {theirs.get('vocab_size')}); a student learns one "
                         "vocabulary: mix caches of teachers that share a tokenizer")
    index = cache_index(mix)
    held = heldout_mask(index.hashes, eval_fraction)
    source = cache_source(mix, index, np.flatnonzero(~held).tolist(), has_teacher=has_teacher,
                          window_blocks=window_blocks, tail_samples=tail_samples)
    if len(source) == 0:
        raise TrainError(f"{{mix_cache}} {mix.url} has no training sequences left after holding out "
                         f"{int(held.sum())} of {len(index)}; use a larger cache or a smaller {{eval_fraction}}")
    return source


class MixedBatcher:
    """Batches from two Batchers, batch i from the second when mix_draw(seed, i) < share (see the module docstring).

    make(source, cursor) builds one source's Batcher; cursor is a MixedBatcher cursor, or None to start.
    """

    def __init__(self, make: Callable[[Source, dict | None], object], main: Source, mixed: Source, share: float,
                 seed: int, cursor: dict | None = None):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"the mix share must be in [0, 1], got {share}")
        cursor = cursor or {}
        self.share, self.seed = share, seed
        self.draws, self.from_mix = int(cursor.get("draws", 0)), int(cursor.get("from_mix", 0))
        self.main = make(main, cursor.get("main"))
        self.mixed = make(mixed, cursor.get("mix"))

    @property
    def cursor(self) -> dict:
        main = self.main.cursor
        return {"epoch": main["epoch"], "draws": self.draws, "from_mix": self.from_mix, "main": main,
                "mix": self.mixed.cursor}

    def __iter__(self):
        return self

    def __next__(self):
        from_mix = mix_draw(self.seed, self.draws) < self.share
        batch = next(self.mixed if from_mix else self.main)
        self.draws += 1
        self.from_mix += from_mix
        return batch

    def close(self) -> None:
        self.main.close()
        self.mixed.close()
