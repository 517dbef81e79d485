"""Bulk tagging throughput and memory, measured side by side in one run on the same corpus and bundle.

1. ``tag_corpus`` (Ray Data, default actor pool; fp32 and int8) vs a naive single-process loop:
   batches of 64 texts in input order, tokenizer padding to the batch's longest text, forward,
   sigmoid, thresholds (what a Hugging Face ``pipeline`` loop does). Both end to end: Parquet in,
   Parquet out, model loading included; the Ray cluster is started before timing (a service).
2. Peak memory (RSS of the driver + every Ray worker, sampled with psutil) for the corpus and for
   one ``--scale`` times larger.
3. Validation macro-F1 on GoEmotions dev with the int8-quantized model vs fp32.

    python benchmarks/tag_throughput.py [--model /tmp/default_run/bundle] [--rows 10000]

Prints a table and writes benchmarks/results/tag_throughput.json. Goals on 2 cores: tag_corpus
fp32 >= 2.0x the naive loop; peak memory at 10x the rows <= 1.3x; int8 moves macro-F1 <= 0.005.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from emotions.bundle import load_bundle
from emotions.corpus import make_corpus
from emotions.data import load_labelled
from emotions.labels import EMOTIONS
from emotions.metrics import compute_metrics
from emotions.tagging import quantize_int8, tag_corpus

RESULTS = Path(__file__).parent / "results" / "tag_throughput.json"
NAIVE_BATCH = 64


def naive_loop(model_path: str, corpus: Path, output: Path) -> float:
    """Rows/s of the plain loop, end to end, with torch's default threads (all cores)."""
    start = time.perf_counter()
    bundle = load_bundle(model_path)
    schema = pa.schema([("id", pa.string()), ("body", pa.large_string())])  # files mix string types
    table = pa.concat_tables(pq.read_table(f, columns=["id", "body"]).cast(schema)
                             for f in sorted(corpus.glob("*.parquet")))  # fmt: skip
    texts = [t if isinstance(t, str) else "" for t in table.column("body").to_pylist()]
    emotions = []
    with torch.inference_mode():
        for i in range(0, len(texts), NAIVE_BATCH):
            batch = bundle.tokenizer(texts[i : i + NAIVE_BATCH], padding=True, truncation=True,
                                     max_length=bundle.max_length, return_tensors="pt")  # fmt: skip
            probs = torch.sigmoid(bundle.model(batch["input_ids"], batch["attention_mask"])).numpy()
            emotions += [[EMOTIONS[j] for j in np.flatnonzero(row)] for row in probs >= bundle.thresholds]
    output.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": table.column("id"), "emotions": emotions}), output / "tagged.parquet")
    return len(texts) / (time.perf_counter() - start)


class PeakRSS:
    """Samples the summed RSS of this process and every ``ray::`` worker process, every 0.2 s."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        total = psutil.Process().memory_info().rss
        for proc in psutil.process_iter(["name", "cmdline", "memory_info"]):
            title = " ".join(proc.info["cmdline"] or []) or proc.info["name"] or ""
            if title.startswith("ray::") and proc.info["memory_info"]:
                total += proc.info["memory_info"].rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(0.2)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def tagged(model: str, corpus: Path, output: Path, **kwargs) -> tuple[float, int, dict]:
    """(rows/s end to end, peak RSS bytes, summary) of one tag_corpus run."""
    with PeakRSS() as rss:
        summary = tag_corpus(model, corpus, output, overwrite=True, **kwargs)
    return summary.rows_per_s, rss.peak, summary


def int8_f1_change(model: str) -> dict:
    """Macro-F1 on GoEmotions dev at the bundle's thresholds, fp32 vs int8 (CPU)."""
    dev = load_labelled("goemotions:dev")
    bundle = load_bundle(model)
    fp32 = compute_metrics(dev.labels, bundle.predict_proba(dev.texts), bundle.thresholds)["macro_f1"]
    bundle.model = quantize_int8(bundle.model)
    int8 = compute_metrics(dev.labels, bundle.predict_proba(dev.texts), bundle.thresholds)["macro_f1"]
    return {"dev_examples": len(dev), "macro_f1_fp32": fp32, "macro_f1_int8": int8, "macro_f1_change": int8 - fp32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/default_run/bundle")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--scale", type=int, default=10, help="the memory check's larger corpus, x rows")
    parser.add_argument("--work", default="/tmp/emotions-tag-bench")
    args = parser.parse_args()

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    corpus, big = work / "corpus", work / "corpus-big"
    make_corpus(corpus, args.rows, args.files, seed=0)
    make_corpus(big, args.rows * args.scale, args.files * args.scale, seed=1)
    bundle = load_bundle(args.model)
    rows = {"model": args.model, "model_hash": bundle.hash, "max_length": bundle.max_length,
            "encoder": bundle.config["model"]["encoder"], "rows": args.rows, "files": args.files,
            "machine_cpus": os.cpu_count(), "naive_batch": NAIVE_BATCH, "naive_torch_threads": torch.get_num_threads()}  # fmt: skip
    del bundle

    naive = naive_loop(args.model, corpus, work / "naive")  # before Ray: it has the machine alone
    ray.init(include_dashboard=False, log_to_driver=False)
    fp32, fp32_rss, summary = tagged(args.model, corpus, work / "fp32")
    int8, _, _ = tagged(args.model, corpus, work / "int8", int8=True)
    _, big_rss, big_summary = tagged(args.model, big, work / "fp32-big")
    ray.shutdown()
    quality = int8_f1_change(args.model)

    manifest = json.loads(Path(summary.manifest).read_text())
    rows.update({
        "actors": manifest["actors"], "rows_flagged": summary.rows_flagged,
        "naive_rows_per_s": naive, "tag_fp32_rows_per_s": fp32, "tag_int8_rows_per_s": int8,
        "fp32_vs_naive": fp32 / naive, "int8_vs_naive": int8 / naive,
        "peak_rss_mb": fp32_rss / 2**20, f"peak_rss_mb_{args.scale}x": big_rss / 2**20,
        "big_rows": big_summary.rows_out, "big_rows_per_s": big_summary.rows_per_s,
        f"peak_rss_{args.scale}x_vs_1x": big_rss / fp32_rss, **quality,
    })  # fmt: skip
    print(f"\ntagging {args.rows:,} rows in {args.files} files ({summary.rows_flagged} flagged), "
          f"{rows['encoder']} max_length {rows['max_length']}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'':44}{'rows/s':>9}{'ratio':>8}   goal")
    print(f"{'naive loop (batches of 64, input order)':44}{naive:9.1f}{1.0:8.2f}")
    print(f"{'tag_corpus fp32 (Ray Data, default pool)':44}{fp32:9.1f}{fp32 / naive:8.2f}   >= 2.0")
    print(f"{'tag_corpus int8':44}{int8:9.1f}{int8 / naive:8.2f}")
    print(f"\n{'peak RSS, driver + Ray workers':44}{'MiB':>9}{'ratio':>8}")
    print(f"{f'{args.rows:,} rows':44}{fp32_rss / 2**20:9.0f}{1.0:8.2f}")
    print(f"{f'{big_summary.rows_out:,} rows':44}{big_rss / 2**20:9.0f}{big_rss / fp32_rss:8.2f}   <= 1.3")
    print(f"\nmacro-F1 on GoEmotions dev: fp32 {quality['macro_f1_fp32']:.4f}, int8 "
          f"{quality['macro_f1_int8']:.4f} (change {quality['macro_f1_change']:+.4f}; allowed 0.005)")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
