"""Bulk tagging speed and memory, measured side by side in one run on the same corpora and bundle.

1. Speed (``--model``, a MiniLM bundle): on real comments (GoEmotions train texts, ``--rows``) and
   on a generated Reddit-style dump with junk rows (``--synthetic-rows``), end to end (Parquet in,
   Parquet out, model loading included; the Ray cluster is started before timing, as a service),
   ``--repeats`` alternating rounds, best of each:
   - naive loop: batches of 64 texts in input order, padding to each batch's longest (what a
     Hugging Face ``pipeline`` loop does);
   - sorted loop: the project's own ``Bundle.predict_proba`` (all texts sorted by length, passes
     of 16), fp32 and int8 (the same quantized model ``tag_corpus`` runs): the best simple
     single-process code, the baseline ``emotions tag`` must match (>= 0.9x);
   - Ray's documented batch inference: ``read_parquet`` -> ``map_batches`` with a callable class on
     an actor pool -> ``write_parquet``;
   - ``tag_corpus`` in fp32, int8 and its default (auto) precision.
   Each row's rows/s, ratio to the naive loop, and percent of the compute floor: FLOPs per row
   from the encoder's config and the corpus' own token counts (no padding), over this machine's
   measured matmul rate (fp32 GEMM for fp32 rows; a dynamically quantized Linear for int8 rows).
2. The precision gate (``check_precision``) for bf16 and int8, with its held-out interval.
3. Memory (``--memory-model``, the smoke bundle, so millions of rows take minutes): the driver's
   own peak RSS (VmHWM) and its Ray workers' summed peak RSS, each corpus (``--driver-rows``,
   files of 25,000 rows in row groups of 10,000) tagged by a fresh driver process with its own
   local Ray. With ``--old-code`` (a checkout of earlier code) the same corpora are tagged by it too.

    python benchmarks/tag_throughput.py --model /tmp/default_run/bundle --memory-model /tmp/smoke_bundle

Prints tables whose goal column says ok or FAIL, and writes benchmarks/results/tag_throughput.json.
Goals on 2 cores: tag_corpus >= 0.9x the sorted loop at the same precision; tag_corpus at its default
precision >= 4x the naive loop; at 20x the rows, the driver's peak <= 1.1x and the workers' <= 1.3x.
"""

from __future__ import annotations

import argparse
import inspect
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
from emotions.data import load_labelled
from emotions.environment import setup_logging
from emotions.labels import EMOTIONS
from emotions.precision import RUNTIMES, auto_candidates, fastest_allowed, known_checks, prepare_model

RESULTS = Path(__file__).parent / "results" / "tag_throughput.json"
ROOT = Path(__file__).resolve().parents[1]
NAIVE_BATCH = 64
SORTED_BATCH = 16  # the passes tag_corpus's CPU actors run (ENCODER_BATCH["cpu"])
DRIVER_ROWS_PER_FILE = 25_000  # the memory corpora: 4 files at 100k rows, 80 at 2M
NAIVE = "naive loop (torch fp32, input order, batches of 64)"
RAY_DOCUMENTED = "Ray documented (map_batches, actor pool, fp32)"
DEFAULT = "emotions tag, its default (--precision auto)"
GOALS = {"vs_sorted": 0.9, "default_vs_naive": 4.0, "driver_growth": 1.1, "workers_growth": 1.3}


# ----------------------------------------------------------------------------- corpora


def real_corpus(folder: Path, rows: int, files: int) -> Path:
    """``rows`` GoEmotions train comments (cycled if more are asked for) in ``files`` Parquet files."""
    texts = load_labelled("goemotions:train").texts
    folder.mkdir(parents=True, exist_ok=True)
    bodies = [texts[i % len(texts)] for i in range(rows)]
    for k, part in enumerate(np.array_split(np.arange(rows), files)):
        pq.write_table(
            pa.table({"id": [f"r{i}" for i in part], "body": [bodies[i] for i in part]}),
            folder / f"real-{k:05d}.parquet",
        )
    return folder


def read_texts(corpus: Path) -> tuple[pa.Array, list[str]]:
    """(ids, texts) of every file, junk as "" (what a simple loop does with it)."""
    schema = pa.schema([("id", pa.string()), ("body", pa.large_string())])  # files mix string types
    table = pa.concat_tables(
        pq.read_table(f, columns=["id", "body"]).cast(schema) for f in sorted(corpus.glob("*.parquet"))
    )
    return table.column("id"), [t if isinstance(t, str) else "" for t in table.column("body").to_pylist()]


