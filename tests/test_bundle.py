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
from saved_bundles import bundle_fields

from emotions import storage
from emotions.bundle import BundleError, load_bundle, publish_bundle, save_bundle
from emotions.bundle_manifest import _content_hash, _file_hashes
from emotions.bundle_store import bundle_cache


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
    (copy / "added_tokens.json").write_text('{"[NEW]": 30522}')  # a tokenizer would read it
    with pytest.raises(BundleError, match="does not list") as refused:
        load_bundle(copy)
    assert "['added_tokens.json', 'notes.txt']" in str(refused.value)
    assert "copy the bundle again into an empty folder" in str(refused.value)


def test_missing_file_is_refused_by_name(copy):
    (copy / "tokenizer.json").unlink()  # listed in the manifest, not required by the layout
    with pytest.raises(BundleError, match=r"missing \['tokenizer.json'\], which manifest.json lists"):
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
    folder.write_text("left over\n", "vocab.txt")  # e.g. from an earlier, other encoder
    with pytest.raises(BundleError, match=r"\['vocab.txt'\], which manifest.json does not list"):
        load_bundle(uri)
    publish_bundle(smoke_bundle, uri)  # replaces the earlier bundle whole
    assert not folder.exists("vocab.txt")
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
    storage.Folder.from_uri(uri).write_text("left over\n", "vocab.txt")
    with pytest.raises(BundleError, match="which manifest.json does not list"):
        load_bundle(uri)


# ----------------------------------------------------------------------------- writing over a folder


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


# ----------------------------------------------------------------------------- the Hugging Face layout


def test_hugging_face_reads_the_bundle_folder_as_it_is(smoke_bundle):
    """config.json, model.safetensors and the tokenizer are what save_pretrained writes: the
    encoder loads with AutoModel and its weights are the bundle's."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    bundle = load_bundle(smoke_bundle)
    assert AutoConfig.from_pretrained(smoke_bundle).model_type == "bert"
    encoder = AutoModel.from_pretrained(smoke_bundle)
    assert type(encoder).__name__ == "BertModel"
    ours = bundle.model.encoder.state_dict()
    theirs = encoder.state_dict()
    assert ours and all(torch.equal(theirs[name], weight) for name, weight in ours.items())
    assert set(theirs) - set(ours) <= {"pooler.dense.weight", "pooler.dense.bias"}  # we pool ourselves
    assert "embeddings.word_embeddings.weight" in load_file(str(smoke_bundle / "model.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(smoke_bundle)
    assert tokenizer("I love it")["input_ids"] == bundle.tokenizer("I love it")["input_ids"]
    head = load_file(str(smoke_bundle / "head.safetensors"))
    assert all(torch.equal(head[name], w) for name, w in bundle.model.head.state_dict().items())
    assert json.loads((smoke_bundle / "emotions_config.json").read_text()) == bundle.config
    assert not [p for p in smoke_bundle.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pickle")]


def as_version_1(bundle_dir, target):
    """The bundle at ``bundle_dir`` written in format version 1: encoder_config.json, one
    model.safetensors with encoder.* and head.*, tokenizer/, the training config in config.json."""
    from safetensors.torch import load_file, save_file

    target.mkdir()
    (target / "tokenizer").mkdir()
    weights = {f"encoder.{k}": v for k, v in load_file(str(bundle_dir / "model.safetensors")).items()}
    weights.update({f"head.{k}": v for k, v in load_file(str(bundle_dir / "head.safetensors")).items()})
    save_file(weights, str(target / "model.safetensors"))
    shutil.copy(bundle_dir / "config.json", target / "encoder_config.json")
    shutil.copy(bundle_dir / "emotions_config.json", target / "config.json")
    shutil.copy(bundle_dir / "metrics.json", target / "metrics.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (bundle_dir / name).exists():
            shutil.copy(bundle_dir / name, target / "tokenizer" / name)
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    (target / "bundle.json").write_text(json.dumps({**meta, "version": 1}))
    files = _file_hashes(target)
    (target / "manifest.json").write_text(json.dumps({"files": files, "hash": _content_hash(files)}))
    return target


def test_a_version_1_bundle_still_loads_and_predicts_the_same(smoke_bundle, tmp_path):
    from emotions.tagging.predictor import load_bundle_tokenizer

    old = load_bundle(as_version_1(smoke_bundle, tmp_path / "v1"))
    new = load_bundle(smoke_bundle)
    texts = ["Thank you so much!", "This is terrible."]
    assert (old.predict_proba(texts) == new.predict_proba(texts)).all()
    assert old.config == new.config
    assert load_bundle_tokenizer(str(tmp_path / "v1"))("hi")["input_ids"] == new.tokenizer("hi")["input_ids"]


def test_a_bundle_of_an_unknown_format_version_is_refused_with_what_to_do(copy):
    meta = json.loads((copy / "bundle.json").read_text())
    (copy / "bundle.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(
        BundleError,
        match=r"format version 99; this emotions reads versions \[1, 2\]. Upgrade "
        r"emotions to read it, or retrain",
    ):
        load_bundle(copy)
