"""Bulk tagging on a real local Ray: real Parquet dumps in tmp_path, the smoke-trained bundle."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from emotions import precision as gate
from emotions.bundle import load_bundle
from emotions.corpus import make_corpus
from emotions.inference import transfer_options
from emotions.labels import EKMAN, EMOTIONS, SENTIMENT, roll_up
from emotions.precision import MAX_F1_LOSS, check_precision
from emotions.storage import Folder
from emotions.tagging import MANIFEST, SUCCESS, TaggingError, TaggingSettings, predictor
from emotions.tagging import tag_corpus as tag_and_report
from emotions.tagging.actor_plan import ROOM_CPUS, plan_actors
from emotions.tagging.commit import STAGING
from emotions.tagging.inputs import (
    FILE_COLUMN,
    InputFile,
    check_texts,
    normalize_block,
    output_schema,
    plan_reads,
    read_units,
    resolve_inputs,
)
from emotions.tagging.pipeline import Tagger, flag_file, tagger_pool
from emotions.tagging.report_reference import validation_reference
from emotions.tagging.settings import check_settings
from emotions.tagging.staging import PART_SCHEMA, PARTS, PartLedger, Staging, merge_parts, write_parts


def tag_corpus(*args, report: bool = False, **kwargs):
    """tag_corpus without the report, which one test checks (the ``tagged`` fixture's)."""
    return tag_and_report(*args, report=report, **kwargs)


LONG = "I can't believe how happy this makes me. " * 150  # ~6,000 characters, far over max_length
HANDMADE = {  # id -> (body, expected error)
    "h-null": (None, "null text"),
    "h-empty": ("", "empty text"),
    "h-space": (" \n\t ", "whitespace only"),
    "h-del": ("[deleted]", "[deleted]"),
    "h-rem": (" [removed] ", "[removed]"),
    "h-long": (LONG, None),
    "h-url": ("https://www.reddit.com/r/aww/comments/abc123/", None),
    "h-emoji": ("😂😂🔥", None),
    "h-ok": ("Thank you so much, this is wonderful!", None),
}
BYTES = {  # id -> (body as bytes, expected error): some exporters write text as binary
    "b-ok": (b"Thank you, that made my day!", None),
    "b-emoji": ("😂🔥".encode(), None),
    "b-bad": (b"caf\xe9 latin-1, not UTF-8", "invalid UTF-8"),
    "b-null": (None, "null text"),
}


def read_output(path) -> pa.Table:
    return pyarrow.dataset.dataset(str(path), format="parquet").to_table()


def read_inputs(folder) -> pa.Table:
    """Every input row's id, body (as large_string) and subreddit, from files of mixed schemas."""
    tables = []
    for file in sorted(Path(folder).glob("*.parquet")):
        t = pq.read_table(file)
        body = t.column("body")
        if pa.types.is_binary(body.type):
            body = pa.array([_utf8_or_none(b) for b in body.to_pylist()], pa.string())
        elif not pa.types.is_string(body.type) and not pa.types.is_large_string(body.type):
            body = pa.nulls(t.num_rows)
        tables.append(
            pa.table(
                {
                    "id": t.column("id"),
                    "body": body.cast(pa.large_string()),
                    "subreddit": t.column("subreddit").cast(pa.string()),
                }
            )
        )
    return pa.concat_tables(tables)


def _utf8_or_none(value: bytes | None) -> str | None:
    try:
        return value.decode()
    except (AttributeError, UnicodeDecodeError):
        return None


def write_handmade(folder: Path) -> None:
    """A hand-written file with one row of each junk kind, one whose body is bytes (valid and
    invalid UTF-8), and one whose body is not text."""
    ids = list(HANDMADE)
    pq.write_table(
        pa.table(
            {
                "id": ids,
                "body": pa.array([HANDMADE[i][0] for i in ids], pa.large_string()),
                "subreddit": ["test"] * len(ids),
            }
        ),
        folder / "handmade.parquet",
    )
    pq.write_table(
        pa.table({"id": ["n-1", "n-2"], "body": pa.array([7, None], pa.int64()), "subreddit": ["test", "test"]}),
        folder / "numbers.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "id": list(BYTES),
                "body": pa.array([b for b, _ in BYTES.values()], pa.binary()),
                "subreddit": ["test"] * len(BYTES),
            }
        ),
        folder / "bytes.parquet",
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """4 generated files (string and large_string bodies, one extra column, 20% junk) + 2 handmade."""
    folder = tmp_path_factory.mktemp("dump")
    make_corpus(folder, rows=800, files=4, seed=3, junk_fraction=0.2)
    write_handmade(folder)
    return folder


@pytest.fixture(scope="module")
def tagged(smoke_bundle, corpus, tmp_path_factory):
    """The corpus tagged once with the default actor pool, probabilities and two kept columns."""
    out = tmp_path_factory.mktemp("tagged") / "out"
    summary = tag_corpus(smoke_bundle, corpus, out, probabilities=True, keep_columns=["subreddit", "body"], report=True)
    return summary, out


