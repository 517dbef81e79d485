"""Stage-1 training throughput, measured side by side in one run on the same examples.

1. Ray Train (2 workers x 1 thread, DDP over gloo) running the real ``emotions`` stage-1 loop,
   vs a plain single-process PyTorch loop with 2 threads, same model, global batch and batches.
2. Length-bucketed batches vs batches padded to ``max_length``, in the plain loop.

    python benchmarks/train_throughput.py [--examples 1536]

Prints a table and writes benchmarks/results/train_throughput.json. Goals: Ray Train >= 0.9x the
plain loop; bucketing >= 1.5x padding.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray
import torch

from emotions.batching import bucket_batches, collate, random_batches, tokenize
from emotions.config import build_config
from emotions.data import load_labelled
from emotions.model import EmotionClassifier, build_head, load_encoder, load_tokenizer
from emotions.training import train

RESULTS = Path(__file__).parent / "results" / "train_throughput.json"


def plain_loop(tokenized, batches, config, pad_to: int | None = None) -> float:
    """Samples/s of a single-process loop over ``batches`` (2 threads), same model and optimiser."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    stage = config.stage1
    model = EmotionClassifier(load_encoder(config.model.encoder), None, config.model.pooling)
    model.head = build_head(model.hidden_size, stage.head_depth, stage.dropout)
    if config.model.freeze_embeddings:
        model.encoder.get_input_embeddings().requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=stage.learning_rate, weight_decay=stage.weight_decay)  # fmt: skip
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    start = time.perf_counter()
    for rows in batches:
        ids, mask, y = collate(tokenized, rows, 0, pad_to)
        loss = loss_fn(model(ids, mask), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def ray_train(examples: int, global_batch: int, storage: str) -> float:
    """Samples/s of the real stage-1 epoch on 2 Ray Train workers (startup not counted)."""
    config = build_config("default", overrides=[
        f"data.max_train_examples={examples}", "data.max_validation_examples=64",
        "stage1.epochs=1", "stage2.epochs=0", f"stage1.batch_size={global_batch // 2}",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1", f"run.storage_path={storage}",
    ])  # fmt: skip
    bundle = train(config, Path(storage) / "bundle")
    history = json.loads((bundle / "metrics.json").read_text())["history"]
    return history[0]["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    parser.add_argument("--storage", default="/tmp/emotions-bench")
    args = parser.parse_args()

    config = build_config("default", overrides=[f"data.max_train_examples={args.examples}"])
    data = load_labelled("goemotions:train").take(args.examples, config.seed)
    tokenized = tokenize(data.texts, data.labels, load_tokenizer(config.model.encoder), config.data.max_length)
    bucketed = bucket_batches(tokenized.lengths, args.batch, seed=0)
    padded = random_batches(len(tokenized), args.batch, seed=0)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_rate = ray_train(args.examples, args.batch, args.storage)
    ray.shutdown()
    plain_rate = plain_loop(tokenized, bucketed, config)
    padded_rate = plain_loop(tokenized, padded, config, pad_to=config.data.max_length)

    rows = {
        "examples": args.examples, "global_batch": args.batch, "encoder": config.model.encoder,
        "freeze_embeddings": config.model.freeze_embeddings,
        "mean_tokens": float(tokenized.lengths.mean()), "max_length": config.data.max_length,
        "ray_train_2x1_samples_per_s": ray_rate, "plain_loop_2_threads_samples_per_s": plain_rate,
        "ray_vs_plain": ray_rate / plain_rate,
        "bucketed_samples_per_s": plain_rate, "padded_to_max_samples_per_s": padded_rate,
        "bucketed_vs_padded": plain_rate / padded_rate,
        "torch_threads_plain": 2, "machine_cpus": __import__("os").cpu_count(),
    }  # fmt: skip
    print(f"\nstage-1 throughput, {args.examples} GoEmotions examples, global batch {args.batch}, "
          f"{config.model.encoder}, mean {rows['mean_tokens']:.1f} tokens")  # fmt: skip
    print(f"{'':36}{'samples/s':>10}{'ratio':>8}   goal")
    print(f"{'plain PyTorch loop (2 threads)':36}{plain_rate:10.1f}{1.0:8.2f}")
    print(f"{'Ray Train (2 workers x 1 thread)':36}{ray_rate:10.1f}{rows['ray_vs_plain']:8.2f}   >= 0.9")
    print(f"{'padded to max_length (plain loop)':36}{padded_rate:10.1f}{1.0:8.2f}")
    print(f"{'length-bucketed (plain loop)':36}{plain_rate:10.1f}{rows['bucketed_vs_padded']:8.2f}   >= 1.5")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
