"""What checking every row costs (storage_layout.md 3.4, 7; BENCHMARKS.md "Verifying rows").

`pytest --heavy tests/reliability/test_verify_cost.py -s` prints, for a 4-shard cache of SmolLM2's shape
(K = 64, V = 49,152, 262,144 rows, synthetic rows that obey section 3.4): `kdcache verify`'s rate in rows
per second with every row checked, against hashing alone; and, on the trainer's read path, decoding a
block of 8,192 rows with and without the table of row invariants. Timings are printed, never asserted;
what is asserted is that verify streams (its peak memory stays within a few blocks, whatever the cache's
size).
"""

from __future__ import annotations

import time
import tracemalloc

import pytest

import shared.reader as reader_module
from shared.reader import CacheReader
from tests.reliability.test_damage import write_sized_cache


@pytest.mark.slow
def test_verify_cost(tmp_path):
    url = str(tmp_path / "big")
    write_sized_cache(url, num_shards=4, rows_per_shard=65536)
    num_rows = CacheReader(url).manifest.totals["num_tokens"]

    started = time.perf_counter()
    assert CacheReader(url).verify(bookkeeping=True) == []
    hashed_s = time.perf_counter() - started
    started = time.perf_counter()
    assert CacheReader(url).verify(bookkeeping=True, rows=True) == []
    rows_s = time.perf_counter() - started
    tracemalloc.start()  # a second pass for memory: tracing slows every allocation, so it is not timed
    assert CacheReader(url).verify(bookkeeping=True, rows=True) == []
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    def decode(checked: bool) -> float:
        view = CacheReader(url).shard(0)
        view.read_rows(0, 8192)  # meta read, chunks warm
        started = time.perf_counter()
        for lo in range(0, int(view.offsets[-1]), 8192):
            view.read_rows(lo, min(lo + 8192, int(view.offsets[-1])))
        return time.perf_counter() - started

    with_checks = min(decode(True) for _ in range(5))  # the best of 5: the machine may be shared
    real = reader_module.check_rows
    reader_module.check_rows = lambda block, where: None
    try:
        without = min(decode(False) for _ in range(5))
    finally:
        reader_module.check_rows = real
    shard_rows = num_rows // 4
    print(f"\n{num_rows:,} rows x K=64: verify (hashes, structure) {hashed_s:.2f}s = {num_rows / hashed_s:,.0f} "
          "rows/s; "
          f"verify with every row checked (kdcache verify) {rows_s:.2f}s = {num_rows / rows_s:,.0f} rows/s; peak "
          f"traced memory {peak / 2**20:.1f} MiB\n"
          f"trainer read path, one shard in blocks of 8,192 rows: decode + row checks {with_checks:.3f}s "
          f"({shard_rows / with_checks:,.0f} rows/s), decode alone {without:.3f}s ({shard_rows / without:,.0f} "
          "rows/s): "
          f"the checks cost {(with_checks - without) / shard_rows * 1e6:.2f} us per row "
          f"(+{100 * (with_checks / without - 1):.0f}% of decoding)")
    assert peak < 64 * 2**20  # one block of 8,192 rows (about 3 MiB decoded) and its temporaries, not the cache
