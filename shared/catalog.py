"""Finding and describing caches: what `kdcache info` and `kdcache ls` print.

A team shares a cache root (a folder, NFS, s3://bucket/prefix); `find_caches` lists every cache
under it, complete or not, and `find_by_key` answers "does a cache for this (teacher, data,
settings) already exist?". Read-only; knows the format, nothing about models.
"""

from __future__ import annotations

import json

from shared.format import BUILD_FILE, MANIFEST_FILE, CacheError
from shared.manifest import parse_manifest
from shared.reader import CacheReader, count_committed
from shared.store import Store, open_store


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
    prefix = f"{key}/" if key else ""
    if store.exists(prefix + MANIFEST_FILE):
        try:
            m = parse_manifest(store.read_bytes(prefix + MANIFEST_FILE))
        except CacheError as exc:
            return {"path": key or ".", "complete": False, "error": str(exc)}
        return {
            "path": key or ".", "complete": True, "teacher": m.teacher.get("name"), "dataset": m.dataset.get("name"),
            "top_k": m.top_k, "num_tokens": m.totals["num_tokens"], "num_bytes": m.totals["num_bytes"],
            "cache_key": m.cache_key,
        }
    try:
        build = json.loads(store.read_bytes(prefix + BUILD_FILE))
        sub = open_store(f"{store.url.rstrip('/')}/{key}" if key else store.url)
        return {
            "path": key or ".", "complete": False, "teacher": build["teacher"].get("name"),
            "dataset": build["dataset"].get("name"), "top_k": build["settings"].get("top_k"),
            "num_tokens": None, "num_bytes": None, "cache_key": build.get("cache_key"),
            "shards_committed": count_committed(sub), "shards_planned": build["plan"]["num_shards"],
        }
    except (ValueError, KeyError, TypeError) as exc:
        return {"path": key or ".", "complete": False, "error": f"unreadable {BUILD_FILE}: {exc}"}


def find_caches(root: str, *, max_depth: int = 4, key_prefix: str | None = None) -> list[dict]:
    """One summary per cache (a folder holding manifest.json or build.json) under root."""
    store = open_store(root)
    if not store.fs.exists(store.root):
        raise CacheError(f"cache root {root} does not exist")
    found = []
    for full in store.fs.find(store.root, maxdepth=max_depth + 1):
        stripped = store.fs._strip_protocol(full)
        base = store.fs._strip_protocol(store.root).rstrip("/")
        rel = stripped[len(base) + 1 :] if stripped.startswith(base + "/") else ""
        name = rel.rsplit("/", 1)[-1]
        folder = rel.rsplit("/", 1)[0] if "/" in rel else ""
        if name == MANIFEST_FILE or (name == BUILD_FILE and not store.exists(f"{folder}/{MANIFEST_FILE}" if folder else MANIFEST_FILE)):
            if "/shards/" in f"/{folder}/":
                continue
            found.append(_summary(store, folder))
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
