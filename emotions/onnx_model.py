"""ONNX Runtime on CPU: the bundle's encoder + head exported to ONNX, checked against torch, and
run through ``inference.run_rows`` like the torch model (``OnnxClassifier`` takes its place).

    bundle (safetensors: the source of truth)
      --export a copy, eager attention, traced on a padded batch-->   fp32 .onnx
      --verify: torch fp32 vs ONNX on padded batches, and each row alone (the mask is kept)-->
      --onnxruntime.quantization.quantize_dynamic, int8 weights per channel-->   int8 .onnx

The exports are derived files, made once per bundle and kept in a local cache by the bundle's
content hash (``cache_dir()``: $EMOTIONS_CACHE, default ~/.cache/emotions): training makes them
when it runs the precision gate, tagging's driver on first use, and its actors receive the bytes
from the driver, so a node never exports. A file in the cache is written whole (temp + rename):
runs that race write the same bytes.

Why eager attention and a copy: traced with the default SDPA attention, the exported graph can
drop the attention mask (the trace sees a mask of all ones and keeps the branch that ignores it),
and tracing changed the traced module's later eager outputs; the copy is thrown away. Why the
legacy (TorchScript) exporter: ``onnxruntime.transformers``' BERT fusions and the quantizer know
its graphs; torch warns that it is deprecated, and the verification below catches a change.

torch and onnxruntime are imported inside the functions: Ray Data's read tasks import
``emotions.precision``, which imports this module.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import uuid
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger("emotions.onnx")

PRECISIONS = ("fp32", "int8")
OPSET = 17
# An export is refused if any logit on the probe batches differs from torch fp32 by more than this
# (fp32 against fp32: the differences seen are ~1e-5, from another summation order).
EXPORT_TOLERANCE = 1e-3
PROBES = (  # texts of very different lengths, so every batch below has padding
    "ok",
    "Thank you so much, this made my day!",
    "I can't believe they did that to him. Absolutely disgusting and I'm furious about it.",
    "lol",
    "Not sure how I feel about this. It's a bit sad but also kind of a relief that it's over, honestly. "
    "We'll see what happens next week, I guess, and I hope it goes better than the last time we tried.",
    "WOW 😍😍",
    "Why would anyone do that?",
    "i miss her every single day",
)


class OnnxExportError(RuntimeError):
    """The exported graph does not compute what the torch model computes; the message says how far."""


def cache_dir() -> Path:
    return Path(os.environ.get("EMOTIONS_CACHE") or Path.home() / ".cache" / "emotions")


def versions() -> str:
    """What an export depends on besides the bundle: the exporter and the runtime."""
    import onnxruntime
    import torch

    return f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__.split('+')[0]}"


def onnx_path(bundle_hash: str, precision: str) -> Path:
    import onnxruntime
    import torch

    tag = f"ort{onnxruntime.__version__}-torch{torch.__version__.split('+')[0]}"
    return cache_dir() / "onnx" / bundle_hash / f"model-{precision}-{tag}.onnx"


def export_bundle(bundle, precision: str) -> Path:
    """The bundle's ONNX file at ``precision`` (fp32 or int8), from the cache or made now (fp32
    export, verified; int8 quantized from it). -> its path."""
    assert precision in PRECISIONS, precision
    path = onnx_path(bundle.hash, precision)
    if path.exists():
        return path
    fp32 = onnx_path(bundle.hash, "fp32")
    if not fp32.exists():
        start, worst = time.perf_counter(), []

        def export_and_verify(tmp: Path) -> None:  # verified before it enters the cache
            export_fp32(bundle.model, bundle.tokenizer, bundle.max_length, bundle.hash, tmp)
            worst.append(verify_export(bundle.model, bundle.tokenizer, bundle.max_length, tmp))

        _write_whole(fp32, export_and_verify)
        log.info(
            "exported bundle %s to ONNX in %.1fs (largest logit difference from torch %.1e): %s",
            bundle.hash,
            time.perf_counter() - start,
            worst[0],
            fp32,
        )
    if precision == "int8":
        start = time.perf_counter()
        _write_whole(path, lambda tmp: quantize_int8(fp32, tmp))
        log.info("quantized the ONNX export to int8 in %.1fs: %s", time.perf_counter() - start, path)
    return path


def _write_whole(path: Path, write) -> None:
    """``write(tmp)``, then rename tmp to ``path``: readers see the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_fp32(model, tokenizer, max_length: int, bundle_hash: str, path: Path) -> None:
    """Trace a copy of ``model`` (eager attention) on a padded batch and write the fp32 graph."""
    import onnx
    import torch

    class LogitsAndFeatures(torch.nn.Module):  # -> (logits [batch, 28], pooled features [batch, hidden])
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            features = self.model.features(input_ids, attention_mask)
            return self.model.head(features), features

    twin = copy.deepcopy(model).eval().float().cpu()
    twin.encoder.set_attn_implementation("eager")
    ids, mask = _probe_batch(tokenizer, max_length, PROBES[:3])  # padded: the mask has zeros
    assert not bool(mask.all()), "the trace batch must hold padding"
    axes = {"batch": 0, "tokens": 1}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        torch.onnx.export(
            LogitsAndFeatures(twin),
            (ids, mask),
            str(path),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits", "features"],
            dynamic_axes={
                "input_ids": {axes["batch"]: "batch", axes["tokens"]: "tokens"},
                "attention_mask": {axes["batch"]: "batch", axes["tokens"]: "tokens"},
                "logits": {0: "batch"},
                "features": {0: "batch"},
            },
            opset_version=OPSET,
        )
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {"emotions_bundle_hash": bundle_hash})
    onnx.save(graph, str(path))


