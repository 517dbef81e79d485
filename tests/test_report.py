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
from emotions.tagging.report_reference import validation_reference

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
    scores = [None if f else rng.beta(4, 3) for f in flagged]
    return write_committed(uri, emotions, reason.tolist(), scores, seed, files)


def write_committed(
    uri: str, emotions: list, reasons: list, scores: list, seed: int, files: int = 1, model: dict | None = None, **extra
) -> str:
    """Rows (``emotions``: each row's labels, None where flagged for ``reasons``) committed at ``uri``
    in the tagged output's schema, in ``files`` files; the manifest names ``model`` and holds ``extra``."""
    rows = len(emotions)
    folder = storage.Folder.from_uri(uri)
    for i, part in enumerate(np.array_split(np.arange(rows), files)):
        table = pa.table(
            {
                "id": [f"t{seed}_{r}" for r in part],
                "emotions": pa.array([emotions[r] for r in part], pa.list_(pa.string())),
                "top_emotion": [None if reasons[r] else (emotions[r] or ["neutral"])[0] for r in part],
                "top_score": pa.array([scores[r] for r in part], pa.float32()),
                "ekman": pa.array(
                    [None if reasons[r] else roll_up(emotions[r], EKMAN) for r in part], pa.list_(pa.string())
                ),
                "sentiment": pa.array(
                    [None if reasons[r] else roll_up(emotions[r], SENTIMENT) for r in part], pa.list_(pa.string())
                ),
                "model_hash": ["0123456789abcdef"] * len(part),
                "error": pa.array([reasons[r] for r in part], pa.string()),
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
            "model": model or {"hash": "0123456789abcdef"},
            "rows_out": rows,
            **extra,
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


def small_run(uri: str, seed: int, model: dict, **extra) -> str:
    """20 tagged rows: relief on 3 (15%), joy on 2 (10%), neutral on the other 15; no flagged rows."""
    emotions = [["relief"]] * 3 + [["joy"]] * 2 + [["neutral"]] * 15
    return write_committed(uri, emotions, [None] * 20, [0.9] * 20, seed, model=model, **extra)


def write_bundle_metrics(uri: str, metrics: dict, content_hash: str = "feedc0ffee000001") -> dict:
    """The two files of a bundle that the report reads (metrics.json, manifest.json's hash) -> the
    tagged manifest's "model" naming it."""
    bundle = storage.Folder.from_uri(uri)
    bundle.write_json(metrics, "metrics.json")
    bundle.write_json({"files": {}, "hash": content_hash}, "manifest.json")
    return {"path": uri, "hash": content_hash}


def metrics_with_heldout_shares(examples: int = 1000) -> dict:
    """metrics.json of a bundle trained with held-out shares: every label true and tagged on 10 of
    1,000 validation rows (1%), but relief (true on 2, tagged on 5), joy (40, 50) and grief (0, 0)."""
    counts = {label: (10, 10) for label in EMOTIONS} | {"relief": (2, 5), "joy": (40, 50), "grief": (0, 0)}
    shares = {
        label: {
            "positives": p,
            "tagged": t,
            "true_share": p / examples,
            "predicted_share": t / examples,
            "ratio": t / p if p else None,
        }
        for label, (p, t) in counts.items()
    }
    return {"n_examples": examples, "heldout": {"examples": examples, "shares": shares}}


def test_report_sets_each_share_beside_the_bundles_heldout_validation_shares(local_ray, s3, tmp_path):
    """Relief on 15% of this run's rows, true on 0.2% of validation rows: x75. The reference recorded
    in the manifest at tag time (the bundle since deleted), and read from the bundle on S3 for an
    output committed before it was recorded."""
    model = write_bundle_metrics(storage.join(s3, "report-bundles", "heldout"), metrics_with_heldout_shares())
    read_from_bundle = small_run(str(tmp_path / "before"), seed=11, model=model)
    deleted = {"path": str(tmp_path / "deleted-bundle"), "hash": model["hash"]}
    recorded = small_run(
        str(tmp_path / "now"), seed=12, model=deleted, reference=validation_reference(metrics_with_heldout_shares())
    )
    for run in (read_from_bundle, recorded):
        write_tagging_report(run)
        text = storage.Folder.from_uri(run).read_text("_report.md")
        emotions = text.split("## Emotions")[1].split("## Ekman")[0]
        assert "Reference: the bundle that tagged this run, on its 1,000 validation rows" in emotions
        assert "| label | rows | share | validation true | validation tagged | x validation |" in emotions
        assert "| relief | 3 | 15.00% | 0.20% | 0.50% | 75.00 |" in emotions  # 0.15 / 0.002
        assert "| joy | 2 | 10.00% | 4.00% | 5.00% | 2.50 |" in emotions  # 0.10 / 0.04
        assert "| anger | 0 | 0.00% | 1.00% | 1.00% | 0.00 |" in emotions
        assert "| grief | 0 | 0.00% | 0.00% | 0.00% | – |" in emotions  # never true in validation: no ratio
        assert "| (none) | 0 | 0.00% |  |  |  |" in emotions
        reference = storage.Folder.from_uri(run).read_json("_report.json")["reference"]
        assert reference["source"] == "heldout.shares"
        assert reference["labels"]["relief"] == {"true_share": 0.002, "predicted_share": 0.005, "positives": 2}


def test_an_older_bundle_gives_the_true_share_from_support_and_no_tagged_share(local_ray, tmp_path):
    support = {label: 5 for label in EMOTIONS} | {"relief": 1, "joy": 20}  # of 500 rows: 1%, 0.2%, 4%
    metrics = {
        "n_examples": 500,
        "heldout": {"macro_f1": 0.4},  # held out, but without shares
        "at_thresholds": {"per_label": {label: {"f1": 0.5, "support": n} for label, n in support.items()}},
    }
    run = small_run(str(tmp_path / "run"), seed=13, model=write_bundle_metrics(str(tmp_path / "bundle"), metrics))
    write_tagging_report(run)
    text = storage.Folder.from_uri(run).read_text("_report.md")
    assert "on its 500 validation rows" in text and "*validation tagged*: – (the bundle was trained before" in text
    assert "| relief | 3 | 15.00% | 0.20% | – | 75.00 |" in text  # 0.15 / (1 / 500)
    assert "| joy | 2 | 10.00% | 4.00% | – | 2.50 |" in text  # 0.10 / (20 / 500)
    assert "| anger | 0 | 0.00% | 1.00% | – | 0.00 |" in text
    assert storage.Folder.from_uri(run).read_json("_report.json")["reference"]["source"] == "at_thresholds.support"


@pytest.mark.parametrize(
    "change, warning",
    [
        ("replaced", "is no longer the one that tagged this run"),
        ("deleted", "cannot be read: it has no manifest.json"),
        ("no shares", "its metrics.json gives no validation shares"),
    ],
)
def test_a_bundle_that_cannot_give_the_reference_leaves_it_out_with_a_warning(
    local_ray, tmp_path, caplog, change, warning
):
    bundle = str(tmp_path / "bundle")
    model = write_bundle_metrics(bundle, metrics_with_heldout_shares())
    run = small_run(str(tmp_path / "run"), seed=14, model=model)
    if change == "replaced":
        write_bundle_metrics(bundle, metrics_with_heldout_shares(), content_hash="0000000000000002")
    elif change == "deleted":
        storage.Folder.from_uri(bundle).delete()
    else:
        write_bundle_metrics(bundle, {"n_examples": 1000}, content_hash=model["hash"])
    write_tagging_report(run)
    text = storage.Folder.from_uri(run).read_text("_report.md")
    assert "validation" not in text and "| label | rows | share |\n" in text and "| relief | 3 | 15.00% |\n" in text
    assert storage.Folder.from_uri(run).read_json("_report.json")["reference"] is None
    assert warning in caplog.text and bundle in caplog.text
