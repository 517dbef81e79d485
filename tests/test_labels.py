"""labels.py is the single source of truth; it must agree with the files shipped with the data."""

from __future__ import annotations

import json
from pathlib import Path

from emotions.labels import EKMAN, EMOTIONS, SENTIMENT, roll_up

DATA = Path(__file__).parents[1] / "emotions" / "resources" / "goemotions"


def test_names_and_order_match_emotions_txt():
    assert tuple((DATA / "emotions.txt").read_text().split("\n")) == EMOTIONS
    assert len(EMOTIONS) == 28 and EMOTIONS[-1] == "neutral"


def test_groupings_match_the_published_mappings():
    ekman = json.loads((DATA / "ekman_mapping.json").read_text())
    sentiment = json.loads((DATA / "sentiment_dict.json").read_text())
    assert {k: sorted(v) for k, v in EKMAN.items()} == {k: sorted(v) for k, v in ekman.items()}
    assert {k: sorted(v) for k, v in SENTIMENT.items()} == {k: sorted(v) for k, v in sentiment.items()}
    grouped = sorted(n for members in EKMAN.values() for n in members)
    assert grouped == sorted(EMOTIONS[:-1])  # every emotion in exactly one group; neutral in none


def test_roll_up():
    assert roll_up(["grief", "joy"], EKMAN) == ["joy", "sadness"]
    assert roll_up(["neutral"], SENTIMENT) == []
