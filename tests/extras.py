"""torch and transformers come with the ``convert`` extra: tests import them through ``optional``
and are marked ``@pytest.mark.torch``; tests/conftest.py skips those where the extra is absent, so
every pure-JAX test still runs."""

from __future__ import annotations

import importlib
from types import ModuleType

CONVERT_EXTRA = "needs torch and transformers, the convert extra: pip install -e '.[convert]'"
# What the convert extra installs (transformers brings tokenizers, regex and huggingface_hub).
_EXTRA_MODULES = ("torch", "transformers", "tokenizers", "regex", "huggingface_hub")


def optional(name: str) -> ModuleType | None:
    """The module ``name``, or None where importing it needs the missing convert extra."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] in _EXTRA_MODULES:
            return None
        raise


def convert_extra_installed() -> bool:
    return all(optional(name) is not None for name in ("torch", "transformers"))
