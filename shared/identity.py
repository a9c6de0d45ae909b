"""What a cache is: its cache_key, the checksums that seal its JSON files, and how two headers differ.

The cache_key (storage_layout.md 6.4) is recomputed from a manifest's own header wherever a cache is
opened, so a cache relabelled with another build's key is refused, never reused. The manifest and each
commit file also carry a sha256 of their own canonical JSON (`manifest_sha256`, `commit_sha256`), so a
flipped bit in any field, descriptive ones included, is refused. Both are checks against damage and
careless edits: whoever can write a cache can recompute them (storage_layout.md 8, threat model).

Knows canonical JSON and the header's sections; nothing about arrays, models or training.
"""

from __future__ import annotations

import hashlib
import json

from shared.format import FORMAT_VERSION

SECTIONS = ("teacher", "tokenizer", "dataset", "settings")

# Keys of each section that describe but do not determine the content; left out of the cache_key.
DESCRIPTIVE_KEYS = {
    "teacher": {"name", "path", "revision", "engine_version"},
    "tokenizer": {"name", "path"},
    "dataset": {"name", "path", "split", "num_source_rows", "num_windows", "num_dropped"},
    "settings": {"shard_tokens", "chunk_rows", "batch_tokens", "num_workers", "limit_note"},
}


def canonical_json(obj) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes that hashes are taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def compute_cache_key(teacher: dict, tokenizer: dict, dataset: dict, settings: dict) -> str:
    """sha256 over everything that determines a cache's content (storage_layout.md 6.4).

    The teacher's name, path and revision are left out when a weights hash identifies it, so the
    same weights under two names give one key; without a weights hash, name and revision count.
    """
    sections = {"teacher": teacher, "tokenizer": tokenizer, "dataset": dataset, "settings": settings}
    identity: dict = {"format_version": FORMAT_VERSION}
    for name, section in sections.items():
        skip = set(DESCRIPTIVE_KEYS[name])
        if name == "teacher" and not section.get("weights_sha256"):
            skip -= {"name", "revision"}
        identity[name] = {k: v for k, v in section.items() if k not in skip}
    return hashlib.sha256(canonical_json(identity)).hexdigest()


def seal(obj: dict, field: str) -> dict:
    """obj with `field` set to the sha256 of the canonical JSON of obj without that field."""
    body = {k: v for k, v in obj.items() if k != field}
    return {**body, field: hashlib.sha256(canonical_json(body)).hexdigest()}


def seal_holds(obj: dict, field: str) -> bool:
    """Whether obj[field] is the sha256 of the canonical JSON of the rest of obj."""
    try:
        return seal(obj, field)[field] == obj.get(field)
    except (TypeError, ValueError):  # a value canonical JSON refuses (NaN, a non-string key)
        return False


def section_differences(old: dict, new: dict) -> list[str]:
    """'section.key: old -> new' for every key of the four header sections whose value differs."""
    diffs = []
    for section in SECTIONS:
        a, b = old.get(section) or {}, new.get(section) or {}
        if not isinstance(a, dict) or not isinstance(b, dict):
            diffs.append(f"{section}: {a!r:.60} -> {b!r:.60}")
            continue
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r:.60} -> {b.get(key)!r:.60}")
    return diffs
