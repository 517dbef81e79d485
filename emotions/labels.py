"""The GoEmotions label set: one source of truth for names, order and groupings.

Head width, metric keys, thresholds and output columns all derive from ``EMOTIONS``.
The groupings are the ones published with the dataset (``resources/goemotions/
ekman_mapping.json`` and ``sentiment_dict.json``); ``neutral`` belongs to no group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# Canonical id order of GoEmotions (emotions.txt): id i is EMOTIONS[i].
EMOTIONS: tuple[str, ...] = (
    "admiration",
    "amusement",
    "anger",
    "annoyance",
    "approval",
    "caring",
    "confusion",
    "curiosity",
    "desire",
    "disappointment",
    "disapproval",
    "disgust",
    "embarrassment",
    "excitement",
    "fear",
    "gratitude",
    "grief",
    "joy",
    "love",
    "nervousness",
    "optimism",
    "pride",
    "realization",
    "relief",
    "remorse",
    "sadness",
    "surprise",
    "neutral",
)
NUM_LABELS = len(EMOTIONS)  # 28
LABEL_TO_ID: dict[str, int] = {name: i for i, name in enumerate(EMOTIONS)}

EKMAN: dict[str, tuple[str, ...]] = {
    "anger": ("anger", "annoyance", "disapproval"),
    "disgust": ("disgust",),
    "fear": ("fear", "nervousness"),
    "joy": (
        "joy",
        "amusement",
        "approval",
        "excitement",
        "gratitude",
        "love",
        "optimism",
        "relief",
        "pride",
        "admiration",
        "desire",
        "caring",
    ),
    "sadness": ("sadness", "disappointment", "embarrassment", "grief", "remorse"),
    "surprise": ("surprise", "realization", "confusion", "curiosity"),
}

SENTIMENT: dict[str, tuple[str, ...]] = {
    "positive": (
        "amusement",
        "excitement",
        "joy",
        "love",
        "desire",
        "optimism",
        "caring",
        "pride",
        "admiration",
        "gratitude",
        "relief",
        "approval",
    ),
    "negative": (
        "fear",
        "nervousness",
        "remorse",
        "embarrassment",
        "disappointment",
        "sadness",
        "grief",
        "disgust",
        "anger",
        "annoyance",
        "disapproval",
    ),
    "ambiguous": ("realization", "surprise", "curiosity", "confusion"),
}


def ids_from_names(names: Iterable[str]) -> list[int]:
    """Map label names to ids; raises KeyError naming the unknown label."""
    out = []
    for name in names:
        key = name.strip().lower()
        if key not in LABEL_TO_ID:
            raise KeyError(name)
        out.append(LABEL_TO_ID[key])
    return out


def roll_up(names: Sequence[str], groups: dict[str, tuple[str, ...]]) -> list[str]:
    """The groups (Ekman or sentiment) that any of ``names`` belongs to, in group order."""
    present = set(names)
    return [group for group, members in groups.items() if present.intersection(members)]


def check_same_labels(found: Sequence[str], where: str) -> None:
    """Refuse a label list that differs from ``EMOTIONS``, showing both."""
    if tuple(found) != EMOTIONS:
        raise ValueError(
            f"{where} has labels {list(found)}, but this version of emotions expects "
            f"{list(EMOTIONS)} (same names, same order). Retrain the model with this version."
        )
