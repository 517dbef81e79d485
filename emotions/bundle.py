"""The model bundle: one folder, written by ``save_bundle`` and read by ``load_bundle``.

    save_bundle:  classifier state dict + tokenizer + config + thresholds + metrics --> folder
    load_bundle:  folder, or URI --(emotions.bundle_store: cached copy)--> read_bundle --> Bundle

The encoder and tokenizer are laid out as ``save_pretrained`` writes them, so Hugging Face tools
read the bundle folder as it is (``AutoModel``/``AutoConfig``/``AutoTokenizer.from_pretrained``);
the project's own files sit beside them under their own names:

    config.json            the encoder's Hugging Face config (architectures, model_type)
    model.safetensors      the encoder's weights, named as AutoModel.from_pretrained expects
    tokenizer.json, tokenizer_config.json, vocab.txt, ...   the tokenizer (save_pretrained)
    head.safetensors       the classification head's weights: [batch, hidden] -> [batch, 28]
    bundle.json            format, version, labels, thresholds (and the precision they were fitted
                           at: ``thresholds_precision``), head, pooling, max_length
    emotions_config.json   the resolved training config
    metrics.json           validation metrics at 0.5 and at the thresholds, training history
    manifest.json          sha256 of every file above and the bundle's content hash

Format version 1 (before the Hugging Face layout: ``encoder_config.json``, encoder and head
weights together in ``model.safetensors``, ``tokenizer/``, the training config in
``config.json``) is still read; ``save_bundle`` writes version 2.

No pickles, and loading never executes code from the bundle: the architecture is rebuilt from
JSON with built-in transformers classes, and weights come from safetensors. Every file is checked
against manifest.json (``emotions.bundle_manifest``); where a bundle may be written and how one on
a URI is published and cached is ``emotions.bundle_store``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from emotions import storage
from emotions.batching import tokenize
from emotions.bundle_manifest import (
    FORMAT,
    BundleError,
    check_file_set,
    check_hashes,
    read_bundle_json,
    read_manifest,
    write_manifest,
)
from emotions.bundle_store import check_output_folder, discard_cached, download_bundle
from emotions.bundle_store import publish_bundle as publish_bundle  # callers import it from here
from emotions.labels import EMOTIONS, check_same_labels
from emotions.model import EmotionClassifier, build_head, encoder_from_config

log = logging.getLogger("emotions.bundle")

VERSION = 2


@dataclass(frozen=True)
class Layout:
    """Where a bundle format version keeps each part (relative to the bundle folder)."""

    encoder_config: str  # the encoder's Hugging Face config
    training_config: str  # the resolved training config
    tokenizer: str  # the folder holding the tokenizer files ("": the bundle folder)
    head: str | None  # the head's weights; None: head.* keys beside encoder.* in model.safetensors

    def required(self) -> tuple[str, ...]:
        tokenizer = f"{self.tokenizer}/tokenizer_config.json" if self.tokenizer else "tokenizer_config.json"
        return (
            "bundle.json",
            self.encoder_config,
            "model.safetensors",
            *([self.head] if self.head else []),
            self.training_config,
            "metrics.json",
            "manifest.json",
            tokenizer,
        )


LAYOUTS = {
    1: Layout(encoder_config="encoder_config.json", training_config="config.json", tokenizer="tokenizer", head=None),
    2: Layout(
        encoder_config="config.json", training_config="emotions_config.json", tokenizer="", head="head.safetensors"
    ),
}
LAYOUT = LAYOUTS[VERSION]


def save_bundle(
    output: str | Path,
    *,
    weights: dict[str, torch.Tensor],
    encoder_config: dict,
    head: dict,
    tokenizer,
    thresholds: np.ndarray,
    config: dict,
    metrics: dict,
    thresholds_precision: dict | None = None,
) -> Path:
    """Write the bundle into ``output`` and return its path. ``weights`` is the classifier's
    state dict (``encoder.*`` and ``head.*``). ``thresholds_precision``: the outputs the thresholds
    were fitted on (``precision.fit_precision``); None: unknown (a bundle re-saved from one made
    before it was recorded). An earlier bundle there is replaced whole; a folder holding anything
    else is refused (``check_output_folder``)."""
    check_output_folder(output)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        parts = split_weights(weights)
        for name, part in (("model.safetensors", parts["encoder"]), (LAYOUT.head, parts["head"])):
            tensors = {k: v.contiguous().cpu() for k, v in part.items()}
            save_file(tensors, str(staging / name), metadata={"format": "pt"})  # "pt": what from_pretrained expects
        tokenizer.save_pretrained(str(staging))
        hf_encoder_config(encoder_config).save_pretrained(str(staging))  # config.json
        _write_json(staging / LAYOUT.training_config, config)
        _write_json(staging / "metrics.json", metrics)
        _write_json(
            staging / "bundle.json",
            {
                "format": FORMAT,
                "version": VERSION,
                "labels": list(EMOTIONS),
                "thresholds": {name: float(t) for name, t in zip(EMOTIONS, thresholds)},
                "thresholds_precision": thresholds_precision,
                "head": head,
                "max_length": config["data"]["max_length"],
                "encoder": config["model"]["encoder"],
            },
        )
        write_manifest(staging)  # last: hashes every file above
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return output


def split_weights(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The classifier's state dict -> {"encoder": ..., "head": ...}, each without its prefix:
    the encoder's keys are then those a bare ``AutoModel`` has (``embeddings.word_embeddings.weight``)."""
    parts = {"encoder": {}, "head": {}}
    for key, value in weights.items():
        prefix, _, rest = key.partition(".")
        assert prefix in parts, f"weight {key!r} is neither encoder.* nor head.*"
        parts[prefix][rest] = value
    return parts