def test_every_row_is_tagged_exactly_once_across_mixed_schemas(corpus, tagged):
    summary, out = tagged
    schemas = {str(pq.read_schema(f).field("body").type) for f in corpus.glob("comments-*.parquet")}
    assert schemas == {"string", "large_string"}  # the corpus really mixes them
    assert "controversiality" in pq.read_schema(corpus / "comments-00002.parquet").names
    inputs = read_inputs(corpus)
    table = read_output(out)
    assert summary.rows_in == summary.rows_out == inputs.num_rows == table.num_rows == 815
    assert sorted(table.column("id").to_pylist()) == sorted(inputs.column("id").to_pylist())
    assert len(set(table.column("id").to_pylist())) == table.num_rows
    manifest = json.loads((out / MANIFEST).read_text())
    assert (out / SUCCESS).exists() and not (out / STAGING).exists()
    assert manifest["rows_in"] == manifest["rows_out"] == 815
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(i["output"] for i in manifest["inputs"])
    assert summary.report == str(out / "_report.md") and (out / "_report.json").exists()  # by default
    assert all(pq.read_metadata(out / i["output"]).num_rows == i["rows"] for i in manifest["inputs"])
    assert manifest["model"]["hash"] == load_bundle(manifest["model"]["path"]).hash
    # The bundle's validation shares, recorded for the report, which sets each label's share beside them.
    reference = validation_reference(load_bundle(manifest["model"]["path"]).metrics)
    assert reference is not None and manifest["reference"] == reference
    assert "| validation true | validation tagged | x validation |" in (out / "_report.md").read_text()
    assert {k: v for k, v in manifest["actors"].items() if k != "why"} == {
        "max_actors": 2,
        "cpus_reserved": 0.75,
        "gpus": 0.0,
        "threads": 1,
        "min_actors": 1,
        "initial_actors": 2,
        "tokenizers": 0,
        "tokenizer_cpus": 0.0,
    }  # CPU: the actors tokenize; an autoscaling pool of 1..2 that starts with the 2 the node holds
    assert "nodes up now: 1 x (CPU 2)" in manifest["actors"]["why"]
    # auto: on CPU the fastest runtime whose check, recorded in the bundle at training time, passed.
    recorded = load_bundle(manifest["model"]["path"]).metrics["precision_checks"]
    assert sorted(recorded) == sorted(gate.auto_candidates())
    assert manifest["precision_requested"] == "auto"
    assert manifest["precision"] == gate.fastest_allowed(recorded)
    assert (manifest["backend"], manifest["numeric_precision"]) == gate.RUNTIMES[manifest["precision"]]
    assert set(manifest["precision_checks"]) == set(recorded)
    for name, check in manifest["precision_checks"].items():  # read, not run again
        assert check["interval_95"] == recorded[name]["interval_95"] and check["source"] == "the bundle's metrics.json"


def test_tagged_files_are_written_by_workers_and_never_by_the_driver(tagged):
    _, out = tagged
    manifest = json.loads((out / MANIFEST).read_text())
    writers = [i["written_by"] for i in manifest["inputs"]]
    assert len(writers) == 7 and all(w["node"] for w in writers)
    assert os.getpid() not in {w["pid"] for w in writers}  # this process was the driver
    assert not list(out.rglob("part-*"))  # every part was merged and deleted


def test_only_reported_parts_are_counted_and_merged(tmp_path):
    """A part written by an attempt Ray retried is never reported: it must not reach the output."""
    target = Folder.from_uri(tmp_path / "out")
    schema = pa.schema([("id", pa.string()), ("error", pa.string())])
    f = InputFile(uri="in.parquet", path="in.parquet", rows=3, bytes=10, schema=schema)
    staging = Staging.open(target, key="k")
    reports = [
        write_parts(
            pa.table({FILE_COLUMN: [0] * n, "id": ids, "error": [None] * n}),
            target.child(STAGING),
            [f.output_name],
            schema,
        )
        for n, ids in ((2, ["a", "b"]), (2, ["a", "b"]), (1, ["c"]))
    ]  # the 2nd: a retried attempt
    assert all(r.schema == PART_SCHEMA for r in reports)
    assert len(list((tmp_path / "out" / STAGING / PARTS / f.output_name).glob("part-*.arrow"))) == 3
    ledger = PartLedger([f])
    assert ledger.add(reports[0]) == []
    ((k, parts, reasons),) = ledger.add(reports[2])  # the driver was told of parts 1 and 3 only
    marker = merge_parts(target.uri, f, parts, reasons, schema, staging.run)
    table = pq.read_table(tmp_path / "out" / STAGING / marker["staged"])
    assert sorted(table.column("id").to_pylist()) == ["a", "b", "c"] and marker["rows_out"] == 3
    assert not (tmp_path / "out" / STAGING / PARTS / f.output_name).exists()
    with pytest.raises(RuntimeError, match="duplicated"):  # had it been reported, the run stops
        PartLedger([f]).add(pa.concat_tables(reports))


def test_tokenizer_stage_tags_like_the_actors_do(smoke_bundle, corpus, tmp_path):
    # fp32 on both sides: int8 quantizes activations per batch, and the two runs batch differently.
    kwargs = dict(probabilities=True, num_actors=1, precision="fp32")
    out, plain = tmp_path / "out", tmp_path / "plain"
    summary = tag_corpus(smoke_bundle, corpus / "handmade.parquet", out, tokenize_stage=True, **kwargs)
    tag_corpus(smoke_bundle, corpus / "handmade.parquet", plain, **kwargs)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["actors"]["tokenizers"] == 1 and summary.rows_out == len(HANDMADE)
    probs = [f"p_{name}" for name in EMOTIONS]
    staged = {r["id"]: r for r in read_output(out).to_pylist()}
    direct = {r["id"]: r for r in read_output(plain).to_pylist()}
    assert staged.keys() == direct.keys()
    for row_id, row in staged.items():
        assert row["error"] == direct[row_id]["error"] and row["emotions"] == direct[row_id]["emotions"]
        if not row["error"]:
            np.testing.assert_allclose([row[c] for c in probs], [direct[row_id][c] for c in probs], atol=1e-6)


def test_tagging_reads_and_writes_s3(smoke_bundle, s3):
    dump, out = f"{s3}/tag-s3/dump", f"{s3}/tag-s3/out"
    fs = Folder.from_uri(dump)
    for k in range(3):  # two files of text and one without rows
        n = 40 * k
        table = pa.table(
            {
                "id": [f"s{k}-{i}" for i in range(n)],
                "body": [("[deleted]" if i % 7 == 0 else f"I love this, number {i}!") for i in range(n)],
            }
        )
        pq.write_table(table, fs.path(f"part-{k}.parquet"), filesystem=fs.fs)
    summary = tag_corpus(smoke_bundle, dump, out, num_actors=1)
    target = Folder.from_uri(out)
    table = pyarrow.dataset.dataset(target.root, filesystem=target.fs, format="parquet").to_table()
    assert summary.rows_in == summary.rows_out == table.num_rows == 120
    assert sorted(table.column("id").to_pylist()) == sorted(f"s{k}-{i}" for k in range(3) for i in range(40 * k))
    assert table.filter(pa.compute.equal(table.column("error"), "[deleted]")).num_rows == summary.rows_flagged == 18
    assert target.read_json(SUCCESS)["rows"] == 120 and not target.exists(STAGING)
    assert len(target.read_json(MANIFEST)["inputs"]) == 3


