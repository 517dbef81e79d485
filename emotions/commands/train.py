"""``emotions train``: the two-stage fine-tune on Ray Train; writes a model bundle."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from emotions import cluster
from emotions.config import ConfigError, build_config, preset_names

HELP = "two-stage fine-tune on Ray Train; writes a model bundle"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="default", help=f"one of {preset_names()} (default: default)")
    parser.add_argument("--config", help="YAML or JSON file merged over the preset")
    parser.add_argument("--output", required=True, help="folder for the model bundle")
    parser.add_argument(
        "--ray-address", default=None, help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="delete the checkpoints of an earlier run with this run.name and start over "
        "(run.resume=false); without it, that run resumes if its config is unchanged",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. stage1.epochs=3 scaling.num_workers=4"
    )


def run_train(args: argparse.Namespace) -> int:
    from emotions.bundle import check_output_folder
    from emotions.evaluation_report import format_shares, format_summary
    from emotions.storage import is_uri
    from emotions.training import load_training_data, prepare_run, train

    fresh = ["run.resume=false"] if args.fresh else []
    config = build_config(args.preset, args.config, [*args.overrides, *fresh])
    check_encoder(config.model.encoder)  # an encoder name that resolves to nothing is refused first,
    check_output_folder(args.output)  # a folder of the user's files is refused before anything is deleted;
    data = load_training_data(config)  # config and data are checked before Ray starts,
    if config.run.name:  # and so is a named run's earlier checkpoints' config (or they are deleted)
        prepare_run(config, config.run.name)
    cluster.connect(args.ray_address)
    path = train(config, args.output, data=data)
    if not is_uri(path):
        metrics = json.loads((Path(path) / "metrics.json").read_text())
        print(format_summary(metrics))
        print(format_shares(metrics))
    print(f"bundle: {path}")
    return 0


def check_encoder(name: str) -> None:
    """Refuse (ConfigError) an encoder whose Hugging Face config cannot be found, before Ray starts."""
    from transformers import AutoConfig

    from emotions.encoders import resolve_encoder

    try:
        AutoConfig.from_pretrained(resolve_encoder(name))
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"model.encoder={name!r}: no Hugging Face config found ({reason}). Pass "
            "model.encoder=minilm (embedded, offline), a local folder holding config.json and "
            "weights, or a hub name on a machine with access to the hub"
        ) from exc
