"""Step time of the bert-base training layouts, worked out from their figures (no GPU needed).

    python benchmarks/ddp_step_time.py [--mfu 0.3] [--pcie-gbytes 12]

A data-parallel step is the compute of one batch per worker plus an all-reduce of every trained
parameter's gradient. DDP overlaps the all-reduce with the backward pass, bucket by bucket, so a
step takes between max(compute, all-reduce) (perfect overlap) and their sum (none). This prints
both bounds and rows/s for each layout, from:

- parameters: bert-base built from ``BertConfig()`` (no hub needed), plus the 768 x 28 head;
- tokens per step: the GoEmotions train split through the embedded MiniLM's tokenizer (the same
  uncased WordPiece vocabulary as bert-base-uncased), cut by ``max_length`` 128 into the length-
  bucketed batches training uses (``batching.bucket_batches``): real padded tokens, not 32 x 128;
- FLOPs: 3 x the forward pass (``gpu_check.encoder_flops_per_token``), at ``--mfu`` of the A10G's
  dense bf16 peak (``gpu_check.BF16_PEAK``);
- bytes: a ring all-reduce moves 2 (N - 1) / N of the gradient in and out of every worker, at 4
  bytes a value (fp32) or 2 (bf16 compression, ``emotions.training.distributed``);
- links: the EC2 G5 page (aws.amazon.com/ec2/instance-types/g5): g5.2xlarge "up to 10 Gbps"
  (a burst rate over a lower baseline), g5.12xlarge 40 Gbps; inside a g5.12xlarge the 4 A10Gs
  talk over PCIe Gen4 with no NVLink, at ``--pcie-gbytes`` GB/s of NCCL bus bandwidth (an
  assumption: PCIe Gen4 x16 is 32 GB/s a direction on paper; through the host, NCCL gets less).

Results go to benchmarks/results/ddp_step_time.json; docs/cluster.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from gpu_check import BF16_PEAK, encoder_flops_per_token

RESULTS = Path(__file__).resolve().parent / "results"
GBIT = 1e9 / 8  # bytes/s in one Gbit/s


@dataclass
class Layout:
    name: str
    nodes: int
    gpus_per_node: int
    batch_per_worker: int
    link: str  # what the all-reduce crosses
    link_bytes_per_s: float | None  # None: one GPU, no all-reduce
    gradient_bytes: int  # per value: 4 (fp32) or 2 (bf16 compression)


def bert_base_parameters() -> tuple[int, dict]:
    from transformers import BertConfig, BertModel

    config = BertConfig()  # bert-base: 12 layers x 768, vocabulary 30,522
    encoder = sum(p.numel() for p in BertModel(config, add_pooling_layer=False).parameters())
    return encoder + 768 * 28 + 28, config.to_dict()


def train_lengths(max_length: int = 128) -> np.ndarray:
    """Token counts of GoEmotions train's rows (minilm's tokenizer, cut at ``max_length``)."""
    from emotions.batching import tokenize
    from emotions.data import load_labelled
    from emotions.model import load_tokenizer

    train = load_labelled("goemotions:train")
    return tokenize(train.texts, train.labels, load_tokenizer("minilm"), max_length).lengths


def tokens_per_batch(lengths: np.ndarray, batch: int) -> float:
    """Mean tokens (rows x longest row, padding included) in a length-bucketed batch of ``batch`` rows."""
    from emotions.batching import bucket_batches

    return float(np.mean([len(rows) * lengths[rows].max() for rows in bucket_batches(lengths, batch, seed=0)]))


def step(layout: Layout, parameters: int, flops_per_token: float, tokens: float, flops_per_s: float) -> dict:
    compute = 3 * flops_per_token * tokens / flops_per_s
    workers = layout.nodes * layout.gpus_per_node
    moved = 2 * (workers - 1) / workers * parameters * layout.gradient_bytes if workers > 1 else 0.0
    reduce = moved / layout.link_bytes_per_s if layout.link_bytes_per_s else 0.0
    fast, slow = max(compute, reduce), compute + reduce
    rows = workers * layout.batch_per_worker
    return {
        **asdict(layout),
        "gpus": workers,
        "rows_per_step": rows,
        "tokens_per_worker_step": tokens,
        "compute_s": compute,
        "allreduce_bytes_per_worker": moved,
        "allreduce_s": reduce,
        "step_s": [fast, slow],
        "rows_per_s": [rows / slow, rows / fast],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mfu", type=float, default=0.3, help="share of the bf16 peak a step reaches (default 0.3)")
    parser.add_argument("--pcie-gbytes", type=float, default=12.0, help="NCCL bus GB/s inside a g5.12xlarge")
    args = parser.parse_args(argv)
    parameters, config = bert_base_parameters()
    flops_per_s = args.mfu * BF16_PEAK["A10G"]
    pcie = args.pcie_gbytes * 1e9
    layouts = [
        Layout("1 x g5.2xlarge, 1 GPU", 1, 1, 32, "none", None, 4),
        Layout("1 x g5.2xlarge, 1 GPU, batch 128", 1, 1, 128, "none", None, 4),
        Layout("4 x g5.2xlarge (the old layout)", 4, 1, 32, "10 Gbit/s pod network", 10 * GBIT, 4),
        Layout("4 x g5.2xlarge, bf16 gradients", 4, 1, 32, "10 Gbit/s pod network", 10 * GBIT, 2),
        Layout("4 x g5.2xlarge, bf16 gradients, batch 128", 4, 1, 128, "10 Gbit/s pod network", 10 * GBIT, 2),
        Layout("1 x g5.12xlarge, 4 GPUs", 1, 4, 32, "PCIe inside the node", pcie, 4),
        Layout("1 x g5.12xlarge, 4 GPUs, bf16 gradients (shipped)", 1, 4, 32, "PCIe inside the node", pcie, 2),
        Layout("2 x g5.12xlarge, bf16 gradients, batch 128", 2, 4, 128, "40 Gbit/s pod network", 40 * GBIT, 2),
    ]
    lengths = train_lengths()
    tokens = {batch: tokens_per_batch(lengths, batch) for batch in {layout.batch_per_worker for layout in layouts}}
    rows = []
    for layout in layouts:
        t = tokens[layout.batch_per_worker]
        rows.append(
            step(layout, parameters, encoder_flops_per_token(config, t / layout.batch_per_worker), t, flops_per_s)
        )
    single = rows[0]["rows_per_s"][1]
    print(
        f"bert-base + head: {parameters:,} parameters ({parameters * 4 / 1e6:.0f} MB of fp32 gradients); "
        f"A10G at {args.mfu:.0%} of {BF16_PEAK['A10G'] / 1e12:.0f} TFLOP/s bf16; tokens per 32-row batch "
        f"{tokens[32]:.0f} (GoEmotions train, bucketed, max_length 128)"
    )
    print(f"{'layout':52} {'compute ms':>10} {'all-reduce ms':>13} {'step ms':>13} {'rows/s':>13} {'vs 1 GPU':>10}")
    for r in rows:
        lo, hi = r["rows_per_s"]
        print(
            f"{r['name']:52} {r['compute_s'] * 1e3:10.1f} {r['allreduce_s'] * 1e3:13.1f} "
            f"{r['step_s'][0] * 1e3:6.0f}-{r['step_s'][1] * 1e3:<6.0f} {lo:6.0f}-{hi:<6.0f} "
            f"{lo / single:4.2f}-{hi / single:<4.2f}"
        )
    record = {"parameters": parameters, "mfu": args.mfu, "pcie_gbytes": args.pcie_gbytes, "layouts": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ddp_step_time.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"results: {RESULTS / 'ddp_step_time.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
