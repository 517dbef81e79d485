"""The CPU runtimes and graph variants tried for tagging, each through the project's precision gate.

One bundle, one process, all threads; every variant scores the same texts through the same loop
(``inference.run_rows``, passes of ``--passes`` length-sorted rows), so only the runtime differs:

- torch fp32 (the reference), torch dynamic int8 (per channel: ``precision.quantize_int8``);
- ONNX Runtime fp32: the project's export (``onnx_model.export_fp32``), and the same graph with
  ``onnxruntime.transformers.optimizer``'s BERT fusions (attention, skip layer norm, GELU);
- ONNX Runtime dynamic int8: per channel (what ``--precision onnx-int8`` runs), with
  ``reduce_range`` (7-bit weights, for CPUs without VNNI), with uint8 weights, on the fused graph;
- ONNX Runtime static int8 (QDQ, activations calibrated with MinMax on ``--calibration`` training
  texts, per-channel weights);
- OpenVINO on the fp32 export, where the package is installed (not a dependency of the project).

For each: rows/s on ``--rows`` dev texts per pass size, and the gate's held-out macro-F1 change
against torch fp32 on the bundle's validation split (``evaluation.paired_change``, thresholds fitted
on torch fp32 outputs, 95% interval; passes when a loss over 0.01 is ruled out and no label is
tagged over 1.5x as often as in fp32).

    python benchmarks/cpu_runtimes.py --model BUNDLE [--rows 3000 --passes 16 32]

Writes benchmarks/results/cpu_runtimes.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from emotions import onnx_model
from emotions.batching import tokenize
from emotions.bundle import load_bundle
from emotions.data import load_labelled
from emotions.environment import setup_logging
from emotions.evaluation import paired_change, rule_of
from emotions.inference import run_rows
from emotions.precision import cpu_kind, quantize_int8, validation_set, within_bounds

RESULTS = Path(__file__).parent / "results" / "cpu_runtimes.json"


class OpenVinoClassifier:
    """An OpenVINO compiled model in the place of the torch model in ``run_rows`` (logits only)."""

    def __init__(self, path: Path, threads: int):
        import openvino

        self.compiled = openvino.Core().compile_model(
            str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        )
        self.request = self.compiled.create_infer_request()

    def eval(self):
        return self

    def __call__(self, input_ids, attention_mask):
        out = self.request.infer({"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
        return torch.from_numpy(np.array(out[self.compiled.output("logits")]))


def variants(bundle, folder: Path, calibration_texts: list[str]) -> dict[str, Path]:
    """Every ONNX graph tried, written into ``folder``: {name: path}."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.transformers.optimizer import optimize_model

    from emotions.batching import collate, sorted_batches

    paths = {"onnx fp32": folder / "fp32.onnx"}
    onnx_model.export_fp32(bundle.model, bundle.tokenizer, bundle.max_length, bundle.hash, paths["onnx fp32"])
    config = bundle.model.encoder.config
    fused = optimize_model(
        str(paths["onnx fp32"]),
        model_type="bert",
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
    )
    paths["onnx fp32, BERT fusions"] = folder / "fused.onnx"
    fused.save_model_to_file(str(paths["onnx fp32, BERT fusions"]))
    typed = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    dynamic = {
        "onnx dynamic int8, per channel (onnx-int8)": ("onnx fp32", {"weight_type": QuantType.QInt8}),
        "onnx dynamic int8, per channel, reduce_range": (
            "onnx fp32",
            {"weight_type": QuantType.QInt8, "reduce_range": True},
        ),
        "onnx dynamic int8, per channel, uint8 weights": ("onnx fp32", {"weight_type": QuantType.QUInt8}),
        "onnx dynamic int8, per channel, BERT fusions": ("onnx fp32, BERT fusions", {"weight_type": QuantType.QInt8}),
    }
    for name, (source, options) in dynamic.items():
        paths[name] = folder / f"{len(paths)}.onnx"
        quantize_dynamic(str(paths[source]), str(paths[name]), per_channel=True, extra_options=typed, **options)
    tokens = tokenize(calibration_texts, np.zeros((len(calibration_texts), 0)), bundle.tokenizer, bundle.max_length)

    class Calibration(CalibrationDataReader):
        def __init__(self):
            batches = sorted_batches(tokens.lengths, 32)
            self.feeds = iter(
                {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
                for ids, mask, _ in (collate(tokens, rows, 0) for rows in batches)
            )

        def get_next(self):
            return next(self.feeds, None)

    name = f"onnx static int8 (QDQ, MinMax on {len(calibration_texts)} training texts)"
    paths[name] = folder / "static.onnx"
    quantize_static(
        str(paths["onnx fp32"]),
        str(paths[name]),
        Calibration(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        calibrate_method=CalibrationMethod.MinMax,
        extra_options=typed,
    )
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a bundle")
    parser.add_argument("--rows", type=int, default=3000, help="dev texts timed per variant")
    parser.add_argument("--passes", type=int, nargs="+", default=[16, 32], help="rows per forward pass")
    parser.add_argument("--calibration", type=int, default=512, help="training texts for static int8")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    setup_logging()
    logging.getLogger().setLevel(logging.WARNING)  # the quantizer's notes
    bundle = load_bundle(args.model)
    threads = torch.get_num_threads()
    validation = validation_set(bundle)  # what the gate scores
    gate_tokens = tokenize(validation.texts, validation.labels, bundle.tokenizer, bundle.max_length)
    texts = load_labelled("goemotions:dev").texts[: args.rows]
    timed = tokenize(texts, np.zeros((len(texts), 0)), bundle.tokenizer, bundle.max_length)
    calibration = load_labelled("goemotions:train").texts[: args.calibration]

    def speed(model) -> dict[int, float]:
        run_rows(model, timed.select(np.arange(64)), 0, batch_size=16, device="cpu")  # warm-up
        rates = {}
        for rows in args.passes:
            start = time.perf_counter()
            run_rows(model, timed, 0, batch_size=rows, device="cpu")
            rates[rows] = len(timed) / (time.perf_counter() - start)
        return rates

    models = {"torch fp32": lambda: bundle.model, "torch dynamic int8, per channel (int8)": None}
    results = {"model": args.model, "bundle": bundle.hash, "cpu": cpu_kind(), "threads": threads, "variants": {}}
    with tempfile.TemporaryDirectory() as folder:
        paths = variants(bundle, Path(folder), calibration)
        models["torch dynamic int8, per channel (int8)"] = lambda: quantize_int8(copy.deepcopy(bundle.model))
        for name, path in paths.items():
            models[name] = lambda path=path: onnx_model.OnnxClassifier(path.read_bytes(), threads)
        try:
            import openvino  # noqa: F401

            models["OpenVINO fp32 (on the fp32 export)"] = lambda: OpenVinoClassifier(paths["onnx fp32"], threads)
        except ImportError:
            print("OpenVINO is not installed: its row is skipped (pip install openvino)")
        reference = None
        for name, build in models.items():
            model = build()
            rates = speed(model)
            probs = run_rows(model, gate_tokens, 0, batch_size=16, device="cpu").numpy()
            row = {"rows_per_s": rates}
            if reference is None:
                reference = probs
            else:
                check = paired_change(validation.labels, reference, probs, rule=rule_of(bundle.config))
                row.update(
                    change=check["change"],
                    interval_95=check["interval_95"],
                    rows_changed=check["rows_changed"],
                    share_change=check["share_change"],
                    passes=all(within_bounds(check)),
                )
            results["variants"][name] = row
            print(name, json.dumps(row, default=float), flush=True)
    base = results["variants"]["torch fp32"]["rows_per_s"]
    print(f"\nbundle {bundle.hash} ({args.model}); CPU {results['cpu']}, {threads} threads; {len(timed)} dev texts")
    print(f"{'':58}" + "".join(f"{f'rows/s @{p}':>12}" for p in args.passes) + f"{'x fp32':>8}   gate")
    for name, row in results["variants"].items():
        rates = row["rows_per_s"]
        best = max(rates[p] / base[p] for p in args.passes)
        gate = (
            "reference"
            if "change" not in row
            else f"{row['change']:+.4f} [{row['interval_95'][0]:+.4f}, {row['interval_95'][1]:+.4f}] "
            + ("passes" if row["passes"] else "fails")
        )
        print(f"{name:58}" + "".join(f"{rates[p]:12.0f}" for p in args.passes) + f"{best:8.2f}   {gate}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"written to {args.results}")


if __name__ == "__main__":
    main()
