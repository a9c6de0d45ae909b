"""Data sets -> rows: the built-in corpus, local files and folders, Hugging Face hub data sets.

Data set specs (`--dataset`):
- `builtin:pydoc-topics` (the default): the reference-manual topics that ship inside Python's
  standard library (`pydoc_data.topics`, about 460 KB of English), one row per topic, sorted by
  topic name. Needs no download.
- a local `.jsonl`/`.json`/`.parquet`/`.csv`/`.txt` file, or a folder of them (read with `datasets`).
  A single file is one split named `train`: `--split` may slice it (`train[:1000]`, `train[-500:]`)
  and any other split name is refused, never silently ignored;
- a Hugging Face hub data set name, with `--split` and, for data sets that have several
  configurations (subsets), `--dataset-config` (e.g. `openai/gsm8k` needs `main` or `socratic`).
  A local folder takes both too (its README.md may define configurations).

Local files and folders are recorded by their real path (`dataset_name`), so `./data.jsonl` and
`/abs/data.jsonl` name one build.

Knows `datasets` and the file system; nothing about tokenizers, models or the cache format.
"""

from __future__ import annotations

import os

from shared.errors import UserError

BUILTIN_PREFIX = "builtin:"
DEFAULT_DATASET = "builtin:pydoc-topics"
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


class DataError(UserError):
    """A data set problem the user can fix (unknown data set or field, empty data, bad template)."""


def builtin_rows(name: str) -> list[dict]:
    if name == "pydoc-topics":
        from pydoc_data.topics import topics

        return [{"text": topics[key], "topic": key} for key in sorted(topics)]
    raise DataError(f"unknown built-in data set {BUILTIN_PREFIX}{name}; built-ins: {BUILTIN_PREFIX}pydoc-topics")


def dataset_name(dataset: str) -> str:
    """The name a cache records: a local file's or folder's real path, else the spec as given."""
    if dataset.startswith(BUILTIN_PREFIX):
        return dataset
    path = os.path.expanduser(dataset)
    return os.path.realpath(path) if os.path.exists(path) else dataset


def load_rows(dataset: str, split: str | None = None, config: str | None = None):
    """An iterable of dict rows plus the list of column names.

    split: default 'train'. config: the data set's configuration (hub data sets and folders only).
    """
    if dataset.startswith(BUILTIN_PREFIX):
        if config is not None or split not in (None, "train"):
            raise DataError(f"{{dataset}} {dataset} is a built-in data set with one split and no configurations; "
                            "drop {split} and {dataset_config}")
        rows = builtin_rows(dataset[len(BUILTIN_PREFIX):])
        return rows, list(rows[0].keys())
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    path = os.path.expanduser(dataset)
    local = os.path.isfile(path) or os.path.isdir(path)
    try:
        if os.path.isfile(path):
            suffix = os.path.splitext(path)[1].lower()
            if suffix not in LOCAL_SUFFIXES:
                raise DataError(f"{{dataset}} {dataset}: unsupported file type {suffix!r}; use one of "
                                f"{sorted(LOCAL_SUFFIXES)}")
            if config is not None:
                raise DataError(f"{{dataset_config}} {config}: {{dataset}} {dataset} is a single file, which has no "
                                "configurations; drop {dataset_config}, or pass a folder or hub data set that has them")
            if os.path.getsize(path) == 0:
                raise DataError(f"{{dataset}} {dataset} is an empty file (0 bytes): there is nothing to read")
            kwargs = {"sample_by": "document"} if suffix == ".txt" else {}  # a .txt file is one document
            try:
                # A single file is the split 'train'; --split may slice it ('train[:1000]').
                ds = datasets.load_dataset(LOCAL_SUFFIXES[suffix], data_files=path, split=split or "train", **kwargs)
            except ValueError as exc:
                if split is not None and "split" in str(exc).lower() and "corresponds to no data" not in str(exc):
                    raise DataError(
                        f"{{split}} {split}: {{dataset}} {dataset} is a single file, which is one split named 'train' "
                        f"({' '.join(str(exc).split())}). Drop {{split}}, slice the file with {{split}} "
                        "'train[:1000]', or "
                        "pass a folder or hub data set that has the split") from exc
                raise
        elif os.path.isdir(path):
            ds = datasets.load_dataset(path, config, split=split or "train")
        elif dataset.startswith((".", "/", "~")) or os.path.splitext(path)[1].lower() in LOCAL_SUFFIXES:
            raise DataError(f"{{dataset}} {dataset}: no such file or folder")
        else:
            ds = datasets.load_dataset(dataset, config, split=split or "train")
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{{dataset}} {dataset}: not found ({exc}). Pass a local .jsonl/.json/.parquet/.csv/.txt file "
                        "or folder, "
                        f"{DEFAULT_DATASET}, or a hub data set on a machine with hub access") from exc
    except ValueError as exc:
        if local and "corresponds to no data" in str(exc):  # datasets' words for a file without rows
            raise DataError(f"{{dataset}} {dataset} has no rows: there is nothing to read") from exc
        if "config name is missing" in str(exc).lower() or "builderconfig" in str(exc).lower():
            raise DataError(f"{{dataset}} {dataset} has several configurations: pass {{dataset_config}} NAME "
                            f"({' '.join(str(exc).split())[:300]})") from exc
        if "split" in str(exc).lower():
            raise DataError(f"{{dataset}} {dataset}: {exc}") from exc
        raise DataError(f"{{dataset}} {dataset}: could not be loaded ({exc})") from exc
    except Exception as exc:  # datasets raises many types for malformed files and offline/missing hub data sets
        if local:
            root = exc
            while root.__cause__ is not None:  # datasets wraps the parser's own error, which names the bad row
                root = root.__cause__
            raise DataError(
                f"{{dataset}} {dataset}: could not be read ({type(root).__name__}: {str(root)[:200]}); check that the "
                "file "
                f"is well-formed {'/'.join(sorted(LOCAL_SUFFIXES))} data"
            ) from exc
        raise DataError(
            f"{{dataset}} {dataset}: could not be loaded ({type(exc).__name__}: {str(exc)[:200]}). It is not a local "
            "file or "
            f"folder; a hub data set needs network access. Pass a local file or {DEFAULT_DATASET}."
        ) from exc
    if len(ds) == 0:
        raise DataError(f"{{dataset}} {dataset} has no rows: there is nothing to read")
    return ds, list(ds.column_names)