def test_junk_rows_are_flagged_with_their_reason_and_never_dropped(corpus, tagged):
    summary, out = tagged
    rows = {r["id"]: r for r in read_output(out).to_pylist()}
    for row_id, (_, reason) in {**HANDMADE, **BYTES}.items():
        assert rows[row_id]["error"] == reason, row_id
    assert rows["n-1"]["error"] == "not a string" and rows["n-2"]["error"] == "null text"
    for row in rows.values():
        if row["error"]:
            assert row["emotions"] is None and row["top_emotion"] is None and row["p_joy"] is None
        else:
            assert row["top_emotion"] in EMOTIONS and 0 < row["top_score"] < 1
    # Generated junk: the reason follows from the input text alone.
    for row_id, body in zip(*read_inputs(corpus).select(["id", "body"]).to_pydict().values()):
        if body is None:
            assert rows[row_id]["error"] in ("null text", "not a string", "invalid UTF-8")
        elif body.strip() in ("", "[deleted]", "[removed]"):
            assert rows[row_id]["error"] is not None
        else:
            assert rows[row_id]["error"] is None
    flagged = sum(r["error"] is not None for r in rows.values())
    assert summary.rows_flagged == flagged and flagged > 100  # 20% junk, most of it flagged


def test_bytes_are_text_where_they_are_utf8_even_in_a_file_of_their_own(smoke_bundle, corpus, tagged, tmp_path):
    """One rule for a binary text column, beside string files or alone: valid UTF-8 is tagged."""
    alone = tag_corpus(smoke_bundle, corpus / "bytes.parquet", tmp_path / "out", keep_columns=["body"])
    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    together = {r["id"]: r for r in read_output(tagged[1]).to_pylist()}
    assert alone.rows_out == len(BYTES) and alone.rows_flagged == 2
    for row_id, (body, reason) in BYTES.items():
        assert rows[row_id]["error"] == together[row_id]["error"] == reason, row_id
        assert (rows[row_id]["top_emotion"] is None) == (reason is not None)
        assert rows[row_id]["emotions"] == together[row_id]["emotions"]
        assert rows[row_id]["body"] == (body.decode() if reason is None else None)


def test_output_columns_types_and_consistency(smoke_bundle, corpus, tagged):
    _, out = tagged
    table = read_output(out)
    probs = [f"p_{name}" for name in EMOTIONS]
    assert table.column_names == [
        "id",
        "emotions",
        "top_emotion",
        "top_score",
        *probs,
        "ekman",
        "sentiment",
        "model_hash",
        "subreddit",
        "body",
        "error",
    ]
    types = dict(zip(table.column_names, table.schema.types))
    assert types["emotions"] == types["ekman"] == types["sentiment"] == pa.list_(pa.string())
    assert types["top_score"] == types["p_joy"] == pa.float32() and types["top_emotion"] == pa.string()
    bundle = load_bundle(smoke_bundle)
    inputs = {r["id"]: r for r in read_inputs(corpus).to_pylist()}
    for row in table.to_pylist():
        assert row["model_hash"] == bundle.hash
        assert row["subreddit"] == inputs[row["id"]]["subreddit"] and row["body"] == inputs[row["id"]]["body"]
        if row["error"]:
            continue
        p = np.array([row[c] for c in probs])
        assert row["emotions"] == [name for name, v, t in zip(EMOTIONS, p, bundle.thresholds) if v >= t]
        assert row["top_emotion"] == EMOTIONS[int(p.argmax())] and row["top_score"] == p.max()
        assert row["ekman"] == roll_up(row["emotions"], EKMAN)
        assert row["sentiment"] == roll_up(row["emotions"], SENTIMENT)


def test_probabilities_match_the_bundle_and_long_texts_are_truncated(smoke_bundle, tagged):
    _, out = tagged
    rows = {r["id"]: r for r in read_output(out).to_pylist()}
    bundle = load_bundle(smoke_bundle)
    precision = json.loads((out / MANIFEST).read_text())["precision"]  # auto: the runtime it chose
    ids = ["h-long", "h-url", "h-emoji", "h-ok"]
    expected = bundle.predict_proba([HANDMADE[i][0] for i in ids], precision=precision)  # the tokenizer truncates
    got = np.array([[rows[i][f"p_{name}"] for name in EMOTIONS] for i in ids])
    # int8 quantizes activations per batch, and the actors' batches hold other rows
    np.testing.assert_allclose(got, expected, atol=1e-5 if gate.RUNTIMES[precision][1] == "fp32" else 0.05)


def test_committed_output_is_refused_and_replaced_only_with_overwrite(smoke_bundle, corpus, tagged, tmp_path):
    target = tmp_path / "out"
    shutil.copytree(tagged[1], target)  # a committed output of 6 files
    before = (target / MANIFEST).read_text()
    with pytest.raises(TaggingError, match="--overwrite"):
        tag_corpus(smoke_bundle, corpus, target)
    assert (target / MANIFEST).read_text() == before  # untouched
    (target / STAGING / "_done").mkdir(parents=True)  # left by a killed run with another model
    (target / STAGING / "run.json").write_text(json.dumps({"key": "another-model", "run_id": "x"}))
    (target / STAGING / "_done" / "handmade-0badf00d.parquet.json").write_text("{}")
    summary = tag_corpus(
        smoke_bundle, corpus / "handmade.parquet", target, overwrite=True, num_actors=1, keep_columns=["body"]
    )
    assert summary.files_resumed == 0  # the stale staging folder was discarded, not resumed
    table = read_output(target)  # only the new run's file: the old output is gone, not mixed in
    assert summary.rows_out == table.num_rows == len(HANDMADE)
    assert table.column_names[-2:] == ["body", "error"] and len(list(target.glob("*.parquet"))) == 1
    assert json.loads((target / MANIFEST).read_text())["settings"]["keep_columns"] == ["body"]
    assert not (target / STAGING).exists()


