"""What a build records: build.json (its header and plan), each shard's commit.json, and manifest.json.

The commit protocol (storage_layout.md 5): build.json first, then each shard's objects, then its commit
file (the shard's manifest entry, the build's cache_key, sealed by `commit_sha256`), then the manifest,
assembled from the commit files once every planned shard has one. A commit file that does not parse or
whose seal does not hold counts as absent (the shard is written again); one of another build is refused.

Knows JSON, the Store and the manifest; nothing about arrays' values, models or training.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
from dataclasses import dataclass, field

from shared.encode import array_descriptions
from shared.format import (
    BUILD_FILE,
    COMMIT_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MAX_BOOKKEEPING_BYTES,
    MAX_MANIFEST_BYTES,
    TAIL_SAMPLES_EXTENSION,
    CacheError,
    CacheFormatError,
    CacheMismatchError,
    chunk_rows_of,
    shard_name,
    shard_path,
    tail_samples_of,
)
from shared.identity import compute_cache_key, seal, seal_holds, section_differences
from shared.manifest import (
    SECTION_KEYS,
    Manifest,
    ShardEntry,
    check_format_version,
    make_totals,
    parse_manifest,
    parse_shard,
)
from shared.ownership import claim_root
from shared.store import Store, open_store


def _installed_version() -> str:
    """kdcache's version from its package metadata (pyproject.toml), the one place it is written."""
    try:
        return importlib.metadata.version("kdcache")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


TOOL_VERSION = _installed_version()


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class BuildHeader:
    """What a build is: the four descriptive sections of the manifest and the shard plan."""

    teacher: dict
    tokenizer: dict
    dataset: dict
    settings: dict
    num_shards: int
    created_at: str = field(default_factory=utc_now)
    tool_version: str = TOOL_VERSION

    def __post_init__(self):
        for section, keys in SECTION_KEYS.items():
            value = getattr(self, section)
            missing = [k for k in keys if k not in value]
            if missing:
                raise CacheFormatError(f"build header: {section} is missing {missing}")
        tail_samples_of(self.settings)
        if isinstance(self.settings["top_k"], int) and isinstance(self.tokenizer["vocab_size"], int):
            chunk_rows_of(self.settings, self.settings["top_k"], self.tokenizer["vocab_size"])  # readers refuse others
        if self.num_shards < 1:
            raise CacheError(
                "the data set produced no sequences to cache (0 shards planned); check {dataset}, "
                "{split}, the text/prompt/response fields and {limit}"
            )

    @property
    def cache_key(self) -> str:
        return compute_cache_key(self.teacher, self.tokenizer, self.dataset, self.settings)

    def sections(self) -> dict:
        return {"teacher": self.teacher, "tokenizer": self.tokenizer, "dataset": self.dataset, "settings": self.settings}

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_at": self.created_at,
            "tool_version": self.tool_version,
            "cache_key": self.cache_key,
            **self.sections(),
            "plan": {"num_shards": self.num_shards},
        }

    @classmethod
    def from_bytes(cls, raw: bytes) -> BuildHeader:
        """Parse build.json; a damaged one is a CacheFormatError naming it, never a bare ValueError."""
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CacheFormatError(f"{BUILD_FILE} is not valid JSON ({exc}); it was damaged after it was written. "
                                   "Rerun with {overwrite} to start the build again, or choose another {out}") from exc
        return cls.from_json(obj)

    @classmethod
    def from_json(cls, obj: dict) -> BuildHeader:
        """A header from build.json's object: its format version checked, its cache_key recomputed."""
        if not isinstance(obj, dict):
            raise CacheFormatError(f"{BUILD_FILE} must hold a JSON object; delete the directory or use {{overwrite}}")
        check_format_version(obj.get("format_version"), BUILD_FILE)
        try:
            header = cls(
                teacher=obj["teacher"],
                tokenizer=obj["tokenizer"],
                dataset=obj["dataset"],
                settings=obj["settings"],
                num_shards=int(obj["plan"]["num_shards"]),
                created_at=obj["created_at"],
                tool_version=obj["tool_version"],
            )
        except (KeyError, TypeError, ValueError, CacheError) as exc:
            raise CacheFormatError(f"{BUILD_FILE} is malformed ({exc!r}); delete the directory or use {{overwrite}}") from exc
        if header.cache_key != obj.get("cache_key"):
            raise CacheFormatError(f"{BUILD_FILE}: its cache_key is not the key of its own header (damaged, or edited "
                                   "after the build started); rerun with {overwrite} to start the build again")
        return header