def write_tags(ids, probs: np.ndarray, thresholds: np.ndarray, output: Path) -> None:
    emotions = [[EMOTIONS[j] for j in np.flatnonzero(row)] for row in probs >= thresholds]
    output.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "emotions": emotions}), output / "tagged.parquet")


# ----------------------------------------------------------------------------- the contenders


def naive_loop(model: str, corpus: Path, output: Path) -> float:
    """Rows/s of the plain loop in input order, end to end, with torch's default threads (all cores)."""
    start = time.perf_counter()
    bundle = load_bundle(model)
    ids, texts = read_texts(corpus)
    probs = np.zeros((len(texts), len(EMOTIONS)), dtype=np.float32)
    with torch.inference_mode():
        for i in range(0, len(texts), NAIVE_BATCH):
            batch = bundle.tokenizer(
                texts[i : i + NAIVE_BATCH],
                padding=True,
                truncation=True,
                max_length=bundle.max_length,
                return_tensors="pt",
            )
            probs[i : i + NAIVE_BATCH] = torch.sigmoid(bundle.model(batch["input_ids"], batch["attention_mask"]))
    write_tags(ids, probs, bundle.thresholds, output)
    return len(texts) / (time.perf_counter() - start)


def sorted_loop(model: str, corpus: Path, output: Path, runtime: str = "fp32") -> float:
    """Rows/s of ``Bundle.predict_proba`` over every text (sorted by length, passes of 16), all
    threads, on ``runtime`` (int8: the quantized model tag_corpus runs; onnx-*: the bundle's cached
    ONNX export, as tag_corpus's actors receive it), end to end."""
    start = time.perf_counter()
    bundle = load_bundle(model)
    ids, texts = read_texts(corpus)
    probs = bundle.predict_proba(texts, batch_size=SORTED_BATCH, precision=runtime)
    write_tags(ids, probs, bundle.thresholds, output)
    return len(texts) / (time.perf_counter() - start)


class Predictor:
    """Ray's documented shape: a callable class that loads the model once per actor."""

    def __init__(self, model: str):
        torch.set_num_threads(1)
        self.bundle = load_bundle(model)

    def __call__(self, batch: dict) -> dict:
        texts = [t if isinstance(t, str) else "" for t in batch["body"]]
        chosen = self.bundle.predict_proba(texts, batch_size=SORTED_BATCH) >= self.bundle.thresholds
        return {"id": batch["id"], "emotions": [[EMOTIONS[j] for j in np.flatnonzero(row)] for row in chosen]}


def ray_documented(model: str, corpus: Path, output: Path) -> float:
    """Rows/s of read_parquet -> map_batches(Predictor, ActorPoolStrategy) -> write_parquet, one
    single-thread actor per CPU, each reserving half a CPU: at 1 CPU (or 0.75) each, on 2 CPUs,
    read_parquet's tasks (1 CPU each) never run and the pipeline hangs without a word."""
    start = time.perf_counter()
    shutil.rmtree(output, ignore_errors=True)
    actors = int(ray.cluster_resources()["CPU"])
    ds = ray.data.read_parquet(str(corpus), columns=["id", "body"])
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model": model},
        batch_size=1024,
        num_cpus=0.5,
        compute=ray.data.ActorPoolStrategy(size=actors),
    )
    ds.write_parquet(str(output))
    rows = sum(pq.read_metadata(f).num_rows for f in output.glob("*.parquet"))
    return rows / (time.perf_counter() - start)


def tagged(model: str, corpus: Path, output: Path, **kwargs) -> tuple[float, object]:
    """(rows/s end to end, summary) of one tag_corpus run; (None, reason) when it is refused."""
    try:
        summary = tagging.tag_corpus(model, corpus, output, overwrite=True, report=False, **kwargs)
    except tagging.TaggingError as error:
        print(f"  refused: {error}", flush=True)
        return None, str(error)
    return summary.rows_per_s, summary


# ----------------------------------------------------------------------------- the compute floor


def flops_per_row(model: str, corpus: Path) -> tuple[float, int, int]:
    """Forward FLOPs per row of the encoder on this corpus' own tokens (no padding): per layer and
    token, 2 x (4 h^2 + 2 h i) for the projections and feed-forward, plus 4 x L x h for attention
    over the row's L tokens. The head is negligible. -> (FLOPs, hidden size, intermediate size)"""
    bundle = load_bundle(model)
    config = bundle.model.encoder.config.to_dict()
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    _, texts = read_texts(corpus)
    lengths = np.array(
        [len(ids) for ids in bundle.tokenizer(texts, truncation=True, max_length=bundle.max_length)["input_ids"]],
        dtype=np.float64,
    )
    per_layer = 2 * lengths * (4 * h * h + 2 * h * i) + 4 * lengths**2 * h
    return float(layers * per_layer.mean()), h, i


