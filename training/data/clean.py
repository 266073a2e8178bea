"""Text cleaning: unicode normalisation, control characters, whitespace runs."""
from __future__ import annotations

import re
import unicodedata

from training.data.config import CleanConfig

# Unicode category Cc minus tab and newline (carriage returns go too: line ends are already "\n"),
# plus U+FEFF, a byte-order mark that concatenated files leave mid-text.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
# A run of two or more horizontal whitespace characters, or any single one that is not a
# plain space or tab (no-break space, ideographic space, ...).
_HSPACE_RUN = re.compile(r"[^\S\n]{2,}|[^\S\n\t ]")
_TRAILING = re.compile(r"[^\S\n]+\n")
_BLANK_RUN = re.compile(r"\n{3,}")
_LINE_SEPARATORS = str.maketrans({"\u2028": "\n", "\u2029": "\n\n", "\x85": "\n"})


def clean_text(text: str, config: CleanConfig) -> str:
    """Normalise, strip control characters and collapse whitespace; the result has no outer whitespace."""
    if config.normalization != "none":
        text = unicodedata.normalize(config.normalization, text)
    text = text.translate(_LINE_SEPARATORS)
    if config.strip_control:
        text = _CONTROL.sub("", text)
    if config.collapse_whitespace:
        text = _HSPACE_RUN.sub(" ", text)
        text = _TRAILING.sub("\n", text)
        text = _BLANK_RUN.sub("\n\n", text)
    return text.strip()
