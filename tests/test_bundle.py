"""Bundle integrity: a bundle is exactly the files its manifest lists, and every hash is recomputed
from the bytes that are loaded (the smoke bundle, copied and then altered the way copies go wrong).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from emotions import storage
from emotions.bundle import BundleError, _file_hashes, load_bundle, publish_bundle


@pytest.fixture
def copy(smoke_bundle, tmp_path):
    """A private copy of the smoke bundle, free to alter."""
    return shutil.copytree(smoke_bundle, tmp_path / "bundle")


def test_untouched_copy_loads_with_the_recomputed_hash(copy):
    bundle = load_bundle(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert bundle.hash == manifest["hash"]
    assert _file_hashes(copy) == manifest["files"]


def test_extra_files_are_refused_by_name(copy):
    (copy / "notes.txt").write_text("tried a new threshold for grief\n")
    (copy / "tokenizer" / "added_tokens.json").write_text('{"[NEW]": 30522}')  # a tokenizer would read it
    with pytest.raises(BundleError, match="does not list") as refused:
        load_bundle(copy)
    assert "['notes.txt', 'tokenizer/added_tokens.json']" in str(refused.value)
    assert "copy the bundle again into an empty folder" in str(refused.value)


def test_missing_file_is_refused_by_name(copy):
    (copy / "tokenizer" / "tokenizer_config.json").unlink()  # listed in the manifest, not in REQUIRED
    with pytest.raises(BundleError, match=r"missing \['tokenizer/tokenizer_config.json'\], which manifest.json lists"):
        load_bundle(copy)


def test_tampered_weights_of_the_same_size_are_refused(smoke_bundle, copy):
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # after the header: inside the first tensors
    data[start + 100 : start + 104] = b"\x7f\x7f\x7f\x7f"
    weights.write_bytes(bytes(data))
    assert weights.stat().st_size == (smoke_bundle / "model.safetensors").stat().st_size
    unchecked = load_bundle(copy, verify=False)  # still valid safetensors: only the hash tells
    original = load_bundle(smoke_bundle, verify=False)
    changed = [k for k, v in unchecked.model.state_dict().items() if not torch.equal(v, original.model.state_dict()[k])]
    assert len(changed) == 1
    with pytest.raises(BundleError, match=r"altered.*sha256 of \['model.safetensors'\]"):
        load_bundle(copy)


def test_manifest_content_hash_is_recomputed_not_read(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    real = manifest["hash"]
    manifest["hash"] = "0123456789abcdef"  # per-file hashes intact: only the content hash is forged
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"content hash 0123456789abcdef, but its files hash to {real}"):
        load_bundle(copy)


def test_bundle_on_s3_is_checked_and_republishing_removes_stale_files(smoke_bundle, s3):
    uri = storage.join(s3, "bundle-integrity", "bundle")
    publish_bundle(smoke_bundle, uri)
    folder = storage.Folder.from_uri(uri)
    folder.write_text("left over\n", "tokenizer", "vocab.txt")  # e.g. from an earlier, other encoder
    with pytest.raises(BundleError, match=r"\['tokenizer/vocab.txt'\], which manifest.json does not list"):
        load_bundle(uri)
    publish_bundle(smoke_bundle, uri)  # replaces the earlier bundle whole
    assert not folder.exists("tokenizer", "vocab.txt")
    assert load_bundle(uri).hash == json.loads((smoke_bundle / "manifest.json").read_text())["hash"]


def test_a_bundle_on_s3_is_copied_once_per_content_hash(smoke_bundle, s3, tmp_path, monkeypatch):
    """Loading a bundle from a URI again (every night, every actor) reuses one local copy."""
    monkeypatch.setenv("EMOTIONS_BUNDLE_CACHE", str(tmp_path / "cache"))
    uri = storage.join(s3, "bundle-cache", "bundle")
    publish_bundle(smoke_bundle, uri)
    first, second = load_bundle(uri), load_bundle(uri)
    assert first.path == second.path == tmp_path / "cache" / first.hash
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.hash]  # no temporary folders left
    # The remote is still checked against its manifest before the copy is used.
    storage.Folder.from_uri(uri).write_text("left over\n", "tokenizer", "vocab.txt")
    with pytest.raises(BundleError, match="which manifest.json does not list"):
        load_bundle(uri)
