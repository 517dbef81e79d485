"""Bulk tagging throughput and memory, measured side by side in one run on the same corpus and bundle.

1. ``tag_corpus`` (Ray Data, default actor pool; fp32 and int8) vs a naive single-process loop:
   batches of 64 texts in input order, tokenizer padding to the batch's longest text, forward,
   sigmoid, thresholds (what a Hugging Face ``pipeline`` loop does). Both end to end: Parquet in,
   Parquet out, model loading included; the Ray cluster is started before timing (a service).
   ``--repeats`` alternating rounds, best of each side.
2. Peak memory (RSS of the driver + the Ray processes it started, sampled with psutil) for a
   ``--memory-rows`` corpus and for one ``--scale`` times larger.
3. Validation macro-F1 with bf16 and with the int8-quantized model vs fp32 (the gate
   ``tag_corpus(precision=...)`` applies; each is only timed when the bundle passes it).
4. The driver's own peak RSS for each ``--driver-rows`` corpus (100k and 2M rows), each in a fresh
   driver process with its own local Ray (VmHWM of that process alone: Ray's workers are other
   processes), so it shows whether tagged rows reach the driver. With ``--old-code`` (a
   checkout of the code before workers wrote the output), the same corpus is tagged by the old
   and the new code, each in a fresh driver, and with the new code's Tokenizer stage on CPU.

    python benchmarks/tag_throughput.py [--model /tmp/default_run/bundle] [--rows 30000] \
        [--driver-rows 100000 2000000] [--old-code /tmp/old_tagging]

The speed corpus (30,000 rows) is large enough that the pool's start-up (actors importing torch and
loading the bundle, ~10 s) is not most of the run, as it would not be in a nightly job of millions
of rows; ``--rows 10000`` shows the start-up's weight on a small input.

Prints a table and writes benchmarks/results/tag_throughput.json. Goals on 2 cores: tag_corpus
fp32 >= 2.0x the naive loop; peak memory at 10x the rows <= 1.3x; int8 moves macro-F1 <= 0.005;
the driver's peak RSS at 2M rows <= 1.1x its peak at 100k; the new code's rows/s >= the old code's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from emotions import tagging  # the module only: --probe may run an older checkout of it
from emotions.bundle import load_bundle
from emotions.corpus import make_corpus
from emotions.environment import setup_logging
from emotions.labels import EMOTIONS

RESULTS = Path(__file__).parent / "results" / "tag_throughput.json"
ROOT = Path(__file__).resolve().parents[1]
NAIVE_BATCH = 64
DRIVER_ROWS_PER_FILE = 25_000  # the driver-memory corpora: 4 files at 100k rows, 80 at 2M


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
    """Samples the summed RSS of this process and its descendants (the local Ray: GCS, raylet,
    every worker and actor), every 0.2 s. Other Ray clusters on the machine are not counted."""

    def __init__(self, children: bool = True):
        self.peak, self.children, self._stop = 0, children, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for proc in me.children(recursive=True) if self.children else ():
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                pass
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
        summary = tagging.tag_corpus(model, corpus, output, overwrite=True, **kwargs)
    return summary.rows_per_s, rss.peak, summary


def peak_rss_mb() -> float:
    """This process's peak RSS since it was started (Linux VmHWM). Not getrusage's ru_maxrss:
    that keeps the peak of the parent the process was forked from (here, the benchmark, which
    holds the 2M-row corpus it made), across exec."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 2**10 for line in status if line.startswith("VmHWM:"))


