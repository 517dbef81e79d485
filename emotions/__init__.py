"""emotions: fine-tune BERT-family encoders on the 28 GoEmotions labels with Ray, and tag corpora."""

from emotions.labels import EKMAN, EMOTIONS, NUM_LABELS, SENTIMENT

__version__ = "0.1.0"
__all__ = ["EMOTIONS", "EKMAN", "SENTIMENT", "NUM_LABELS", "__version__"]
