"""Labelled data: GoEmotions-style examples from the bundled splits, local files or the hub.

Every loader ends in one ``LabelledData``: texts plus a ``[n, 28]`` 0/1 float32 matrix whose
columns follow ``labels.EMOTIONS``. Bad rows are refused before any training starts, with the
file, the row, the value and the fix in the message.
"""

from __future__ import annotations

import csv
import json
import numbers
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emotions.labels import EMOTIONS, LABEL_TO_ID, NUM_LABELS

NEUTRAL = LABEL_TO_ID["neutral"]
LABEL_FORMATS = ("auto", "names", "ids", "columns")
FILE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".parquet")
SUPPORTED_SOURCES = "goemotions:train, goemotions:dev, hf:NAME[:SPLIT], or a .tsv/.csv/.jsonl/.json/.parquet file"
_BUNDLED = Path(__file__).parent / "resources" / "goemotions"
_TSV_COLUMNS = ["text", "labels", "id"]
_TSV_FIX = "a GoEmotions TSV row has 3 tab-separated fields: text, label ids, comment id"


class DataError(ValueError):
    """Bad labelled data; message names the file, row or column, and the fix."""


@dataclass(frozen=True, eq=False)
class LabelledData:
    """Texts with multi-hot labels: ``labels`` is ``[n, 28]`` float32 0/1 in ``EMOTIONS`` order."""

    texts: list[str]
    labels: np.ndarray
    source: str  # where it came from, for messages and logs

    def __post_init__(self) -> None:
        expected = (len(self.texts), NUM_LABELS)
        if self.labels.shape != expected:
            raise ValueError(f"{self.source}: labels shape {self.labels.shape}, not {expected}")

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, n: int | None, seed: int) -> LabelledData:
        """``n`` rows picked by a seeded shuffle, kept in file order; all if n is None or >= len."""
        if n is None or n >= len(self):
            return self
        if n < 0:
            raise ValueError(f"take needs n >= 0, got {n}")
        rows = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return self._subset(rows, f"{self.source} (take {n}, seed {seed})")

    def shard(self, rank: int, world: int) -> LabelledData:
        """Rows ``rank::world``, so ``world`` workers together see every row once."""
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"shard needs 0 <= rank < world, got rank={rank}, world={world}")
        rows = np.arange(rank, len(self), world)
        return self._subset(rows, f"{self.source} (shard {rank} of {world})")

    def _subset(self, rows: np.ndarray, source: str) -> LabelledData:
        return LabelledData([self.texts[i] for i in rows], self.labels[rows], source)


def bundled_path(split: str) -> Path:
    """Path of a bundled GoEmotions split: ``train`` or ``dev``."""
    if split not in ("train", "dev"):
        raise DataError(
            f"goemotions:{split}: unknown bundled split {split!r}; use goemotions:train or "
            "goemotions:dev (the test split is deliberately not bundled)"
        )
    return _BUNDLED / f"{split}.tsv"


def load_labelled(
    source: str,
    *,
    text_column: str = "text",
    labels_column: str = "labels",
    label_format: str = "auto",
) -> LabelledData:
    """Load and check labelled examples from any of ``SUPPORTED_SOURCES``.

    ``.tsv`` files and ``goemotions:*`` use the GoEmotions layout (no header; text,
    comma-separated ids, comment id), so the column and format arguments do not apply to them.
    """
    if label_format not in LABEL_FORMATS:
        raise DataError(
            f"{source}: label_format {label_format!r} is not one of {list(LABEL_FORMATS)}; "
            "fix it with data.label_format=auto"
        )
    if source.startswith("goemotions:"):
        table = _read_delimited(bundled_path(source.partition(":")[2]), source, tsv=True)
        return _check_table(source, table, "text", "labels", "ids")
    if source.startswith("hf:"):
        table = _read_hub(source, text_column, labels_column, label_format)
        return _check_table(source, table, text_column, labels_column, label_format)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        kind = suffix or "(no extension)"
        raise DataError(f"{source}: unknown data format {kind!r}; supported: {SUPPORTED_SOURCES}")
    if not path.is_file():
        raise DataError(f"{source}: file not found (looked for {path.resolve()}); check the path")
    if suffix == ".tsv":
        table = _read_delimited(path, source, tsv=True)
        return _check_table(source, table, "text", "labels", "ids")
    if suffix == ".csv":
        table = _read_delimited(path, source, tsv=False)
    elif suffix == ".parquet":
        table = _read_parquet(path, source, text_column, labels_column, label_format)
    else:
        table = _read_jsonl(path, source)
    return _check_table(source, table, text_column, labels_column, label_format)


