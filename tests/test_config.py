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
        build_config("smoke", overrides=["stage1.epoch=3", "model.pooling=max", "stage2.head_depth=3",
                                         "scaling.num_workers=two", "bogus.key=1"])  # fmt: skip
    message = str(err.value)
    for fragment in ("stage1.epoch: unknown key", "model.pooling: 'max'", "stage2.head_depth: 3",
                     "scaling.num_workers: expected int", "bogus: unknown key"):  # fmt: skip
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
        "stage1.epochs: 2 -> 3"]
