"""Configuration: presets, files, overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from emotions.config import ConfigError, build_config, preset_names


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


def test_malformed_override():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        build_config("smoke", overrides=["stage1.epochs"])