def test_unreadable_file_stops_the_job_before_anything_is_written(smoke_bundle, corpus, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    good = (corpus / "handmade.parquet").read_bytes()
    (dump / "good.parquet").write_bytes(good)
    (dump / "truncated.parquet").write_bytes(good[: len(good) // 2])  # a copy cut short
    pq.write_table(pa.table({"id": ["a"], "text": ["no body column"]}), dump / "other.parquet")
    out = tmp_path / "out"
    with pytest.raises(TaggingError) as error:
        tag_corpus(smoke_bundle, dump, out)
    message = str(error.value)
    assert "truncated.parquet: not a readable Parquet file" in message
    assert "other.parquet: no column(s) ['body']" in message and "--skip-bad-files" in message
    assert not out.exists()  # nothing committed, nothing staged

    summary = tag_corpus(smoke_bundle, dump, out, on_bad_file="skip", num_actors=1)
    manifest = json.loads((out / MANIFEST).read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped_files"]}
    assert set(skipped) == {"truncated.parquet", "other.parquet"}
    assert summary.rows_out == len(HANDMADE)
    assert [Path(i["path"]).name for i in manifest["inputs"]] == ["good.parquet"]


def test_killed_run_resumes_and_commits_every_row_exactly_once(smoke_bundle, local_ray, tmp_path):
    dump, out = tmp_path / "dump", tmp_path / "out"
    make_corpus(dump, rows=2000, files=8, seed=5)
    command = [
        sys.executable,
        "-m",
        "emotions.cli",
        "tag",
        "--model",
        str(smoke_bundle),
        "--input",
        str(dump),
        "--output",
        str(out),
        "--actors",
        "1",
        "--batch-size",
        "16",
        "--ray-address",
        local_ray.get_runtime_context().gcs_address,
    ]
    log = tmp_path / "driver.log"  # a file, not a pipe: a full pipe would stall the driver
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    done = out / STAGING / "_done"
    deadline = time.monotonic() + 120
    while not list(done.glob("*.json")) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)  # the driver dies mid-run: no cleanup, no commit
    driver.wait()
    assert driver.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    finished = {p.name[: -len(".json")] for p in done.glob("*.json")}
    assert 1 <= len(finished) < 8 and not (out / SUCCESS).exists()
    staged = {name: json.loads((done / f"{name}.json").read_text())["staged"] for name in finished}
    stamps = {name: (out / STAGING / staged[name]).stat().st_mtime_ns for name in finished}
    stale = out / STAGING / PARTS / "stale-00000000.parquet" / "part-left.parquet"  # a killed run's part
    stale.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ["dup"]}), stale)

    summary = tag_corpus(smoke_bundle, dump, out, num_actors=1)
    table = read_output(out)
    ids = table.column("id").to_pylist()
    assert summary.rows_out == len(ids) == len(set(ids)) == 2000
    assert sorted(ids) == sorted(read_inputs(dump).column("id").to_pylist())
    manifest = json.loads((out / MANIFEST).read_text())
    assert {i["output"] for i in manifest["inputs"] if i["resumed"]} == finished == set(stamps)
    assert summary.files_resumed == len(finished)
    for name, stamp in stamps.items():  # finished files were kept, not tagged again
        assert (out / name).stat().st_mtime_ns == stamp
    assert not (out / STAGING).exists() and "dup" not in ids


@pytest.mark.parametrize("precision", ["bf16", "int8", "onnx-int8"])
def test_precision_is_checked_on_the_validation_split_and_stays_close_to_fp32(
    smoke_bundle, corpus, precision, tmp_path
):
    bundle = load_bundle(smoke_bundle)
    check = check_precision(bundle, precision)  # one gate for every precision
    assert check["precision"] == precision and check["examples"] == 128  # the smoke preset's validation cap
    low, high = check["interval_95"]
    assert check["heldout_macro_f1_reference"] > 0 and low <= check["change"] <= high
    assert check["change"] == pytest.approx(check["heldout_macro_f1_candidate"] - check["heldout_macro_f1_reference"])
    shares_kept = check["share_change"]["ratio"] <= gate.MAX_SHARE_CHANGE  # no label over-tagged against fp32
    assert check["allowed"] == (low > -MAX_F1_LOSS and shares_kept) and 0 <= check["rows_changed"] <= 1
    # The actor's own code path, called in this process: same batch, fp32 and the other precision.
    block = pq.read_table(corpus / "handmade.parquet").append_column("path", pa.array(["h"] * len(HANDMADE)))
    batch = normalize_block(block, ["h"], "body", {"id": pa.string()})
    schema = output_schema(
        [InputFile("h", "h", len(HANDMADE), 0, block.schema)],
        TaggingSettings(model="m", output="o", probabilities=True),
    )[0]
    kwargs = dict(
        model=str(smoke_bundle),
        model_hash=bundle.hash,
        threads=1,
        use_gpu=False,
        schema=schema,
        text_column="body",
        staging=str(tmp_path),
        names=["h.parquet"],
    )
    threads = torch.get_num_threads()
    fp32, other = Tagger(precision="fp32", **kwargs).tag(batch), Tagger(precision=precision, **kwargs).tag(batch)
    torch.set_num_threads(threads)  # the actor set 1 for itself; this is the test process
    assert fp32.column("error").to_pylist() == other.column("error").to_pylist()
    p32, p = (
        np.array([t.column(f"p_{n}").to_numpy(zero_copy_only=False) for n in EMOTIONS]) for t in (fp32, other)
    )  # [28, rows] each; NaN where flagged
    tagged_rows = ~np.isnan(p32[0])
    assert tagged_rows.sum() == 4 and 0 < np.abs(p32 - p)[:, tagged_rows].max() < 0.05