def matmul_rate(h: int, i: int, precision: str, seconds: float = 1.0) -> float:
    """FLOP/s of this machine on the encoder's linear shapes, all threads: the best of [rows, h] x
    [h, h] and [rows, h] x [h, i] for rows of one sorted pass (16 texts x ~20 tokens) up to 2,048.
    The best, not one shape: a rate measured on a single shape undershot what the model itself
    reached (the sorted loop ran at 134% of a floor from [512, h] x [h, i] alone)."""
    best = 0.0
    for rows in (320, 512, 2048):
        for out in (h, i):
            x = torch.randn(rows, h)
            linear = prepare_model(torch.nn.Sequential(torch.nn.Linear(h, out)), precision)
            with torch.inference_mode():
                for _ in range(5):
                    linear(x)
                calls, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    linear(x)
                    calls += 1
            best = max(best, calls * 2 * rows * h * out / (time.perf_counter() - start))
    return best


# ----------------------------------------------------------------------------- memory, fresh drivers


class PeakRSS:
    """Samples, every 0.2 s, this process's RSS and the summed RSS of its descendants (the local
    Ray: GCS, raylet, every worker and actor); keeps the peak of each."""

    def __init__(self):
        self.driver = self.workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            workers = 0
            for proc in me.children(recursive=True):
                try:
                    workers += proc.memory_info().rss
                except psutil.Error:  # exited between listing and reading
                    pass
            self.driver, self.workers = max(self.driver, me.memory_info().rss), max(self.workers, workers)
            time.sleep(0.2)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def peak_rss_mb() -> float:
    """This process's peak RSS since it was started (Linux VmHWM). Not getrusage's ru_maxrss:
    that keeps the peak of the parent the process was forked from (here, the benchmark, which
    holds the 2M-row corpus it made), across exec."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 2**10 for line in status if line.startswith("VmHWM:"))


def probe(model: str, corpus: str, output: str) -> None:
    """``--probe``: this process is the driver of one tag_corpus run on its own local Ray; prints
    one JSON line with its rows/s, its own peak memory and its Ray processes' summed peak."""
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    new = "report" in inspect.signature(tagging.tag_corpus).parameters  # older checkouts write no report
    with PeakRSS() as rss:
        summary = tagging.tag_corpus(model, corpus, output, overwrite=True, **({"report": False} if new else {}))
    ray.shutdown()
    print(
        json.dumps(
            {
                "code": tagging.__file__,
                "rows": summary.rows_out,
                "rows_per_s": summary.rows_per_s,
                "driver_hwm_mb": peak_rss_mb(),
                "workers_peak_mb": rss.workers / 2**20,
            }
        )
    )


def fresh_driver(model: str, corpus: Path, output: Path, code: str | None = None) -> dict:
    """One ``--probe`` run in a new process (``code``: a checkout to import emotions from)."""
    env = dict(os.environ, **({"PYTHONPATH": code} if code else {}))
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--probe",
        "--model",
        model,
        "--corpus",
        str(corpus),
        "--output",
        str(output),
    ]
    # Ray's workers put the driver's working directory first on sys.path: run in the checkout.
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=code or ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    print(
        f"  {row['rows']:>9,} rows  {row['rows_per_s']:8.1f} rows/s  driver {row['driver_hwm_mb']:6.0f} MiB  "
        f"workers {row['workers_peak_mb']:6.0f} MiB  ({row['code']})",
        flush=True,
    )
    return row


# ----------------------------------------------------------------------------- sections


