"""The model bundle: one folder, written by ``save_bundle`` and read by ``load_bundle``.

    bundle.json            format, labels, thresholds, head, pooling, max_length, hash
    encoder_config.json    the encoder's Hugging Face config (architecture only)
    model.safetensors      encoder.* and head.* weights
    tokenizer/             tokenizer files (save_pretrained)
    config.json            the resolved training config
    metrics.json           validation metrics at 0.5 and at the thresholds, training history
    manifest.json          sha256 of every file above and the bundle's content hash

No pickles, and loading never executes code from the bundle: the architecture is rebuilt from
JSON with built-in transformers classes, and weights come from safetensors.

Integrity. A bundle is exactly the files its manifest lists: ``load_bundle`` refuses a folder with
a file missing or one the manifest does not list (named, with the fix), recomputes every file's
sha256 from the bytes it loads and the content hash from those, and refuses any difference. The
content hash (``Bundle.hash``) is therefore the hash of what was loaded, never a copied string.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from emotions import storage
from emotions.batching import tokenize
from emotions.labels import EMOTIONS, check_same_labels
from emotions.model import EmotionClassifier, build_head, encoder_from_config

FORMAT = "emotions-bundle"
VERSION = 1
REQUIRED = ("bundle.json", "encoder_config.json", "model.safetensors", "config.json",
            "metrics.json", "manifest.json", "tokenizer")  # fmt: skip


class BundleError(ValueError):
    """A bundle folder that is incomplete, altered, or made for other labels."""


def save_bundle(output: str | Path, *, weights: dict[str, torch.Tensor], encoder_config: dict,
                head: dict, tokenizer, thresholds: np.ndarray, config: dict, metrics: dict) -> Path:  # fmt: skip
    """Write the bundle into ``output`` (replaced atomically if it exists) and return its path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        save_file({k: v.contiguous().cpu() for k, v in weights.items()}, str(staging / "model.safetensors"))
        tokenizer.save_pretrained(str(staging / "tokenizer"))
        _write_json(staging / "encoder_config.json", encoder_config)
        _write_json(staging / "config.json", config)
        _write_json(staging / "metrics.json", metrics)
        _write_json(staging / "bundle.json", {
            "format": FORMAT, "version": VERSION, "labels": list(EMOTIONS),
            "thresholds": {name: float(t) for name, t in zip(EMOTIONS, thresholds)},
            "head": head, "max_length": config["data"]["max_length"],
            "encoder": config["model"]["encoder"],
        })  # fmt: skip
        files = _file_hashes(staging)
        _write_json(staging / "manifest.json", {"files": files, "hash": _content_hash(files)})
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return output


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

    @property
    def labels(self) -> tuple[str, ...]:
        return EMOTIONS

    def run(self, texts: list[str], batch_size: int = 64, precision: str = "fp32", output: str = "probs") -> np.ndarray:
        """[n] texts -> ``inference.run_rows`` on the model's device: [n, 28] probabilities or
        [n, hidden] pooled features (float32)."""
        from emotions.inference import run_rows

        data = tokenize(texts, np.zeros((len(texts), len(EMOTIONS))), self.tokenizer, self.max_length)
        device = next(self.model.parameters()).device
        return run_rows(self.model, data, self.tokenizer.pad_token_id or 0, batch_size=batch_size, device=device,
                        precision=precision, output=output).cpu().numpy()  # fmt: skip

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


def publish_bundle(local: Path, output: str) -> str:
    """Upload a finished local bundle to a URI; the manifest goes last so a reader never sees a
    partial bundle as complete. An earlier bundle there is deleted first, as ``save_bundle``
    replaces a local one: a file it left behind would not be in the new manifest, and
    ``load_bundle`` would refuse the bundle."""
    target = storage.Folder.from_uri(output)
    if target.exists("manifest.json"):
        target.delete("manifest.json")  # first: no reader takes the half-deleted folder for a bundle
        target.delete()
    target.upload(local, last="manifest.json")
    return output


def load_bundle(path: str | Path, device: str = "cpu", verify: bool = True) -> Bundle:
    """Read a bundle folder (local, or a URI that pyarrow understands: it is downloaded first).

    The folder must hold exactly the files its manifest lists. With ``verify`` (the default) every
    file's sha256 and the content hash are recomputed and compared with the manifest's;
    ``verify=False`` skips the hashing and trusts the manifest's hash."""
    if storage.is_uri(path):
        path = download_bundle(str(path))
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"model bundle {path} does not exist (expected a folder made by `emotions train`)")
    missing = [name for name in REQUIRED if not (path / name).exists()]
    if missing:
        raise BundleError(f"model bundle {path} is incomplete: missing {missing}. "
                          "Copy the whole bundle folder, or retrain with `emotions train`.")  # fmt: skip
    manifest = read_manifest(path)
    check_file_set(path, manifest["files"])
    content_hash = check_hashes(path, manifest) if verify else manifest["hash"]
    meta = json.loads((path / "bundle.json").read_text())
    if meta.get("format") != FORMAT:
        raise BundleError(f"{path}/bundle.json is not an emotions bundle (format={meta.get('format')!r})")
    check_same_labels(meta["labels"], f"model bundle {path}")
    head = meta["head"]
    encoder = encoder_from_config(json.loads((path / "encoder_config.json").read_text()))
    model = EmotionClassifier(encoder, build_head(encoder.config.hidden_size, head["depth"],
                                                  head["dropout"], head.get("hidden")),
                              head["pooling"])  # fmt: skip
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"), trust_remote_code=False)
    return Bundle(
        path=path, model=model, tokenizer=tokenizer,
        thresholds=np.array([meta["thresholds"][name] for name in EMOTIONS], dtype=np.float32),
        max_length=meta["max_length"], hash=content_hash,
        config=json.loads((path / "config.json").read_text()),
        metrics=json.loads((path / "metrics.json").read_text()),
    )  # fmt: skip


