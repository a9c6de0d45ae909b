"""Rows -> token sequences with loss masks: the input side of a cache, and of a run without one.

Both the cacher (to build a cache) and the trainer (to train a cross-entropy baseline on the same
data without a cache) turn a data set into the same sequences with these functions.

Sequences:
- text rows (`--text-field`, default `text`): each row is tokenized and cut into consecutive,
  non-overlapping windows of `max_length` tokens; `loss_mask` is true on every row but the last of
  a window. A final window of a single token cannot be trained on; it is counted (`num_dropped`)
  and reported, never silently lost.
- a text value is a string; an empty or null value is the empty text and a number is its decimal text
  (a CSV column of numbers); any other value (a list, a dict, a boolean, bytes) is refused naming the row
  and the field (`row_text`), never turned into its Python repr.
- prompt/response rows (`--prompt-field`, `--response-field`): the prompt formatted by a template
  (`--prompt-template`, common.templates; default: `chat` when the tokenizer has a chat template,
  else `plain`), then the response and EOS; `loss_mask` is true exactly on the rows whose next token
  belongs to the response. Responses longer than fits are truncated (counted); rows whose prompt
  alone leaves no room for a response token are skipped (counted).
- prompt/response rows with an ids field (`--ids-field`, kdtrain generate's `token_ids`): the row's own token
  ids, the formatted prompt's followed by the response's exactly as a model sampled them (no EOS added, no
  re-tokenization of the text, which can differ: a byte-level BPE's partial characters, merges across the
  prompt's end); the prompt text formatted by the template must give exactly their first ids, and every id
  must be a token id of the tokenizer. The texts still key the held-out rule.

Takes a tokenizer object (anything with the Hugging Face tokenizer call interface) and imports nothing
about models or the cache format.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from common.datasets import DataError, dataset_name, load_rows
from common.templates import (
    check_template_options,
    prompt_ids_with_template,
    prompt_only_ids,
    resolve_template,
)

BATCH_ROWS = 256  # text rows tokenized together


@dataclass
class Sequence:
    input_ids: np.ndarray  # (T,) int64
    loss_mask: np.ndarray  # (T,) bool; row t is trained when token t+1 is a target
    source_index: int
    window_index: int = 0
    prompt_length: int = 0
    text_sha256: str = ""
    reference: str | None = None  # the data set's response text (evaluation, generate mode)

    def meta(self) -> dict:
        return {
            "source_index": self.source_index,
            "window_index": self.window_index,
            "prompt_length": self.prompt_length,
            "text_sha256": self.text_sha256,
        }


@dataclass
class DataInfo:
    """Counts and settings that describe how the sequences were made (goes into the manifest)."""

    name: str
    split: str | None
    fields: dict
    template: str | None = None
    config: str | None = None  # --dataset-config; recorded only when given (it then counts in the cache_key)
    num_source_rows: int = 0
    num_windows: int = 0
    num_dropped: int = 0  # tokens that could not be trained on (1-token windows, skipped rows)
    num_truncated: int = 0  # response tokens cut by max_length
    num_skipped_rows: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "name": self.name, "split": self.split, **({"config": self.config} if self.config is not None else {}),
            "fields": self.fields, "template": self.template,
            "num_source_rows": self.num_source_rows, "num_windows": self.num_windows,
            "num_dropped": self.num_dropped, "num_truncated": self.num_truncated,
            "num_skipped_rows": self.num_skipped_rows,
        }


def text_sha256(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", errors="surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def _check_field(name: str | None, columns: list[str], option: str, dataset: str) -> None:
    if name is not None and name not in columns:
        raise DataError(f"{option} {name!r} is not a field of {dataset}; its fields are: {', '.join(columns)}")


def row_text(row: dict, field: str, index: int, option: str, dataset: str) -> str:
    """The text in `row[field]` (see the module docstring); a DataError naming the row and field otherwise.

    index: the row's position in the data set (0-based); option: the setting that named the field (`{text_field}`).
    """
    value = row[field]
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{option} {field!r}: row {index} of {dataset} (counting from 0) holds a {type(value).__name__}, "
                    f"not text: {value!r:.80}; every row's {field!r} must be a string (a number or an empty value "
                    "is read as text); fix or drop such rows, or pick another field")


def _row_input(row: dict, input_field: str | None, index: int, dataset: str) -> str | None:
    """The row's input text for the minillm template; None when there is no input field or it is empty."""
    if input_field is None:
        return None
    return row_text(row, input_field, index, "{input_field}", dataset) or None


