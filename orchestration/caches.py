"""What the cache stages left: done-markers, the caches they recorded, manifests, and `kdcache build`'s report.

`kdcache build` returns an existing complete cache with the same cache_key at once (anywhere under
the cache root) instead of building a second one; the chain reads the cache the build reports (its
`--json` line), records it in the cache stage's marker, and every later stage (train, eval, the
teacher's folder) uses that cache. So a teacher never runs twice on the same data and settings,
whichever plan built its cache first. Reads manifests through `shared/`; never imports the cacher.
"""

from __future__ import annotations

import json
import os

from orchestration.plan import TEACHER, Plan, PlanError
from orchestration.stages import BUILD_STATUSES, marker_of
from shared.format import CacheError


def read_marker(path: str) -> dict | None:
    """A stage marker's JSON object, or None when there is none (or it is not a JSON object)."""
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def recorded_cache(plan: Plan, node: str) -> str | None:
    """The cache node's finished cache stage recorded (what `kdcache build` reported), if any."""
    recorded = (read_marker(marker_of(plan, "cache", node)) or {}).get("cache")
    return recorded if isinstance(recorded, str) and recorded else None


def cache_output(url: str) -> dict | None:
    """What a complete cache gives the stages after it, read from its manifest: {"cache", "cache_key", "teacher"
    (the identity of its teacher: weights sha256, else name and revision), "teacher_path"}. None when url holds
    no readable complete cache."""
    try:
        manifest = read_manifest(url)
    except (CacheError, OSError, ValueError):
        return None
    teacher = manifest.teacher
    identity = teacher.get("weights_sha256") or json.dumps([teacher.get("name"), teacher.get("revision")])
    return {"cache": url, "cache_key": manifest.cache_key, "teacher": f"weights:{identity}",
            "teacher_path": teacher.get("path")}


def teacher_folder(plan: Plan) -> str:
    """The root teacher's local folder: the plan's model if it is a folder, else what its cache recorded."""
    if os.path.isdir(plan.teacher["model"]):
        return plan.teacher["model"]
    cache = recorded_cache(plan, TEACHER)
    if cache is None:
        raise PlanError(f"cannot find the teacher's folder: {plan.teacher['model']} is not a folder and the teacher "
                        "cache is not built yet")
    try:
        return read_manifest(cache).teacher["path"]
    except (CacheError, OSError, ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"cannot find the teacher's folder: {plan.teacher['model']} is not a folder and the teacher "
                        f"cache {cache} has no readable manifest.json ({exc})") from exc


def read_manifest(url: str):
    from shared.format import MANIFEST_FILE
    from shared.manifest import parse_manifest
    from shared.store import open_store

    return parse_manifest(open_store(url).read_bytes(MANIFEST_FILE))


def cache_state(url: str) -> str:
    """'complete' (manifest.json), 'partial' (build.json only) or 'missing'; url is a folder or store URL."""
    from shared.format import BUILD_FILE, MANIFEST_FILE
    from shared.store import open_store

    try:
        store = open_store(url)
        if store.exists(MANIFEST_FILE):
            return "complete"
        if store.exists(BUILD_FILE):
            return "partial"
    except (CacheError, OSError, ValueError):
        pass
    return "missing"


def build_report(log_text: str) -> dict | None:
    """The JSON object `kdcache build --json` printed last in a stage's log, or None when there is none.

    The log holds the build's stderr too (progress, messages), so the object is the last line that parses
    as a JSON object with a `status` and a `cache_key`.
    """
    for line in reversed(log_text.splitlines()):
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "status" in obj and "cache_key" in obj:
            return obj
    return None


def reported_cache(plan: Plan, log_text: str) -> dict:
    """The cache a finished `kdcache build --json` reported in its log: {"cache", "cache_key", "status"}.

    `reused` names an identical cache elsewhere under the cache root, and nothing is written at --out.
    The reported cache is checked against the reported cache_key (its manifest's); if it cannot be read
    or holds another key, the cache is looked up by that key under the plan's cache root.
    """
    from shared.catalog import find_caches

    report = build_report(log_text)
    if report is None:
        raise PlanError("kdcache build finished without printing its JSON report (--json), so the chain cannot tell "
                        "which cache it built or reused; see the stage's log")
    status, url, key = report.get("status"), report.get("cache"), report.get("cache_key")
    if status not in BUILD_STATUSES or not isinstance(url, str) or not isinstance(key, str) or not key:
        raise PlanError(f"kdcache build printed a report the chain cannot read ({json.dumps(report)[:300]}); expected "
                        f"status in {BUILD_STATUSES}, cache and cache_key; see the stage's log")
    if status == "partial":
        raise PlanError(f"kdcache build left {url} partial: other workers still owe shards. Run them (or "
                        f"`kdcache finalize {url}`), then rerun the plan")
    try:
        found_key = read_manifest(url).cache_key
    except (CacheError, OSError, ValueError):
        found_key = None
    if found_key != key:
        try:
            found = [c for c in find_caches(plan.cache_root, key_prefix=key) if c.get("complete")]
        except CacheError:
            found = []
        if not found:
            raise PlanError(f"kdcache build reported cache {url} (cache_key {key[:12]}...), but no complete cache with "
                            f"that key is there or under {plan.cache_root}; see the stage's log")
        url = plan.cache_root if found[0]["path"] == "." else f"{plan.cache_root.rstrip('/')}/{found[0]['path']}"
    return {"cache": url, "cache_key": key, "status": status}
