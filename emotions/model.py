"""Encoder + pooling + dense head: the emotion classifier, and the builders for its parts.

token ids [batch, seq] -> encoder -> [batch, seq, hidden] -> pool -> [batch, hidden]
                                                        -> head -> [batch, 28] logits
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel

from emotions.encoders import TINY_RANDOM, TINY_RANDOM_POSITIONS, resolve_encoder
from emotions.labels import NUM_LABELS

TINY_LAYERS = 2


def load_tokenizer(name: str):
    return AutoTokenizer.from_pretrained(resolve_encoder(name))


def load_encoder(name: str, seed: int = 0) -> nn.Module:
    """A pretrained encoder by alias, hub name or local path; ``tiny-random`` is built, seeded."""
    if name == TINY_RANDOM:
        torch.manual_seed(seed)
        vocab = load_tokenizer(name).vocab_size
        config = BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=TINY_RANDOM_POSITIONS,
        )
        return BertModel(config, add_pooling_layer=False)
    try:
        encoder = AutoModel.from_pretrained(resolve_encoder(name))
    except OSError as exc:
        raise OSError(
            f"could not load encoder {name!r}: {exc}\nUse model.encoder=minilm (embedded, offline), "
            "a local folder with config.json and weights, or a hub name on a machine with access."
        ) from exc
    return drop_pooler(encoder)


def encoder_layers(name: str) -> int:
    """The number of transformer layers of an encoder, from its config alone (no weights loaded)."""
    if name == TINY_RANDOM:
        return TINY_LAYERS
    return AutoConfig.from_pretrained(resolve_encoder(name)).num_hidden_layers


def drop_pooler(encoder: nn.Module) -> nn.Module:
    # BERT/RoBERTa's pooler is unused here (we pool ourselves); left in, DDP sees unused params.
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder


def encoder_from_config(config_dict: dict) -> nn.Module:
    """An encoder with the architecture of ``config_dict`` and untrained weights (bundle loading)."""
    config = AutoConfig.for_model(**config_dict)
    return drop_pooler(AutoModel.from_config(config))


def build_head(hidden: int, depth: int, dropout: float, head_hidden: int | None = None) -> nn.Sequential:
    """[batch, hidden] -> [batch, 28]. depth 1: Dropout-Linear; depth 2: Dropout-Linear-GELU-Dropout-Linear."""
    if depth == 1:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, NUM_LABELS))
    if depth == 2:
        width = head_hidden or hidden
        return nn.Sequential(
            nn.Dropout(dropout), nn.Linear(hidden, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, NUM_LABELS)
        )
    raise ValueError(f"head depth must be 1 or 2, got {depth}")


def pool(hidden: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """[batch, seq, hidden], [batch, seq] -> [batch, hidden]."""
    if method == "cls":
        return hidden[:, 0]
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class EmotionClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Module, pooling: str):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.pooling = pooling

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[batch, seq] -> pooled [batch, hidden]."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return pool(out.last_hidden_state, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[batch, seq] -> logits [batch, 28]."""
        return self.head(self.features(input_ids, attention_mask))