def quantize_int8(fp32_path: Path, path: Path) -> None:
    """Dynamic int8: weights int8 per output channel, activations quantized per pass (uint8)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().disabled, was = True, logging.getLogger().disabled  # its "run pre-processing" note
    try:
        quantize_dynamic(
            str(fp32_path),
            str(path),
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        logging.getLogger().disabled = was


def _probe_batch(tokenizer, max_length: int, texts):
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def verify_export(model, tokenizer, max_length: int, path: Path) -> float:
    """The export against torch fp32: logits of the probe texts in one padded batch, in padded
    batches of 3, and each text alone (no padding, a mask of all ones). OnnxExportError if any
    logit differs by more than EXPORT_TOLERANCE, or if a row's logits depend on its padding.
    -> the largest difference."""
    import torch

    session = OnnxClassifier(path.read_bytes(), threads=1)
    worst = 0.0
    batches = [PROBES, PROBES[3:6], *[(t,) for t in PROBES]]
    alone = {}
    model = model.eval()
    with torch.inference_mode():
        for texts in batches:
            ids, mask = _probe_batch(tokenizer, max_length, texts)
            expected = model(ids, mask).float().numpy()
            got = session(ids, mask).numpy()
            worst = max(worst, float(np.abs(got - expected).max()))
            for text, row in zip(texts, got):
                alone.setdefault(text, []).append(row)
    padding = max(float(np.abs(rows[0] - row).max()) for rows in alone.values() for row in rows)
    if worst > EXPORT_TOLERANCE or padding > EXPORT_TOLERANCE:
        raise OnnxExportError(
            f"the ONNX export of bundle {session.bundle_hash} does not match the torch model: largest logit "
            f"difference {worst:.2e}, largest change of a row's logits with its padding {padding:.2e} "
            f"(allowed {EXPORT_TOLERANCE:.0e}); tag with a torch precision (--precision fp32, bf16 or int8)"
        )
    return worst


class OnnxClassifier:
    """An ONNX Runtime session in the place of an ``EmotionClassifier`` in ``inference.run_rows``:
    ``model(ids, mask)`` -> logits, ``model.features(ids, mask)`` -> pooled features, as torch
    tensors. ``threads``: ONNX Runtime's intra-op threads (tagging's actors: their share)."""

    def __init__(self, model: bytes | str, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: one per core
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self.session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.bundle_hash = meta.get("emotions_bundle_hash")
        self.hidden_size = self.session.get_outputs()[1].shape[1]

    def eval(self):
        return self

    def _run(self, output: str, input_ids, attention_mask):
        import torch

        feed = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy()}
        return torch.from_numpy(self.session.run([output], feed)[0])

    def __call__(self, input_ids, attention_mask):
        return self._run("logits", input_ids, attention_mask)

    def features(self, input_ids, attention_mask):
        return self._run("features", input_ids, attention_mask)


def load_onnx(bundle, precision: str, threads: int | None = None) -> OnnxClassifier:
    """The bundle's ONNX model at ``precision`` (exported now if the cache lacks it), ready to run."""
    return OnnxClassifier(onnx_bytes(bundle, precision), threads)


def onnx_bytes(bundle, precision: str) -> bytes:
    """The exported file's bytes: what tagging's driver sends its actors."""
    return export_bundle(bundle, precision).read_bytes()
