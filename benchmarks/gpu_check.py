"""The prepared GPU check: one command, a few minutes on one GPU, every number in one JSON file.

    python benchmarks/gpu_check.py                 # on a GPU machine: the real check (< 5 min, one H100)
    python benchmarks/gpu_check.py --smoke         # anywhere: the same code paths at toy sizes on CPU

(a) Ray Train, one GPU worker, bf16 autocast: the embedded MiniLM for ``--steps`` stage-1 steps
    (then a short stage 2, so the run yields a real bundle); samples/s.
(b) A bert-base-sized encoder (random weights from ``BertConfig()``: no hub here) through the same
    Ray Train steps and through ``emotions tag`` on one GPU actor: samples/s and rows/s, and model
    FLOPs utilisation against the card's dense bf16 peak (FLOPs counted on real tokens, 3x the
    forward pass for training).
(c) The MiniLM bundle from (a) tags ``--rows`` generated rows in fp32 and in bf16: rows/s of each,
    their ratio, and macro-F1 at the bundle's thresholds of fp32 vs bf16 on the GPU, through the
    encoder loop the tagging actors run (``tagging.predict_tokens``), on the whole dev split.
(d) Everything goes to benchmarks/results/gpu_check.json (gpu_check_cpu.json when no GPU ran).

Without a CUDA GPU the GPU parts are skipped with a message saying so; ``--smoke`` runs every part
on CPU with a tiny model and a few hundred rows, so CI keeps this script working.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device-name substring.
BF16_PEAK = {
    "H200": 989.4e12,
    "H100 NVL": 835.5e12,
    "H100 PCIe": 756.0e12,
    "H100": 989.4e12,
    "A100": 312.0e12,
    "L40S": 362.1e12,
    "L4": 121.0e12,
    "A10G": 70.0e12,
}
BATCH = 32  # stage-1 batch per worker


def bf16_peak(device_name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK.items() if key in device_name), None)


def encoder_flops_per_token(config: dict, tokens: float) -> float:
    """Forward FLOPs per token of a BERT encoder at mean sequence length ``tokens``: 2 x the
    non-embedding weights (every token meets each once) + attention's two [seq x seq] products."""
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    weights = layers * (4 * h * h + 2 * h * inter)
    return 2 * weights + layers * 4 * tokens * h


def mean_tokens(texts: list[str], tokenizer, max_length: int) -> float:
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    return float(np.mean(lengths))