def test_precision_is_refused_past_the_tolerance_and_recorded_in_the_manifest(
    smoke_bundle, corpus, tmp_path, monkeypatch
):
    monkeypatch.setattr(gate, "MAX_F1_LOSS", -1.0)  # no interval rules out every loss
    monkeypatch.setattr(gate, "MAX_SHARE_CHANGE", float("inf"))  # the F1 bound alone decides
    with pytest.raises(TaggingError, match=r"bf16 vs fp32 .* held-out .* is not ruled out: tag in fp32"):
        tag_corpus(smoke_bundle, corpus / "handmade.parquet", tmp_path / "refused", precision="bf16")
    assert not (tmp_path / "refused").exists()  # refused before anything was written
    with pytest.raises(TaggingError, match="int8 is for CPU inference"):
        tag_corpus(smoke_bundle, corpus, tmp_path / "gpu", precision="int8", gpus_per_actor=1)

    monkeypatch.setattr(gate, "MAX_F1_LOSS", 1.0)  # any change passes

    monkeypatch.setattr(gate, "MAX_SHARE_CHANGE", float("inf"))
    out = tmp_path / "bf16"
    summary = tag_corpus(smoke_bundle, corpus / "handmade.parquet", out, precision="bf16", num_actors=1)
    manifest = json.loads((out / MANIFEST).read_text())
    assert summary.rows_out == len(HANDMADE) and manifest["settings"]["precision"] == manifest["precision"] == "bf16"
    check = manifest["precision_check"]
    assert check["precision"] == "bf16" and check["allowed"] and check["max_loss"] == 1.0
    assert "interval_95" in check and "is ruled out" in check["verdict"]


def nodes(*cpus: float, gpus: float = 0) -> list[dict[str, float]]:
    """Nodes as ``cluster.nodes()`` lists them: one of each CPU count, each with ``gpus`` GPUs."""
    return [{"CPU": float(c), **({"GPU": float(gpus)} if gpus else {})} for c in cpus]


def test_plan_leaves_room_for_reads_and_merges_on_every_node():
    settings = TaggingSettings(model="m", output="o")
    plan = plan_actors(settings, nodes(2))
    assert (plan.max_actors, plan.threads, plan.cpus_reserved) == (2, 1, 0.75)
    assert plan.max_actors * plan.cpus_reserved <= 2 - ROOM_CPUS
    crowded = plan_actors(TaggingSettings(model="m", output="o", num_actors=4), nodes(2))
    assert crowded.max_actors == 4 and crowded.max_actors * crowded.cpus_reserved <= 2 - ROOM_CPUS
    # 1-CPU worker pods and a head without CPUs (KubeRay): one actor per pod, each leaving room
    # on its own pod, since Ray spreads the pool and no pod may be left without room for a read.
    pods = plan_actors(settings, nodes(0, 1, 1))
    assert (pods.max_actors, pods.cpus_reserved) == (2, 0.5) and 1 - pods.cpus_reserved >= ROOM_CPUS
    uneven = plan_actors(settings, nodes(4, 1))
    assert uneven.max_actors == 5 and 1 - uneven.cpus_reserved >= ROOM_CPUS
    assert 4 - 4 * uneven.cpus_reserved >= ROOM_CPUS
    big = plan_actors(TaggingSettings(model="m", output="o", cpus_per_actor=4), nodes(64))
    assert (big.max_actors, big.cpus_reserved, big.threads) == (16, 3.96, 4)
    gpu = plan_actors(TaggingSettings(model="m", output="o", gpus_per_actor=1), nodes(32, gpus=4))
    assert (gpu.max_actors, gpu.gpus, gpu.cpus_reserved) == (4, 1.0, 1.0)
    assert (gpu.tokenizers, gpu.tokenizer_cpus) == (4, 1.0)  # GPU actors only run the encoder
    staged = plan_actors(TaggingSettings(model="m", output="o", tokenize_stage=True), nodes(2))
    assert staged.tokenizers == 2
    assert staged.max_actors * staged.cpus_reserved + 2 * staged.tokenizer_cpus <= 2 - ROOM_CPUS


def test_a_head_only_cluster_is_planned_for_the_nodes_its_autoscaler_brings():
    """A KubeRay cron starts on a head without CPUs or GPUs; its workers scale from 0. The pool is
    sized for the nodes the autoscaler can bring, not for a 1-CPU node, and starts whole: each
    pending actor is a demand the autoscaler answers, so the GPU nodes start in parallel, and Ray
    Data waits for none of them (a pool started with one grows one wave of nodes at a time)."""
    head = nodes(0)
    gpu = plan_actors(TaggingSettings(model="m", output="o", gpus_per_actor=1), head, nodes(8, 8, gpus=1))
    assert (gpu.min_actors, gpu.initial_actors, gpu.max_actors) == (1, 2, 2)
    # 2 actors + 2 tokenizers over two 8-CPU nodes: each reserves what it asks, not a 1-CPU node's 0.12
    assert (gpu.cpus_reserved, gpu.tokenizers, gpu.tokenizer_cpus) == (1.0, 2, 1.0)
    assert "at the autoscaler's largest: 2 x (CPU 8, GPU 1)" in gpu.why and "1 x (CPU 0)" in gpu.why
    cpu = plan_actors(TaggingSettings(model="m", output="o"), head, nodes(8, 8))
    assert (cpu.min_actors, cpu.initial_actors, cpu.max_actors, cpu.cpus_reserved) == (1, 16, 16, 0.93)
    assert 8 - 8 * cpu.cpus_reserved >= ROOM_CPUS  # a full node of its share still has room for reads
    # The nodes up now hold more than the autoscaler's groups (a head with CPUs of its own): those.
    static = plan_actors(TaggingSettings(model="m", output="o"), nodes(4), nodes(2))
    assert (static.initial_actors, static.max_actors) == (4, 4) and "1..4 actors" in static.why


