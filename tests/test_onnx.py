"""The ONNX Runtime export: what it computes is what the torch model computes, on real padded
batches, with the attention mask kept; the bundle's own model is untouched by it; a graph that
drops the mask, or that belongs to another bundle, is refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from emotions import onnx_model
from emotions.batching import collate, tokenize
from emotions.bundle import load_bundle
from emotions.data import load_labelled
from emotions.inference import run_rows
from emotions.precision import PrecisionError, check_runtimes, runtime_model


@pytest.fixture
def bundle(smoke_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("EMOTIONS_CACHE", str(tmp_path / "cache"))  # an empty cache: the test exports
    return load_bundle(smoke_bundle)


def dev_rows(bundle, n: int = 96):
    texts = load_labelled("goemotions:dev").texts[:n]
    return tokenize(texts, np.zeros((n, 0), dtype=np.float32), bundle.tokenizer, bundle.max_length)


def test_the_export_matches_torch_fp32_on_padded_batches_and_keeps_the_mask(bundle):
    data = dev_rows(bundle)
    before = run_rows(bundle.model, data, 0, batch_size=16, device="cpu")
    path = onnx_model.export_bundle(bundle, "fp32")
    assert path.parent.parent == onnx_model.cache_dir() / "onnx" and path.parent.name == bundle.hash
    exported = runtime_model(bundle, "onnx-fp32")
    assert exported.bundle_hash == bundle.hash and exported.hidden_size == bundle.model.hidden_size
    # Exported from a copy: the bundle's model computes what it computed before the export.
    assert torch.equal(run_rows(bundle.model, data, 0, batch_size=16, device="cpu"), before)
    # Batches in input order, padded to their longest row: every row's logits and features as torch's.
    with torch.inference_mode():
        for start in range(0, len(data), 32):
            ids, mask, _ = collate(data, np.arange(start, start + 32), 0)
            assert not bool(mask.all())  # real padding in every batch
            np.testing.assert_allclose(exported(ids, mask).numpy(), bundle.model(ids, mask).numpy(), atol=1e-4)
            np.testing.assert_allclose(
                exported.features(ids, mask).numpy(), bundle.model.features(ids, mask).numpy(), atol=1e-4
            )
            # The mask is an input of the graph, not a constant of the trace: what stands in the padded
            # positions changes nothing, and a row alone (no padding) gives what it gave padded.
            noise = torch.where(mask.bool(), ids, torch.randint_like(ids, 1000, 2000))
            np.testing.assert_allclose(exported(noise, mask).numpy(), exported(ids, mask).numpy(), atol=1e-5)
            length = int(mask[0].sum())
            np.testing.assert_allclose(
                exported(ids[:1, :length], mask[:1, :length]).numpy(), exported(ids, mask).numpy()[:1], atol=1e-5
            )
    # Scored through the one inference loop, as tagging and the gate score.
    via_loop = run_rows(exported, data, 0, batch_size=16, device="cpu", precision="onnx-fp32")
    np.testing.assert_allclose(via_loop.numpy(), before.numpy(), atol=1e-5)


def test_int8_is_quantized_from_the_cached_export_and_stays_close(bundle):
    data = dev_rows(bundle)
    fp32 = run_rows(bundle.model, data, 0, batch_size=16, device="cpu").numpy()
    int8 = run_rows(runtime_model(bundle, "onnx-int8"), data, 0, batch_size=16, device="cpu").numpy()
    assert onnx_model.onnx_path(bundle.hash, "fp32").exists()  # the int8 graph comes from the fp32 one
    assert 0 < np.abs(int8 - fp32).max() < 0.05
    int8_file = onnx_model.onnx_path(bundle.hash, "int8")
    assert int8_file.stat().st_size < onnx_model.onnx_path(bundle.hash, "fp32").stat().st_size / 2
    stamp = int8_file.stat().st_mtime_ns
    onnx_model.export_bundle(bundle, "int8")  # cached: not made again
    assert int8_file.stat().st_mtime_ns == stamp and not list(int8_file.parent.glob(".*"))  # no temp files left


def test_a_graph_that_drops_the_mask_or_belongs_to_another_bundle_is_refused(bundle, tmp_path):
    class NoMask(torch.nn.Module):  # what a trace that dropped the attention mask computes
        def __init__(self, model):
            super().__init__()
            self.encoder, self.head, self.model = model.encoder, model.head, model

        def features(self, input_ids, attention_mask):
            out = self.encoder(input_ids=input_ids, attention_mask=torch.ones_like(attention_mask))
            return out.last_hidden_state[:, 0]

        def forward(self, input_ids, attention_mask):
            return self.head(self.features(input_ids, attention_mask))

    broken = NoMask(copy.deepcopy(bundle.model))
    broken.encoder.set_attn_implementation("eager")
    path = tmp_path / "no-mask.onnx"
    onnx_model.export_fp32(broken, bundle.tokenizer, bundle.max_length, bundle.hash, path)
    with pytest.raises(onnx_model.OnnxExportError, match="change of a row's logits with its padding"):
        onnx_model.verify_export(broken, bundle.tokenizer, bundle.max_length, path)
    with pytest.raises(onnx_model.OnnxExportError, match="largest logit difference"):
        onnx_model.verify_export(bundle.model, bundle.tokenizer, bundle.max_length, path)  # not this model
    with pytest.raises(PrecisionError, match="exported from bundle other"):
        other = copy.copy(bundle)
        other.hash = "other"
        runtime_model(bundle, "onnx-fp32", exported=onnx_model.onnx_bytes(other, "fp32"))


def test_an_export_that_fails_its_check_never_enters_the_cache(bundle, monkeypatch):
    monkeypatch.setattr(onnx_model, "EXPORT_TOLERANCE", -1.0)  # no export can pass
    with pytest.raises(onnx_model.OnnxExportError, match=f"export of bundle {bundle.hash} does not match"):
        onnx_model.export_bundle(bundle, "int8")
    folder = onnx_model.onnx_path(bundle.hash, "fp32").parent
    assert not folder.exists() or not list(folder.iterdir())  # neither the graph nor a temp file
    with pytest.raises(PrecisionError, match="does not match the torch model"):  # the gate says so
        check_runtimes(bundle, ["onnx-int8"])
