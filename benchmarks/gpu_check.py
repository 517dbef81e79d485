"""The prepared GPU check: one command, a few minutes on one GPU, every number in one JSON file.

    python benchmarks/gpu_check.py                 # on a GPU machine: the real check (< 5 min, one H100)
    python benchmarks/gpu_check.py --smoke         # anywhere: the same code paths at toy sizes on CPU

(a) Ray Train, one GPU worker: the embedded MiniLM (default preset) for ``--steps`` stage-1 steps
    under the GPU's autocast (bf16; fp16 + GradScaler on GPUs without native bf16), then a short
    stage 2, so the run yields a real bundle; samples/s.
(b) The shipped bert-base job's recipe (the bert-base preset: ``max_length`` 128, 32 rows per
    worker, bf16; random weights from ``BertConfig()``: no hub here) through the same Ray Train
    steps on one GPU worker: samples/s and model FLOPs utilisation. The shipped job runs four such
    workers in DDP on one 4-GPU node; one GPU cannot show the all-reduce, whose arithmetic is in
    benchmarks/ddp_step_time.py. Then the encoder pass tagging actors run (``predict_tokens``) over
    the corpus, tokenized beforehand and timed alone, in bf16 and in fp32 with TF32 matmuls: rows/s
    and MFU, each against its own dense peak (bf16; TF32 is half the bf16 peak on these data
    sheets). ``emotions tag``'s whole-command rows/s (start-up, hashing, actor start included) is
    reported beside it, not as MFU.
(c) The MiniLM bundle from (a) through ``emotions tag`` in fp32 (TF32 where the GPU has it) and in
    bf16: rows/s of each; the precision gate run on the GPU for bf16 (what training records on a GPU
    run and ``--precision auto`` reads), and TF32 fp32 against IEEE fp32 (the thresholds' own
    numerics) on the whole dev split: held-out macro-F1 change with its 95% interval.
(d) Everything goes to benchmarks/results/gpu_check.json (gpu_check_cpu.json when no GPU ran).

Without a CUDA GPU the GPU parts are skipped with a message saying so; ``--smoke`` runs every part
on CPU with a tiny model and a few hundred rows, so CI keeps this script working.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (half the "with sparsity"
# figures), matched on the device name by pattern: "L4" must not match an L40 or L40S.
BF16_PEAK = {
    r"H200": 989.4e12,
    r"H100 NVL": 835.5e12,
    r"H100 PCIe": 756.0e12,
    r"H100": 989.4e12,
    r"A100": 312.0e12,
    r"L40S": 362.1e12,
    r"L40(?!S)": 181.05e12,
    r"\bL4\b": 121.0e12,
    r"A10G": 70.0e12,
    r"\bA10\b": 125.0e12,
}
BATCH = 32  # stage-1 batch per worker (both presets)
TAG_ROWS = 50_000  # corpus rows through the bert-base encoder pass, per precision


def bf16_peak(device_name: str) -> float | None:
    return next((peak for pattern, peak in BF16_PEAK.items() if re.search(pattern, device_name)), None)


def encoder_flops_per_token(config: dict, tokens: float) -> float:
    """Forward FLOPs per token of a BERT encoder at mean sequence length ``tokens``: 2 x the
    non-embedding weights (every token meets each once) + attention's two [seq x seq] products."""
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    weights = layers * (4 * h * h + 2 * h * inter)
    return 2 * weights + layers * 4 * tokens * h


def mean_tokens(texts: list[str], tokenizer, max_length: int) -> float:
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    return float(np.mean(lengths))