def probe(model: str, corpus: str, output: str, tokenize_stage: bool) -> None:
    """``--probe``: this process is the driver of one tag_corpus run on its own local Ray; prints
    one JSON line with its rows/s and its own memory (not Ray's worker processes')."""
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    before = psutil.Process().memory_info().rss
    kwargs = {"tokenize_stage": True} if tokenize_stage else {}  # the old code has no such argument
    with PeakRSS(children=False) as rss:
        summary = tagging.tag_corpus(model, corpus, output, overwrite=True, **kwargs)
    ray.shutdown()
    print(json.dumps({"code": tagging.__file__, "rows": summary.rows_out, "rows_per_s": summary.rows_per_s,
                      "driver_hwm_mb": peak_rss_mb(),
                      "driver_peak_mb": rss.peak / 2**20, "driver_before_mb": before / 2**20,
                      "driver_growth_mb": (rss.peak - before) / 2**20}))  # fmt: skip


def fresh_driver(model: str, corpus: Path, output: Path, code: str | None = None,
                 tokenize_stage: bool = False) -> dict:  # fmt: skip
    """One ``--probe`` run in a new process (``code``: a checkout to import emotions from)."""
    env = dict(os.environ, **({"PYTHONPATH": code} if code else {}))
    command = [sys.executable, os.path.abspath(__file__), "--probe", "--model", model, "--corpus", str(corpus),
               "--output", str(output), *(["--tokenize-stage"] if tokenize_stage else [])]  # fmt: skip
    # Ray's workers put the driver's working directory first on sys.path: run in the checkout.
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=code or ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"  {row['rows']:>9,} rows  {row['rows_per_s']:8.1f} rows/s  driver peak {row['driver_hwm_mb']:6.0f} MiB"
          f"  ({row['code']}{', tokenizer stage' if tokenize_stage else ''})", flush=True)  # fmt: skip
    return row