def download_bundle(uri: str) -> Path:
    """A local copy of the bundle at ``uri``, in ``bundle_cache()/<content hash>``: one copy per
    distinct bundle however often it is loaded (a nightly job, every tagging actor), instead of
    a new temporary folder each time. The copy is made beside it and renamed into place, so a
    crash never leaves a half copy under the hash; load_bundle then checks it file by file."""
    import pyarrow.fs as pafs

    source = storage.Folder.from_uri(uri)
    try:
        manifest = json.loads(source.read_bytes("manifest.json"))
        content_hash, listed = manifest["hash"], dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BundleError(f"{uri} has no readable manifest.json ({error}): is it a bundle written by "
                          "`emotions train`?") from error  # fmt: skip
    infos = source.fs.get_file_info(pafs.FileSelector(source.root, recursive=True))
    found = {i.path[len(source.root):].lstrip("/") for i in infos if i.type == pafs.FileType.File}
    check_file_set(uri, listed, found - {"manifest.json"})  # a cached copy must not hide a changed remote
    if not all(c in "0123456789abcdef" for c in content_hash) or not content_hash:
        raise BundleError(f"{uri}/manifest.json: hash {content_hash!r} is not a hex digest")
    cache = bundle_cache()
    target = cache / content_hash
    if (target / "manifest.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{content_hash}-", dir=cache))
    source.download(partial)
    try:
        partial.rename(target)
    except OSError:  # another process put its copy there first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def bundle_cache() -> Path:
    """Where bundles loaded from URIs are copied: $EMOTIONS_BUNDLE_CACHE, else a folder in the
    temporary directory."""
    import os

    return Path(os.environ.get("EMOTIONS_BUNDLE_CACHE") or Path(tempfile.gettempdir()) / "emotions-bundles")


def read_manifest(path: Path) -> dict:
    """manifest.json: ``files`` (relative path -> sha256) and ``hash`` (the content hash)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except ValueError as error:
        raise BundleError(f"{path}/manifest.json is not JSON ({error}). Use an unmodified copy of the "
                          "bundle, or retrain with `emotions train`.") from error  # fmt: skip
    if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
            and isinstance(manifest.get("hash"), str)):  # fmt: skip
        raise BundleError(f"{path}/manifest.json is not a bundle manifest (expected 'files' and 'hash'). "
                          "Use an unmodified copy of the bundle, or retrain with `emotions train`.")  # fmt: skip
    return manifest


def check_file_set(path: Path | str, listed: dict[str, str], found: set[str] | None = None) -> None:
    """Refuse a folder whose files (``found``: relative paths but the manifest; by default those
    under the local ``path``) are not exactly the manifest's: a file the manifest does not list
    was never checked and could be read by a loader (a tokenizer picks up extra files)."""
    found = set(_bundle_files(Path(path))) if found is None else found
    extra, missing = sorted(found - set(listed)), sorted(set(listed) - found)
    problems = []
    if missing:
        problems.append(f"missing {missing}, which manifest.json lists: copy the whole bundle folder again")
    if extra:
        problems.append(f"holds {extra}, which manifest.json does not list: delete them, or copy the "
                        "bundle again into an empty folder (a bundle is changed only by writing a new one)")
    if problems:
        raise BundleError(f"model bundle {path} does not match its manifest: " + "; ".join(problems) + ".")


def check_hashes(path: Path, manifest: dict) -> str:
    """Recompute every file's sha256 and the content hash; refuse the bundle if either differs
    from the manifest. Returns the recomputed content hash.

    Each file is read once here, in 1 MiB blocks; the weights are then memory-mapped by
    safetensors from the page cache, not read from disk again. (Reading them into one bytes
    object and deserialising that instead costs two more copies of the weights: on an 87 MB
    MiniLM bundle, the median of 14 loads on the 2-core machine was 0.69 s that way against
    0.57 s, and 0.56 s before the file-set and content-hash checks.)"""
    found = _file_hashes(path)
    changed = sorted(name for name, digest in found.items() if digest != manifest["files"][name])
    if changed:
        raise BundleError(f"model bundle {path} was altered after it was written: the sha256 of {changed} "
                          "does not match manifest.json. Use an unmodified copy of the bundle, or retrain "
                          "with `emotions train`.")  # fmt: skip
    content_hash = _content_hash(found)
    if content_hash != manifest["hash"]:
        raise BundleError(f"model bundle {path} was altered after it was written: manifest.json gives the "
                          f"content hash {manifest['hash']}, but its files hash to {content_hash}. Use an "
                          "unmodified copy of the bundle, or retrain with `emotions train`.")  # fmt: skip
    return content_hash


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _bundle_files(root: Path) -> list[str]:
    """Every file under ``root`` but the manifest, as sorted relative POSIX paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).as_posix() != "manifest.json")  # fmt: skip


def _file_hashes(root: Path) -> dict[str, str]:
    hashes = {}
    for name in _bundle_files(root):
        digest = hashlib.sha256()
        with open(root / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        hashes[name] = digest.hexdigest()
    return hashes


def _content_hash(files: dict[str, str]) -> str:
    """sha256 over the sorted (path, file hash) pairs, shortened: names the bundle's content."""
    joined = "\n".join(f"{name} {digest}" for name, digest in sorted(files.items()))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]
