"""The `emotions` command, run end to end in a subprocess like a user would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest


def emotions(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emotions.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_bad_labelled_file_fails_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,labels\nI love it,joy\nwhat a day,happyness\n")
    result = emotions("train", "--preset", "smoke", "--output", str(tmp_path / "out"), f"data.train={bad}")
    assert result.returncode == 2
    assert "bad.csv" in result.stderr and "line 3" in result.stderr and "happyness" in result.stderr
    assert "Started a local Ray instance" not in result.stderr  # refused before cluster time
    assert not (tmp_path / "out").exists()


def test_train_refuses_an_output_folder_of_other_files_before_anything_is_deleted(tmp_path):
    output = tmp_path / "work"
    output.mkdir()
    (output / "notes.md").write_text("mine\n")
    run = tmp_path / "runs" / "again"  # --fresh would delete this run's checkpoints: not before the check
    run.mkdir(parents=True)
    (run / "state.json").write_text("{}")
    result = emotions(
        "train",
        "--preset",
        "smoke",
        "--output",
        str(output),
        "--fresh",
        f"run.storage_path={tmp_path / 'runs'}",
        "run.name=again",
    )
    assert result.returncode == 2
    assert f"bundle output {output} already holds files and is not a model bundle" in result.stderr
    assert "Choose a new or empty folder" in result.stderr
    assert "Started a local Ray instance" not in result.stderr
    assert (output / "notes.md").read_text() == "mine\n" and (run / "state.json").exists()


def test_unknown_config_key_is_refused_by_name(tmp_path):
    result = emotions("train", "--preset", "smoke", "--output", str(tmp_path / "out"), "stage1.epoks=2")
    assert result.returncode == 2
    assert "stage1.epoks: unknown key" in result.stderr


def test_evaluate_writes_report(smoke_bundle, tmp_path):
    data = tmp_path / "few.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"text": "Thank you so much!", "labels": ["gratitude"]},
                {"text": "This is terrible.", "labels": ["disgust", "anger"]},
                {"text": "ok then", "labels": ["neutral"]},
            ]
        )
    )
    result = emotions("evaluate", "--model", str(smoke_bundle), "--data", str(data), "--report", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    # Data the bundle's thresholds never saw: its row is the true test, and says so. (Three rows
    # with three different labels cannot be halved with positives on both sides: no held-out row.)
    assert "bundle's thresholds, unseen data" in result.stdout and "held-out" not in result.stdout
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert report["n_examples"] == 3 and set(report) >= {"at_0.5", "at_thresholds"}
    assert (tmp_path / "r" / "report.md").exists()
    assert (tmp_path / "r" / "per_label_f1.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_refuses_incomplete_bundle(smoke_bundle, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(smoke_bundle, broken)
    (broken / "model.safetensors").unlink()
    result = emotions("evaluate", "--model", str(broken))
    assert result.returncode == 2
    assert "missing ['model.safetensors']" in result.stderr


def test_bundle_with_other_labels_is_refused(smoke_bundle, tmp_path):
    import shutil

    from emotions.bundle import load_bundle

    other = tmp_path / "other"
    shutil.copytree(smoke_bundle, other)
    meta = json.loads((other / "bundle.json").read_text())
    meta["labels"] = meta["labels"][:-1] + ["calm"]
    (other / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="calm"):
        load_bundle(other, verify=False)
    with pytest.raises(ValueError, match="altered"):
        load_bundle(other)


def test_train_job_entry_point_accepts_the_cli_flags():
    result = subprocess.run([sys.executable, "jobs/train.py", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--preset", "--config", "--output", "KEY=VALUE"):
        assert flag in result.stdout


def test_help_lists_every_command_and_the_module_docstring_too():
    from emotions import cli

    result = emotions("--help", timeout=60)
    assert result.returncode == 0
    for name in cli.COMMANDS:
        assert f"\n    {name} " in result.stdout, name
        assert f"emotions {name} " in cli.__doc__, name


@pytest.mark.parametrize(
    "job, command", [("train.py", "train"), ("tune.py", "tune"), ("ablate.py", "ablate"), ("tag_nightly.py", "nightly")]
)
def test_each_job_is_its_cli_command(job, command):
    """jobs/X.py is `emotions COMMAND`: the same flags, nothing of its own."""
    result = subprocess.run([sys.executable, f"jobs/{job}", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: emotions {command} ")
    assert emotions(command, "--help", timeout=60).stdout == result.stdout


def test_nightly_takes_every_tag_flag_and_its_own():
    tag, nightly = emotions("tag", "--help", timeout=60), emotions("nightly", "--help", timeout=60)
    assert nightly.returncode == 0, nightly.stderr
    flags = set(re.findall(r"--[a-z][a-z0-9-]*", tag.stdout))
    assert "--precision" in flags and "--int8" not in flags  # one way to ask for int8
    assert flags <= set(re.findall(r"--[a-z][a-z0-9-]*", nightly.stdout))
    for own in (
        "--date",
        "--max-dates",
        "--since",
        "--until",
        "--dry-run",
        "--lease-ttl",
        "--lease-settle",
        "--ready-marker",
        "--min-age",
        "--set-aside-after",
        "--set-aside-retry-days",
    ):
        assert own in nightly.stdout, own


def test_a_new_tag_flag_reaches_nightly_without_a_table(monkeypatch, capsys):
    """A flag added to `emotions tag` is accepted by `emotions nightly`, passed to tag_nightly (and
    from there to tag_corpus) under its dest, and shown in the dry run's `emotions tag` lines."""
    import emotions.nightly
    from emotions import cli
    from emotions.commands import tag

    original = tag.add_tag_arguments

    def with_a_new_flag(parser):
        original(parser)
        parser.add_argument("--new-flag", default="off")

    seen = {}

    def tag_nightly(model, inputs, output, **options):
        seen.update(model=model, inputs=inputs, output=output, **options)
        return emotions.nightly.NightlyReport(planned=["2026-01-02"], dry_run=True)

    monkeypatch.setattr(tag, "add_tag_arguments", with_a_new_flag)
    monkeypatch.setattr(emotions.nightly, "tag_nightly", tag_nightly)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = cli.main(
        [
            "nightly",
            "--model",
            "m",
            "--input",
            "d/dt={date}/",
            "--output",
            "t/dt={date}/",
            "--new-flag",
            "on",
            "--date",
            "2026-01-02",
            "--dry-run",
            "--ray-address",
            "ray://head:10001",
            "--keep-columns",
            "a, b",
            "--no-report",
            "--actors",
            "2",
        ]
    )
    assert code == 0
    assert seen["new_flag"] == "on" and seen["date"] == "2026-01-02" and seen["dry_run"]
    assert seen["model"] == "m" and seen["inputs"] == ["d/dt={date}/"] and seen["output"] == "t/dt={date}/"
    assert seen["keep_columns"] == ["a", "b"] and seen["report"] is False and seen["num_actors"] == 2
    assert seen["ray_address"] == "ray://head:10001" and "RAY_ADDRESS" not in os.environ  # an argument, not the env
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  emotions tag "))
    assert line == (
        "  emotions tag --model m --input d/dt=2026-01-02/ --output t/dt=2026-01-02/ --keep-columns a,b "
        "--actors 2 --no-report --ray-address ray://head:10001 --new-flag on"
    )


