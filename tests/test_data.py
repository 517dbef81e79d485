"""Tests for emotions.data: every source format, every refusal message, and expansion."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emotions.data import (
    DataError,
    LabelledData,
    bundled_path,
    expand_by_concatenation,
    load_labelled,
)
from emotions.labels import EMOTIONS, LABEL_TO_ID, NUM_LABELS

NEUTRAL = LABEL_TO_ID["neutral"]

# Four examples; one text holds a comma and a quote to exercise CSV quoting.
ROWS = [
    ("I love this", ["love"]),
    ('So angry, and "sad"', ["anger", "sadness"]),
    ("ok", ["neutral"]),
    ("Thanks!", ["gratitude", "joy"]),
]
TEXTS = [text for text, _ in ROWS]


def _expected_labels() -> np.ndarray:
    out = np.zeros((len(ROWS), NUM_LABELS), np.float32)
    for i, (_, names) in enumerate(ROWS):
        out[i, [LABEL_TO_ID[n] for n in names]] = 1
    return out


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def _ids(names: list[str]) -> list[int]:
    return [LABEL_TO_ID[n] for n in names]


def _flag_columns(rows: list[tuple[str, list[str]]]) -> dict[str, list[int]]:
    return {e: [int(e in names) for _, names in rows] for e in EMOTIONS}


# --- bundled splits ---------------------------------------------------------------------------


@pytest.mark.parametrize(("split", "rows"), [("train", 43_410), ("dev", 5_426)])
def test_bundled_split_loads_every_row(split: str, rows: int) -> None:
    data = load_labelled(f"goemotions:{split}")
    assert len(data) == rows
    assert data.labels.shape == (rows, NUM_LABELS)
    assert data.labels.dtype == np.float32
    assert set(np.unique(data.labels)) == {0.0, 1.0}
    assert data.labels.sum(axis=1).min() == 1  # every GoEmotions row has a label
    assert data.source == f"goemotions:{split}"


def test_bundled_first_rows_match_the_file() -> None:
    train = load_labelled("goemotions:train")
    assert train.texts[0] == "My favourite food is anything I didn't have to cook myself."
    assert np.flatnonzero(train.labels[0]).tolist() == [NEUTRAL]
    assert train.texts[2] == "WHY THE FUCK IS BAYLESS ISOING"
    assert np.flatnonzero(train.labels[2]).tolist() == [LABEL_TO_ID["anger"]]
    # Multi-label counts from the resources README: 7,102 in train.
    assert int((train.labels.sum(axis=1) > 1).sum()) == 7_102
    dev = load_labelled("goemotions:dev")
    assert dev.texts[0] == "Is this in New Orleans?? I really feel like this is New Orleans."


def test_bundled_texts_keep_literal_quotes() -> None:
    train = load_labelled("goemotions:train")
    assert any(t.startswith('"') and '""' in t for t in train.texts)


def test_bundled_path_refuses_other_splits() -> None:
    assert bundled_path("dev").name == "dev.tsv"
    with pytest.raises(DataError, match="goemotions:test.*goemotions:train"):
        bundled_path("test")
    with pytest.raises(DataError, match="not bundled"):
        load_labelled("goemotions:test")


# --- formats ----------------------------------------------------------------------------------


def _tsv(path: Path, rows: list[tuple[str, ...]]) -> Path:
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _format_sources(tmp_path: Path) -> dict[str, Path]:
    """The ROWS written in every supported layout."""
    ids = [_ids(names) for _, names in ROWS]
    id_strings = [",".join(map(str, i)) for i in ids]
    name_strings = [",".join(names) for _, names in ROWS]
    shouted = [" , ".join(n.upper() for n in names) for _, names in ROWS]
    flags = _flag_columns(ROWS)
    flag_rows = [[t, *row] for t, row in zip(TEXTS, zip(*flags.values()))]
    bools = {name: [bool(v) for v in column] for name, column in flags.items()}
    header = ["text", "labels"]
    return {
        "tsv ids": _tsv(tmp_path / "d.tsv", [(t, i, "c") for t, i in zip(TEXTS, id_strings)]),
        "csv names": _write_csv(tmp_path / "n.csv", header, list(zip(TEXTS, name_strings))),
        "csv names spaced": _write_csv(tmp_path / "u.csv", header, list(zip(TEXTS, shouted))),
        "csv pandas list": _write_csv(tmp_path / "p.csv", header, [[t, str(n)] for t, n in ROWS]),
        "csv ids": _write_csv(tmp_path / "i.csv", header, list(zip(TEXTS, id_strings))),
        "csv 0/1 columns": _write_csv(tmp_path / "f.csv", ["text", *EMOTIONS], flag_rows),
        "jsonl names list": _write_jsonl(tmp_path / "n.jsonl", [{"text": t, "labels": n} for t, n in ROWS]),
        "jsonl ids (.json)": _write_jsonl(tmp_path / "i.json", [{"text": t, "labels": i} for t, i in zip(TEXTS, ids)]),
        "parquet ids list": _write_parquet(tmp_path / "i.parquet", {"text": TEXTS, "labels": ids}),
        "parquet 0/1 columns": _write_parquet(tmp_path / "f.parquet", {"text": TEXTS, **flags}),
        "parquet bool columns": _write_parquet(tmp_path / "b.parquet", {"text": TEXTS, **bools}),
    }


def test_every_format_loads_the_same_labels(tmp_path: Path) -> None:
    expected = _expected_labels()
    for kind, path in _format_sources(tmp_path).items():
        data = load_labelled(str(path))
        assert data.texts == TEXTS, kind
        np.testing.assert_array_equal(data.labels, expected, err_msg=kind)
        assert data.labels.dtype == np.float32, kind
        assert data.source == str(path)


def test_explicit_label_formats_and_column_names(tmp_path: Path) -> None:
    rows = [[i, t, ",".join(n)] for i, (t, n) in enumerate(ROWS)]
    path = _write_csv(tmp_path / "custom.csv", ["id", "sentence", "emotion"], rows)
    data = load_labelled(str(path), text_column="sentence", labels_column="emotion", label_format="names")
    np.testing.assert_array_equal(data.labels, _expected_labels())
    # A decoy labels column: label_format="columns" must use the 28 flag columns instead.
    columns = {"text": TEXTS, "labels": [1] * 4, **_flag_columns(ROWS)}
    flags = _write_parquet(tmp_path / "f.parquet", columns)
    np.testing.assert_array_equal(load_labelled(str(flags), label_format="columns").labels, _expected_labels())


def test_parquet_reads_only_needed_columns(tmp_path: Path, monkeypatch) -> None:
    labels = [_ids(n) for _, n in ROWS]
    columns = {"extra": [1, 2, 3, 4], "text": TEXTS, "labels": labels, **_flag_columns(ROWS)}
    path = _write_parquet(tmp_path / "wide.parquet", columns)
    read, real = [], pq.read_table

    def spy(source, columns=None):
        read.append(columns)
        return real(source, columns=columns)

    monkeypatch.setattr(pq, "read_table", spy)
    load_labelled(str(path))
    assert read == [["text", "labels"]]


# --- refusals ---------------------------------------------------------------------------------


def _refusal(source: object, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        load_labelled(str(source), **kwargs)
    return str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    message = _refusal(tmp_path / "nope.csv")
    assert "nope.csv" in message and "not found" in message


def test_unknown_extension_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    message = _refusal(path)
    assert "data.txt" in message and ".txt" in message
    assert all(s in message for s in (".parquet", ".jsonl", ".csv", ".tsv", "hf:", "goemotions:"))


def test_unknown_label_format(tmp_path: Path) -> None:
    message = _refusal(tmp_path / "x.csv", label_format="names_list")
    assert "names_list" in message and "data.label_format" in message


def test_missing_text_column_lists_columns(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "t.csv", ["sentence", "labels"], [["hi", "joy"]])
    message = _refusal(path)
    assert "t.csv" in message and "'text'" in message and "'sentence'" in message
    assert "data.text_column=" in message


def test_missing_labels_column_lists_columns(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "l.csv", ["text", "emotion"], [["hi", "joy"]])
    message = _refusal(path)
    assert "l.csv" in message and "'labels'" in message and "'emotion'" in message
    assert "data.labels_column=" in message and "0/1 column per label" in message
    assert "admiration" not in message  # no need to list all 28 when none are there


def test_columns_format_names_missing_label_columns(tmp_path: Path) -> None:
    flags = _flag_columns(ROWS)
    del flags["grief"]
    path = _write_parquet(tmp_path / "f.parquet", {"text": TEXTS, **flags})
    message = _refusal(path)
    assert "f.parquet" in message and "1 missing: ['grief']" in message


def test_unknown_label_name_shows_value_line_and_allowed(tmp_path: Path) -> None:
    rows = [["fine", "joy"], ["ugh", "anger,joyy"], ["fine", "love"]]
    message = _refusal(_write_csv(tmp_path / "n.csv", ["text", "labels"], rows))
    assert "n.csv: line 3:" in message  # header is line 1
    assert "'joyy'" in message and "admiration" in message and "neutral" in message


def test_id_out_of_range(tmp_path: Path) -> None:
    records = [{"text": "a", "labels": [1]}, {"text": "b", "labels": [3, 28]}]
    message = _refusal(_write_jsonl(tmp_path / "r.jsonl", records))
    assert "r.jsonl: line 2:" in message and "28" in message and "0..27" in message


def test_name_among_ids_suggests_names_format(tmp_path: Path) -> None:
    records = [{"text": "a", "labels": "1"}, {"text": "b", "labels": "joy"}]
    message = _refusal(_write_jsonl(tmp_path / "m.jsonl", records))
    assert "m.jsonl: line 2:" in message and "'joy'" in message
    assert "data.label_format=names" in message


def test_empty_text(tmp_path: Path) -> None:
    rows = [["fine", "joy"], ["   ", "joy"]]
    message = _refusal(_write_csv(tmp_path / "e.csv", ["text", "labels"], rows))
    assert "e.csv: line 3:" in message and "'   '" in message and "'text'" in message


def test_missing_text_in_parquet_row(tmp_path: Path) -> None:
    path = _write_parquet(tmp_path / "p.parquet", {"text": ["a", None], "labels": [[1], [2]]})
    message = _refusal(path)
    assert "p.parquet: row 2:" in message and "None" in message


def test_row_without_labels_mentions_neutral(tmp_path: Path) -> None:
    records = [{"text": "a", "labels": ["joy"]}, {"text": "b", "labels": []}]
    message = _refusal(_write_jsonl(tmp_path / "z.jsonl", records))
    assert "z.jsonl: line 2:" in message and "[]" in message and "neutral" in message


def test_all_zero_label_columns_mentions_neutral(tmp_path: Path) -> None:
    flags = _flag_columns(ROWS[:2] + [("none", [])])
    path = _write_parquet(tmp_path / "zero.parquet", {"text": ["a", "b", "c"], **flags})
    message = _refusal(path)
    assert "zero.parquet: row 3:" in message and "neutral" in message


def test_non_binary_label_column(tmp_path: Path) -> None:
    flags = _flag_columns(ROWS)
    flags["joy"][1] = 2
    message = _refusal(_write_parquet(tmp_path / "b.parquet", {"text": TEXTS, **flags}))
    assert "b.parquet: row 2:" in message and "'joy'" in message and "holds 2" in message


def test_tsv_row_with_wrong_field_count(tmp_path: Path) -> None:
    rows = [("ok", "27", "a1"), ("two fields", "27"), ("four", "1", "c", "d")]
    path = _tsv(tmp_path / "w.tsv", rows)
    message = _refusal(path)
    assert "w.tsv: line 2" in message and "2 fields" in message and "two fields" in message
    assert "1 more row like it" in message


def test_csv_row_with_wrong_field_count(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("text,labels\nfine,joy\nhi, there,joy\n", encoding="utf-8")
    message = _refusal(path)
    assert "c.csv: line 3" in message and "3 fields" in message and "quote" in message


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_text('{"text": "a", "labels": [1]}\n\n[1, 2]\n{"text": \n', encoding="utf-8")
    message = _refusal(path)
    assert "j.jsonl: line 3" in message and "[1, 2]" in message
    assert "1 more row like it" in message and "JSON Lines" in message


def test_first_bad_row_reported_with_count_of_the_rest(tmp_path: Path) -> None:
    rows = [["a", "joy"], ["b", "jo"], ["c", "joy"], ["d", "lov"], ["e", "grr"]]
    message = _refusal(_write_csv(tmp_path / "many.csv", ["text", "labels"], rows))
    assert "many.csv: line 3 (and 2 more rows like it):" in message and "'jo'" in message


@pytest.mark.parametrize("name", ["empty.csv", "empty.jsonl", "empty.tsv", "header.csv"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("text,labels\n" if name == "header.csv" else "", encoding="utf-8")
    message = _refusal(path)
    assert name in message and "no data rows" in message


# --- the hub (never reached: there is no network here) ----------------------------------------


def test_hub_failure_says_to_use_a_local_file(monkeypatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'go_emotions' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = _refusal("hf:go_emotions:validation")
    assert "hf:go_emotions:validation" in message and "'validation'" in message
    assert "unreachable" in message and "local file" in message


def test_hub_dataset_uses_simplified_config_and_id_lists(monkeypatch) -> None:
    import datasets

    calls = []

    def fake(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict(
            {"text": TEXTS, "labels": [_ids(n) for _, n in ROWS], "id": ["a", "b", "c", "d"]}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    data = load_labelled("hf:go_emotions")
    assert calls == [("go_emotions", "simplified", "train")]
    np.testing.assert_array_equal(data.labels, _expected_labels())
    load_labelled("hf:someone/other:test")
    assert calls[-1] == ("someone/other", None, "test")


# --- take and shard ---------------------------------------------------------------------------


def _numbered(n: int) -> LabelledData:
    labels = np.zeros((n, NUM_LABELS), np.float32)
    labels[np.arange(n), np.arange(n) % NUM_LABELS] = 1
    return LabelledData([f"t{i}" for i in range(n)], labels, "numbered")


def test_take_is_seeded_and_keeps_rows_intact() -> None:
    data = _numbered(50)
    assert data.take(None, seed=0) is data and data.take(50, seed=0) is data
    some = data.take(10, seed=3)
    assert len(some) == 10 and some.texts == data.take(10, seed=3).texts
    assert some.texts != data.take(10, seed=4).texts
    rows = [int(t[1:]) for t in some.texts]
    assert rows == sorted(rows) and len(set(rows)) == 10
    np.testing.assert_array_equal(some.labels, data.labels[rows])


def test_shards_partition_the_rows() -> None:
    data = _numbered(11)
    shards = [data.shard(rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [4, 4, 3]
    assert shards[1].texts == ["t1", "t4", "t7", "t10"]
    assert sorted(t for s in shards for t in s.texts) == sorted(data.texts)
    with pytest.raises(ValueError):
        data.shard(3, 3)


# --- expansion by concatenation ---------------------------------------------------------------


def _mixed(n: int = 20) -> LabelledData:
    """Half neutral rows, half single emotions, texts unique so pairs can be recovered."""
    labels = np.zeros((n, NUM_LABELS), np.float32)
    for i in range(n):
        labels[i, NEUTRAL if i % 2 else i % 27] = 1
    return LabelledData([f"w{i}" for i in range(n)], labels, "mixed")


def test_expansion_adds_unions_after_the_originals() -> None:
    data = _mixed()
    grown = expand_by_concatenation(data, 0.5, seed=1)
    assert len(grown) == 30 and grown.labels.shape == (30, NUM_LABELS)
    assert grown.texts[:20] == data.texts
    np.testing.assert_array_equal(grown.labels[:20], data.labels)
    index = {t: i for i, t in enumerate(data.texts)}
    for text, labels in zip(grown.texts[20:], grown.labels[20:]):
        a, b = (index[w] for w in text.split(" "))
        assert a != b
        union = np.maximum(data.labels[a], data.labels[b])
        if union[:NEUTRAL].any():
            union[NEUTRAL] = 0
        np.testing.assert_array_equal(labels, union)


def test_expansion_is_seeded() -> None:
    data = _mixed()
    once = expand_by_concatenation(data, 1.0, seed=7)
    again = expand_by_concatenation(data, 1.0, seed=7)
    other = expand_by_concatenation(data, 1.0, seed=8)
    assert once.texts == again.texts and np.array_equal(once.labels, again.labels)
    assert once.texts != other.texts
    assert len(expand_by_concatenation(data, 0.26, seed=0)) == 20 + round(0.26 * 20)


def test_expansion_neutral_rule() -> None:
    labels = np.zeros((2, NUM_LABELS), np.float32)
    labels[0, NEUTRAL] = 1
    labels[1, LABEL_TO_ID["joy"]] = 1
    pair = expand_by_concatenation(LabelledData(["calm", "yay"], labels, "two"), 2.0, seed=0)
    assert set(pair.texts[2:]) <= {"calm yay", "yay calm"}
    for row in pair.labels[2:]:
        assert np.flatnonzero(row).tolist() == [LABEL_TO_ID["joy"]]
    both_neutral = LabelledData(["a", "b"], np.tile(labels[:1], (2, 1)), "neutral")
    grown = expand_by_concatenation(both_neutral, 1.0, seed=0)
    assert all(np.flatnonzero(row).tolist() == [NEUTRAL] for row in grown.labels[2:])


def test_expansion_fraction_zero_and_negative() -> None:
    data = _mixed()
    assert expand_by_concatenation(data, 0.0, seed=0) is data
    with pytest.raises(ValueError):
        expand_by_concatenation(data, -0.1, seed=0)