def driver_memory(args, work: Path) -> dict:
    """Section 4: the driver's peak RSS per corpus size; old vs new code (and the new code's
    Tokenizer stage) on the smallest corpus, each in a fresh driver."""
    rows: dict = {"driver_rows_per_file": DRIVER_ROWS_PER_FILE}
    corpora = {}
    for n in args.driver_rows:
        corpora[n] = work / f"corpus-driver-{n}"
        make_corpus(corpora[n], n, max(1, n // DRIVER_ROWS_PER_FILE), seed=3)
    first = corpora[args.driver_rows[0]]
    for _ in range(args.repeats):  # alternating: a shared machine's busy spells hit all alike
        if args.old_code:
            rows.setdefault("old_runs", []).append(fresh_driver(args.model, first, work / "old", args.old_code))
        rows.setdefault("new_runs", []).append(fresh_driver(args.model, first, work / "new"))
        rows.setdefault("stage_runs", []).append(fresh_driver(args.model, first, work / "stage", tokenize_stage=True))
    rows["driver"] = {n: rows["new_runs"][0] if n == args.driver_rows[0]
                      else fresh_driver(args.model, path, work / "big") for n, path in corpora.items()}  # fmt: skip
    if args.old_code and args.old_big:
        rows["driver_old"] = {n: fresh_driver(args.model, path, work / "old-big", args.old_code)
                              for n, path in corpora.items() if n != args.driver_rows[0]}  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/default_run/bundle")
    parser.add_argument("--rows", type=int, default=30_000, help="rows of the speed corpus")
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--memory-rows", type=int, default=10_000, help="the memory check's smaller corpus")
    parser.add_argument("--scale", type=int, default=10, help="the memory check's larger corpus, x --memory-rows")
    parser.add_argument("--driver-rows", type=int, nargs="+", default=[100_000, 2_000_000],
                        help="corpora for the driver's own peak RSS, each tagged by a fresh driver")
    parser.add_argument("--old-code", default=None, metavar="CHECKOUT",
                        help="a checkout of the earlier code (git worktree add /tmp/old_tagging <commit>): "
                             "tags the first --driver-rows corpus too, for old vs new rows/s")
    parser.add_argument("--old-big", action="store_true", help="the old code tags the larger corpora too")
    parser.add_argument("--work", default="/tmp/emotions-tag-bench")
    parser.add_argument("--repeats", type=int, default=2,
                        help="alternating rounds of naive + fp32 (and of old + new code); the best of each counts")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # one fresh-driver run
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--tokenize-stage", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args.model, args.corpus, args.output, args.tokenize_stage)
    setup_logging()  # tag_corpus's progress and summary lines

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    corpus, small, big = work / "corpus", work / "corpus-small", work / "corpus-big"
    make_corpus(corpus, args.rows, args.files, seed=0)
    make_corpus(small, args.memory_rows, 8, seed=1)
    make_corpus(big, args.memory_rows * args.scale, 8 * args.scale, seed=2)
    bundle = load_bundle(args.model)
    rows = {"model": args.model, "model_hash": bundle.hash, "max_length": bundle.max_length,
            "encoder": bundle.config["model"]["encoder"], "rows": args.rows, "files": args.files,
            "machine_cpus": os.cpu_count(), "naive_batch": NAIVE_BATCH,
            "naive_torch_threads": torch.get_num_threads()}  # fmt: skip

    # The gate tag_corpus(precision=...) applies: the bundle's validation data, fp32 vs each.
    quality = {p: tagging.check_precision(bundle, p) for p in ("bf16", "int8")}
    del bundle
    # Alternating rounds, best of each: a shared machine's busy spells hit both sides alike.
    ray.init(include_dashboard=False, log_to_driver=False)
    naive_runs, fp32_runs = [], []
    for _ in range(args.repeats):
        naive_runs.append(naive_loop(args.model, corpus, work / "naive"))
        fp32_runs.append(tagged(args.model, corpus, work / "fp32"))
    naive, (fp32, _, summary) = max(naive_runs), max(fp32_runs, key=lambda run: run[0])
    other = {p: tagged(args.model, corpus, work / p, precision=p)[0] if quality[p]["allowed"] else None
             for p in quality}  # fmt: skip
    _, small_rss, small_summary = tagged(args.model, small, work / "fp32-small")
    _, big_rss, big_summary = tagged(args.model, big, work / "fp32-big")
    ray.shutdown()
    print("\nfresh drivers (each with its own local Ray):", flush=True)
    drivers = driver_memory(args, work)

    manifest = json.loads(Path(summary.manifest).read_text())
    timings = manifest["timings"]  # startup: until the first tagged rows (actors loading the bundle)
    best = {side: max(drivers.get(f"{side}_runs", [{}]), key=lambda r: r.get("rows_per_s", 0)).get("rows_per_s")
            for side in ("old", "new", "stage")}  # fmt: skip
    sizes = sorted(drivers["driver"])
    rows.update({
        "fp32_first_output_s": timings["startup_s"],  # actors up, bundle loaded, first batch tagged
        "actors": manifest["actors"], "rows_flagged": summary.rows_flagged,
        "naive_rows_per_s": naive, "tag_fp32_rows_per_s": fp32, "fp32_vs_naive": fp32 / naive,
        "repeats": args.repeats, "naive_runs": naive_runs, "fp32_runs": [run[0] for run in fp32_runs],
        "tag_int8_rows_per_s": other["int8"], "int8_vs_naive": other["int8"] and other["int8"] / naive,
        "tag_bf16_rows_per_s": other["bf16"], "bf16_vs_naive": other["bf16"] and other["bf16"] / naive,
        "int8_encoder_speedup": quality["int8"]["fp32_s"] / quality["int8"]["int8_s"],
        "bf16_encoder_speedup": quality["bf16"]["fp32_s"] / quality["bf16"]["bf16_s"],
        "memory_rows": small_summary.rows_out, "peak_rss_mb": small_rss / 2**20,
        f"peak_rss_mb_{args.scale}x": big_rss / 2**20,
        "big_rows": big_summary.rows_out, "big_rows_per_s": big_summary.rows_per_s,
        f"peak_rss_{args.scale}x_vs_1x": big_rss / small_rss,
        "precision_checks": {p: {k: v for k, v in q.items() if k != "verdict"} for p, q in quality.items()},
        "driver_rss": drivers, "old_rows_per_s": best["old"], "new_rows_per_s": best["new"],
        "tokenizer_stage_rows_per_s": best["stage"],
        "driver_peak_rss_large_vs_small": (drivers["driver"][sizes[-1]]["driver_hwm_mb"]
                                           / drivers["driver"][sizes[0]]["driver_hwm_mb"]),
    })  # fmt: skip
    print(f"\ntagging {args.rows:,} rows in {args.files} files ({summary.rows_flagged} flagged), "
          f"{rows['encoder']} max_length {rows['max_length']}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'':44}{'rows/s':>9}{'ratio':>8}   goal")
    print(f"{'naive loop (batches of 64, input order)':44}{naive:9.1f}{1.0:8.2f}")
    print(f"{'tag_corpus fp32 (Ray Data, default pool)':44}{fp32:9.1f}{fp32 / naive:8.2f}   >= 2.0")
    print(f"{'  (first output rows after':44}{timings['startup_s']:8.1f} s)")
    for p, rate in other.items():
        if rate:
            print(f"{f'tag_corpus {p}':44}{rate:9.1f}{rate / naive:8.2f}")
        else:
            speedup = rows[f"{p}_encoder_speedup"]
            print(f"{f'tag_corpus {p}':44}{'refused':>9}          (encoder alone {speedup:.2f}x fp32)")
    print(f"\n{'peak RSS, driver + Ray processes':44}{'MiB':>9}{'ratio':>8}")
    print(f"{f'{small_summary.rows_out:,} rows':44}{small_rss / 2**20:9.0f}{1.0:8.2f}")
    print(f"{f'{big_summary.rows_out:,} rows':44}{big_rss / 2**20:9.0f}{big_rss / small_rss:8.2f}   <= 1.3")
    print(f"\n{'the driver alone, fresh process':30}" + "".join(f"{f'{n:,} rows':>14}" for n in sizes)
          + f"{'ratio':>8}   goal")  # fmt: skip
    for label, key in (("peak RSS (VmHWM), MiB", "driver_hwm_mb"),
                       ("growth while tagging, MiB", "driver_growth_mb"), ("rows/s", "rows_per_s")):  # fmt: skip
        values = [drivers["driver"][n][key] for n in sizes]
        ratio = values[-1] / values[0] if key == "driver_hwm_mb" else None
        print(f"{label:30}" + "".join(f"{v:14.1f}" for v in values)
              + (f"{ratio:8.2f}   <= 1.1" if ratio else ""))  # fmt: skip
    if drivers.get("driver_old"):
        old = drivers["driver_old"]
        print(f"{'old code: peak RSS, MiB':30}{'':14}"
              + "".join(f"{old[n]['driver_hwm_mb']:14.1f}" for n in sizes[1:]))  # fmt: skip
        print(f"{'old code: rows/s':30}{'':14}" + "".join(f"{old[n]['rows_per_s']:14.1f}" for n in sizes[1:]))
        ratio = drivers["driver"][sizes[-1]]["rows_per_s"] / old[sizes[-1]]["rows_per_s"]
        rows["new_vs_old_rows_per_s_largest"] = ratio
        print(f"{'new / old rows/s':30}{'':14}"
              + "".join(f"{drivers['driver'][n]['rows_per_s'] / old[n]['rows_per_s']:14.2f}" for n in sizes[1:])
              + "   >= 1.0")  # fmt: skip
    print(f"\nsame {sizes[0]:,}-row corpus, fresh drivers, best of {args.repeats}")
    if best["old"]:
        print(f"{'old code (driver writes)':44}{best['old']:9.1f}{1.0:8.2f}")
    base = best["old"] or best["new"]
    print(f"{'new code (workers write)':44}{best['new']:9.1f}{best['new'] / base:8.2f}   >= 1.0")
    print(f"{'new code + Tokenizer stage (CPU)':44}{best['stage']:9.1f}{best['stage'] / base:8.2f}")
    for q in quality.values():
        print(f"\n{q['verdict']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