def speed(args, work: Path, model: str) -> dict:
    """Every contender on ``model``'s bundle, on the real corpus (and the synthetic one)."""
    corpora = {"real": real_corpus(work / "real", args.rows, args.files)}
    if args.synthetic_rows:
        corpora["synthetic"] = work / "synthetic"
        make_corpus(corpora["synthetic"], args.synthetic_rows, args.files, seed=0)
    bundle = load_bundle(model)
    # The gate for every candidate, as training records it (run once here for an older bundle, and
    # cached on this machine): what tag_corpus reads at start-up, so its timings hold no check.
    checks = known_checks(bundle, auto_candidates())
    default = fastest_allowed(checks)
    loops = dict.fromkeys(["fp32", default, *args.runtimes])  # in order, once each
    contenders = {NAIVE: lambda c, o: naive_loop(model, c, o)}
    contenders.update({f"sorted loop {r}": (lambda c, o, r=r: sorted_loop(model, c, o, r)) for r in loops})
    if args.ray_documented:
        contenders[RAY_DOCUMENTED] = lambda c, o: ray_documented(model, c, o)
    contenders.update(
        {f"emotions tag {r}": (lambda c, o, r=r: tagged(model, c, o, precision=r)[0]) for r in args.runtimes}
    )
    contenders[DEFAULT] = lambda c, o: tagged(model, c, o)[0]
    out = {
        "model": model,
        "model_hash": bundle.hash,
        "encoder": bundle.config["model"]["encoder"],
        "max_length": bundle.max_length,
        "default_precision": default,
        "precision_checks": checks,
        "corpora": {},
    }
    del bundle
    for name, corpus in corpora.items():
        flops, h, i = flops_per_row(model, corpus)
        rates = {p: matmul_rate(h, i, p) for p in ("fp32", "int8")}
        runs = {label: [] for label in contenders}
        for _ in range(args.repeats):  # alternating: a busy spell of the machine hits all alike
            for k, (label, run) in enumerate(contenders.items()):
                runs[label].append(run(corpus, work / f"out-{k}"))
                print(f"  {name}: {label}: {runs[label][-1] or 'refused'}", flush=True)
        out["corpora"][name] = {
            "rows": sum(pq.read_metadata(f).num_rows for f in corpus.glob("*.parquet")),
            "flops_per_row": flops,
            "matmul_flops_per_s": rates,
            "runs": runs,
            "best": {label: max(r for r in rs if r) if any(rs) else None for label, rs in runs.items()},
        }
    return out


def runtime_of(label: str, default: str) -> str | None:
    """The runtime a contender ran on (None: the naive loop's torch fp32, or Ray's documented fp32)."""
    if label == DEFAULT:
        return default
    return label.rsplit(" ", 1)[1] if label.startswith(("sorted loop", "emotions tag")) else "fp32"


def print_speed(bundle_name: str, results: dict) -> list[bool]:
    verdicts = []
    default = results["default_precision"]
    for name, r in results["corpora"].items():
        best, naive = r["best"], r["best"][NAIVE]
        print(
            f"\n{bundle_name} bundle ({results['model']}), {name} comments: {r['rows']:,} rows, "
            f"{r['flops_per_row'] / 1e9:.2f} GFLOP per row; torch matmul "
            f"{r['matmul_flops_per_s']['fp32'] / 1e9:.0f} GFLOP/s fp32, "
            f"{r['matmul_flops_per_s']['int8'] / 1e9:.0f} int8; default precision (auto): {default}"
        )
        print(f"{'':52}{'rows/s':>9}{'x naive':>9}{'% floor':>9}   goal")
        for label, rate in best.items():
            if rate is None:
                print(f"{label:52}{'refused':>9}")
                continue
            runtime = runtime_of(label, default)
            floor = r["matmul_flops_per_s"][RUNTIMES[runtime][1] if runtime != "bf16" else "fp32"] / r["flops_per_row"]
            goal = ""
            if label.startswith("emotions tag"):
                base = best.get(f"sorted loop {runtime}")
                ok = base is not None and rate >= GOALS["vs_sorted"] * base
                verdicts.append(ok)
                verdict = "ok" if ok else "FAIL"
                goal = f"{rate / base:.2f}x the sorted loop {runtime}, goal >= {GOALS['vs_sorted']}: {verdict}"
            if label == DEFAULT:
                ok = rate >= GOALS["default_vs_naive"] * naive
                verdicts.append(ok)
                goal += f"; goal >= {GOALS['default_vs_naive']}x naive: {'ok' if ok else 'FAIL'}"
            print(f"{label:52}{rate:9.1f}{rate / naive:9.2f}{100 * rate / floor:8.0f}%   {goal}")
    print(f"\nthe gate on the {bundle_name} bundle (held-out macro-F1 change vs torch fp32, 95% interval, speed):")
    for runtime, check in results["precision_checks"].items():
        low, high = check["interval_95"]
        print(
            f"  {runtime:10} {check['change']:+.4f}  [{low:+.4f}, {high:+.4f}]  {check['speedup']:.2f}x  "
            f"{'passes' if check['allowed'] else 'fails'}{'  <- auto' if runtime == default else ''}"
            f"  ({check['source']})"
        )
    return verdicts