def test_nightly_refuses_flags_that_cannot_mean_what_the_user_wants(capsys):
    from emotions import cli

    base = ["nightly", "--model", "m", "--input", "d/dt={date}/", "--output", "t/dt={date}/"]
    for extra, why in [
        (["--overwrite"], "--overwrite re-tags a committed date: name it with --date"),
        (["--date", "2026-01-02", "--since", "2026-01-01"], "--date names one date"),
        (["--output", "t/"], "--output must contain {date}"),
    ]:
        assert cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert why in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as bad:
        cli.build_parser().parse_args([*base, "--date", "25/11/2026"])
    assert bad.value.code == 2


def one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The error line of a refused command: exit 2, no traceback, one `error:` line and it is last."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [result.stderr.strip().splitlines()[-1]], result.stderr[-3000:]
    assert errors[0].startswith(f"emotions {command}: error: ")
    return errors[0]


def test_a_bad_encoder_name_is_refused_in_one_line_before_ray_starts(tmp_path):
    result = emotions(
        "train", "--preset", "smoke", "--output", str(tmp_path / "out"), "model.encoder=no-such-org/no-such-encoder"
    )
    line = one_error_line(result, "train")
    assert "model.encoder='no-such-org/no-such-encoder'" in line and "model.encoder=minilm" in line
    assert "Started a local Ray instance" not in result.stderr and not (tmp_path / "out").exists()


def test_s3_without_a_reachable_endpoint_is_one_line_naming_what_to_set():
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "fake",
        "AWS_SECRET_ACCESS_KEY": "fake",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "emotions.cli",
            "tag",
            "--model",
            "s3://nowhere/bundle",
            "--input",
            "s3://nowhere/dump/",
            "--output",
            "s3://nowhere/tagged/",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    line = one_error_line(result, "tag")
    assert "nowhere" in line and "AWS_ENDPOINT_URL" in line and "AWS_ACCESS_KEY_ID" in line
    assert "Started a local Ray instance" not in result.stderr
