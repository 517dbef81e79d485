"""Configuration: presets, files, overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from emotions.cluster import resolve_scaling
from emotions.config import ConfigError, ScalingSettings, build_config, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_loads(name):
    config = build_config(name)
    assert config.stage1.train_encoder and not config.stage2.train_encoder
    assert config.stage1.name == "stage1" and config.stage2.name == "stage2"


def test_presets_include_the_documented_ones():
    assert {"smoke", "quickstart", "default", "bert-base"} <= set(preset_names())


def test_overrides_and_file_merge_in_order(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("stage1:\n  epochs: 7\n  learning_rate: 3e-5\nmodel:\n  pooling: cls\n")
    config = build_config("smoke", file, ["stage1.epochs=1", "scaling.num_workers=3"])
    assert config.stage1.epochs == 1  # override beats file
    assert config.stage1.learning_rate == 3e-5  # YAML's "3e-5" string becomes a float
    assert config.model.pooling == "cls"
    assert config.scaling.num_workers == 3
    assert config.stage1.batch_size == 16  # untouched preset value


def test_unknown_keys_and_bad_values_are_all_reported_by_name():
    with pytest.raises(ConfigError) as err:
        build_config(
            "smoke",
            overrides=[
                "stage1.epoch=3",
                "model.pooling=max",
                "stage2.head_depth=3",
                "scaling.num_workers=two",
                "bogus.key=1",
            ],
        )
    message = str(err.value)
    for fragment in (
        "stage1.epoch: unknown key",
        "model.pooling: 'max'",
        "stage2.head_depth: 3",
        "scaling.num_workers: expected int",
        "bogus: unknown key",
    ):
        assert fragment in message, message


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="quickstart"):
        build_config("nope")


@pytest.mark.parametrize("name", ["..", "a/b", "../other-team", ".", ".hidden", "/tmp", "a b"])
def test_run_names_that_leave_the_runs_folder_are_refused_by_name(name):
    with pytest.raises(ConfigError, match=r"run.name: .* is not a folder name under run.storage_path"):
        build_config("smoke", overrides=[f"run.name={name}", "run.resume=false"])  # --fresh deletes the run folder


def test_run_name_may_use_letters_digits_dots_dashes_and_underscores():
    assert build_config("smoke", overrides=["run.name=bert-base_v1.2"]).run.name == "bert-base_v1.2"


def test_malformed_override():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        build_config("smoke", overrides=["stage1.epochs"])


# Values the hand-written checks let through, each refused now by a message that names its key.
REFUSED = [
    ("stage1.learning_rate=nan", "stage1.learning_rate: nan must be a finite number"),
    ("stage1.learning_rate=.nan", "stage1.learning_rate: nan must be a finite number"),
    ("stage2.learning_rate=inf", "stage2.learning_rate: inf must be a finite number"),
    ("stage1.learning_rate=-.inf", "stage1.learning_rate: -inf must be a finite number"),
    ("data.max_train_examples=-5", "data.max_train_examples: -5 must be >= 1"),
    ("stage2.head_hidden=-64", "stage2.head_hidden: -64 must be >= 1"),
    ("stage1.weight_decay=-0.01", "stage1.weight_decay: -0.01 must be >= 0"),
    ("stage1.head_learning_rate=-1e-3", "stage1.head_learning_rate: -1e-3 must be > 0"),
    ("thresholds.fallback=7", "thresholds.fallback: 7 must be in [0, 1]"),
    ("thresholds.shrink=-5", "thresholds.shrink: -5 must be >= 0"),
    ("thresholds.max_share_ratio=0.5", "thresholds.max_share_ratio: 0.5 must be >= 1"),
    ("data.max_length=256", "data.max_length: 256 is more than the 128 positions of model.encoder=tiny-random"),
    ("run.checkpoints_to_keep=0", "run.checkpoints_to_keep: 0 must be >= 1"),
    ("run.max_failures=-1", "run.max_failures: -1 must be >= 0"),
]


@pytest.mark.parametrize(("override", "message"), REFUSED, ids=[o for o, _ in REFUSED])
def test_values_out_of_range_are_refused_by_key(override, message):
    with pytest.raises(ConfigError) as err:
        build_config("smoke", overrides=[override])
    assert message in str(err.value)


def test_every_refused_value_is_reported_at_once():
    # One value per key; data.max_length is checked against the encoder once every key is valid.
    first = {o.split("=")[0]: (o, m) for o, m in reversed(REFUSED) if not o.startswith("data.max_length")}
    with pytest.raises(ConfigError) as err:
        build_config("smoke", overrides=[o for o, _ in first.values()])
    assert sorted(err.value.problems) == sorted(m for _, m in first.values())


def test_max_length_is_checked_against_the_encoders_position_embeddings():
    with pytest.raises(ConfigError, match=r"data.max_length: 1024 is more than the 512 positions .* at most 512"):
        build_config("default", overrides=["data.max_length=1024"])  # the embedded MiniLM
    assert build_config("default", overrides=["data.max_length=512"]).data.max_length == 512
    # A hub name whose config cannot be read offline: that one check is skipped, not failed.
    offline = build_config("default", overrides=["model.encoder=no-such-org/no-such-model", "data.max_length=1024"])
    assert offline.data.max_length == 1024


@pytest.mark.parametrize("name", ["../presets/smoke", "smoke.yaml", "/tmp/smoke"])
def test_a_preset_is_a_name_never_a_path(name):
    with pytest.raises(ConfigError, match=r"unknown preset .*--config"):
        build_config(name)


def test_replace_validates_like_a_config_file():
    import dataclasses

    config = build_config("smoke")
    with pytest.raises(ValueError, match="finite"):
        dataclasses.replace(config.stage1, learning_rate=float("nan"))
    assert dataclasses.replace(config.stage1, batch_size=8).batch_size == 8
    assert dataclasses.asdict(config) == config.to_dict()


def test_cross_field_rules_still_hold():
    with pytest.raises(ConfigError, match="stage1.lr_floor: 0.1 needs schedule=linear"):
        build_config("smoke", overrides=["stage1.lr_floor=0.1", "stage1.schedule=constant"])
    with pytest.raises(ConfigError, match="nothing to train"):
        build_config("smoke", overrides=["stage1.epochs=0", "stage2.epochs=0"])
    with pytest.raises(ConfigError, match="stage1.train_encoder: must be true"):
        build_config("smoke", overrides=["stage1.train_encoder=false"])


def test_types_are_strict_but_yaml_exponents_are_floats():
    with pytest.raises(ConfigError) as err:
        build_config("smoke", overrides=["stage1.epochs='3'", "run.resume=1", "stage1.dropout=true", "stage1=5"])
    for fragment in ("stage1: expected a mapping, got 5", "run.resume: expected bool, got 1"):
        assert fragment in str(err.value)
    with pytest.raises(ConfigError, match=r"stage1.epochs: expected int, got '3'"):
        build_config("smoke", overrides=["stage1.epochs='3'"])
    with pytest.raises(ConfigError, match=r"stage1.dropout: expected float, got True"):
        build_config("smoke", overrides=["stage1.dropout=true"])
    assert build_config("smoke", overrides=["stage1.learning_rate=2e-4"]).stage1.learning_rate == 2e-4


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch_size": 0}, "batch_size: 0 must be >= 1 (--batch-size)"),
        ({"num_actors": 0}, "num_actors: 0 must be >= 1 (--actors)"),
        ({"cpus_per_actor": 0}, "cpus_per_actor: 0 must be >= 1 (--cpus-per-actor)"),
        ({"cpus_per_actor": 1.5}, "cpus_per_actor: expected int, got 1.5 (--cpus-per-actor)"),
        ({"gpus_per_actor": -1.0}, "gpus_per_actor: -1.0 must be >= 0 (--gpus-per-actor)"),
        (
            {"precision": "fp16"},
            "precision: 'fp16' is not one of ['auto', 'fp32', 'bf16', 'int8', 'onnx-fp32', 'onnx-int8'] (--precision)",
        ),
        ({"on_bad_file": "ignore"}, "on_bad_file: 'ignore' is not one of ['fail', 'skip']"),
        ({"text_column": ""}, "text_column: may not be empty (--text-column)"),
        ({"keep_columns": ("a", "")}, "keep_columns.1: may not be empty (--keep-columns)"),
        ({"id_column": "body"}, "id_column: 'body' is the text column too"),
        ({"keep_columns": ("emotions",)}, "columns ['emotions'] clash with output"),
        ({"precision": "int8", "gpus_per_actor": 1.0}, "int8 is for CPU inference"),
        ({"precision": "onnx-int8", "gpus_per_actor": 1.0}, "onnx-int8 is for CPU inference"),
        ({"batch": 8}, "batch: unknown key"),
    ],
)
def test_tagging_settings_are_refused_by_name_and_flag(values, message):
    from emotions.tagging.settings import TaggingError, check_settings

    with pytest.raises(TaggingError) as err:
        check_settings(model="bundle", output="out", **values)
    assert message in str(err.value)


def test_tagging_settings_report_every_bad_argument_at_once():
    from emotions.tagging.settings import TaggingError, check_settings

    with pytest.raises(TaggingError) as err:
        check_settings(model="bundle", output="out", batch_size=0, num_actors=0, precision="fp16")
    assert all(flag in str(err.value) for flag in ("--batch-size", "--actors", "--precision"))
    settings = check_settings(model="bundle", output="out", keep_columns=["a"], gpus_per_actor=1)
    assert settings.keep_columns == ("a",) and settings.gpus_per_actor == 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tune.num_samples=0", "tune.num_samples: 0 must be >= 1"),
        ("tune.grace_period=0", "tune.grace_period: 0 must be >= 1"),
        ("tune.reduction_factor=1", "tune.reduction_factor: 1 must be >= 2"),
        ("tune.max_concurrent_trials=0", "tune.max_concurrent_trials: 0 must be >= 1"),
        ("tune.metric=val_loss", "tune.metric: 'val_loss' is not one of ['val_macro_f1_heldout', 'val_macro_f1']"),
        ("tune.num_sample=4", "tune.num_sample: unknown key"),
        ("tune.baseline=yes please", "tune.baseline: expected bool"),
    ],
)
def test_tune_settings_are_refused_by_key(override, message):
    from emotions.tuning import build_sweep_config, split_tune_settings

    with pytest.raises(ConfigError) as err:
        split_tune_settings(build_sweep_config("smoke", overrides=[override]))
    assert message in str(err.value)


def test_every_malformed_search_entry_is_reported_at_once():
    from emotions.tuning import build_sweep_config, split_tune_settings

    raw = build_sweep_config("smoke")
    raw["tune"]["search"] = {
        "stage1.learning_rate": {"loguniform": [0, 1e-3]},
        "stage2.dropout": {"uniform": [0.3, 0.1]},
        "stage2.head_depth": {"choice": []},
        "stage1.batch_size": {"choice": [8], "uniform": [8, 16]},
    }
    with pytest.raises(ConfigError) as err:
        split_tune_settings(raw)
    for fragment in (
        "tune.search.stage1.learning_rate: loguniform needs 0 < low < high",
        "tune.search.stage2.dropout: uniform needs low < high",
        "tune.search.stage2.head_depth: choice needs a list of values",
        "tune.search.stage1.batch_size: give exactly one of",
    ):
        assert fragment in str(err.value)


def test_searched_values_the_config_refuses_are_caught_before_any_trial():
    from emotions.config import from_dict
    from emotions.tuning import build_sweep_config, check_search_keys, split_tune_settings

    raw = build_sweep_config("smoke")
    raw["tune"]["search"] = {"stage2.head_depth": {"choice": [1, 3]}, "stage1.batch_size": {"uniform": [8, 64]}}
    base, settings = split_tune_settings(raw)
    with pytest.raises(ConfigError) as err:
        check_search_keys(from_dict(base), settings)
    assert "stage2.head_depth: 3 is not one of [1, 2]" in str(err.value)
    assert "stage1.batch_size: expected int, got 8.0" in str(err.value)  # Tune's uniform samples floats


@pytest.mark.parametrize("name", ["../tune/smoke", "smoke.yaml"])
def test_a_tune_preset_is_a_name_never_a_path(name):
    from emotions.tuning import build_sweep_config

    with pytest.raises(ConfigError, match="unknown tune preset"):
        build_sweep_config(name)


# Node resources as Ray reports them: ray.nodes()[i]["Resources"].
ONE_TWO_CPU_NODE = [{"CPU": 2.0}]
MULTINODE_TEST = [{"CPU": 0.0}, {"CPU": 1.0}, {"CPU": 1.0}]  # tests/test_multinode.py: 0-CPU head, two 1-CPU nodes
AUTO = ScalingSettings()  # num_workers: auto, cpus_per_worker: auto


def layout(scaling: ScalingSettings, up, at_max=None) -> tuple[int, int]:
    resolved, _ = resolve_scaling(scaling, up, at_max)
    return resolved.num_workers, resolved.cpus_per_worker


def test_auto_layout_is_one_worker_per_cpu_node_with_all_its_cpus():
    assert layout(AUTO, ONE_TWO_CPU_NODE) == (1, 2)
    assert layout(AUTO, MULTINODE_TEST) == (2, 1)  # DDP across the two worker nodes; the head has no CPUs
    resolved, how = resolve_scaling(AUTO, [{"CPU": 8.0}, {"CPU": 4.0}, {"CPU": 8.0}])
    assert (resolved.num_workers, resolved.cpus_per_worker) == (3, 4)  # uneven nodes: the smallest's CPUs
    assert "4 to 8 CPUs" in how and "scaling.cpus_per_worker" in how
    # CPU training leaves GPU nodes alone when there are CPU-only nodes; a GPU box alone is used.
    assert layout(AUTO, [{"CPU": 4.0}, {"CPU": 7.0, "GPU": 1.0}]) == (1, 4)
    assert layout(AUTO, [{"CPU": 8.0, "GPU": 1.0}]) == (1, 8)


def test_presets_default_and_quickstart_resolve_to_the_auto_layout():
    for name in ("default", "quickstart"):
        assert layout(build_config(name).scaling, ONE_TWO_CPU_NODE) == (1, 2), name
        assert layout(build_config(name).scaling, MULTINODE_TEST) == (2, 1), name
    assert layout(build_config("smoke").scaling, ONE_TWO_CPU_NODE) == (2, 1)  # DDP on one node, for the tests


def test_explicit_scaling_values_are_kept():
    assert layout(ScalingSettings(num_workers=2, cpus_per_worker=1), ONE_TWO_CPU_NODE) == (2, 1)
    assert layout(ScalingSettings(num_workers=3), []) == (3, 1)  # cpus auto beside a fixed count: 1, as before
    # num_workers auto with fixed CPUs: as many such workers as each node holds (the old 2 x 1 here).
    assert layout(ScalingSettings(cpus_per_worker=1), ONE_TWO_CPU_NODE) == (2, 1)
    assert layout(ScalingSettings(cpus_per_worker=3), [{"CPU": 8.0}, {"CPU": 4.0}]) == (3, 3)
    config = build_config("default", overrides=["scaling.num_workers=2", "scaling.cpus_per_worker=1"])
    assert (config.scaling.num_workers, config.scaling.cpus_per_worker) == (2, 1)


def test_auto_sizes_for_the_autoscalers_maximum_when_it_holds_more():
    at_max = [{"CPU": 0.0}] + [{"CPU": 8.0}] * 4  # worker groups at 0 replicas now, up to 4 x 8 CPUs
    assert layout(AUTO, [{"CPU": 0.0}], at_max) == (4, 8)
    assert layout(AUTO, ONE_TWO_CPU_NODE * 3, [{"CPU": 2.0}] * 2) == (3, 2)  # more up now than the config says


def test_auto_on_gpu_is_one_worker_per_gpu():
    gpu = ScalingSettings(use_gpu=True)
    assert layout(gpu, [{"CPU": 4.0}, {"CPU": 16.0, "GPU": 2.0}, {"CPU": 7.0, "GPU": 1.0}]) == (3, 7)
    assert layout(ScalingSettings(use_gpu=True, cpus_per_worker=2), [{"CPU": 16.0, "GPU": 4.0}]) == (4, 2)


def test_auto_with_nowhere_to_run_says_what_to_do():
    with pytest.raises(ConfigError, match="no node with CPUs.*set scaling.num_workers=N"):
        resolve_scaling(AUTO, [{"CPU": 0.0}], None)
    with pytest.raises(ConfigError, match="found no GPU.*scaling.use_gpu=false"):
        resolve_scaling(ScalingSettings(use_gpu=True), ONE_TWO_CPU_NODE)
    with pytest.raises(ConfigError, match="cpus_per_worker=4 CPUs.*Lower scaling.cpus_per_worker"):
        resolve_scaling(ScalingSettings(cpus_per_worker=4), ONE_TWO_CPU_NODE)


def test_scaling_values_are_an_int_or_auto():
    assert build_config("smoke", overrides=["scaling.num_workers=auto"]).scaling.num_workers == "auto"
    with pytest.raises(ConfigError) as err:
        build_config("smoke", overrides=["scaling.num_workers=0", "scaling.cpus_per_worker=most"])
    assert "scaling.num_workers: 0 must be >= 1, or auto" in str(err.value)
    assert "scaling.cpus_per_worker: expected int or 'auto', got 'most'" in str(err.value)


def test_a_setting_added_since_a_checkpoint_is_no_change_at_its_default():
    from emotions.config import config_changes

    new = build_config("smoke").to_dict()
    old = {**new, "stage1": {k: v for k, v in new["stage1"].items() if k != "ema_decay"}}  # an older version's
    assert config_changes(old, new) == []
    ema = build_config("smoke", overrides=["stage1.ema_decay=0.99"]).to_dict()
    assert config_changes(old, ema) == ["stage1.ema_decay: (absent) -> 0.99"]
    assert config_changes(new, build_config("smoke", overrides=["stage1.epochs=3"]).to_dict()) == [
        "stage1.epochs: 2 -> 3"
    ]


def test_the_threshold_settings_default_to_the_rule_fitting_uses():
    """The config's defaults and ``ThresholdRule()`` (what ``fit_thresholds`` uses when given no
    rule) are written in two places; they must not drift apart."""
    from emotions.evaluation import ThresholdRule

    assert build_config("smoke").thresholds.rule() == ThresholdRule()