def expand_by_concatenation(data: LabelledData, fraction: float, seed: int) -> LabelledData:
    """Append ``round(fraction * len)`` examples, each two distinct random examples' texts
    joined by a space, labelled with the union of their labels. Original rows come first.

    A union holding ``neutral`` and an emotion drops ``neutral``: text with an emotion in it
    is not neutral.
    """
    if fraction < 0:
        raise ValueError(f"expansion fraction must be >= 0, got {fraction}")
    extra = round(fraction * len(data))
    if extra == 0:
        return data
    if len(data) < 2:
        raise ValueError(f"{data.source}: concatenation needs at least 2 examples")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(data), extra)
    # Draw the partner from the other n-1 rows, so no pair is one example twice.
    second = rng.integers(0, len(data) - 1, extra)
    second += second >= first
    union = np.maximum(data.labels[first], data.labels[second])  # [extra, 28]
    union[np.delete(union, NEUTRAL, axis=1).any(axis=1), NEUTRAL] = 0
    texts = data.texts + [f"{data.texts[a]} {data.texts[b]}" for a, b in zip(first, second)]
    labels = np.concatenate([data.labels, union])
    return LabelledData(texts, labels, f"{data.source} + {extra} concatenated (seed {seed})")


@dataclass
class _Table:
    names: list[str]  # every column in the source, for messages
    columns: dict[str, list[Any]]  # the columns read, one value per row
    locate: Callable[[int], str]  # row index -> "line 7" or "row 7"


class _Problems:
    """The first bad row and how many rows share its problem: one message covers the file."""

    def __init__(self, source: str) -> None:
        self.source, self.first, self.counts = source, None, Counter()

    def add(self, kind: str, where: str, message: str) -> None:
        self.first = self.first or (kind, where, message)
        self.counts[kind] += 1

    def raise_first(self) -> None:
        if self.first:
            kind, where, message = self.first
            more = self.counts[kind] - 1
            also = f" (and {more} more row{'s' * (more > 1)} like it)" if more else ""
            raise DataError(f"{self.source}: {where}{also}: {message}")


class _BadValue(Exception):
    """A bad labels cell: ``args`` are (problem kind, message)."""


def _read_delimited(path: Path, source: str, tsv: bool) -> _Table:
    """GoEmotions TSV (no header, 3 fields) or CSV (header row); rows located by line."""
    rows, lines, problems = [], [], _Problems(source)
    # utf-8-sig: spreadsheets often start CSVs with a byte-order mark that renames column 1.
    with path.open(encoding="utf-8" if tsv else "utf-8-sig", newline="") as f:
        # QUOTE_NONE: GoEmotions texts hold literal quotes that are part of the text.
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
        header = _TSV_COLUMNS if tsv else next(reader, [])
        for row in filter(None, reader):  # skips blank lines
            if len(row) == len(header):
                rows.append(row)
                lines.append(reader.line_num)
                continue
            fix = _TSV_FIX if tsv else f"the header has {len(header)}; quote text with commas"
            problems.add("fields", f"line {reader.line_num}", f"{len(row)} fields {row!r}; {fix}")
    problems.raise_first()
    columns = {name: [row[j] for row in rows] for j, name in enumerate(header)}
    return _Table(header, columns, lambda i: f"line {lines[i]}")


def _read_jsonl(path: Path, source: str) -> _Table:
    records, lines, problems = [], [], _Problems(source)
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                record = error.msg
            if isinstance(record, dict):
                records.append(record)
                lines.append(number)
            else:
                message = (
                    f"not a JSON object ({record}): {line.strip()[:80]!r}; write JSON Lines, "
                    "one object per line, not a JSON array or pretty-printed JSON"
                )
                problems.add("json", f"line {number}", message)
    problems.raise_first()
    names = list(dict.fromkeys(key for record in records for key in record))
    columns = {name: [record.get(name) for record in records] for name in names}
    return _Table(names, columns, lambda i: f"line {lines[i]}")


def _wanted(names: list[str], text_column: str, labels_column: str, label_format: str) -> list[str]:
    """Columns worth reading: the per-label ones only when they can be the labels."""
    wanted = {text_column, labels_column}
    if label_format == "columns" or labels_column not in names:
        wanted.update(EMOTIONS)
    return [name for name in names if name in wanted]


def _read_parquet(path: Path, source: str, text_column: str, labels_column: str, label_format: str) -> _Table:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        wanted = _wanted(names, text_column, labels_column, label_format)
        table = pq.read_table(path, columns=wanted)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise DataError(f"{source}: not a readable Parquet file ({error}); re-export it") from error
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    return _Table(names, columns, lambda i: f"row {i + 1}")


def _read_hub(source: str, text_column: str, labels_column: str, label_format: str) -> _Table:
    _, name, split = (source.split(":", 2) + ["train"])[:3]
    config = "simplified" if name.rsplit("/", 1)[-1] == "go_emotions" else None
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # offline, unknown name or unknown split: the fix is the same
        raise DataError(
            f"{source}: could not load {name!r} split {split!r} from the Hugging Face hub "
            f"({type(error).__name__}: {str(error)[:300]}). The hub is unreachable from here or "
            "the name/split is wrong; use a local file instead, e.g. goemotions:train or a "
            ".parquet/.csv/.jsonl path"
        ) from error
    names = list(dataset.column_names)
    wanted = _wanted(names, text_column, labels_column, label_format)
    return _Table(names, {c: list(dataset[c]) for c in wanted}, lambda i: f"row {i + 1}")