def header_differences(old: BuildHeader, new: BuildHeader) -> list[str]:
    """Human-readable 'section.key: old -> new' for every setting that differs."""
    diffs = section_differences(old.sections(), new.sections())
    if old.num_shards != new.num_shards:
        diffs.append(f"plan.num_shards: {old.num_shards} -> {new.num_shards}")
    return diffs


def read_build_header(store: Store) -> BuildHeader:
    return BuildHeader.from_bytes(store.read_bytes(BUILD_FILE, max_bytes=MAX_BOOKKEEPING_BYTES))


def commit_body(entry: ShardEntry, cache_key: str) -> bytes:
    """A shard's commit.json: its manifest entry and the build's cache_key, sealed by commit_sha256."""
    return json.dumps(seal({"cache_key": cache_key, **entry.to_json()}, "commit_sha256"), indent=1).encode()


def read_commit(store: Store, index: int, cache_key: str | None) -> ShardEntry | None:
    """Shard `index`'s commit file as a manifest entry; None if absent or damaged (then it is not committed).

    A commit file is written atomically, so only damage after the fact makes one unreadable or breaks its
    seal; the shard is then treated as uncommitted and a resumed build writes it again.
    """
    key = f"{shard_path(index)}/{COMMIT_FILE}"
    try:
        raw = json.loads(store.read_bytes(key, max_bytes=MAX_BOOKKEEPING_BYTES))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(raw, dict) or not seal_holds(raw, "commit_sha256"):
        return None
    if cache_key is not None and raw.get("cache_key") != cache_key:
        raise CacheMismatchError(f"{key} belongs to another build (cache_key differs); rerun with {{overwrite}}")
    entry = {k: v for k, v in raw.items() if k not in ("cache_key", "commit_sha256")}
    try:
        return parse_shard(entry, index)
    except CacheError:
        return None


def read_commits(store: Store, num_shards: int, cache_key: str | None) -> tuple[list[ShardEntry], list[int]]:
    """The committed shards' entries and the indices still missing."""
    entries, missing = [], []
    for index in range(num_shards):
        entry = read_commit(store, index, cache_key)
        if entry is None or entry.name != shard_name(index):
            missing.append(index)
        else:
            entries.append(entry)
    return entries, missing


def read_manifest_or_none(store: Store) -> Manifest | None:
    try:
        return parse_manifest(store.read_bytes(MANIFEST_FILE, max_bytes=MAX_MANIFEST_BYTES))
    except (CacheError, FileNotFoundError):
        return None


def finalize_cache(store: Store | str, header: BuildHeader | None = None) -> Manifest | None:
    """Assemble and write manifest.json from the shards' commit files (`kdcache finalize`)."""
    if isinstance(store, str):
        store = open_store(store)
    if header is None:
        if not store.exists(BUILD_FILE):
            raise CacheError(f"{store.url} has no {BUILD_FILE}: it is not a kdcache build")
        claim_root(store, create=False)
        header = read_build_header(store)
    if store.exists(MANIFEST_FILE):  # a complete cache is never changed (storage_layout.md 5)
        existing = read_manifest_or_none(store)
        if existing is not None and existing.cache_key == header.cache_key:
            return existing
    entries, missing = read_commits(store, header.num_shards, header.cache_key)
    if missing:
        return None
    tail_samples = tail_samples_of(header.settings)
    manifest = Manifest(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        created_at=header.created_at,
        tool_version=header.tool_version,
        cache_key=header.cache_key,
        **header.sections(),
        arrays=array_descriptions(header.tokenizer["vocab_size"], tail_samples, top_k=header.settings["top_k"],
                                  chunk_rows=header.settings["chunk_rows"]),
        shards=entries,
        totals=make_totals(entries),
        extensions={TAIL_SAMPLES_EXTENSION: {"must_understand": True}} if tail_samples else {},
    )
    data = manifest.dumps()
    parse_manifest(data)  # never write a manifest this reader would refuse
    store.write_bytes(MANIFEST_FILE, data)
    return manifest