def test_more_gpu_actors_than_the_autoscaler_can_bring_are_capped_and_the_pool_can_start(caplog):
    """--actors 4 with at most 2 GPUs to be had: a fixed pool of 4 would never start. The pool is
    1..2 (a max over 2 would only ask the autoscaler for GPUs it cannot bring, and shrink every
    actor's CPU share); without an autoscaler to ask, 4 stays the most and 1 is enough to start."""
    asked = TaggingSettings(model="m", output="o", gpus_per_actor=1, num_actors=4)
    head, two = nodes(0), nodes(8, 8, gpus=1)
    plan = plan_actors(asked, head, two)
    assert (plan.min_actors, plan.initial_actors, plan.max_actors) == (1, 2, 2) and plan.tokenizers == 2
    assert "--actors 4 capped" in plan.why and "more than the autoscaler can ever bring" in caplog.text
    unknown = plan_actors(asked, head + nodes(8, gpus=1))  # a GPU node up, no autoscaler seen
    assert (unknown.min_actors, unknown.initial_actors, unknown.max_actors) == (1, 4, 4)
    floor = plan_actors(replace(asked, min_actors=2), head, two)
    assert (floor.min_actors, floor.initial_actors, floor.max_actors) == (2, 2, 2)
    with pytest.raises(TaggingError, match="--min-actors 3 needs 3 GPUs, but the autoscaler can bring at most 2"):
        plan_actors(replace(asked, min_actors=3), head, two)
    with pytest.raises(TaggingError, match="drop --gpus-per-actor"):
        plan_actors(TaggingSettings(model="m", output="o", gpus_per_actor=1), head, nodes(8, 8))
    with pytest.raises(TaggingError, match=r"min_actors: 5 is more than --actors 4"):
        check_settings(model="m", output="o", num_actors=4, min_actors=5)


def test_the_tagger_pool_autoscales_within_the_plan_with_two_calls_per_actor():
    plan = plan_actors(TaggingSettings(model="m", output="o", gpus_per_actor=1, num_actors=4), nodes(8, 8, gpus=1))
    pool = tagger_pool(plan)
    assert (pool.min_size, pool.initial_size, pool.max_size) == (1, 4, 4)
    # one call on the model while the other writes its parts (Tagger.__call__)
    assert pool.max_concurrent_calls_per_actor == 2 and pool.enable_true_multi_threading


def test_a_pool_that_gets_fewer_nodes_than_its_autoscaler_promised_tags_every_row_once(
    smoke_bundle, local_ray, tmp_path
):
    """The autoscaler publishes a largest cluster of two 2-CPU nodes; only this one ever comes. The
    pool (1..4, all 4 started) runs on the 2 actors this node holds while the other 2 stay pending,
    and every row is tagged exactly once."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated.autoscaler_pb2 import ClusterConfig
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    config = ClusterConfig()
    config.node_group_configs.add(max_count=2).resources["CPU"] = 2
    key, namespace = GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    dump, out = tmp_path / "dump", tmp_path / "out"
    make_corpus(dump, rows=1200, files=3, seed=11)
    _internal_kv_put(key, config.SerializeToString(), overwrite=True, namespace=namespace)
    try:
        summary = tag_corpus(smoke_bundle, dump, out, batch_size=32, precision="fp32")
    finally:
        _internal_kv_del(key, namespace=namespace)
    manifest = json.loads((out / MANIFEST).read_text())
    actors = manifest["actors"]
    assert (actors["min_actors"], actors["initial_actors"], actors["max_actors"]) == (1, 4, 4)
    assert "at the autoscaler's largest: 2 x (CPU 2)" in actors["why"]
    ids = read_output(out).column("id").to_pylist()
    assert summary.rows_in == summary.rows_out == len(ids) == len(set(ids)) == 1200
    assert sorted(ids) == sorted(read_inputs(dump).column("id").to_pylist())


def handmade_tagger(smoke_bundle, corpus, staging: Path) -> tuple[Tagger, pa.Table, pa.Schema, InputFile]:
    """A Tagger in this process writing into ``staging``, and the handmade file as one batch."""
    block = pq.read_table(corpus / "handmade.parquet").append_column("path", pa.array(["h"] * len(HANDMADE)))
    f = InputFile(uri="h.parquet", path="h.parquet", rows=len(HANDMADE), bytes=1, schema=block.schema)
    schema = output_schema([f], TaggingSettings(model="m", output="o"))[0]
    threads = torch.get_num_threads()
    tagger = Tagger(
        model=str(smoke_bundle),
        model_hash=load_bundle(smoke_bundle).hash,
        threads=1,
        use_gpu=False,
        precision="fp32",
        schema=schema,
        text_column="body",
        staging=str(staging),
        names=[f.output_name],
    )
    torch.set_num_threads(threads)  # the actor set 1 for itself; this is the test process
    return tagger, normalize_block(block, ["h"], "body", {"id": pa.string()}), schema, f


def test_a_slow_part_write_does_not_hold_up_the_next_batch(smoke_bundle, corpus, tmp_path):
    """Ray Data runs two calls at once per Tagger (tagger_pool): while one batch's parts are being
    written, the next batch is tagged and written, and each call reports only its written parts."""
    tagger, batch, schema, f = handmade_tagger(smoke_bundle, corpus, tmp_path / STAGING)
    writing, release = threading.Event(), threading.Event()

    def slow_write(tagged, staging, names, schema):  # the first batch's write hangs until released
        if not writing.is_set():
            writing.set()
            assert release.wait(120)
        return write_parts(tagged, staging, names, schema)

    tagger.write = slow_write
    with ThreadPoolExecutor(max_workers=2) as calls:  # the actor's two call threads
        first = calls.submit(tagger, batch)
        assert writing.wait(120)  # the first batch is tagged; its write hangs
        second = calls.submit(tagger, batch.slice(0, 4)).result(timeout=120)  # tagged and written meanwhile
        assert not first.done()
        release.set()
        first = first.result(timeout=120)
    assert first.column("rows").to_pylist() == [len(HANDMADE)] and second.column("rows").to_pylist() == [4]
    for report in (first, second):
        (part,) = report.column("part").to_pylist()
        with pa.OSFile(str(tmp_path / STAGING / PARTS / part)) as handle:
            assert pa.ipc.open_file(handle).read_all().num_rows == report.column("rows")[0].as_py()


def test_a_failed_part_write_fails_its_batch_and_none_of_its_parts_is_merged(smoke_bundle, corpus, tmp_path):
    """A write that fails raises from the call (Ray retries the batch, or the run stops); a part it
    left behind is reported by no one, so the merge, from the retry's parts, has every row once."""
    target = Folder.from_uri(tmp_path / "out")
    staging = Staging.open(target, key="k")
    tagger, batch, schema, f = handmade_tagger(smoke_bundle, corpus, tmp_path / "out" / STAGING)

    def failing_write(tagged, staging, names, schema):  # one part lands, then the store fails
        write_parts(tagged.slice(0, 3), staging, names, schema)
        raise OSError("the object store refused the upload")

    tagger.write = failing_write
    with pytest.raises(OSError, match="refused the upload"):
        tagger(batch)
    del tagger.write  # Ray's retry of the batch, with the real writer
    ledger = PartLedger([f])
    ((k, parts, reasons),) = ledger.add(tagger(batch))
    assert len(list((tmp_path / "out" / STAGING / PARTS / f.output_name).glob("part-*"))) == 2 and len(parts) == 1
    marker = merge_parts(target.uri, f, parts, reasons, schema, staging.run)
    ids = pq.read_table(tmp_path / "out" / STAGING / marker["staged"]).column("id").to_pylist()
    assert sorted(ids) == sorted(HANDMADE) and marker["rows_out"] == len(HANDMADE)