def _check_table(source: str, table: _Table, text_column: str, labels_column: str, label_format: str) -> LabelledData:
    """Check every row and build the ``[n, 28]`` label matrix."""
    empty = f"{source}: no data rows; the file is empty (or only a header): add examples"
    if not table.names:
        raise DataError(empty)
    texts = table.columns.get(text_column)
    if texts is None:
        raise DataError(
            f"{source}: no text column {text_column!r}; columns found: {table.names}. "
            "Name the text column with data.text_column=..."
        )
    if not texts:
        raise DataError(empty)
    label_format = _resolve_format(source, table, labels_column, label_format)
    if label_format == "columns":
        flags = zip(*(table.columns[name] for name in EMOTIONS))  # rows of 28 values
        cells = [dict(zip(EMOTIONS, row)) for row in flags]
        parse, where = _ids_from_flags, "any label column"
    else:
        to_id = _id_from_number if label_format == "ids" else _id_from_name
        cells, where = table.columns[labels_column], f"column {labels_column!r}"
        parse = lambda cell: [to_id(token) for token in _tokens(cell)]  # noqa: E731
    labels, problems = np.zeros((len(texts), NUM_LABELS), np.float32), _Problems(source)
    for i, (text, cell) in enumerate(zip(texts, cells)):
        if not isinstance(text, str) or not text.strip():
            message = f"empty text {text!r} in column {text_column!r}; write it or drop the row"
            problems.add("text", table.locate(i), message)
        try:
            ids = parse(cell)
        except _BadValue as bad:
            problems.add(bad.args[0], table.locate(i), bad.args[1])
            continue
        if not ids:
            message = (
                f"no labels in {where} (value {cell!r}); every GoEmotions example has at least "
                "one label (neutral when it shows no emotion), so add 'neutral' or drop the row"
            )
            problems.add("no-labels", table.locate(i), message)
        labels[i, ids] = 1
    problems.raise_first()
    return LabelledData(list(texts), labels, source)


def _resolve_format(source: str, table: _Table, labels_column: str, label_format: str) -> str:
    """``auto`` -> per-label columns, ids or names, judged by the first non-empty labels cell."""
    if label_format == "columns" or (label_format == "auto" and labels_column not in table.names):
        missing = [name for name in EMOTIONS if name not in table.names]
        if not missing:
            return "columns"
        gap = "none" if len(missing) == NUM_LABELS else f"{len(missing)} missing: {missing}"
        raise DataError(
            f"{source}: no labels column {labels_column!r}, and of the {NUM_LABELS} per-label "
            f"0/1 columns {gap}; columns found: {table.names}. Name the labels column with "
            "data.labels_column=..., or give one 0/1 column per label named exactly as in "
            "emotions.labels.EMOTIONS"
        )
    if label_format != "auto":
        return label_format
    for cell in table.columns[labels_column]:
        if tokens := _tokens(cell):
            return "ids" if all(_is_int(token) for token in tokens) else "names"
    return "names"  # every cell is empty; the row check reports that


def _tokens(cell: Any) -> list[Any]:
    """A labels cell as a list: lists stay lists; "joy, love" and "[0, 15]" split on commas."""
    if cell is None:
        return []
    if isinstance(cell, str):
        inner = cell.strip()
        if inner.startswith("[") and inner.endswith("]"):  # a list as pandas writes it to CSV
            inner = inner[1:-1]
        return [t.strip().strip("'\"").strip() for t in inner.split(",") if t.strip()]
    return list(cell) if isinstance(cell, (list, tuple, np.ndarray)) else [cell]


def _is_int(token: Any) -> bool:
    if isinstance(token, str):
        return token.strip().lstrip("-").isdigit()
    real = isinstance(token, numbers.Real) and not isinstance(token, bool)
    return real and float(token).is_integer()


def _id_from_number(token: Any) -> int:
    if not _is_int(token):
        message = (
            f"{token!r} is not a label id (an integer 0..{NUM_LABELS - 1}); if the column "
            "holds label names, set data.label_format=names"
        )
        raise _BadValue("not-id", message)
    if not 0 <= int(token) < NUM_LABELS:
        message = (
            f"label id {int(token)} is out of range; ids run 0..{NUM_LABELS - 1} "
            "in the order of emotions.labels.EMOTIONS"
        )
        raise _BadValue("id-range", message)
    return int(token)


def _id_from_name(token: Any) -> int:
    key = str(token).strip().lower()
    if key not in LABEL_TO_ID:
        message = f"unknown label name {token!r}; allowed names: {', '.join(EMOTIONS)}"
        raise _BadValue("unknown-name", message)
    return LABEL_TO_ID[key]


def _ids_from_flags(flags: dict[str, Any]) -> list[int]:
    ids = []
    for j, (name, value) in enumerate(flags.items()):
        flag = value.strip().lower() if isinstance(value, str) else value
        if flag in ("1", "true", 1):  # True == 1, 1.0 == 1
            ids.append(j)
        elif flag not in ("0", "false", 0):
            message = f"column {name!r} holds {value!r}; label columns hold 0 or 1 (or true/false)"
            raise _BadValue("not-01", message)
    return ids
