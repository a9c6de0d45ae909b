"""What a writer may write into and delete in a cache root: only what kdcache created (storage_layout.md 5.1).

A cache root that kdcache creates gets `owner.json` first of all, created exclusively:
`{"tool": "kdcache", "kind": "cache", "id": <32 hex digits>, "created_at": ...}`. A writer then works in a
root only when it is new or empty (it writes the marker), or carries a marker of kind "cache" and holds
nothing but the format's own names (owner.json, build.json, manifest.json, shards/, meta/, locks/ and
`.tmp-` leftovers), none of them a symbolic link. Anything else is refused before a byte is written or
deleted, naming the path: a folder of the user's own files, a model, a kdtrain run, a cache written before
markers existed. `--overwrite` deletes only the format's names inside a marked root (never the marker),
after checking that the marker is still the one that was checked at opening.

Knows the format's names and the Store; nothing about arrays, models or training.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import uuid

from shared.format import (
    BUILD_FILE,
    LOCKS_DIR,
    MANIFEST_FILE,
    MAX_BOOKKEEPING_BYTES,
    META_DIR,
    OWNER_FILE,
    SHARDS_DIR,
    CacheError,
    CacheMismatchError,
    UnsafePathError,
)
from shared.store import Store

TOOL = "kdcache"
KIND = "cache"
OWN_NAMES = (OWNER_FILE, BUILD_FILE, MANIFEST_FILE, SHARDS_DIR, META_DIR, LOCKS_DIR)
OWN_FOLDERS = (SHARDS_DIR, META_DIR, LOCKS_DIR)
BUILD_NAMES = (BUILD_FILE, MANIFEST_FILE, SHARDS_DIR, META_DIR, LOCKS_DIR)  # what --overwrite removes
ID_RE = re.compile(r"^[0-9a-f]{32}$")
# Names that mark a folder as a model (Hugging Face layout): never a cache --out, whatever else it holds.
MODEL_NAMES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def marker_body() -> bytes:
    """A new owner.json: tool, kind, a random id and the time of creation."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return json.dumps({"tool": TOOL, "kind": KIND, "id": uuid.uuid4().hex, "created_at": now}).encode()


def read_marker(store: Store) -> dict | None:
    """The root's owner.json as a dict ({} when absent); None when it is there but not a marker kdcache writes."""
    try:
        raw = store.read_bytes(OWNER_FILE, max_bytes=MAX_BOOKKEEPING_BYTES)
    except FileNotFoundError:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if (not isinstance(body, dict) or not isinstance(body.get("tool"), str) or not isinstance(body.get("kind"), str)
            or not isinstance(body.get("id"), str) or not ID_RE.match(body["id"])):
        return None
    return body


def root_entries(store: Store) -> dict[str, str]:
    """{name: kind} directly in the root ('file', 'folder', 'link', 'special file'; object stores: 'file' or 'folder')."""
    if store.local:
        from shared import localfs

        return localfs.list_folder(store.root)
    if not store.fs.exists(store.root):
        return {}
    out = {}
    for info in store.fs.ls(store.root, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        out[name] = "folder" if info.get("type") == "directory" else "file"
    return out


def _temporary(name: str) -> bool:
    return name.startswith(".tmp-")


def claim_root(store: Store, *, create: bool = True) -> str:
    """Check that a writer may work in store's root, marking a new or empty one; returns the marker's id.

    create=False (`kdcache finalize`): an empty or missing root is refused instead of marked.

    Refuses (nothing written or deleted): a non-empty root without a kdcache cache marker, one holding
    other names than the format's, and a format name or an entry of shards/, meta/, locks/ that is a
    symbolic link (UnsafePathError).
    """
    entries = {n: k for n, k in root_entries(store).items() if not _temporary(n)}
    if not entries and create:
        store.create_exclusive(OWNER_FILE, marker_body())  # a builder starting beside us may have won: fine
        entries = {n: k for n, k in root_entries(store).items() if not _temporary(n)}
    marker = read_marker(store)
    if not marker or marker.get("tool") != TOOL or marker.get("kind") != KIND:
        raise CacheMismatchError(_not_ours(store, entries, marker))
    foreign = sorted(n for n in entries if n not in OWN_NAMES)
    if foreign:
        raise CacheMismatchError(
            f"{store.url} is a kdcache cache folder but also holds {_listed(foreign)}, which kdcache did not "
            "create; it writes and deletes nothing in a folder that holds other files. Move them out, or choose "
            "another folder")
    _refuse_links(store, entries)
    return marker["id"]


def _not_ours(store: Store, entries: dict[str, str], marker: dict | None) -> str:
    names = sorted(entries)
    model = [n for n in names if n in MODEL_NAMES or n.endswith(".safetensors")]
    if marker is None:
        why = f"its {OWNER_FILE} is not a marker kdcache writes (damaged, or someone else's)"
    elif marker:
        why = f"its {OWNER_FILE} marks it as a {marker.get('tool')} {marker.get('kind')!s:.40} folder, not a kdcache cache"
    elif model:
        why = f"it holds a model ({_listed(model)})"
    elif set(names) & {BUILD_FILE, MANIFEST_FILE}:
        why = (f"it holds a kdcache build without the {OWNER_FILE} marker that kdcache writes when it creates a cache "
               "(written by an older kdcache, or copied without it); delete it by hand if you mean to replace it")
    else:
        why = f"it holds {_listed(names)}, and no {OWNER_FILE} marking it as a cache kdcache created"
    return (f"{store.url} is not a kdcache cache folder: {why}. kdcache writes into and deletes only what it "
            "created, even when told to overwrite, so nothing there was changed. Choose a new or empty folder")


def _listed(names: list[str], most: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _refuse_links(store: Store, entries: dict[str, str]) -> None:
    """A format name that is not what the format makes it (a link, a FIFO...), or a link one level inside a folder."""
    for name, kind in sorted(entries.items()):
        wanted = "folder" if name in OWN_FOLDERS else "file"
        if kind != wanted:
            raise UnsafePathError(
                f"{store.url}: {name} is a {kind} where the format has a {wanted}; kdcache never writes or deletes "
                "through a link inside a cache (nor over something it did not create): remove it, or build into a new "
                "folder")
    if not store.local:
        return
    from shared import localfs

    for folder in OWN_FOLDERS:
        if entries.get(folder) == "folder":
            for name, kind in sorted(localfs.list_folder(store.root, folder).items()):
                if kind == "link":
                    raise UnsafePathError(
                        f"{store.url}: {folder}/{name} is a symbolic link; kdcache never writes or deletes through a "
                        "link inside a cache root: remove it, or build into a new folder")


def remove_build(store: Store, owner_id: str) -> None:
    """--overwrite: delete the format's names (not the marker) of a root claim_root accepted with this id."""
    marker = read_marker(store)
    if not marker or marker.get("id") != owner_id:
        raise CacheError(f"{store.url}: its {OWNER_FILE} changed while this writer ran (another tool replaced the "
                         "folder?); nothing was deleted")
    for name in BUILD_NAMES:
        store.delete(name)
