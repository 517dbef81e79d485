"""Where bundles are written to and fetched from: output folders, URIs, and the private cache.

    local bundle --publish_bundle--> URI (manifest.json uploaded last)
    URI --download_bundle--> bundle_cache()/<content hash>/ --read_bundle--> Bundle

Writing. ``save_bundle`` and ``publish_bundle`` replace the whole output folder, so they write only
into a folder that is missing, empty, or an earlier bundle (``check_output_folder``); any other
folder is refused by name, so ``--output .`` never deletes a user's files. ``emotions train`` and
``emotions tune`` check their output this way before Ray starts.

Bundles loaded from a URI are copied once into the user's private cache (``bundle_cache()``:
$EMOTIONS_BUNDLE_CACHE, else $XDG_CACHE_HOME/emotions/bundles, else ~/.cache/emotions/bundles,
made with mode 0700), one folder per content hash. A cached copy is used only if its manifest.json
is byte for byte the remote's, and it is verified like any bundle; a copy that differs or fails its
check is discarded and the bundle fetched again, once (``load_remote_bundle`` in ``emotions.bundle``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from emotions import storage
from emotions.bundle_manifest import BundleError, check_file_set, is_bundle_folder

log = logging.getLogger("emotions.bundle")


def check_output_folder(output: str | Path) -> None:
    """Refuse (BundleError) to write a bundle into ``output``, a local folder or a URI, unless it is
    missing, empty, or an earlier bundle: writing replaces the whole folder, so anything else in it
    would be deleted. Cheap (reads two small files at most): callers run it before training."""
    folder = storage.Folder.from_uri(output)
    kind = folder.fs.get_file_info(folder.root).type
    if kind == pafs.FileType.NotFound:
        return
    if kind != pafs.FileType.Directory:
        raise BundleError(
            f"bundle output {folder.uri} is a file, not a folder. Choose a new folder for the "
            "bundle (e.g. bundles/NAME), or move that file away."
        )
    if is_bundle_folder(folder) or not folder.list():
        return
    raise BundleError(
        f"bundle output {folder.uri} already holds files and is not a model bundle (a "
        "bundle has a manifest.json with 'files' and 'hash' and a bundle.json of format "
        "'emotions-bundle'); writing a bundle there would delete those files. Choose a new "
        "or empty folder (e.g. "
        f"{storage.join(folder.uri, 'bundle')}), or move those files away first."
    )


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
        log.warning(
            "the cached copy %s is not the bundle at %s (another manifest.json): fetching it again", target, uri
        )
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
        raise BundleError(
            f"{uri} has no readable manifest.json ({error}): is it a bundle written by `emotions train`?"
        ) from error
    infos = source.fs.get_file_info(pafs.FileSelector(source.root, recursive=True))
    found = {i.path[len(source.root) :].lstrip("/") for i in infos if i.type == pafs.FileType.File}
    check_file_set(uri, listed, found - {"manifest.json"})
    if not isinstance(content_hash, str) or not content_hash or not all(c in "0123456789abcdef" for c in content_hash):
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
