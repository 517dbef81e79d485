"""``emotions tune``: a Ray Tune sweep over the two-stage fine-tune (ASHA), or over the head alone
on a bundle's cached features (``--from-bundle``)."""

from __future__ import annotations

import argparse
import json

from emotions import cluster
from emotions.config import ConfigError

HELP = "Ray Tune sweep over the two-stage fine-tune (ASHA)"


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    from importlib import resources

    presets = (resources.files("emotions") / "presets" / "tune").iterdir()
    names = sorted(p.name[:-5] for p in presets if p.name.endswith(".yaml"))
    parser.add_argument(
        "--preset", default=None, help=f"tune preset, one of {names} (default: minilm; heads with --from-bundle)"
    )
    parser.add_argument("--config", help="YAML or JSON file merged over the preset (may hold a tune: section)")
    parser.add_argument(
        "--from-bundle",
        metavar="BUNDLE",
        default=None,
        help="head-only sweep: stage-2 settings over this bundle's encoder, which runs once "
        "(cached features); the bundle's config is the base",
    )
    parser.add_argument(
        "--output", required=True, help="folder or URI (s3://...) for the sweep, results, plot and the best bundle"
    )
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--no-resume", action="store_true", help="start over even if the sweep exists")
    parser.add_argument(
        "--max-concurrent-trials",
        type=int,
        default=None,
        metavar="N",
        help="trials at once (default: tune.max_concurrent_trials, else as many as the "
        "cluster fits at the autoscaler's maximum size)",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. tune.num_samples=4 stage1.epochs=1")


def run_tune(args: argparse.Namespace) -> int:
    from emotions import storage
    from emotions.bundle import check_output_folder
    from emotions.config import from_dict
    from emotions.tuning import build_sweep_config, run_sweep, split_tune_settings

    if args.max_concurrent_trials is not None and args.max_concurrent_trials < 1:
        raise ConfigError(f"--max-concurrent-trials {args.max_concurrent_trials}: give 1 or more")
    if args.max_concurrent_trials:
        args.overrides = [*args.overrides, f"tune.max_concurrent_trials={args.max_concurrent_trials}"]
    if args.from_bundle:
        from emotions.bundle import load_bundle
        from emotions.head_sweep import build_head_sweep_config, run_head_sweep

        source = load_bundle(args.from_bundle)  # once: checked here, swept over below
        raw = build_head_sweep_config(source, args.preset or "heads", args.config, args.overrides)
    else:
        raw = build_sweep_config(args.preset or "minilm", args.config, args.overrides)
    from_dict(split_tune_settings(raw)[0])  # refuse bad keys before Ray starts
    check_output_folder(storage.join(args.output, "best_bundle"))  # and an output where the best bundle cannot go
    cluster.connect(args.ray_address)
    if args.from_bundle:
        summary = run_head_sweep(source, raw, args.output, resume=not args.no_resume)
    else:
        summary = run_sweep(raw, args.output, resume=not args.no_resume)
    print(json.dumps(summary, indent=2))
    print(f"results: {storage.join(args.output, 'results.md')}")
    return 0