def memory(args, work: Path) -> dict:
    rows: dict = {"rows_per_file": DRIVER_ROWS_PER_FILE, "new": {}, "old": {}}
    for n in args.driver_rows:
        corpus = work / f"memory-{n}"
        make_corpus(corpus, n, max(1, n // DRIVER_ROWS_PER_FILE), seed=3)
        rows["new"][n] = fresh_driver(args.memory_model, corpus, work / "memory-out")
        if args.old_code:
            rows["old"][n] = fresh_driver(args.memory_model, corpus, work / "memory-old", args.old_code)
        shutil.rmtree(corpus)
    return rows


def print_memory(results: dict) -> list[bool]:
    sizes = sorted(results["new"])
    print(
        f"\n{'fresh driver per corpus (smoke bundle)':40}"
        + "".join(f"{f'{n:,} rows':>16}" for n in sizes)
        + f"{'ratio':>8}   goal"
    )
    verdicts = []
    for side in ("new", "old"):
        for label, key, goal in (
            ("driver peak RSS (VmHWM), MiB", "driver_hwm_mb", "driver_growth"),
            ("Ray workers' summed peak RSS, MiB", "workers_peak_mb", "workers_growth"),
            ("rows/s", "rows_per_s", None),
        ):
            if not results[side]:
                continue
            values = [results[side][n][key] for n in sizes]
            line = f"{(side + ' code: ' if results['old'] else '') + label:40}" + "".join(f"{v:16.1f}" for v in values)
            if goal and side == "new":
                ok = values[-1] <= GOALS[goal] * values[0]
                verdicts.append(ok)
                line += f"{values[-1] / values[0]:8.2f}   <= {GOALS[goal]}: {'ok' if ok else 'FAIL'}"
            print(line)
    if results["old"]:
        print(
            f"{'new / old rows/s':40}"
            + "".join(f"{results['new'][n]['rows_per_s'] / results['old'][n]['rows_per_s']:16.2f}" for n in sizes)
            + "   >= 1.0"
        )
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        nargs="+",
        default=[],
        metavar="NAME=BUNDLE",
        help="bundles to time tagging on, each named (default=/tmp/b/default quickstart=/tmp/b/qs)",
    )
    parser.add_argument(
        "--runtimes",
        nargs="*",
        default=[],
        help="runtimes timed besides the default's, as sorted loops and emotions tag (fp32 int8 onnx-int8 ...)",
    )
    parser.add_argument("--ray-documented", action="store_true", help="time Ray's documented batch inference too")
    parser.add_argument("--rows", type=int, default=30_000, help="rows of real comments (GoEmotions train)")
    parser.add_argument("--synthetic-rows", type=int, default=0, help="rows of a generated dump with junk (0: none)")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds; the best of each counts")
    parser.add_argument("--memory-model", default=None, help="the smoke bundle: the memory section's model")
    parser.add_argument(
        "--driver-rows",
        type=int,
        nargs="+",
        default=[100_000, 2_000_000],
        help="memory corpora, each tagged by a fresh driver",
    )
    parser.add_argument(
        "--old-code",
        default=None,
        metavar="CHECKOUT",
        help="a checkout of earlier code (git worktree add /tmp/old_tagging <commit>): tags the memory corpora too",
    )
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--work", default="/tmp/emotions-tag-bench")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"JSON written at the end (default: {RESULTS})")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # one fresh-driver run
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args.model, args.corpus, args.output)
    setup_logging()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    results, verdicts = {"machine_cpus": os.cpu_count(), "args": vars(args)}, []
    bundles = dict(item.split("=", 1) for item in args.model)
    if bundles and not args.skip_speed:
        ray.init(include_dashboard=False, log_to_driver=False)
        results["speed"] = {name: speed(args, work, model) for name, model in bundles.items()}
        ray.shutdown()
    if args.memory_model:
        print("\nfresh drivers (each with its own local Ray):", flush=True)
        results["memory"] = memory(args, work)
    for name, speeds in results.get("speed", {}).items():
        verdicts += print_speed(name, speeds)
    if "memory" in results:
        verdicts += print_memory(results["memory"])
    results["goals_met"] = all(verdicts)
    print(f"\ngoals: {sum(verdicts)} of {len(verdicts)} met")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"written to {args.results}")


if __name__ == "__main__":
    main()