def test_host_to_device_copies_are_pinned_and_asynchronous_on_cuda_only():
    assert transfer_options("cuda") == transfer_options(torch.device("cuda", 1)) == (True, True)
    assert transfer_options("cpu") == transfer_options(torch.device("cpu")) == (False, False)
    assert transfer_options("mps") == (False, False)


def test_reads_cover_every_row_once_in_whole_row_groups_where_there_are_enough(tmp_path):
    schema = pa.schema([("id", pa.string()), ("body", pa.string())])
    many = [
        InputFile(uri=f"{k}", path=f"{k}", rows=30_000, bytes=1, schema=schema, row_groups=(10_000,) * 3)
        for k in range(20)
    ]
    assert [(u["start"], u["stop"]) for u in plan_reads(many, 1024, actors=2)[:3]] == [(0, 10_000)] * 3
    # One file of one big row group on 4 actors: cut into slices, never more than 8.
    one = [InputFile(uri="a", path="a", rows=1_000_000, bytes=1, schema=schema, row_groups=(1_000_000, 0))]
    units = plan_reads(one, 1024, actors=4)
    assert len(units) == 8 and {u["row_group"] for u in units} == {0}  # the empty group has no unit
    assert units[0]["start"] == 0 and units[-1]["stop"] == 1_000_000
    assert all(a["stop"] == b["start"] for a, b in zip(units, units[1:]))
    # Read back, the slices hold each row once, in any row-group layout.
    ids = [str(i) for i in range(2_500)]
    pq.write_table(pa.table({"id": ids, "body": ids}), tmp_path / "f.parquet", row_group_size=1_000)
    f = InputFile(
        uri="f", path=str(tmp_path / "f.parquet"), rows=2_500, bytes=1, schema=schema, row_groups=(1_000, 1_000, 500)
    )
    units = plan_reads([f], 100, actors=8)
    assert len(units) == 8 + 8 + 5
    blocks = read_units(
        pa.Table.from_pylist(units), pafs.LocalFileSystem(), [f.path], ["id", "body"], "body", {"id": pa.string()}
    )
    assert sorted(sum((b.column("id").to_pylist() for b in blocks), [])) == sorted(ids)


def test_text_checks_name_each_kind_of_junk():
    texts = pa.chunked_array([pa.array([None, "", "  ", "[deleted]", "[removed]", "ok", "\u00a0"])])
    text, reason = check_texts(texts)
    assert text.type == pa.large_string()
    assert reason.to_pylist() == [
        "null text",
        "empty text",
        "whitespace only",
        "[deleted]",
        "[removed]",
        None,
        "whitespace only",
    ]
    _, reason = check_texts(pa.chunked_array([pa.array([1.5, None])]))
    assert reason.to_pylist() == ["not a string", "null text"]
    text, reason = check_texts(pa.chunked_array([pa.array([b"ok", b"\xff", None, b" "], pa.binary())]))
    assert text.to_pylist() == ["ok", None, None, " "]
    assert reason.to_pylist() == [None, "invalid UTF-8", "null text", "whitespace only"]


def test_the_all_flagged_path_never_writes_an_unflagged_row(tmp_path):
    """flag_file writes tags from no probabilities: even given text, every row must be flagged."""
    pq.write_table(pa.table({"id": ["a", "b"], "body": ["real text", None]}), tmp_path / "in.parquet")
    f = InputFile(
        uri=str(tmp_path / "in.parquet"),
        path=str(tmp_path / "in.parquet"),
        rows=2,
        bytes=1,
        schema=pq.read_schema(tmp_path / "in.parquet"),
    )
    settings = TaggingSettings(model="m", output=str(tmp_path / "out"))
    schema, column_types = output_schema([f], settings)
    staging = Staging.open(Folder.from_uri(tmp_path / "out"), key="k")
    marker = flag_file(str(tmp_path / "out"), f, column_types, schema, settings, "hash", staging.run)
    table = pq.read_table(tmp_path / "out" / STAGING / marker["staged"])
    assert table.column("error").null_count == 0 and table.column("top_emotion").null_count == 2
    assert marker["flagged"] == marker["rows_out"] == 2