def hf_encoder_config(encoder_config: dict) -> AutoConfig:
    """The encoder's config as ``save_pretrained`` writes it: with ``architectures`` (the bare
    model class, e.g. BertModel), which ``AutoModel`` and pipelines read."""
    hf = AutoConfig.for_model(**encoder_config)
    if not hf.architectures:  # a model built from a config (tiny-random) has none yet
        hf.architectures = [MODEL_MAPPING_NAMES[hf.model_type]]
    return hf


@dataclass
class Bundle:
    path: Path
    model: EmotionClassifier
    tokenizer: object
    thresholds: np.ndarray  # [28]
    max_length: int
    hash: str
    config: dict
    metrics: dict
    # The outputs the thresholds were fitted on ({"backend", "numeric_precision", "matmuls",
    # "device"}); None: unknown, a bundle made before it was recorded (a GPU run then fitted them
    # on bf16 outputs).
    thresholds_precision: dict | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        return EMOTIONS

    def run(self, texts: list[str], batch_size: int = 64, precision: str = "fp32", output: str = "probs") -> np.ndarray:
        """[n] texts -> ``inference.run_rows`` on the model's device: [n, 28] probabilities or
        [n, hidden] pooled features (float32). ``precision``: a runtime of ``precision.RUNTIMES``
        (int8 and the ONNX runtimes on CPU only)."""
        from emotions.inference import run_rows
        from emotions.precision import GPU_RUNTIMES, RUNTIMES, runtime_model

        device = next(self.model.parameters()).device
        if precision not in RUNTIMES or (device.type != "cpu" and precision not in GPU_RUNTIMES):
            raise ValueError(f"precision {precision!r} on {device.type}: use one of {sorted(RUNTIMES)} (CPU)")
        data = tokenize(texts, np.zeros((len(texts), len(EMOTIONS))), self.tokenizer, self.max_length)
        model = runtime_model(self, precision)
        pad = self.tokenizer.pad_token_id or 0
        rows = run_rows(model, data, pad, batch_size=batch_size, device=device, precision=precision, output=output)
        return rows.cpu().numpy()

    def predict_proba(self, texts: list[str], batch_size: int = 64, precision: str = "fp32") -> np.ndarray:
        """[n] texts -> [n, 28] probabilities (float32)."""
        return self.run(texts, batch_size, precision)

    def features(self, texts: list[str], batch_size: int = 64, precision: str = "fp32") -> np.ndarray:
        """[n] texts -> [n, hidden] pooled encoder features (float32): what a stage-2 head reads."""
        return self.run(texts, batch_size, precision, output="features")

    def predict(self, texts: list[str]) -> list[list[str]]:
        """Label names over their thresholds, for each text."""
        chosen = self.predict_proba(texts) >= self.thresholds
        return [[EMOTIONS[j] for j in np.flatnonzero(row)] for row in chosen]


def load_bundle(path: str | Path, device: str = "cpu", verify: bool = True) -> Bundle:
    """Read a bundle folder (local, or a URI that pyarrow understands: read from its cached copy,
    see ``load_remote_bundle``).

    The folder must hold exactly the files its manifest lists. With ``verify`` (the default) every
    file's sha256 and the content hash are recomputed and compared with the manifest's;
    ``verify=False`` skips the hashing and trusts the manifest's hash."""
    if storage.is_uri(path):
        return load_remote_bundle(str(path), device, verify)
    return read_bundle(Path(path), device, verify)


