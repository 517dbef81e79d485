"""Stage-1 training throughput, measured side by side in one run on the same examples.

Every row trains the same model (the ``default`` preset's MiniLM, word embeddings frozen) on the
same examples at the same global batch, and the rows alternate: each repeat runs them all, the
odd repeats in reverse order, so a change in the machine's load hits every row alike.

1. Plain single-process PyTorch loops with all of the machine's threads, as a user would write
   them: batches padded to ``max_length`` (naive), padded to each batch's longest (dynamic
   padding, careful), and length-bucketed (the project's ``bucket_batches``, what Ray Train runs).
2. Ray Train running the real ``emotions`` stage-1 loop: the default layout (``scaling.num_workers:
   auto``: one worker per node with all its CPUs) and the old layout (2 workers x 1 CPU, DDP over
   gloo). Samples/s of the epoch, as the run reports it; start-up is not counted (its wall time
   is shown beside).
3. The same two with their steps under autocast to bfloat16 (``scaling.cpu_bf16``; on a CPU with
   native bf16, AVX512-BF16 or AMX): the plain bucketed loop and Ray Train's default layout.

    python benchmarks/train_throughput.py [--examples 768] [--batch 32] [--repeats 2]

Prints a table (best of the repeats, every repeat beside it) and the goals, each ok or FAIL;
writes benchmarks/results/train_throughput.json; exits 1 if a goal failed. Goals: Ray Train's
default layout >= 0.9x the best plain loop; bucketing >= 1.5x padding to max_length; on a CPU
with native bf16, Ray Train's default layout in bf16 >= 1.2x the same in float32 (and >= 0.9x the
plain bf16 loop). The pad-to-max_length loop runs over the first ``--padded-examples`` rows only:
every one of its batches has the same shape, so its rate does not depend on which rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ray
import torch

from emotions.batching import bucket_batches, collate, random_batches, tokenize
from emotions.cluster import describe_layout
from emotions.config import build_config
from emotions.data import load_labelled
from emotions.environment import cpu_has_bf16
from emotions.model import EmotionClassifier, build_head, load_encoder, load_tokenizer
from emotions.training import fit, resolve_layout

RESULTS = Path(__file__).parent / "results" / "train_throughput.json"
GOAL_RAY = 0.9  # Ray Train (default layout) / best plain loop
GOAL_BUCKETING = 1.5  # bucketed / padded to max_length
GOAL_CPU_BF16 = 1.2  # Ray Train default layout, steps in bf16 / in float32 (CPUs with native bf16 only)


def plain_loop(tokenized, batches, config, threads: int, pad_to: int | None = None, bf16: bool = False) -> float:
    """Samples/s of a single-process loop over ``batches`` with ``threads`` torch threads: the same
    model, optimiser and step as Ray Train's stage 1 (model building not counted); ``bf16``: the
    forward pass under autocast to bfloat16, as a user would add it."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    stage = config.stage1
    model = EmotionClassifier(load_encoder(config.model.encoder), None, config.model.pooling)
    model.head = build_head(model.hidden_size, stage.head_depth, stage.dropout)
    if config.model.freeze_embeddings:
        model.encoder.get_input_embeddings().requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=stage.learning_rate, weight_decay=stage.weight_decay
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    start = time.perf_counter()
    for rows in batches:
        ids, mask, y = collate(tokenized, rows, 0, pad_to)  # [batch, seq], [batch, seq], [batch, 28]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids, mask)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # as Ray Train's loop does: waits for the step
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def ray_train_config(examples: int, global_batch: int, storage: str, scaling: list[str]):
    """The default preset cut to one stage-1 epoch, with ``scaling`` overrides (none: the default
    layout) resolved against the connected cluster, and per-worker batch = global / workers."""
    overrides = [
        f"data.max_train_examples={examples}",
        "data.max_validation_examples=64",
        "stage1.epochs=1",
        "stage2.epochs=0",
        f"run.storage_path={storage}",
        "run.resume=false",
        *scaling,
    ]
    config = resolve_layout(build_config("default", overrides=overrides))
    workers = config.scaling.num_workers
    if global_batch % workers:
        sys.exit(f"--batch {global_batch} does not split over {workers} Ray Train workers; give a multiple")
    return replace(config, stage1=replace(config.stage1, batch_size=global_batch // workers))


def ray_train(config, name: str) -> tuple[float, float]:
    """(samples/s of the stage-1 epoch as the run reports it, wall seconds of the whole run)."""
    start = time.perf_counter()
    result = fit(config, name)
    return result.metrics["samples_per_s"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=768, help="GoEmotions train comments (seeded subset)")
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    parser.add_argument("--repeats", type=int, default=2, help="alternating repeats of every row")
    parser.add_argument(
        "--padded-examples", type=int, default=256, help="rows the pad-to-max_length loop runs over (it is slow)"
    )
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()

    config = build_config("default", overrides=[f"data.max_train_examples={args.examples}"])
    data = load_labelled("goemotions:train").take(args.examples, config.seed)
    tokenized = tokenize(data.texts, data.labels, load_tokenizer(config.model.encoder), config.data.max_length)
    bucketed = bucket_batches(tokenized.lengths, args.batch, seed=0)
    shuffled = random_batches(len(tokenized), args.batch, seed=0)
    padded = shuffled[: max(1, args.padded_examples // args.batch)]

    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="emotions-bench-")
    default_layout = ray_train_config(args.examples, args.batch, storage, [])
    old_layout = ray_train_config(
        args.examples, args.batch, storage, ["scaling.num_workers=2", "scaling.cpus_per_worker=1"]
    )
    bf16_layout = ray_train_config(args.examples, args.batch, storage, ["scaling.cpu_bf16=true"])
    native_bf16 = cpu_has_bf16()
    max_len = config.data.max_length
    rows = {  # name -> f(repeat) = samples/s, or (samples/s, wall seconds of the Ray Train run)
        "plain, padded to max_length": lambda r: plain_loop(tokenized, padded, config, threads, max_len),
        "plain, dynamic padding": lambda r: plain_loop(tokenized, shuffled, config, threads),
        "plain, length-bucketed": lambda r: plain_loop(tokenized, bucketed, config, threads),
        "Ray Train, default layout": lambda r: ray_train(default_layout, f"default-{r}"),
        "Ray Train, 2 workers x 1 CPU": lambda r: ray_train(old_layout, f"old-{r}"),
    }
    if native_bf16:  # elsewhere autocast to bf16 is emulated, slower, and scaling.cpu_bf16=auto stays off
        rows["plain, length-bucketed, bf16"] = lambda r: plain_loop(tokenized, bucketed, config, threads, bf16=True)
        rows["Ray Train, default layout, bf16"] = lambda r: ray_train(bf16_layout, f"bf16-{r}")
    rates: dict[str, list[float]] = {name: [] for name in rows}
    walls: dict[str, list[float]] = {name: [] for name in rows if name.startswith("Ray")}
    for r in range(args.repeats):
        for name in list(rows) if r % 2 == 0 else list(rows)[::-1]:
            value = rows[name](r)
            rate, wall = value if isinstance(value, tuple) else (value, None)
            rates[name].append(rate)
            if wall is not None:
                walls[name].append(wall)
            print(f"repeat {r + 1}/{args.repeats}: {name}: {rate:.1f} samples/s", flush=True)
    ray.shutdown()
    shutil.rmtree(storage, ignore_errors=True)

    results = {
        "command": " ".join(["python", *sys.argv]),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "examples": args.examples,
        "padded_examples": sum(len(b) for b in padded),
        "global_batch": args.batch,
        "repeats": args.repeats,
        "encoder": config.model.encoder,
        "freeze_embeddings": config.model.freeze_embeddings,
        "max_length": max_len,
        "mean_tokens": float(tokenized.lengths.mean()),
        "machine_cpus": os.cpu_count(),
        "plain_loop_torch_threads": threads,
        "cpu_has_bf16": native_bf16,
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "layouts": {
            "Ray Train, default layout": describe_layout(default_layout.scaling),
            "Ray Train, 2 workers x 1 CPU": describe_layout(old_layout.scaling),
            "Ray Train, default layout, bf16": describe_layout(bf16_layout.scaling),
        },
        "samples_per_s": rates,
        "ray_train_run_wall_s": walls,
    }
    results.update(compare(rates))
    print_table(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")
    sys.exit(0 if all(goal["met"] for goal in results["goals"].values()) else 1)


def compare(rates: dict[str, list[float]]) -> dict:
    """Best of the repeats per row, the ratios, and each goal with whether it was met."""
    best = {name: max(values) for name, values in rates.items()}
    best_plain = max((k for k in best if k.startswith("plain") and "bf16" not in k), key=best.get)
    ray_default, ray_old = best["Ray Train, default layout"], best["Ray Train, 2 workers x 1 CPU"]
    bucketed, padded = best["plain, length-bucketed"], best["plain, padded to max_length"]
    goals = {
        "ray_default_vs_best_plain": {"ratio": ray_default / best[best_plain], "goal": GOAL_RAY},
        "bucketed_vs_padded_to_max": {"ratio": bucketed / padded, "goal": GOAL_BUCKETING},
    }
    if "Ray Train, default layout, bf16" in best:  # a CPU with native bf16
        ray_bf16 = best["Ray Train, default layout, bf16"]
        goals["ray_bf16_vs_ray_fp32"] = {"ratio": ray_bf16 / ray_default, "goal": GOAL_CPU_BF16}
        goals["ray_bf16_vs_plain_bf16"] = {"ratio": ray_bf16 / best["plain, length-bucketed, bf16"], "goal": GOAL_RAY}
    for goal in goals.values():
        goal["met"] = goal["ratio"] >= goal["goal"]
    return {
        "best_samples_per_s": best,
        "best_plain": best_plain,
        "ray_default_vs_ray_2x1": ray_default / ray_old,
        "bucketed_vs_dynamic_padding": bucketed / best["plain, dynamic padding"],
        "goals": goals,
    }


def print_table(results: dict) -> None:
    best, plain = results["best_samples_per_s"], results["best_samples_per_s"][results["best_plain"]]
    padded = best["plain, padded to max_length"]
    print(
        f"\nstage-1 throughput: {results['examples']} GoEmotions comments (mean {results['mean_tokens']:.1f} "
        f"tokens, max_length {results['max_length']}; padded row: first {results['padded_examples']}), "
        f"{results['encoder']}, global batch {results['global_batch']}, {results['machine_cpus']} CPUs; "
        f"best of {results['repeats']} alternating repeats, each repeat in brackets"
    )
    load = {k: " ".join(f"{x:.2f}" for x in results[f"load_average_{k}"]) for k in ("before", "after")}
    print(f"load average (1, 5, 15 min): before {load['before']}, after {load['after']}\n")
    print(f"{'':32}{'samples/s':>10}  {'repeats':<15}{'vs best plain':>14}{'vs padded':>10}  layout")
    for name, value in best.items():
        each = "[" + ", ".join(f"{v:.1f}" for v in results["samples_per_s"][name]) + "]"
        layout = results["layouts"].get(name, f"1 process, {results['plain_loop_torch_threads']} torch threads")
        if results["ray_train_run_wall_s"].get(name):
            layout += f"; whole run {min(results['ray_train_run_wall_s'][name]):.0f} s"
        print(f"{name:32}{value:10.1f}  {each:<15}{value / plain:14.2f}{value / padded:10.2f}  {layout}")
    print(f"\nbest plain loop (float32): {results['best_plain']}")
    print(f"Ray Train default layout vs 2 workers x 1 CPU: {results['ray_default_vs_ray_2x1']:.2f}x")
    print(f"length-bucketed vs dynamic padding (plain): {results['bucketed_vs_dynamic_padding']:.2f}x")
    for key, goal in results["goals"].items():
        print(f"goal: {key} >= {goal['goal']}: {goal['ratio']:.2f}  {'ok' if goal['met'] else 'FAIL'}")
    busiest = max(results["load_average_before"][0], results["load_average_after"][0])
    if busiest > results["machine_cpus"]:
        print(
            f"warning: load average {busiest:.1f} on {results['machine_cpus']} CPUs: other processes share the "
            "cores, and rows with several torch threads per process (plain loops, 1 worker x N) lose far "
            "more than 1-thread workers; compare only runs on an idle machine"
        )


if __name__ == "__main__":
    main()
