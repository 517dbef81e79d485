"""Bulk tagging of Parquet comment dumps with Ray Data: ``tag_corpus``.

    inputs -> footers checked -> planned reads (Ray tasks; normalized per block)   inputs.py
           [-> Tokenizer actors (CPU: token ids per row; GPU runs)]                 pipeline.py
           -> Tagger actors (bundle loaded once each, at a checked precision)      pipeline.py, inference.py
              (the precision gate they pass: emotions/precision.py, which training runs too)
              -> part files in OUTPUT/_staging; the driver gets part names and row counts only
           -> merge task per finished input file -> rows in == rows out -> commit  staging.py
                                                                          run.py: tag_corpus

Output (one row per input row; flagged rows keep their id and have null predictions)::

    <id column> | emotions list<string> | top_emotion string | top_score float32
    | p_<label> float32 x 28 (probabilities=True) | ekman list<string> | sentiment list<string>
    | model_hash string | <keep columns> | error string (null when tagged)

``error`` says why a row was not tagged: "null text", "empty text", "whitespace only",
"not a string" (the file's text column is neither string nor bytes), "invalid UTF-8" (bytes that
are not text), "[deleted]" or "[removed]" (Reddit's placeholders for comments that are gone:
tagging them would count "neutral" for text nobody wrote). Texts longer than the bundle's
``max_length`` tokens are truncated, not rejected.
"""

from emotions.precision import MAX_F1_LOSS, check_precision  # the gate's home; kept here for old callers
from emotions.tagging.commit import MANIFEST, SUCCESS
from emotions.tagging.inputs import resolve_inputs
from emotions.tagging.run import tag_corpus
from emotions.tagging.settings import PRECISIONS, TaggingError, TaggingSettings
from emotions.tagging.summary import TagSummary

__all__ = [
    "MANIFEST",
    "MAX_F1_LOSS",
    "PRECISIONS",
    "SUCCESS",
    "TagSummary",
    "TaggingError",
    "TaggingSettings",
    "check_precision",
    "resolve_inputs",
    "tag_corpus",
]
