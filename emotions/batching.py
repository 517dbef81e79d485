"""Tokenized examples as flat arrays, worker shards, and length-bucketed batches.

Token ids live in one flat int32 array plus offsets, so a whole split is a few numpy arrays that
Ray's object store hands to every worker without copying.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TokenizedSet:
    ids: np.ndarray  # [total_tokens] int32, all examples back to back
    offsets: np.ndarray  # [n + 1] int64; example i is ids[offsets[i]:offsets[i + 1]]
    labels: np.ndarray  # [n, 28] float32
    index: np.ndarray  # [n] int64: row number in the source data (shards keep it)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def select(self, rows: np.ndarray) -> TokenizedSet:
        lengths = self.lengths[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = self.offsets[rows]
        # Gather every selected example's token span in one vectorised pass.
        positions = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return TokenizedSet(self.ids[positions], offsets, self.labels[rows], self.index[rows])

    def shard(self, rank: int, world: int, equal: bool = True) -> TokenizedSet:
        """Rows rank::world. ``equal`` wraps around so every shard has the same size, which DDP
        needs (each worker must take the same number of steps); evaluation uses equal=False."""
        n = len(self)
        total = -(-n // world) * world if equal else n
        rows = (np.arange(total) % n)[rank::world]
        return self.select(rows)


def tokenize(texts: list[str], labels: np.ndarray, tokenizer, max_length: int) -> TokenizedSet:
    """Tokenize once, without padding (padding happens per batch)."""
    encoded = tokenizer(
        texts, truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=False
    )["input_ids"]
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((t for e in encoded for t in e), dtype=np.int32, count=int(offsets[-1]))
    return TokenizedSet(ids, offsets, labels.astype(np.float32), np.arange(len(encoded)))


def bucket_batches(lengths: np.ndarray, batch_size: int, seed: int, pool: int = 50) -> list[np.ndarray]:
    """Length-bucketed batches: shuffle, cut into pools of ``pool`` batches, sort each pool by
    length, slice into batches, shuffle the batches. Short comments travel with short ones, so
    little compute goes to padding, while the order stays random."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * pool):
        chunk = order[start : start + batch_size * pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def random_batches(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Inference order: by length, so each batch pads as little as possible."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(data: TokenizedSet, rows: np.ndarray, pad_id: int, pad_to: int | None = None):
    """-> input_ids [batch, seq] int64, attention_mask [batch, seq] int64, labels [batch, 28]."""
    lengths = data.lengths[rows]
    width = pad_to or int(lengths.max())
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.arange(width)[None, :] < lengths[:, None]
    for k, row in enumerate(rows):
        input_ids[k, : lengths[k]] = data.ids[data.offsets[row] : data.offsets[row + 1]]
    return (torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(data.labels[rows]))