def load_sequences(dataset: str, tokenizer, *, split: str | None = None, config: str | None = None,
                   text_field: str | None = None,
                   prompt_field: str | None = None, response_field: str | None = None, max_length: int = 512,
                   limit: int | None = None, prompt_template: str | None = None,
                   input_field: str | None = None, ids_field: str | None = None) -> tuple[list[Sequence], DataInfo]:
    """Tokenize a data set into sequences (see the module docstring for the rules).

    `limit` caps the number of sequences (taken in data order); the data set is read only as far
    as needed. prompt_template / input_field: prompt/response data only (PROMPT_TEMPLATES; the input
    field with `minillm`). Raises DataError for unknown data sets, fields or templates and for an
    empty result.
    """
    if max_length < 2:
        raise DataError(f"{{max_length}} must be >= 2 tokens, got {max_length}")
    if limit is not None and limit < 1:
        raise DataError(f"{{limit}} must be >= 1, got {limit}")
    if (prompt_field is None) != (response_field is None):
        raise DataError("{prompt_field} and {response_field} go together: give both for prompt/response data, or "
                        "neither")
    pairs = prompt_field is not None
    if ids_field is not None and not pairs:
        raise DataError("{ids_field} holds the token ids of prompt/response rows: give {prompt_field} and "
                        "{response_field} too")
    check_template_options(prompt_template, input_field, pairs)
    template = resolve_template(tokenizer, prompt_template) if pairs else None
    rows, columns = load_rows(dataset, split, config)
    if pairs:
        _check_field(prompt_field, columns, "{prompt_field}", dataset)
        _check_field(response_field, columns, "{response_field}", dataset)
        _check_field(input_field, columns, "{input_field}", dataset)
        _check_field(ids_field, columns, "{ids_field}", dataset)
        if text_field is not None:
            raise DataError("give either {text_field} or {prompt_field}/{response_field}, not both")
        fields = {"prompt": prompt_field, "response": response_field, **({"input": input_field} if input_field else {}),
                  **({"ids": ids_field} if ids_field else {})}
    else:
        text_field = text_field or "text"
        if text_field not in columns:
            raise DataError(
                f"{{text_field}} {text_field!r} is not a field of {dataset}; its fields are: {', '.join(columns)}. "
                "Pass {text_field} NAME, or {prompt_field}/{response_field} for prompt/response data."
            )
        fields = {"text": text_field}
    info = DataInfo(name=dataset_name(dataset), split=split, fields=fields, template=template, config=config)
    sequences: list[Sequence] = []

    def full() -> bool:
        return limit is not None and len(sequences) >= limit

    batch: list[tuple[int, dict]] = []
    batch_rows = BATCH_ROWS if limit is None else max(1, min(BATCH_ROWS, limit))

    def flush():
        if not batch:
            return
        if pairs:
            for index, row in batch:
                if full():
                    break
                _add_pair(sequences, info, tokenizer, index, row, prompt_field, response_field, max_length,
                          template, input_field, ids_field)
        else:
            texts = [row_text(row, text_field, index, "{text_field}", info.name) for index, row in batch]
            encoded = tokenizer(texts)["input_ids"]
            for (index, _row), text, ids in zip(batch, texts, encoded):
                if full():
                    break
                _add_windows(sequences, info, index, text, ids, max_length, limit)
        batch.clear()

    for index, row in enumerate(rows):
        info.num_source_rows += 1
        batch.append((index, row))
        if len(batch) >= batch_rows:
            flush()
        if full():
            break
    flush()
    if limit is not None:
        del sequences[limit:]
    info.num_windows = len(sequences)
    if not sequences:
        raise DataError(
            f"{dataset} gave no sequences to train on ({info.num_source_rows} rows read, {info.num_skipped_rows} "
            "skipped); "
            "check the data set, {split}, the fields and {max_length}"
        )
    return sequences, info


def _add_windows(out: list[Sequence], info: DataInfo, index: int, text: str, ids: list[int], max_length: int,
                 limit: int | None) -> None:
    digest = text_sha256(text)
    for w, start in enumerate(range(0, len(ids), max_length)):
        window = np.asarray(ids[start : start + max_length], dtype=np.int64)
        if len(window) < 2:
            info.num_dropped += len(window)
            continue
        mask = np.ones(len(window), dtype=bool)
        mask[-1] = False
        out.append(Sequence(window, mask, source_index=index, window_index=w, text_sha256=digest))
        if limit is not None and len(out) >= limit:
            return
    if not ids:
        info.num_skipped_rows += 1


def _sha_parts(prompt: str, response: str, input_field: str | None, input_text: str | None) -> tuple[str, ...]:
    """What a pair's text_sha256 hashes: prompt and response, and the input when there is an input field."""
    return (prompt, response) if input_field is None else (prompt, response, input_text or "")


