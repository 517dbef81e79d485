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

Writing. ``save_bundle`` and ``publish_bundle`` replace the whole output folder, so they write only
into a folder that is missing, empty, or an earlier bundle (``check_output_folder``: its
manifest.json is a bundle manifest and its bundle.json says ``format: emotions-bundle``); any other
folder is refused by name, so ``--output .`` never deletes a user's files. ``emotions train`` and
``emotions tune`` check their output this way before Ray starts.

Bundles loaded from a URI are copied once into the user's private cache (``bundle_cache()``:
$EMOTIONS_BUNDLE_CACHE, else $XDG_CACHE_HOME/emotions/bundles, else ~/.cache/emotions/bundles,
made with mode 0700), one folder per content hash. A cached copy is used only if its manifest.json
is byte for byte the remote's, and it is verified like any bundle; a copy that differs or fails its
check is discarded and the bundle fetched again, once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from emotions import storage
from emotions.batching import tokenize
from emotions.labels import EMOTIONS, check_same_labels
from emotions.model import EmotionClassifier, build_head, encoder_from_config

log = logging.getLogger("emotions.bundle")

FORMAT = "emotions-bundle"
VERSION = 1
REQUIRED = ("bundle.json", "encoder_config.json", "model.safetensors", "config.json",
            "metrics.json", "manifest.json", "tokenizer")  # fmt: skip


class BundleError(ValueError):
    """A bundle folder that is incomplete, altered, or made for other labels."""


def save_bundle(output: str | Path, *, weights: dict[str, torch.Tensor], encoder_config: dict,
                head: dict, tokenizer, thresholds: np.ndarray, config: dict, metrics: dict) -> Path:  # fmt: skip
    """Write the bundle into ``output`` and return its path. An earlier bundle there is replaced
    whole; a folder holding anything else is refused (``check_output_folder``)."""
    check_output_folder(output)
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
    ``load_bundle`` would refuse the bundle. A folder holding anything but a bundle is refused."""
    check_output_folder(output)
    target = storage.Folder.from_uri(output)
    if target.exists("manifest.json"):
        target.delete("manifest.json")  # first: no reader takes the half-deleted folder for a bundle
        target.delete()
    target.upload(local, last="manifest.json")
    return output


def check_output_folder(output: str | Path) -> None:
    """Refuse (BundleError) to write a bundle into ``output``, a local folder or a URI, unless it is
    missing, empty, or an earlier bundle: writing replaces the whole folder, so anything else in it
    would be deleted. Cheap (reads two small files at most): callers run it before training."""
    folder = storage.Folder.from_uri(output)
    kind = folder.fs.get_file_info(folder.root).type
    if kind == pafs.FileType.NotFound:
        return
    if kind != pafs.FileType.Directory:
        raise BundleError(f"bundle output {folder.uri} is a file, not a folder. Choose a new folder for the "
                          "bundle (e.g. bundles/NAME), or move that file away.")  # fmt: skip
    if is_bundle_folder(folder) or not folder.list():
        return
    raise BundleError(f"bundle output {folder.uri} already holds files and is not a model bundle (a "
                      "bundle has a manifest.json with 'files' and 'hash' and a bundle.json of format "
                      "'emotions-bundle'); writing a bundle there would delete those files. Choose a new "
                      "or empty folder (e.g. "
                      f"{storage.join(folder.uri, 'bundle')}), or move those files away first.")  # fmt: skip


def is_bundle_folder(folder: storage.Folder) -> bool:
    """Whether ``folder`` holds a bundle that ``save_bundle`` or ``publish_bundle`` wrote (and so
    may replace): its manifest.json has ``files`` and ``hash``, its bundle.json the bundle format."""
    manifest = folder.read_json("manifest.json") if folder.is_file("manifest.json") else None
    meta = folder.read_json("bundle.json") if folder.is_file("bundle.json") else None
    return (manifest is not None and isinstance(manifest.get("files"), dict)
            and isinstance(manifest.get("hash"), str)
            and meta is not None and meta.get("format") == FORMAT)  # fmt: skip


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


def download_bundle(uri: str) -> tuple[Path, bool]:
    """(a local copy of the bundle at ``uri``, whether this call made it), in
    ``bundle_cache()/<content hash>``: one copy per distinct bundle however often it is loaded (a
    nightly job, every tagging actor), instead of a new temporary folder each time. A cached copy
    is reused only if its manifest.json is the remote's, byte for byte (a folder name proves
    nothing); any other is discarded. The copy is made beside it and renamed into place, so a
    crash never leaves a half copy under the hash; load_bundle then checks it file by file."""
    source = storage.Folder.from_uri(uri)
    manifest_bytes, content_hash = read_remote_manifest(source, uri)
    target = bundle_cache() / content_hash
    if target.is_dir() and _read_bytes(target / "manifest.json") == manifest_bytes:
        return target, False
    if target.exists() or target.is_symlink():
        log.warning("the cached copy %s is not the bundle at %s (another manifest.json): fetching it again",
                    target, uri)  # fmt: skip
        discard_cached(target)
    return fetch_into_cache(source, target)


def read_remote_manifest(source: storage.Folder, uri: str) -> tuple[bytes, str]:
    """(manifest.json's bytes, the content hash it gives) of the bundle at ``uri``, after checking
    that the remote folder holds exactly the files it lists: a cached copy must not hide a
    changed remote."""
    try:
        manifest_bytes = source.read_bytes("manifest.json")
        manifest = json.loads(manifest_bytes)
        content_hash, listed = manifest["hash"], dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BundleError(f"{uri} has no readable manifest.json ({error}): is it a bundle written by "
                          "`emotions train`?") from error  # fmt: skip
    infos = source.fs.get_file_info(pafs.FileSelector(source.root, recursive=True))
    found = {i.path[len(source.root):].lstrip("/") for i in infos if i.type == pafs.FileType.File}
    check_file_set(uri, listed, found - {"manifest.json"})
    if not isinstance(content_hash, str) or not content_hash or \
            not all(c in "0123456789abcdef" for c in content_hash):  # fmt: skip
        raise BundleError(f"{uri}/manifest.json: hash {content_hash!r} is not a hex digest")
    return manifest_bytes, content_hash


def fetch_into_cache(source: storage.Folder, target: Path) -> tuple[Path, bool]:
    """Download ``source`` beside ``target`` and rename it into place; -> (target, True). If
    another process put its copy there first, theirs is kept: -> (target, False)."""
    cache = target.parent
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)  # private: only this user reads or plants copies
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    try:
        source.download(partial)
        partial.rename(target)
        return target, True
    except OSError:
        if not target.is_dir():  # the download failed, not the rename
            raise
        return target, False
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def discard_cached(path: Path) -> None:
    """Remove a cached copy: first renamed away (atomic), so no loader takes a half-deleted copy
    for the bundle, then deleted. Nothing if another process removed it first."""
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}-discarded-", dir=path.parent))
    try:
        path.rename(trash / "copy")
    except FileNotFoundError:
        pass
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def bundle_cache() -> Path:
    """Where bundles loaded from URIs are copied: $EMOTIONS_BUNDLE_CACHE, else
    $XDG_CACHE_HOME/emotions/bundles, else ~/.cache/emotions/bundles. The user's own folder (made
    with mode 0700), not the shared temporary directory, where anyone could make a folder under a
    bundle's hash before the bundle is first loaded."""
    if os.environ.get("EMOTIONS_BUNDLE_CACHE"):
        return Path(os.environ["EMOTIONS_BUNDLE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec ignores relative paths
    return base / "emotions" / "bundles"


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


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