def train_part(name: str, preset: str, overrides: list[str], workdir: Path, use_gpu: bool) -> dict:
    """A Ray Train run of ``preset`` on one worker with ``overrides``; stage-1 samples/s and the bundle."""
    from emotions.config import build_config
    from emotions.training import train

    config = build_config(
        preset,
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
        "preset": preset,
        "samples_per_s": stage1["samples_per_s"],
        "epoch_s": stage1["epoch_seconds"],
        "train_precision": stage1.get("train_precision"),
        "examples": config.data.max_train_examples,
        "steps": -(-config.data.max_train_examples // BATCH),
        "wall_s": seconds,
        "encoder": config.model.encoder,
        "max_length": config.data.max_length,
    }


def tag_part(bundle: str, corpus: Path, out: Path, precision: str, gpus: float) -> dict:
    """``emotions tag`` end to end: rows/s over the whole command (start-up included)."""
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


def encoder_pass(bundle_path: str, tokens, device: str, flops_per_row: float, peak: float | None) -> dict:
    """The encoder loop a tagging actor runs (``predict_tokens``) over ``tokens`` (texts tokenized
    beforehand, as tagging does: ``tokenize_texts``), timed alone (after a warm-up pass), in bf16 and in
    fp32 (TF32 matmuls where the GPU has them): rows/s, and MFU against the matching dense peak (TF32's
    is half of bf16's on these data sheets)."""
    import torch

    from emotions.bundle import load_bundle
    from emotions.tagging.predictor import ENCODER_BATCH, predict_tokens, tagging_tf32

    bundle = load_bundle(bundle_path, device=device)
    pad_id, batch = bundle.tokenizer.pad_token_id or 0, ENCODER_BATCH["cuda" if device == "cuda" else "cpu"]
    out = {"rows": len(tokens)}
    for precision in ("bf16", "fp32"):
        predict_tokens(bundle.model, tokens.select(np.arange(min(512, len(tokens)))), pad_id, batch, precision, device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        predict_tokens(bundle.model, tokens, pad_id, batch, precision, device)  # ends in .cpu(): synchronised
        rate = len(tokens) / (time.perf_counter() - start)
        tf32 = precision == "fp32" and tagging_tf32(precision, device)
        own_peak = (peak / 2 if tf32 else peak) if peak and (precision == "bf16" or tf32) else None
        out[precision] = {
            "rows_per_s": rate,
            "matmuls": "tf32" if tf32 else precision,
            "mfu": rate * flops_per_row / own_peak if own_peak else None,
        }
    return out


def dev_quality(bundle_path: str, device: str, examples: int | None = None) -> dict:
    """On GoEmotions dev (or a seeded ``examples`` of it), on ``device``, through the loop tagging's
    actors run (``inference.run_rows``): the precision gate for bf16 as training runs it on a GPU
    (``precision.check_runtimes`` on this device: held-out macro-F1 of fp32 and bf16, thresholds
    fitted on one half of dev and scored on the other, both ways, the paired change with its 95%
    bootstrap interval, the most over-tagged label's share against fp32, allowed or refused), and
    fp32 with TF32 matmuls against IEEE fp32 the same way (``evaluation.paired_change``)."""
    from emotions.batching import tokenize
    from emotions.bundle import load_bundle
    from emotions.data import load_labelled
    from emotions.evaluation import paired_change
    from emotions.inference import run_rows
    from emotions.precision import CPU_BATCH, GPU_BATCH, check_runtimes, describe_device, uses_tf32

    bundle = load_bundle(bundle_path, device=device)
    dev = load_labelled("goemotions:dev").take(examples, 0)
    gpu = describe_device(device)
    check = check_runtimes(bundle, ["bf16"], device=gpu, validation=dev)["bf16"]
    tokens = tokenize(dev.texts, dev.labels, bundle.tokenizer, bundle.max_length)
    pad_id, batch = bundle.tokenizer.pad_token_id or 0, GPU_BATCH if device == "cuda" else CPU_BATCH
    probs = {
        tf32: run_rows(bundle.model, tokens, pad_id, batch_size=batch, device=device, tf32=tf32).cpu().numpy()
        for tf32 in (False, True)
    }
    tf32 = paired_change(dev.labels, probs[False], probs[True])
    return {
        "examples": len(dev),
        "device": str(gpu),
        "heldout_macro_f1_fp32": check["heldout_macro_f1_reference"],
        "heldout_macro_f1_bf16": check["heldout_macro_f1_candidate"],
        "change": check["change"],
        "interval_95": check["interval_95"],
        "rows_changed": check["rows_changed"],
        "share_change": check["share_change"],
        "bf16_allowed": check["allowed"],
        "bf16_speedup": check["speedup"],
        "bf16_verdict": check["verdict"],
        "tf32_on_this_device": uses_tf32(gpu),
        "tf32_change": tf32["change"],
        "tf32_interval_95": tf32["interval_95"],
        "tf32_rows_changed": tf32["rows_changed"],
    }


def minilm_weights(folder: Path) -> Path | None:
    """None where the embedded MiniLM holds its weights. Else (the device machine's payload,
    benchmarks/gpu_device.sh, carries its config and tokenizer but not its 91 MB of weights) a
    MiniLM of the same shape with random weights, saved in ``folder``: the same speed, but quality
    figures from it are not the default bundle's."""
    from transformers import BertConfig, BertModel

    from emotions.encoders import minilm_path
    from emotions.model import load_tokenizer

    if (minilm_path() / "model.safetensors").exists():
        return None
    BertModel(BertConfig.from_pretrained(minilm_path()), add_pooling_layer=False).save_pretrained(folder)
    load_tokenizer("minilm").save_pretrained(folder)
    print(f"the embedded MiniLM has no weights here: a MiniLM with random weights stands in ({folder})")
    return folder


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


def run(args: argparse.Namespace, record: dict) -> dict:
    """The check, filling ``record`` part by part (so a failure in a later part keeps the earlier
    parts' numbers: ``main`` writes what there is)."""
    import ray
    import torch

    from emotions import environment
    from emotions.corpus import make_corpus
    from emotions.model import load_tokenizer

    gpu = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if gpu else "cpu"
    peak = bf16_peak(name) if gpu else None
    record.update(
        device=name,
        bf16_peak_flops=peak,
        smoke=args.smoke,
        versions=environment.library_versions(),
        started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    if not gpu and not args.smoke:
        message = (
            "no CUDA GPU here: the GPU parts (a)-(c) are skipped. Run this on a GPU machine, or "
            "pass --smoke to run every part on CPU at toy sizes"
        )
        print(message)
        record["skipped"] = message
        return record
    if not gpu:
        print("no CUDA GPU here: running every part on CPU at toy sizes (--smoke); no GPU numbers")
    if not ray.is_initialized():
        ray.init()
    if gpu and not ray.cluster_resources().get("GPU"):  # Ray Train would wait for one without end
        raise SystemExit(f"torch sees {name}, but Ray does not: {ray.cluster_resources()}")
    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    steps, rows = (4, 300) if args.smoke else (args.steps, args.rows)
    gpus = 1.0 if gpu else 0.0
    tokenizer = load_tokenizer("minilm")
    corpus = workdir / "corpus"
    make_corpus(corpus, rows=rows, files=8, seed=0, junk_fraction=0.02)

    # (a) MiniLM on one worker, the GPU's autocast
    minilm = ["model.encoder=tiny-random", "data.max_length=32"] if args.smoke else []
    if not args.smoke and (weights := minilm_weights(workdir / "minilm-random")) is not None:
        minilm.append(f"model.encoder={weights}")  # the device machine: no room for the weights
        record["minilm_weights"] = "random (the embedded package came without model.safetensors)"
    part_a = train_part(
        "minilm",
        "default",
        [*minilm, f"data.max_train_examples={steps * BATCH}", "data.max_validation_examples=2000", "stage2.epochs=3"],
        workdir,
        gpu,
    )
    print(
        f"(a) {part_a['encoder']}: {part_a['steps']} steps x {BATCH} in {part_a['train_precision']}, "
        f"{part_a['samples_per_s']:.0f} samples/s"
    )
    record["train_minilm"] = part_a

    # (b) the shipped bert-base recipe, random weights: training steps, the encoder pass, tagging
    bert_dir = workdir / "bert-base-random"
    bert_config = random_bert(bert_dir, tiny=args.smoke)
    part_b = train_part(
        "bert-base",
        "bert-base",
        [
            f"model.encoder={bert_dir}",
            f"data.max_train_examples={steps * BATCH}",
            "data.max_validation_examples=512",
            "stage2.epochs=0",
            f"scaling.cpus_per_worker={min(4, os.cpu_count() or 1)}",
            *(["data.max_length=32"] if args.smoke else []),
        ],
        workdir,
        gpu,
    )
    from emotions.data import load_labelled

    train_texts = load_labelled("goemotions:train").take(steps * BATCH, 0).texts
    tokens_train = mean_tokens(train_texts, tokenizer, part_b["max_length"])
    train_flops = 3 * encoder_flops_per_token(bert_config, tokens_train) * tokens_train  # per example
    import pyarrow.dataset

    corpus_texts = [
        t
        for t in pyarrow.dataset.dataset(corpus).to_table(columns=["body"]).column("body").to_pylist()
        if isinstance(t, str) and t.strip()
    ][: 300 if args.smoke else TAG_ROWS]
    from emotions.tagging.predictor import tokenize_texts

    corpus_tokens = tokenize_texts(corpus_texts, tokenizer, part_b["max_length"])  # what encoder_pass encodes
    tokens_tag = float(np.mean(corpus_tokens.lengths))
    tag_flops = encoder_flops_per_token(bert_config, tokens_tag) * tokens_tag  # per row
    device = "cuda" if gpu else "cpu"
    encoder = encoder_pass(part_b["bundle"], corpus_tokens, device, tag_flops, peak)
    tag_b = tag_part(part_b["bundle"], corpus, workdir / "tagged-bert", "bf16", gpus)
    part_b.update(
        encoder_pass=encoder,
        tag_command_bf16=tag_b,
        mean_tokens_train=tokens_train,
        mean_tokens_tag=tokens_tag,
        train_flops_per_example=train_flops,
        tag_flops_per_row=tag_flops,
        train_mfu=part_b["samples_per_s"] * train_flops / peak if peak else None,
    )

    def mfu(value) -> str:
        return f" (MFU {value:.1%})" if value is not None else ""

    print(
        f"(b) bert-base recipe (max_length {part_b['max_length']}, {part_b['train_precision']}): train "
        f"{part_b['samples_per_s']:.0f} samples/s{mfu(part_b['train_mfu'])}; encoder pass "
        f"bf16 {encoder['bf16']['rows_per_s']:.0f} rows/s{mfu(encoder['bf16']['mfu'])}, fp32 "
        f"({encoder['fp32']['matmuls']} matmuls) {encoder['fp32']['rows_per_s']:.0f} rows/s"
        f"{mfu(encoder['fp32']['mfu'])}; "
        f"`emotions tag` bf16, whole command: {tag_b.get('rows_per_s', 0):.0f} rows/s"
        + (f" [refused: {tag_b['refused']}]" if "refused" in tag_b else "")
    )
    record["bert_base"] = part_b

    # (c) the MiniLM bundle tags the corpus in fp32 (TF32) and bf16; the bf16 gate and TF32 on dev
    runs = {p: tag_part(part_a["bundle"], corpus, workdir / f"tagged-{p}", p, gpus) for p in ("fp32", "bf16")}
    quality = dev_quality(part_a["bundle"], device, examples=600 if args.smoke else None)
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
        + f"; bf16 gate on {quality['device']}: {'allowed' if quality['bf16_allowed'] else 'REFUSED'}, dev held-out "
        f"macro-F1 fp32 {quality['heldout_macro_f1_fp32']:.4f} vs bf16 {quality['heldout_macro_f1_bf16']:.4f} "
        f"({quality['change']:+.4f}, 95% interval {quality['interval_95'][0]:+.4f} to "
        f"{quality['interval_95'][1]:+.4f}); TF32 vs IEEE fp32: {quality['tf32_change']:+.4f} "
        f"({quality['tf32_rows_changed']:.2%} of rows change)"
        + ("" if quality["tf32_on_this_device"] else " [no TF32 on this device: the same numerics]")
    )
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every part on CPU at toy sizes (what CI runs)")
    parser.add_argument("--steps", type=int, default=200, help="stage-1 training steps per model (default 200)")
    parser.add_argument("--rows", type=int, default=50_000, help="rows tagged in fp32 and in bf16 (default 50k)")
    parser.add_argument(
        "--output",
        default=None,
        help="JSON file (default: $OUT/gpu_check.json where $OUT is set, as on the device machine, "
        "else benchmarks/results/gpu_check[_cpu].json)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    default = RESULTS / ("gpu_check.json" if torch.cuda.is_available() else "gpu_check_cpu.json")
    if os.environ.get("OUT"):
        default = Path(os.environ["OUT"]) / default.name
    output = Path(args.output) if args.output else default
    start, record = time.perf_counter(), {}
    try:
        run(args, record)
    except BaseException as error:
        record["failed"] = f"{type(error).__name__}: {error}"
        raise
    finally:
        record["total_s"] = time.perf_counter() - start
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"{record['total_s']:.0f} s in all; results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