def _add_pair(out: list[Sequence], info: DataInfo, tokenizer, index: int, row: dict, prompt_field: str,
              response_field: str, max_length: int, template: str, input_field: str | None,
              ids_field: str | None = None) -> None:
    prompt = row_text(row, prompt_field, index, "{prompt_field}", info.name)
    response = row_text(row, response_field, index, "{response_field}", info.name)
    input_text = _row_input(row, input_field, index, info.name)
    prompt_ids, full_ids, _ = prompt_ids_with_template(tokenizer, prompt, response, template, input_text)
    if ids_field is not None:
        full_ids = _row_ids(row, ids_field, index, info.name, len(tokenizer), prompt_ids, template)
    if len(prompt_ids) >= max_length - 1 or len(full_ids) <= len(prompt_ids):
        info.num_skipped_rows += 1
        info.num_dropped += len(full_ids)
        return
    if len(full_ids) > max_length:
        info.num_truncated += len(full_ids) - max_length
        full_ids = full_ids[:max_length]
    ids = np.asarray(full_ids, dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    mask[len(prompt_ids) - 1 : len(ids) - 1] = True  # rows whose next token is a response token
    out.append(Sequence(ids, mask, source_index=index, prompt_length=len(prompt_ids),
                        text_sha256=text_sha256(*_sha_parts(prompt, response, input_field, input_text)),
                        reference=response))


def _row_ids(row: dict, field: str, index: int, dataset: str, num_ids: int, prompt_ids: list[int],
             template: str) -> list[int]:
    """The row's own token ids (see the module docstring); a DataError naming the row and the field otherwise."""
    ids = row[field]
    where = f"{{ids_field}} {field!r}: row {index} of {dataset} (counting from 0)"
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise DataError(f"{where} is not a list of token ids: {ids!r:.80}")
    bad = [t for t in ids if not 0 <= t < num_ids]
    if bad:
        raise DataError(f"{where} holds {bad[0]}, not a token id of this tokenizer (0 to {num_ids - 1}): were the "
                        "ids written by a model of another tokenizer?")
    if list(ids[: len(prompt_ids)]) != list(prompt_ids):
        raise DataError(f"{where} does not start with the row's prompt formatted by the {template} template "
                        f"({len(prompt_ids)} ids); the ids must be that prompt followed by the response, as kdtrain "
                        "generate writes them with the same data settings")
    return list(ids)


def load_prompts(dataset: str, tokenizer, *, split: str | None = None, config: str | None = None, prompt_field: str,
                 response_field: str | None = None, max_length: int = 512, limit: int | None = None,
                 prompt_template: str | None = None, input_field: str | None = None) -> tuple[list[Sequence], DataInfo]:
    """Prompts to generate from (generate mode, evaluation): ids of the formatted prompt only (prompt_only_ids)."""
    check_template_options(prompt_template, input_field, True)
    template = resolve_template(tokenizer, prompt_template)
    rows, columns = load_rows(dataset, split, config)
    _check_field(prompt_field, columns, "{prompt_field}", dataset)
    _check_field(response_field, columns, "{response_field}", dataset)
    _check_field(input_field, columns, "{input_field}", dataset)
    fields = {"prompt": prompt_field, "response": response_field, **({"input": input_field} if input_field else {})}
    info = DataInfo(name=dataset_name(dataset), split=split, fields=fields, template=template, config=config)
    out: list[Sequence] = []
    for index, row in enumerate(rows):
        info.num_source_rows += 1
        prompt = row_text(row, prompt_field, index, "{prompt_field}", info.name)
        reference = row_text(row, response_field, index, "{response_field}", info.name) if response_field else None
        input_text = _row_input(row, input_field, index, info.name)
        ids = prompt_only_ids(tokenizer, prompt, template, input_text)
        if len(ids) >= max_length:
            info.num_skipped_rows += 1
            continue
        out.append(Sequence(np.asarray(ids, dtype=np.int64), np.zeros(len(ids), dtype=bool), source_index=index,
                            prompt_length=len(ids),
                            text_sha256=text_sha256(*_sha_parts(prompt, reference or "", input_field, input_text)),
                            reference=reference))
        if limit is not None and len(out) >= limit:
            break
    info.num_windows = len(out)
    if not out:
        raise DataError(f"{dataset} gave no prompts shorter than {{max_length}} {max_length}")
    return out, info


# ---------------------------------------------------------------------------------------------
# Fingerprint and shard plan


def sequences_fingerprint(sequences) -> str:
    """sha256 over every sequence's tokens and loss mask, in order (manifest dataset.fingerprint)."""
    h = hashlib.sha256()
    for seq in sequences:
        ids = np.asarray(seq.input_ids, dtype=np.int64)
        h.update(len(ids).to_bytes(8, "little"))
        h.update(ids.tobytes())
        h.update(np.packbits(np.asarray(seq.loss_mask, dtype=bool)).tobytes())
    return h.hexdigest()


def plan_shards(lengths, shard_tokens: int) -> list[list[int]]:
    """Consecutive sequences per shard, each shard holding at most shard_tokens rows (at least one sequence).

    The plan depends only on the sequence lengths and shard_tokens, never on the number of workers.
    """
    if shard_tokens < 1:
        raise DataError(f"{{shard_tokens}} must be >= 1, got {shard_tokens}")
    shards: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, n in enumerate(lengths):
        if current and size + n > shard_tokens:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += int(n)
    if current:
        shards.append(current)
    return shards
