"""Score a finished run's epoch-end weight averages, and uniform means of the last ones, held out.

Checkpoint averaging ("average the last checkpoints", issue 12) without training again: each
stage-1 checkpoint of a run with ``stage1.ema_decay`` holds the weight average at the end of its
epoch (``ema.safetensors``). This loads the run's bundle, puts each of those averages (and the
mean of the last two and three) in its place, and scores them the way training does: held-out
macro-F1 on the validation file (``emotions.evaluation.heldout_metrics``). The run must keep
every epoch's checkpoint:

    emotions train --preset default --output bundles/s1 run.storage_path=runs seed=1 run.checkpoints_to_keep=5
    python benchmarks/epoch_averages.py bundles/s1 runs/s1-<time> goemotions:dev --out averages.json

The ``bundle`` row is the bundle as trained (the last epoch's average): it must equal the last
``ema_epN`` row, which checks that the weights are put in place as training leaves them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from emotions.bundle import load_bundle
from emotions.data import load_labelled
from emotions.evaluation import heldout_metrics


def epoch_averages(run: Path) -> dict[int, dict[str, torch.Tensor]]:
    """{epoch: weight average} of the run's stage-1 checkpoints that hold one."""
    found = {}
    for checkpoint in sorted(p for p in run.glob("checkpoint_*") if p.is_dir()):
        state = json.loads((checkpoint / "state.json").read_text())
        if state["stage"] == "stage1" and (checkpoint / "ema.safetensors").exists():
            found[state["epoch"]] = load_file(str(checkpoint / "ema.safetensors"))
    return found


def mean(weights: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([w[k] for w in weights]).mean(0) for k in weights[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("run", type=Path, help="the run's folder under run.storage_path")
    parser.add_argument("data", help="a labelled file or goemotions:dev")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    bundle, data = load_bundle(args.bundle), load_labelled(args.data)
    averages = epoch_averages(args.run)
    if not averages:
        raise SystemExit(f"{args.run}: no stage-1 checkpoint with a weight average (train with stage1.ema_decay)")
    epochs = sorted(averages)
    variants = {"bundle": None, **{f"ema_ep{e}": averages[e] for e in epochs}}
    for n in (2, 3):
        if len(epochs) >= n:
            variants[f"mean_ep{epochs[-n]}-{epochs[-1]}"] = mean([averages[e] for e in epochs[-n:]])
    trained = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    results = {}
    for name, weights in variants.items():
        bundle.model.load_state_dict(trained)
        if weights is not None:
            loaded = bundle.model.load_state_dict(weights, strict=False)
            assert not loaded.unexpected_keys, loaded.unexpected_keys
        m = heldout_metrics(data.labels, bundle.predict_proba(data.texts, batch_size=128))
        results[name] = {k: round(m[k], 4) for k in ("macro_f1", "weighted_f1", "micro_f1", "accuracy")}
        print(f"{name:>14}: held-out macro-F1 {results[name]['macro_f1']:.4f}", flush=True)
    if args.out:
        args.out.write_text(
            json.dumps({"bundle": args.bundle, "run": str(args.run), "data": args.data, "held_out": results}, indent=2)
            + "\n"
        )


if __name__ == "__main__":
    main()
