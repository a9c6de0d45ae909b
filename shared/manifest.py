"""The manifest: dataclasses, strict JSON parsing, and the cache_key.

Parsing is strict on purpose (storage_layout.md, "Manifest"): unknown top-level fields, unknown
extensions marked must_understand, wrong types, negative or absurd counts, and shard paths that
are absolute or leave the cache are refused with a message naming the field. The descriptive
sections (teacher, tokenizer, dataset, settings) have mandatory keys and may carry more.

Knows JSON and the format's rules; nothing about models or training.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from shared.encode import check_array_descriptions
from shared.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MAX_SHARD_SEQUENCES,
    MAX_TOPK_MASS,
    MAX_VOCAB_SIZE,
    SHARD_NAME_RE,
    TAIL_SAMPLES_EXTENSION,
    CacheFormatError,
    CacheIdentityError,
    check_object_key,
    chunk_rows_of,
    meta_path,
    shard_path,
    tail_samples_of,
)
from shared.identity import compute_cache_key, seal, seal_holds

MAX_COUNT = 2**48  # any count above this is hostile input, not a real cache

# Mandatory keys (and their JSON types) of each descriptive section.
SECTION_KEYS: dict[str, dict[str, tuple[type, ...]]] = {
    "teacher": {"name": (str,), "dtype": (str,), "engine": (str,), "engine_version": (str,)},
    "tokenizer": {"name": (str,), "vocab_size": (int,), "vocab_sha256": (str,)},
    "dataset": {"name": (str,), "fingerprint": (str,), "num_sequences": (int,)},
    "settings": {"mode": (str,), "top_k": (int,), "max_length": (int,)},
}

TOP_LEVEL_KEYS = (
    "format",
    "format_version",
    "created_at",
    "tool_version",
    "cache_key",
    "teacher",
    "tokenizer",
    "dataset",
    "settings",
    "arrays",
    "shards",
    "totals",
    "extensions",
    "manifest_sha256",
)
KNOWN_EXTENSIONS: set[str] = {TAIL_SAMPLES_EXTENSION}


@dataclass
class ObjectInfo:
    size: int
    sha256: str


@dataclass
class ShardEntry:
    """One committed shard: its counts and the size and sha256 of every stored object."""

    name: str
    path: str
    meta_path: str
    num_sequences: int
    num_tokens: int
    num_loss_tokens: int
    topk_mass_sum: float  # sum over rows of the probability in the top K (for mean coverage)
    objects: dict[str, ObjectInfo] = field(default_factory=dict)

    @property
    def index(self) -> int:
        return int(self.name.split("-", 1)[1])

    @property
    def num_bytes(self) -> int:
        return sum(o.size for o in self.objects.values())

    def to_json(self) -> dict:
        out = asdict(self)
        out["objects"] = {k: {"size": v.size, "sha256": v.sha256} for k, v in sorted(self.objects.items())}
        return out


@dataclass
class Manifest:
    format: str
    format_version: int
    created_at: str
    tool_version: str
    cache_key: str
    teacher: dict
    tokenizer: dict
    dataset: dict
    settings: dict
    arrays: dict  # stored array name -> {"dtype": str}, with topk_id_table's table_size and topk_prob_steps' levels
    shards: list[ShardEntry]
    totals: dict
    extensions: dict = field(default_factory=dict)

    @property
    def top_k(self) -> int:
        return int(self.settings["top_k"])

    @property
    def tail_samples(self) -> int:
        """M, the tail draws per row (storage_layout.md 3.3); 0 when the cache has no tail samples."""
        return tail_samples_of(self.settings)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    def to_json(self) -> dict:
        """The manifest's JSON object, sealed: manifest_sha256 covers every other field (storage_layout.md 6.1)."""
        out = {k: getattr(self, k) for k in TOP_LEVEL_KEYS if k != "manifest_sha256"}
        out["shards"] = [s.to_json() for s in self.shards]
        return seal(out, "manifest_sha256")

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), indent=1, sort_keys=False, allow_nan=False).encode() + b"\n"


