"""Finding and describing caches: what `kdcache info` and `kdcache ls` print.

A team shares a cache root (a folder, NFS, s3://bucket/prefix); `find_caches` lists every cache
under it, complete or not, and `find_by_key` answers "does a cache for this (teacher, data,
settings) already exist?". Read-only; knows the format, nothing about models.
"""

from __future__ import annotations

import json

from shared.format import BUILD_FILE, MANIFEST_FILE, MAX_BOOKKEEPING_BYTES, MAX_MANIFEST_BYTES, CacheError
from shared.manifest import parse_manifest
from shared.reader import CacheReader
from shared.store import Store, open_store
from shared.verify import count_committed


def describe(reader: CacheReader) -> dict:
    """Everything `kdcache info` shows, as plain JSON-able values."""
    m = reader.manifest
    totals = m.totals
    num_tokens = totals["num_tokens"]
    return {
        "url": reader.url,
        "cache_key": m.cache_key,
        "format_version": m.format_version,
        "created_at": m.created_at,
        "tool_version": m.tool_version,
        "teacher": m.teacher,
        "tokenizer": m.tokenizer,
        "dataset": m.dataset,
        "settings": m.settings,
        "arrays": m.arrays,
        "num_shards": totals["num_shards"],
        "num_sequences": totals["num_sequences"],
        "num_tokens": num_tokens,
        "num_loss_tokens": totals["num_loss_tokens"],
        "num_bytes": totals["num_bytes"],
        "bytes_per_token": totals["num_bytes"] / num_tokens if num_tokens else 0.0,
        # per stored entry: K top-K entries plus M tail-sample slots per row
        "bytes_per_token_k": totals["num_bytes"] / (num_tokens * (m.top_k + m.tail_samples)) if num_tokens else 0.0,
        "mean_topk_mass": totals["mean_topk_mass"],
    }


def _summary(store: Store, key: str) -> dict:
    """One cache's line: from its manifest (parsed as a reader does, identity included), else its build.json."""
    prefix = f"{key}/" if key else ""
    path = key or "."
    try:
        raw = store.read_bytes(prefix + MANIFEST_FILE, max_bytes=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raw = None
    except (OSError, CacheError) as exc:
        return {"path": path, "complete": False, "error": str(exc)}
    if raw is not None:
        try:
            m = parse_manifest(raw)
        except CacheError as exc:
            return {"path": path, "complete": False, "error": str(exc)}
        return {
            "path": path, "complete": True, "teacher": m.teacher.get("name"), "dataset": m.dataset.get("name"),
            "top_k": m.top_k, "num_tokens": m.totals["num_tokens"], "num_bytes": m.totals["num_bytes"],
            "cache_key": m.cache_key,
        }
    try:
        build = json.loads(store.read_bytes(prefix + BUILD_FILE, max_bytes=MAX_BOOKKEEPING_BYTES))
        sub = open_store(f"{store.url.rstrip('/')}/{key}" if key else store.url)
        return {
            "path": path, "complete": False, "teacher": build["teacher"].get("name"),
            "dataset": build["dataset"].get("name"), "top_k": build["settings"].get("top_k"),
            "num_tokens": None, "num_bytes": None, "cache_key": build.get("cache_key"),
            "shards_committed": count_committed(sub), "shards_planned": build["plan"]["num_shards"],
        }
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, OSError, CacheError) as exc:
        return {"path": path, "complete": False, "error": f"unreadable {BUILD_FILE}: {exc}"}


def find_caches(root: str, *, max_depth: int = 4, key_prefix: str | None = None) -> list[dict]:
    """One summary per cache (a folder holding manifest.json or build.json) under root."""
    store = open_store(root)
    if not store.fs.exists(store.root):
        raise CacheError(f"cache root {root} does not exist")
    folders = set()
    base = store.fs._strip_protocol(store.root).rstrip("/")
    for full in store.fs.find(store.root, maxdepth=max_depth + 1):  # links are listed, never descended into
        stripped = store.fs._strip_protocol(full)
        rel = stripped[len(base) + 1 :] if stripped.startswith(base + "/") else ""
        name = rel.rsplit("/", 1)[-1]
        folder = rel.rsplit("/", 1)[0] if "/" in rel else ""
        if name in (MANIFEST_FILE, BUILD_FILE) and "/shards/" not in f"/{folder}/":
            folders.add(folder)
    found = [_summary(store, folder) for folder in sorted(folders)]
    found.sort(key=lambda s: s["path"])
    if key_prefix:
        found = [s for s in found if (s.get("cache_key") or "").startswith(key_prefix)]
    return found


def find_by_key(root: str, cache_key: str) -> str | None:
    """The URL of a complete cache under root with exactly this cache_key, if any."""
    try:
        for summary in find_caches(root, key_prefix=cache_key):
            if summary.get("complete") and summary.get("cache_key") == cache_key:
                path = summary["path"]
                return root if path == "." else f"{root.rstrip('/')}/{path}"
    except CacheError:
        return None
    return None
