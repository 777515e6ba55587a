"""Names for error messages, importable without jax: the closest known name, the known datasets.

One copy for the configs (which load without jax) and ``zsad_jax.config_check``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


def did_you_mean(word: Any, candidates: Iterable[Any]) -> str:
    """``" (did you mean 'tiny'?)"`` for the candidate closest to ``word`` (difflib, compared in
    lower case as dataset names are read), else ``""`` (also when ``word`` is not a string)."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word.lower(), [str(c) for c in candidates], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def known_datasets() -> tuple[str, ...]:
    """The names ``zsad_jax.data.protocol.read_dataset`` knows (its ``READERS`` keys), sorted."""
    # Imported on use: the readers pull in numpy and PIL, which a config naming no dataset does
    # not need.
    from zsad_jax.data.protocol import READERS

    return tuple(sorted(READERS))
