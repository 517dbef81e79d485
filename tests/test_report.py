"""The tagging report: committed outputs written here in the tagged output's schema with known
label shares (so the drift is known), counted by Ray Data on the session's Ray, on local disk
and on the moto S3 server.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset
import pyarrow.parquet as pq
import pytest

from emotions import storage
from emotions.labels import EKMAN, EMOTIONS, SENTIMENT, roll_up
from emotions.tagging.report import ReportError, write_tagging_report
from emotions.tagging.report_counts import MIN_Z, NONE, SHARE_RATIO, Counts, count_block, label_drift

# GoEmotions-like label shares (train split, rounded): neutral a third, grief 0.2%.
SHARES = dict(
    zip(
        EMOTIONS,
        (
            0.095,
            0.053,
            0.036,
            0.057,
            0.068,
            0.025,
            0.029,
            0.05,
            0.015,
            0.029,
            0.047,
            0.018,
            0.007,
            0.02,
            0.014,
            0.061,
            0.002,
            0.034,
            0.048,
            0.004,
            0.036,
            0.003,
            0.025,
            0.004,
            0.013,
            0.03,
            0.024,
            0.33,
        ),
    )
)
REASONS = {"[deleted]": 0.02, "empty text": 0.01}
ROWS = 4000


def write_tagged(uri: str, shares: dict[str, float], seed: int, rows: int = ROWS, files: int = 2) -> str:
    """A committed tagging output at ``uri`` whose rows carry each label with probability
    ``shares[label]``, some flagged rows, and ``_manifest.json`` then ``_SUCCESS``."""
    rng = np.random.default_rng(seed)
    chosen = rng.random((rows, len(EMOTIONS))) < np.array([shares[name] for name in EMOTIONS])  # [rows, 28]
    reason = rng.choice([None, *REASONS], size=rows, p=[1 - sum(REASONS.values()), *REASONS.values()])
    flagged = reason != None  # noqa: E711 (elementwise)
    emotions = [None if f else [EMOTIONS[j] for j in np.flatnonzero(row)] for row, f in zip(chosen, flagged)]
    folder = storage.Folder.from_uri(uri)
    for i, part in enumerate(np.array_split(np.arange(rows), files)):
        table = pa.table(
            {
                "id": [f"t{seed}_{r}" for r in part],
                "emotions": pa.array([emotions[r] for r in part], pa.list_(pa.string())),
                "top_emotion": [None if flagged[r] else (emotions[r] or ["neutral"])[0] for r in part],
                "top_score": pa.array([None if flagged[r] else rng.beta(4, 3) for r in part], pa.float32()),
                "ekman": pa.array(
                    [None if flagged[r] else roll_up(emotions[r], EKMAN) for r in part], pa.list_(pa.string())
                ),
                "sentiment": pa.array(
                    [None if flagged[r] else roll_up(emotions[r], SENTIMENT) for r in part], pa.list_(pa.string())
                ),
                "model_hash": ["0123456789abcdef"] * len(part),
                "error": pa.array(reason[part].tolist(), pa.string()),
            }
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        folder.write_bytes(sink.getvalue().to_pybytes(), f"comments-{i:05d}-{seed:08x}.parquet")
    folder.write_json(
        {
            "format": "emotions-tagging",
            "run_id": f"run-{seed}",
            "created_utc": "2026-11-25T03:00:00Z",
            "model": {"hash": "0123456789abcdef"},
            "rows_out": rows,
        },
        "_manifest.json",
    )
    folder.write_json({"run_id": f"run-{seed}", "rows": rows}, "_SUCCESS")
    return uri


def test_block_counts_are_exact_and_flagged_rows_count_only_by_reason():
    block = pa.table(
        {
            "emotions": pa.array([["joy", "love"], [], None, ["neutral"]], pa.list_(pa.string())),
            "ekman": pa.array([["joy"], [], None, []], pa.list_(pa.string())),
            "sentiment": pa.array([["positive"], [], None, []], pa.list_(pa.string())),
            "top_score": pa.array([0.91, 0.2, None, 0.55], pa.float32()),
            "error": pa.array([None, None, "[deleted]", None], pa.string()),
        }
    )
    totals = {(k, key): v for k, key, v in zip(*(count_block(block)[c].to_pylist() for c in ("kind", "key", "value")))}
    counts = Counts.from_totals(totals)
    assert (counts.rows, counts.tagged, counts.flagged, counts.reasons) == (4, 3, 1, {"[deleted]": 1})
    assert (counts.emotions["joy"], counts.emotions["love"], counts.emotions["neutral"], counts.emotions[NONE]) == (
        1,
        1,
        1,
        1,
    )
    assert (counts.ekman["joy"], counts.ekman[NONE], counts.sentiment["positive"], counts.sentiment[NONE]) == (
        1,
        2,
        1,
        2,
    )
    assert sum(counts.top_score_bins) == 3 and counts.top_score_bins[18] == 1  # 0.91 in [0.90, 0.95)
    assert counts.top_score_sum == pytest.approx(0.91 + 0.2 + 0.55, abs=1e-6)


def test_drift_needs_both_the_ratio_and_the_noise_floor():
    def counts(joy: int, tagged: int) -> Counts:
        out = Counts(rows=tagged, tagged=tagged)
        out.emotions["joy"] = joy
        return out

    assert [d.label for d in label_drift(counts(300, 10_000), counts(100, 10_000)) if d.called_out] == ["joy"]
    noisy = label_drift(counts(6, 1_000), counts(2, 1_000))[EMOTIONS.index("joy")]  # x3, but 6 rows against 2
    assert noisy.ratio > SHARE_RATIO and abs(noisy.z) < MIN_Z and not noisy.called_out
    small = label_drift(counts(1_200_000, 10_000_000), counts(1_000_000, 10_000_000))[EMOTIONS.index("joy")]
    assert abs(small.z) > MIN_Z and not small.called_out  # x1.2 on 10M rows: real, but not a shift to call out


@pytest.fixture(scope="module")
def runs(local_ray, s3, tmp_path_factory):
    """Three nights: a baseline (reported, so its counts are stored, as a nightly run's are) and a
    night with the same label shares (other rows) on local disk, and on S3 a night where joy
    tripled and fear quadrupled."""
    root = tmp_path_factory.mktemp("tagged")
    baseline = write_tagged(str(root / "2026-11-23"), SHARES, seed=1)
    write_tagging_report(baseline)
    unchanged = write_tagged(str(root / "2026-11-24"), SHARES, seed=2)
    shifted = {**SHARES, "joy": SHARES["joy"] * 3, "fear": SHARES["fear"] * 4}
    return {
        "baseline": baseline,
        "unchanged": unchanged,
        "shifted": write_tagged(storage.join(s3, "report", "2026-11-25"), shifted, seed=3),
    }


def test_unchanged_run_is_not_called_out(runs):
    calm = write_tagging_report(runs["unchanged"], [runs["baseline"]])
    assert calm.called_out == () and not calm.top_score_called_out
    text = storage.Folder.from_uri(runs["unchanged"]).read_text("_report.md")
    assert "No label called out against 1 baseline run(s)" in text.split("## Emotions")[0]


def test_shifted_run_on_s3_is_called_out_at_the_top_by_the_cli(runs, capsys):
    from emotions.cli import main

    shifted = runs["shifted"]
    assert main(["report", shifted, "--baseline", runs["baseline"], runs["unchanged"]]) == 0  # pooled
    printed = capsys.readouterr().out
    assert f"report: {shifted}/_report.md" in printed and "called out: fear, joy" in printed  # largest first

    folder = storage.Folder.from_uri(shifted)
    text = folder.read_text("_report.md")
    top = text.split("## Emotions")[0]
    assert "**Called out**" in top and "- **fear**" in top and "- **joy**" in top
    for section in ("## Drift", "## Emotions", "## Ekman and sentiment", "## Flagged rows", "## top_score"):
        assert section in text
    assert "| [deleted] |" in text and "| positive |" in text and "| anger |" in text and "Mean 0." in text
    for name in ("emotions.png", "groups.png", "top_score.png"):
        assert folder.read_bytes("_report", name)[:4] == b"\x89PNG"
    data = folder.read_json("_report.json")
    assert data["called_out"] == ["fear", "joy"] and [b["run_id"] for b in data["baselines"]] == ["run-1", "run-2"]
    flagged = ROWS - data["counts"]["tagged"]
    assert data["counts"]["rows"] == ROWS and sum(data["counts"]["reasons"].values()) == flagged
    assert flagged == pytest.approx(ROWS * sum(REASONS.values()), rel=0.25)
    # Readers of the folder see the tagged rows only: the report's files all start with "_".
    fs, path, _ = storage.filesystem(shifted)
    assert pyarrow.dataset.dataset(path, filesystem=fs, format="parquet").count_rows() == ROWS


def test_uncommitted_or_foreign_folders_are_refused_before_counting(tmp_path, capsys):
    from emotions.cli import main

    write_tagged(str(tmp_path / "run"), SHARES, seed=6, rows=10)
    (tmp_path / "run" / "_SUCCESS").unlink()
    with pytest.raises(ReportError, match="has no _SUCCESS"):
        write_tagging_report(str(tmp_path / "run"))
    assert main(["report", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "other" / "part-0.parquet")
    (tmp_path / "other" / "_SUCCESS").write_text("")
    with pytest.raises(ReportError, match=r"without the columns \['emotions'"):
        write_tagging_report(str(tmp_path / "other"))