def load_remote_bundle(uri: str, device: str = "cpu", verify: bool = True) -> Bundle:
    """The bundle at ``uri``, read from its copy in the cache (``download_bundle``). A copy this
    call did not make that fails its check (a file changed or lost since it was copied) is
    discarded and the bundle fetched again, once: one bad copy does not fail every load."""
    path, fetched = download_bundle(uri)
    if fetched:
        return read_bundle(path, device, verify)
    try:
        return read_bundle(path, device, verify)
    except BundleError as error:
        log.warning("the cached copy %s of %s fails its check, so it is fetched again: %s", path, uri, error)
        discard_cached(path)
        return read_bundle(download_bundle(uri)[0], device, verify)


def read_bundle(path: Path, device: str = "cpu", verify: bool = True) -> Bundle:
    """Read and check the local bundle folder ``path`` (see ``load_bundle``)."""
    if not path.is_dir():
        raise BundleError(f"model bundle {path} does not exist (expected a folder made by `emotions train`)")
    meta = read_meta(path)
    layout = LAYOUTS[meta["version"]]
    missing = [name for name in layout.required() if not (path / name).exists()]
    if missing:
        raise BundleError(
            f"model bundle {path} is incomplete: missing {missing}. "
            "Copy the whole bundle folder, or retrain with `emotions train`."
        )
    manifest = read_manifest(path)
    check_file_set(path, manifest["files"])
    content_hash = check_hashes(path, manifest) if verify else manifest["hash"]
    check_same_labels(meta["labels"], f"model bundle {path}")
    head = meta["head"]
    encoder = encoder_from_config(json.loads((path / layout.encoder_config).read_text()))
    model = EmotionClassifier(
        encoder,
        build_head(encoder.config.hidden_size, head["depth"], head["dropout"], head.get("hidden")),
        head["pooling"],
    )
    if layout.head:
        model.encoder.load_state_dict(load_file(str(path / "model.safetensors")))
        model.head.load_state_dict(load_file(str(path / layout.head)))
    else:
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path / layout.tokenizer), trust_remote_code=False)
    if meta.get("thresholds_precision") is None:
        log.info(
            "model bundle %s does not record the precision its thresholds were fitted at (made before it was "
            "recorded): unknown; the precision gate compares runtimes against torch fp32",
            path,
        )
    return Bundle(
        path=path,
        model=model,
        tokenizer=tokenizer,
        thresholds=np.array([meta["thresholds"][name] for name in EMOTIONS], dtype=np.float32),
        max_length=meta["max_length"],
        hash=content_hash,
        config=json.loads((path / layout.training_config).read_text()),
        metrics=json.loads((path / "metrics.json").read_text()),
        thresholds_precision=meta.get("thresholds_precision"),
    )


def bundle_files(path: Path) -> dict[str, bytes]:
    """Every file of the local bundle folder ``path`` (relative POSIX path -> bytes): how a bundle
    travels to a Ray task on a node that cannot read this one's disk (``load_bundle_files``)."""
    path = Path(path)
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def load_bundle_files(files: dict[str, bytes], bundle_hash: str, device: str = "cpu") -> Bundle:
    """The bundle ``bundle_files`` read, loaded on ``device`` from a temporary folder (removed once
    loaded: ``Bundle.path`` then names a folder that is gone) and checked to be ``bundle_hash``."""
    with tempfile.TemporaryDirectory(prefix="emotions-bundle-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_bytes(data)
        bundle = load_bundle(tmp, device=device)  # verifies every file against the manifest
    if bundle.hash != bundle_hash:
        raise BundleError(f"the bundle's files sent to this task are bundle {bundle.hash}, expected {bundle_hash}")
    return bundle


def read_meta(path: Path) -> dict:
    """bundle.json, checked to be an emotions bundle of a format version this code reads."""
    if not (path / "bundle.json").is_file():
        raise BundleError(
            f"model bundle {path} is incomplete: missing ['bundle.json']. "
            "Copy the whole bundle folder, or retrain with `emotions train`."
        )
    meta = read_bundle_json(path, "bundle.json")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(
            f"{path}/bundle.json is not an emotions bundle "
            f"(format={meta.get('format') if isinstance(meta, dict) else None!r})"
        )
    if meta.get("version") not in LAYOUTS:
        raise BundleError(
            f"model bundle {path} has format version {meta.get('version')!r}; this emotions reads "
            f"versions {sorted(LAYOUTS)}. Upgrade emotions to read it, or retrain the bundle "
            "with `emotions train`."
        )
    return meta


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
