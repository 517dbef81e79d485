"""Bundle integrity: a bundle is exactly the files its manifest lists, and every hash is recomputed
from the bytes that are loaded (the smoke bundle, copied and then altered the way copies go wrong).
Writing a bundle replaces only an earlier bundle or an empty folder; a cached copy of a bundle on
S3 is used only while it is the remote's, and fetched again when it is not.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from emotions import storage
from emotions.bundle import (BundleError, _content_hash, _file_hashes, bundle_cache, load_bundle, publish_bundle,
                             save_bundle)  # fmt: skip


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


# ----------------------------------------------------------------------------- writing over a folder


def bundle_fields(path) -> dict:
    """``save_bundle``'s keyword arguments that rebuild the bundle at ``path``."""
    bundle = load_bundle(path)
    meta = json.loads((path / "bundle.json").read_text())
    return dict(weights=bundle.model.state_dict(), encoder_config=json.loads((path / "encoder_config.json").read_text()),
                head=meta["head"], tokenizer=bundle.tokenizer, thresholds=bundle.thresholds,
                config=bundle.config, metrics=bundle.metrics)  # fmt: skip


def test_saving_over_a_folder_of_other_files_is_refused_and_they_survive(smoke_bundle, tmp_path):
    home = tmp_path / "home"  # `emotions train --output ~`
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / "draft.tex").write_text("three years of work\n")
    with pytest.raises(BundleError, match="already holds files and is not a model bundle") as refused:
        save_bundle(home, **bundle_fields(smoke_bundle))
    assert str(home) in str(refused.value) and "Choose a new or empty folder" in str(refused.value)
    assert (home / "thesis" / "draft.tex").read_text() == "three years of work\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no staging folder left beside it


@pytest.mark.parametrize("before", ["missing", "empty", "earlier bundle"])
def test_saving_writes_a_new_or_empty_folder_and_replaces_an_earlier_bundle(smoke_bundle, tmp_path, before):
    output = tmp_path / "bundle"
    if before == "empty":
        output.mkdir()
    elif before == "earlier bundle":
        shutil.copytree(smoke_bundle, output)
    fields = bundle_fields(smoke_bundle)
    save_bundle(output, **{**fields, "thresholds": fields["thresholds"] * 0 + 0.25})
    assert (load_bundle(output).thresholds == 0.25).all()  # the new bundle, whole


def test_publishing_over_a_folder_of_other_files_on_s3_is_refused_and_they_survive(smoke_bundle, s3):
    uri = storage.join(s3, "bundle-output", "shared")
    folder = storage.Folder.from_uri(uri)
    folder.write_text("a colleague's results\n", "results.csv")
    folder.write_text('{"not": "a bundle"}', "manifest.json")  # a manifest.json of something else
    with pytest.raises(BundleError, match="already holds files and is not a model bundle") as refused:
        publish_bundle(smoke_bundle, uri)
    assert uri in str(refused.value)
    assert folder.read_text("results.csv") == "a colleague's results\n"
    assert folder.read_text("manifest.json") == '{"not": "a bundle"}'


# ----------------------------------------------------------------------------- the bundle cache


@pytest.fixture
def on_s3(smoke_bundle, s3, tmp_path, monkeypatch, request):
    """The smoke bundle published to its own S3 folder, loaded through a cache in ``tmp_path``."""
    monkeypatch.setenv("EMOTIONS_BUNDLE_CACHE", str(tmp_path / "cache"))
    uri = storage.join(s3, "bundle-cache", request.node.name)
    publish_bundle(smoke_bundle, uri)
    return uri


def test_a_damaged_cached_copy_is_discarded_and_fetched_again(smoke_bundle, on_s3):
    first = load_bundle(on_s3)
    weights = first.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x7f\x7f\x7f\x7f"  # a flipped block on disk: same size, same manifest
    weights.write_bytes(bytes(data))
    again = load_bundle(on_s3)
    assert again.path == first.path and again.hash == first.hash
    assert weights.read_bytes() == (smoke_bundle / "model.safetensors").read_bytes()
    assert [p.name for p in first.path.parent.iterdir()] == [first.hash]  # nothing left over


def test_a_cached_copy_with_another_manifest_is_not_used(smoke_bundle, on_s3, tmp_path):
    remote = json.loads((smoke_bundle / "manifest.json").read_text())
    planted = shutil.copytree(smoke_bundle, tmp_path / "cache" / remote["hash"])  # under the remote's hash
    meta = json.loads((planted / "bundle.json").read_text())
    meta["thresholds"] = dict.fromkeys(meta["thresholds"], 0.99)  # another bundle, consistent in itself
    (planted / "bundle.json").write_text(json.dumps(meta))
    files = _file_hashes(planted)
    (planted / "manifest.json").write_text(json.dumps({"files": files, "hash": _content_hash(files)}))
    assert load_bundle(planted).hash != remote["hash"]  # passes its own check
    bundle = load_bundle(on_s3)
    assert bundle.hash == remote["hash"]
    assert (bundle.thresholds == load_bundle(smoke_bundle).thresholds).all()
    assert (planted / "manifest.json").read_bytes() == (smoke_bundle / "manifest.json").read_bytes()


def test_the_bundle_cache_is_a_private_folder_of_the_user(on_s3, tmp_path, monkeypatch):
    monkeypatch.delenv("EMOTIONS_BUNDLE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert bundle_cache() == tmp_path / "home" / ".cache" / "emotions" / "bundles"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    bundle = load_bundle(on_s3)
    assert bundle.path.parent == tmp_path / "xdg" / "emotions" / "bundles"
    assert os.stat(bundle.path.parent).st_mode & 0o777 == 0o700  # nobody else can plant a copy