def train_part(name: str, overrides: list[str], workdir: Path, use_gpu: bool) -> dict:
    """A Ray Train run of the default preset with ``overrides``; stage-1 samples/s and the bundle."""
    from emotions.config import build_config
    from emotions.training import train

    config = build_config(
        "default",
        overrides=[
            f"run.storage_path={workdir / 'runs'}",
            f"run.name={name}",
            "scaling.num_workers=1",
            f"scaling.use_gpu={str(use_gpu).lower()}",
            "scaling.bf16=true",
            f"stage1.batch_size={BATCH}",
            "stage1.epochs=1",
            *overrides,
        ],
    )
    start = time.perf_counter()
    bundle = train(config, workdir / name)
    seconds = time.perf_counter() - start
    history = json.loads((Path(bundle) / "metrics.json").read_text())["history"]
    stage1 = [h for h in history if h["stage"] == "stage1"][-1]
    return {
        "bundle": str(bundle),
        "samples_per_s": stage1["samples_per_s"],
        "epoch_s": stage1["epoch_seconds"],
        "examples": config.data.max_train_examples,
        "steps": -(-config.data.max_train_examples // BATCH),
        "wall_s": seconds,
        "encoder": config.model.encoder,
        "max_length": config.data.max_length,
    }


def tag_part(bundle: str, corpus: Path, out: Path, precision: str, gpus: float) -> dict:
    from emotions.tagging import TaggingError, tag_corpus

    try:
        summary = tag_corpus(bundle, corpus, out, precision=precision, gpus_per_actor=gpus, overwrite=True)
    except TaggingError as error:  # the precision gate refused it: that is a result too
        return {"precision": precision, "refused": str(error)}
    manifest = json.loads(Path(summary.manifest).read_text())
    return {
        "precision": precision,
        "rows": summary.rows_out,
        "rows_per_s": summary.rows_per_s,
        "seconds": summary.seconds,
        "startup_s": manifest["timings"].get("startup_s"),
        "precision_check": manifest.get("precision_check"),
    }


def dev_quality(bundle_path: str, device: str, examples: int | None = None) -> dict:
    """bf16 against fp32 on GoEmotions dev (or a seeded ``examples`` of it), on ``device``, through
    the loop tagging's actors run (``inference.run_rows``): held-out macro-F1 of each (thresholds
    fitted on one half of dev, scored on the other, both ways) and the paired change with its 95%
    bootstrap interval (``evaluation.paired_change``, what the tagging gate compares)."""
    from emotions.bundle import load_bundle
    from emotions.data import load_labelled
    from emotions.evaluation import paired_change
    from emotions.tagging.predictor import ENCODER_BATCH, predict_tokens, tokenize_texts

    bundle = load_bundle(bundle_path, device=device)
    dev = load_labelled("goemotions:dev").take(examples, 0)
    tokens = tokenize_texts(dev.texts, bundle.tokenizer, bundle.max_length)
    pad_id = bundle.tokenizer.pad_token_id or 0
    batch = ENCODER_BATCH["cuda" if device == "cuda" else "cpu"]
    probs = {p: predict_tokens(bundle.model, tokens, pad_id, batch, p, device) for p in ("fp32", "bf16")}
    check = paired_change(dev.labels, probs["fp32"], probs["bf16"])
    return {
        "examples": len(dev),
        "heldout_macro_f1_fp32": check["heldout_macro_f1_reference"],
        "heldout_macro_f1_bf16": check["heldout_macro_f1_candidate"],
        "change": check["change"],
        "interval_95": check["interval_95"],
        "rows_changed": check["rows_changed"],
    }


def random_bert(folder: Path, tiny: bool) -> dict:
    """A BERT with random weights saved like a hub model (config, safetensors, the embedded
    MiniLM's uncased WordPiece tokenizer, which is bert-base-uncased's vocabulary)."""
    from transformers import BertConfig, BertModel

    from emotions.model import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    config = BertConfig(vocab_size=tokenizer.vocab_size)  # bert-base: 12 x 768, 110M parameters
    if tiny:
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return config.to_dict()


def run(args: argparse.Namespace) -> dict:
    import ray
    import torch

    from emotions import environment
    from emotions.corpus import make_corpus
    from emotions.model import load_tokenizer

    gpu = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if gpu else "cpu"
    peak = bf16_peak(name) if gpu else None
    record: dict = {
        "device": name,
        "bf16_peak_flops": peak,
        "smoke": args.smoke,
        "versions": environment.library_versions(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if not gpu and not args.smoke:
        message = (
            "no CUDA GPU here: the GPU parts (a)-(c) are skipped. Run this on a GPU machine, or "
            "pass --smoke to run every part on CPU at toy sizes"
        )
        print(message)
        return {**record, "skipped": message}
    if not gpu:
        print("no CUDA GPU here: running every part on CPU at toy sizes (--smoke); no GPU numbers")
    if not ray.is_initialized():
        ray.init()
    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    steps, rows = (4, 300) if args.smoke else (args.steps, args.rows)
    gpus = 1.0 if gpu else 0.0
    tokenizer = load_tokenizer("minilm")
    corpus = workdir / "corpus"
    make_corpus(corpus, rows=rows, files=8, seed=0, junk_fraction=0.02)

    # (a) MiniLM on one worker, bf16 autocast on GPU
    minilm = ["model.encoder=tiny-random", "data.max_length=32"] if args.smoke else []
    part_a = train_part(
        "minilm",
        [*minilm, f"data.max_train_examples={steps * BATCH}", "data.max_validation_examples=2000", "stage2.epochs=3"],
        workdir,
        gpu,
    )
    print(f"(a) {part_a['encoder']}: {part_a['steps']} steps x {BATCH}, {part_a['samples_per_s']:.0f} samples/s")
    record["train_minilm"] = part_a

    # (b) bert-base-sized, random weights: training steps and tagging, with MFU
    bert_dir = workdir / "bert-base-random"
    bert_config = random_bert(bert_dir, tiny=args.smoke)
    part_b = train_part(
        "bert-base",
        [
            f"model.encoder={bert_dir}",
            f"data.max_train_examples={steps * BATCH}",
            "data.max_validation_examples=512",
            "stage2.epochs=0",
        ],
        workdir,
        gpu,
    )
    from emotions.data import load_labelled

    train_texts = load_labelled("goemotions:train").take(steps * BATCH, 0).texts
    tokens_train = mean_tokens(train_texts, tokenizer, part_b["max_length"])
    train_flops = 3 * encoder_flops_per_token(bert_config, tokens_train) * tokens_train  # per example
    tag_b = tag_part(part_b["bundle"], corpus, workdir / "tagged-bert", "fp32", gpus)
    import pyarrow.dataset

    corpus_texts = [
        t
        for t in pyarrow.dataset.dataset(corpus).to_table(columns=["body"]).column("body").to_pylist()
        if isinstance(t, str) and t.strip()
    ][:20000]
    tokens_tag = mean_tokens(corpus_texts, tokenizer, part_b["max_length"])
    tag_flops = encoder_flops_per_token(bert_config, tokens_tag) * tokens_tag  # per row
    part_b.update(
        tag_fp32=tag_b,
        mean_tokens_train=tokens_train,
        mean_tokens_tag=tokens_tag,
        train_flops_per_example=train_flops,
        tag_flops_per_row=tag_flops,
    )
    if peak:
        part_b["train_mfu"] = part_b["samples_per_s"] * train_flops / peak
        part_b["tag_mfu"] = tag_b.get("rows_per_s", 0) * tag_flops / peak
    print(
        f"(b) bert-base-sized: train {part_b['samples_per_s']:.0f} samples/s"
        + (f" (MFU {part_b['train_mfu']:.1%})" if peak else "")
        + f"; tag {tag_b.get('rows_per_s', 0):.0f} rows/s"
        + (f" (MFU {part_b['tag_mfu']:.1%})" if peak else "")
    )
    record["bert_base"] = part_b

    # (c) the MiniLM bundle tags the corpus in fp32 and bf16; quality delta on dev
    runs = {p: tag_part(part_a["bundle"], corpus, workdir / f"tagged-{p}", p, gpus) for p in ("fp32", "bf16")}
    quality = dev_quality(part_a["bundle"], "cuda" if gpu else "cpu")
    speed = runs["bf16"].get("rows_per_s", 0) / max(runs["fp32"].get("rows_per_s", 0), 1e-9)
    record["precision"] = {
        "rows": rows,
        "fp32": runs["fp32"],
        "bf16": runs["bf16"],
        "bf16_over_fp32_rows_per_s": speed,
        "dev_quality": quality,
    }
    print(
        f"(c) {rows:,} rows: fp32 {runs['fp32'].get('rows_per_s', 0):.0f} rows/s, bf16 "
        f"{runs['bf16'].get('rows_per_s', 0):.0f} rows/s ({speed:.2f}x)"
        + (f" [bf16 refused: {runs['bf16']['refused']}]" if "refused" in runs["bf16"] else "")
        + f"; dev held-out macro-F1 fp32 {quality['heldout_macro_f1_fp32']:.4f} vs bf16 "
        f"{quality['heldout_macro_f1_bf16']:.4f} ({quality['change']:+.4f}, 95% interval "
        f"{quality['interval_95'][0]:+.4f} to {quality['interval_95'][1]:+.4f})"
    )
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every part on CPU at toy sizes (what CI runs)")
    parser.add_argument("--steps", type=int, default=300, help="stage-1 training steps per model (default 300)")
    parser.add_argument("--rows", type=int, default=200_000, help="rows tagged in fp32 and in bf16 (default 200k)")
    parser.add_argument("--output", default=None, help="JSON file (default benchmarks/results/gpu_check[_cpu].json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    record = run(args)
    record["total_s"] = time.perf_counter() - start
    import torch

    default = RESULTS / ("gpu_check.json" if torch.cuda.is_available() else "gpu_check_cpu.json")
    output = Path(args.output) if args.output else default
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"{record['total_s']:.0f} s in all; results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
