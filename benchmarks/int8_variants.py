"""int8 variants on one bundle, speed and quality side by side in one run: why tagging's int8 is
per-channel dynamic quantization in passes of 16.

For each variant (per-channel or per-tensor weight scales; passes of 16 or 64 length-sorted texts)
on the bundle's validation texts, in this process with all threads: rows/s of the encoder loop
tagging runs (``predict_tokens``), beside fp32, and the gate's paired comparison with fp32
(``evaluation.paired_change``: held-out halves, 95% bootstrap interval). A variant passes when
the interval's low end is above -MAX_F1_LOSS.

    python benchmarks/int8_variants.py --model /tmp/default_run/bundle
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

import torch
from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

from emotions.bundle import load_bundle
from emotions.evaluation import paired_change
from emotions.precision import MAX_F1_LOSS, validation_set
from emotions.tagging.predictor import predict_tokens, tokenize_texts

RESULTS = Path(__file__).parent / "results" / "int8_variants.json"
SCALES = {"per-channel": per_channel_dynamic_qconfig, "per-tensor": default_dynamic_qconfig}


def rate(model, tokens, pad_id: int, batch: int) -> tuple[float, object]:
    start = time.perf_counter()
    probs = predict_tokens(model, tokens, pad_id, batch, "fp32", "cpu")
    return len(tokens) / (time.perf_counter() - start), probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/default_run/bundle")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # torch announces the move of quantize_dynamic to torchao
    bundle = load_bundle(args.model)
    validation = validation_set(bundle)  # the rows the gate scores
    tokens = tokenize_texts(validation.texts, bundle.tokenizer, bundle.max_length)
    pad_id = bundle.tokenizer.pad_token_id or 0
    rows = []
    fp32_rate, reference = rate(bundle.model, tokens, pad_id, 16)
    rows.append({"variant": "fp32", "batch": 16, "rows_per_s": fp32_rate})
    for scale, qconfig in SCALES.items():
        model = quantize_dynamic(copy.deepcopy(bundle.model), {torch.nn.Linear: qconfig}, dtype=torch.qint8)
        for batch in args.batches:
            speed, probs = rate(model, tokens, pad_id, batch)
            change = paired_change(validation.labels, reference, probs)
            rows.append(
                {
                    "variant": f"int8 {scale}",
                    "batch": batch,
                    "rows_per_s": speed,
                    **change,
                    "passes": change["interval_95"][0] > -MAX_F1_LOSS,
                }
            )
    print(f"\n{len(tokens):,} texts of {validation.source}, bundle {bundle.hash}, {torch.get_num_threads()} threads")
    print(f"{'variant':20}{'batch':>6}{'rows/s':>9}{'x fp32':>8}{'change':>9}  95% interval        rows changed  gate")
    for r in rows:
        if r["variant"] == "fp32":
            print(f"{'fp32':20}{r['batch']:>6}{r['rows_per_s']:9.1f}{1:8.2f}")
            continue
        low, high = r["interval_95"]
        print(
            f"{r['variant']:20}{r['batch']:>6}{r['rows_per_s']:9.1f}{r['rows_per_s'] / fp32_rate:8.2f}"
            f"{r['change']:+9.4f}  {low:+.4f} to {high:+.4f}  {100 * r['rows_changed']:10.1f}%  "
            f"{'passes' if r['passes'] else 'FAILS'}"
        )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"model_hash": bundle.hash, "rows": rows}, indent=2) + "\n")
    print(f"written to {args.results}")


if __name__ == "__main__":
    main()