def make_totals(shards: list[ShardEntry]) -> dict:
    num_tokens = sum(s.num_tokens for s in shards)
    return {
        "num_shards": len(shards),
        "num_sequences": sum(s.num_sequences for s in shards),
        "num_tokens": num_tokens,
        "num_loss_tokens": sum(s.num_loss_tokens for s in shards),
        "num_bytes": sum(s.num_bytes for s in shards),
        "mean_topk_mass": (sum(s.topk_mass_sum for s in shards) / num_tokens) if num_tokens else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# Strict parsing


def _need(obj: dict, key: str, types: tuple[type, ...], where: str):
    if key not in obj:
        raise CacheFormatError(f"manifest: {where} is missing mandatory field {key!r}")
    value = obj[key]
    if types == (int,) and isinstance(value, bool):
        raise CacheFormatError(f"manifest: {where}.{key} must be an integer, got {value!r}")
    if not isinstance(value, types):
        names = "/".join(t.__name__ for t in types)
        raise CacheFormatError(f"manifest: {where}.{key} must be {names}, got {type(value).__name__} {value!r:.60}")
    return value


def _count(obj: dict, key: str, where: str) -> int:
    value = _need(obj, key, (int,), where)
    if value < 0 or value > MAX_COUNT:
        raise CacheFormatError(f"manifest: {where}.{key} = {value} is outside [0, 2**48]")
    return value


def _sha(value, where: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise CacheFormatError(f"manifest: {where} must be a 64-character lowercase hex sha256, got {value!r:.80}")
    return value


def _key(key, where: str) -> str:
    """check_object_key, with the manifest field named in the message."""
    try:
        return check_object_key(key)
    except CacheFormatError as exc:
        raise CacheFormatError(f"manifest: {where}: {exc}") from exc


def parse_shard(obj, position: int) -> ShardEntry:
    where = f"shards[{position}]"
    if not isinstance(obj, dict):
        raise CacheFormatError(f"manifest: {where} must be an object")
    known = {"name", "path", "meta_path", "num_sequences", "num_tokens", "num_loss_tokens", "topk_mass_sum", "objects"}
    unknown = set(obj) - known
    if unknown:
        raise CacheFormatError(f"manifest: {where} has unknown fields {sorted(unknown)}; known: {sorted(known)}")
    name = _need(obj, "name", (str,), where)
    if not SHARD_NAME_RE.match(name):
        raise CacheFormatError(f"manifest: {where}.name {name!r} is not of the form shard-NNNNN")
    index = int(name.split("-", 1)[1])
    path = _need(obj, "path", (str,), where)
    _key(path, f"{where}.path")
    if path != shard_path(index):
        raise CacheFormatError(
            f"manifest: {where}.path {path!r} must be {shard_path(index)!r} (shards live under shards/, "
            "relative to the cache; absolute paths, '..' and URLs are refused)"
        )
    mpath = _need(obj, "meta_path", (str,), where)
    if mpath != meta_path(index):
        raise CacheFormatError(f"manifest: {where}.meta_path {mpath!r} must be {meta_path(index)!r}")
    num_sequences = _count(obj, "num_sequences", where)
    num_tokens = _count(obj, "num_tokens", where)
    num_loss_tokens = _count(obj, "num_loss_tokens", where)
    if num_sequences > MAX_SHARD_SEQUENCES:
        raise CacheFormatError(f"manifest: {where}.num_sequences = {num_sequences} exceeds the format's limit of "
                               f"{MAX_SHARD_SEQUENCES} sequences per shard")
    if num_sequences < 1 or num_tokens < num_sequences or num_loss_tokens > num_tokens:
        raise CacheFormatError(
            f"manifest: {where} counts are inconsistent (num_sequences={num_sequences}, "
            f"num_tokens={num_tokens}, num_loss_tokens={num_loss_tokens})"
        )
    mass = _need(obj, "topk_mass_sum", (int, float), where)
    if isinstance(mass, bool) or not math.isfinite(mass) or mass < 0 or mass > num_tokens * MAX_TOPK_MASS:
        raise CacheFormatError(f"manifest: {where}.topk_mass_sum = {mass} is not in [0, {MAX_TOPK_MASS} x num_tokens "
                               f"= {num_tokens * MAX_TOPK_MASS:g}] (storage_layout.md 6.3)")
    objects_raw = _need(obj, "objects", (dict,), where)
    if len(objects_raw) > 1_000_000:
        raise CacheFormatError(f"manifest: {where}.objects lists {len(objects_raw)} objects; refusing")
    objects = {}
    for key, info in objects_raw.items():
        _key(key, f"{where}.objects")
        if not (key.startswith(path + "/") or key == mpath):
            raise CacheFormatError(f"manifest: {where} lists object {key!r} outside its shard {path!r}")
        if not isinstance(info, dict) or set(info) != {"size", "sha256"}:
            raise CacheFormatError(f"manifest: {where}.objects[{key!r}] must be {{'size': int, 'sha256': hex}}")
        objects[key] = ObjectInfo(size=_count(info, "size", f"{where}.objects[{key!r}]"), sha256=_sha(info["sha256"], f"{where}.objects[{key!r}].sha256"))
    if mpath not in objects:
        raise CacheFormatError(f"manifest: {where}.objects does not list its meta file {mpath!r}")
    return ShardEntry(name, path, mpath, num_sequences, num_tokens, num_loss_tokens, float(mass), objects)


def parse_manifest(raw: bytes | str) -> Manifest:
    """Parse and validate manifest.json; raise CacheFormatError naming the first problem."""
    if isinstance(raw, bytes) and len(raw) > 512 * 2**20:
        raise CacheFormatError(f"manifest.json is {len(raw)} bytes; refusing anything over 512 MiB")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CacheFormatError(f"manifest.json is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise CacheFormatError("manifest.json must hold a JSON object")
    fmt = obj.get("format")
    if fmt != FORMAT_NAME:
        raise CacheFormatError(f"manifest: format is {fmt!r}, expected {FORMAT_NAME!r}; this is not a kdcache cache")
    check_format_version(obj.get("format_version"), MANIFEST_FILE)
    version = obj["format_version"]
    unknown = set(obj) - set(TOP_LEVEL_KEYS)
    if unknown:
        raise CacheFormatError(
            f"manifest: unknown field(s) {sorted(unknown)}; this kdcache knows {list(TOP_LEVEL_KEYS)}. "
            "A newer writer made this cache: upgrade kdcache."
        )
    extensions = obj.get("extensions", {})
    if not isinstance(extensions, dict):
        raise CacheFormatError("manifest: extensions must be an object")
    for name, ext in extensions.items():
        if not isinstance(ext, dict) or not isinstance(ext.get("must_understand", True), bool):
            raise CacheFormatError(f"manifest: extension {name!r} must be an object with a boolean must_understand")
        if name not in KNOWN_EXTENSIONS and ext.get("must_understand", True):
            raise CacheFormatError(
                f"manifest: extension {name!r} is marked must_understand and this kdcache does not know it; upgrade "
                "kdcache"
            )
    sections = {}
    for section, keys in SECTION_KEYS.items():
        value = _need(obj, section, (dict,), "manifest")
        for key, types in keys.items():
            _need(value, key, types, section)
        sections[section] = value
    top_k = sections["settings"]["top_k"]
    vocab_size = sections["tokenizer"]["vocab_size"]
    if not 1 <= vocab_size <= MAX_VOCAB_SIZE:
        raise CacheFormatError(f"manifest: tokenizer.vocab_size = {vocab_size} is outside [1, 2**24] (storage_layout.md 6.2)")
    if sections["tokenizer"].get("tokenizer_size", vocab_size) != vocab_size:  # version 2: V is the tokenizer's size
        raise CacheFormatError(f"manifest: tokenizer.tokenizer_size = {sections['tokenizer']['tokenizer_size']!r:.40} "
                               f"differs from tokenizer.vocab_size = {vocab_size}; in format {FORMAT_VERSION} both are "
                               "the tokenizer's size (storage_layout.md 3)")
    if not 1 <= top_k <= vocab_size:
        raise CacheFormatError(f"manifest: settings.top_k = {top_k} must be in [1, vocab_size={vocab_size}]")
    if sections["settings"]["mode"] not in ("score", "generate"):
        raise CacheFormatError("manifest: settings.mode must be 'score' or 'generate', got "
                               f"{sections['settings']['mode']!r}")
    try:  # the settings' own checks name the field; the message must name the manifest too
        tail_samples = tail_samples_of(sections["settings"])
        chunk_rows = chunk_rows_of(sections["settings"], top_k, vocab_size)
    except CacheFormatError as exc:
        raise CacheFormatError(f"manifest: {exc}") from exc
    if chunk_rows is None:
        raise CacheFormatError(f"manifest: settings is missing mandatory field 'chunk_rows' (format {FORMAT_VERSION}: "
                               "every zarr.json and chunk key of a shard follows from it)")
    if bool(tail_samples) != (TAIL_SAMPLES_EXTENSION in extensions):
        raise CacheFormatError(
            f"manifest: settings.tail_samples = {tail_samples} but extensions "
            f"{'lacks' if tail_samples else 'has'} {TAIL_SAMPLES_EXTENSION!r}; the two go together (storage_layout.md "
            "3.3)")
    arrays = _need(obj, "arrays", (dict,), "manifest")
    check_array_descriptions(arrays, vocab_size=vocab_size, tail_samples=tail_samples)  # dtypes, N and L
    shards_raw = _need(obj, "shards", (list,), "manifest")
    if not shards_raw:
        raise CacheFormatError("manifest: shards is empty; a complete cache has at least one shard")
    shards = [parse_shard(s, i) for i, s in enumerate(shards_raw)]
    for shard in shards:
        check_shard_objects(shard, sections["settings"], vocab_size, chunk_rows)
    names = [s.name for s in shards]
    if names != sorted(set(names)) or [s.index for s in shards] != list(range(len(shards))):
        raise CacheFormatError("manifest: shards must be shard-00000, shard-00001, ... in order, without gaps or "
                               "repeats")
    totals = _need(obj, "totals", (dict,), "manifest")
    expected = make_totals(shards)
    for key in ("num_shards", "num_sequences", "num_tokens", "num_loss_tokens", "num_bytes"):
        if _count(totals, key, "totals") != expected[key]:
            raise CacheFormatError(f"manifest: totals.{key} = {totals[key]} but the shards add up to {expected[key]}")
    cache_key = _sha(_need(obj, "cache_key", (str,), "manifest"), "cache_key")
    check_identity(obj, sections, cache_key)
    return Manifest(
        format=fmt,
        format_version=version,
        created_at=_need(obj, "created_at", (str,), "manifest"),
        tool_version=_need(obj, "tool_version", (str,), "manifest"),
        cache_key=cache_key,
        teacher=sections["teacher"],
        tokenizer=sections["tokenizer"],
        dataset=sections["dataset"],
        settings=sections["settings"],
        arrays=arrays,
        shards=shards,
        totals=totals,
        extensions=extensions,
    )


def check_shard_objects(entry: ShardEntry, settings: dict, vocab_size: int, chunk_rows: int) -> None:
    """A shard lists exactly the objects the format's writer stores for its counts (storage_layout.md 3.1, 6.3):
    the group and array zarr.json files, every chunk the shapes imply (none is ever an implicit fill), and the
    meta file."""
    from shared.encode import shard_object_keys, shard_shapes, zarr_chunk_shape

    shapes = shard_shapes(entry.num_tokens, entry.num_sequences, settings["top_k"], tail_samples_of(settings), vocab_size,
                          chunk_rows=chunk_rows, table_size=1)  # the keys do not depend on the tables' size
    num_objects = 2 + sum(1 + math.ceil(shape[0] / zarr_chunk_shape(name, shape, chunk_rows)[0])
                          for name, (shape, _) in shapes.items())  # group zarr.json, meta; zarr.json + chunks each
    if num_objects != len(entry.objects):  # counted before any key is made: hostile counts imply billions
        raise CacheFormatError(f"manifest: {entry.name} lists {len(entry.objects):,} objects, but {entry.num_tokens:,} "
                               "rows "
                               f"in chunks of {chunk_rows:,} rows imply {num_objects:,} (a missing chunk would be read "
                               "as fill values)")
    want = {f"{entry.path}/{key}" for key in shard_object_keys(shapes, chunk_rows)} | {entry.meta_path}
    missing, extra = sorted(want - set(entry.objects)), sorted(set(entry.objects) - want)
    if missing or extra:
        name = missing[0] if missing else extra[0]
        raise CacheFormatError(
            f"manifest: {entry.name}: {name}: " + (
                f"is not listed, but {entry.num_tokens} rows in chunks of {chunk_rows} rows imply it (a missing chunk "
                "would be read as fill values)" if missing else
                "is listed, but the format stores no such object for this shard's counts and chunk_rows")
            + f" ({len(missing)} missing, {len(extra)} extra)")


def check_format_version(version, source: str) -> None:
    """The one place where a cache of another format version is refused (manifest.json, build.json)."""
    if isinstance(version, int) and not isinstance(version, bool) and version == FORMAT_VERSION:
        return
    if isinstance(version, int) and not isinstance(version, bool) and 1 <= version < FORMAT_VERSION:
        raise CacheFormatError(
            f"{source}: this cache has format_version {version}, written by an older kdcache; this kdcache reads "
            f"version {FORMAT_VERSION} only (storage_layout.md 11 says what each version changed; version 3 stores the "
            "top-K rows as id codes and probability steps). Rebuild it with this kdcache: delete the cache folder, "
            "then rerun its `kdcache build` command.")
    raise CacheFormatError(
        f"{source}: unsupported format_version {version!r:.40}; this kdcache reads version {FORMAT_VERSION}. "
        "Upgrade kdcache (pip install -U kdcache) or rebuild the cache with this version.")


def check_identity(obj: dict, sections: dict, cache_key: str) -> None:
    """Refuse a manifest whose header does not give its cache_key, or whose manifest_sha256 does not hold.

    The key is recomputed from the four header sections (storage_layout.md 6.4): a cache relabelled with
    another build's key is refused wherever it is opened. The seal covers every other field, descriptive
    ones included. CacheIdentityError carries the header so that a caller with a reference (build.json, the
    build it wanted) can name the fields that differ.
    """
    recomputed = compute_cache_key(*(sections[name] for name in ("teacher", "tokenizer", "dataset", "settings")))
    if recomputed != cache_key:
        raise CacheIdentityError(
            f"manifest: cache_key {cache_key[:12]}... is not the key of its own header (teacher, tokenizer, dataset "
            f"and settings give {recomputed[:12]}...): the header or the key was changed after the build",
            sections, cache_key)
    if not isinstance(obj.get("manifest_sha256"), str) or not seal_holds(obj, "manifest_sha256"):
        raise CacheIdentityError(
            "manifest: manifest_sha256 does not match the manifest's content: a field was changed after the build "
            "(a flipped bit, or an edit)", sections, cache_key)