def test_inputs_resolve_from_folders_globs_and_lists(tmp_path):
    for name in ("a/one.parquet", "a/b/two.parquet", "a/_staging/hidden.parquet", "a/.tmp.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": ["x"]}), tmp_path / name)
    (tmp_path / "a" / "notes.txt").write_text("not Parquet")
    folder = tmp_path / "a"
    assert [Path(p).name for p, _ in resolve_inputs(folder)[1]] == ["two.parquet", "one.parquet"]
    assert [Path(p).name for p, _ in resolve_inputs(f"{folder}/*/*.parquet")[1]] == ["two.parquet"]
    both = resolve_inputs([folder / "one.parquet", f"file://{folder}/b/two.parquet"])[1]
    assert [uri for _, uri in both] == [f"file://{folder}/b/two.parquet", str(folder / "one.parquet")]
    with pytest.raises(TaggingError, match="does not exist"):
        resolve_inputs(tmp_path / "missing")
    with pytest.raises(TaggingError, match="inside the output folder"):
        resolve_inputs(folder, exclude=Folder.from_uri(str(folder / "b")))


def test_cli_refuses_a_missing_input_before_ray_starts(smoke_bundle, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "emotions.cli",
            "tag",
            "--model",
            str(smoke_bundle),
            "--input",
            str(tmp_path / "nope"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("emotions tag: error: input ")
    assert "nope does not exist" in result.stderr and "Started a local Ray" not in result.stderr


def test_auto_precision_picks_the_fastest_runtime_the_recorded_checks_allow(smoke_bundle, monkeypatch, tmp_path):
    monkeypatch.setenv("EMOTIONS_CACHE", str(tmp_path / "cache"))  # no checks cached on this machine yet
    bundle = load_bundle(smoke_bundle)
    recorded = bundle.metrics["precision_checks"]
    names = list(recorded)
    assert sorted(names) == sorted(gate.auto_candidates())  # written by training, one per candidate
    for name, check in recorded.items():
        assert check["kernels"] == gate.kernels(name) and "interval_95" in check and check["seconds"] > 0

    def resolve_with(speedups: dict, allowed: set, requested="auto"):
        bundle.metrics["precision_checks"] = {
            n: {**c, "seconds": c["fp32_s"] / speedups[n], "speedup": speedups[n], "allowed": n in allowed}
            for n, c in recorded.items()
        }
        return predictor.resolve_precision(bundle, requested, gpu=False)

    speeds = {n: 1.5 + k for k, n in enumerate(names)}  # the last one the fastest
    chosen, check, checks = resolve_with(speeds, set(names))
    assert chosen == names[-1] and check["allowed"] and set(checks) == set(names)
    assert all(c["source"] == "the bundle's metrics.json" for c in checks.values())  # none run again
    assert resolve_with(speeds, set(names[:-1]))[0] == names[-2]  # the fastest one allowed
    assert resolve_with(speeds, set())[:2] == ("fp32", None)  # none allowed
    assert resolve_with(dict.fromkeys(names, 0.8), set(names))[:2] == ("fp32", None)  # none faster than fp32
    assert predictor.resolve_precision(bundle, "auto", gpu=True) == ("fp32", None, {})
    with pytest.raises(TaggingError, match="int8"):  # asked for explicitly: refused, not downgraded
        resolve_with(speeds, set(names) - {"int8"}, requested="int8")
    # A check made with other kernels (another machine's) is ignored, whatever it said: the gate runs
    # now, its verdict decides, and it is cached for this machine. The bound makes the verdict known.
    bundle.metrics["precision_checks"] = {**recorded, "int8": {**recorded["int8"], "kernels": "torch 0.0, other"}}
    monkeypatch.setattr(gate, "MAX_F1_LOSS", 1.0)  # any change passes
    monkeypatch.setattr(gate, "MAX_SHARE_CHANGE", float("inf"))
    precision, check, _ = predictor.resolve_precision(bundle, "int8", gpu=False)
    assert precision == "int8" and check["allowed"] and check["max_loss"] == 1.0
    assert check["source"] == "checked now" and check["kernels"] == gate.kernels("int8")
    again = predictor.resolve_precision(bundle, "int8", gpu=False)[1]
    assert again["source"].startswith("checked earlier on this machine") and again["max_loss"] == 1.0
    monkeypatch.setenv("EMOTIONS_CACHE", str(tmp_path / "other-cache"))  # another machine of this kind
    monkeypatch.setattr(gate, "MAX_F1_LOSS", -1.0)  # no interval rules out every loss
    with pytest.raises(TaggingError, match=r"int8 vs fp32 .* is not ruled out: tag in fp32"):
        predictor.resolve_precision(bundle, "int8", gpu=False)


def test_onnx_int8_tags_through_ray_with_the_graph_the_driver_sent(smoke_bundle, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(gate, "MAX_F1_LOSS", 1.0)  # the smoke bundle's verdict known in advance: allowed
    monkeypatch.setattr(gate, "MAX_SHARE_CHANGE", float("inf"))
    out = tmp_path / "onnx"
    summary = tag_corpus(smoke_bundle, corpus / "handmade.parquet", out, precision="onnx-int8", probabilities=True)
    manifest = json.loads((out / MANIFEST).read_text())
    assert summary.rows_out == len(HANDMADE) and manifest["precision"] == "onnx-int8"
    assert (manifest["backend"], manifest["numeric_precision"]) == ("onnxruntime", "int8")
    assert manifest["precision_check"]["allowed"] and set(manifest["precision_checks"]) == {"onnx-int8"}
    rows = {r["id"]: r for r in read_output(out).to_pylist()}
    ids = [i for i, (_, error) in HANDMADE.items() if error is None]
    expected = load_bundle(smoke_bundle).predict_proba([HANDMADE[i][0] for i in ids], precision="onnx-int8")
    got = np.array([[rows[i][f"p_{name}"] for name in EMOTIONS] for i in ids])
    # int8 quantizes activations per pass, and the actors' passes hold other rows
    np.testing.assert_allclose(got, expected, atol=0.05)
    assert all(rows[i]["error"] == error for i, (_, error) in HANDMADE.items())
