"""How a command refuses: one line ``error: ...`` and an exit status, never a traceback.

``zsad_jax.cli.Command`` (the absl commands) and ``run_command`` (the argparse ones: the
converters, ``pretrain.backbone``, ``data.tfds_builder``) both end this way. A leaf module, so that
a library module's ``__main__`` can use it without importing the commands' machinery.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

# Ctrl-C (128 + SIGINT), as shells report a process it stopped.
INTERRUPTED_EXIT_CODE = 130
# A command's expected failures (bad paths, data, configs, checkpoints): one line, exit 1.
EXPECTED_ERRORS = (FileNotFoundError, ValueError, PermissionError)


class CommandLineError(ValueError):
    """A flag or config override that cannot be used (exit status 2)."""


def fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def run_command(
    main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None
) -> int:
    """``main(argv)`` of an argparse command as the absl commands end: a refusal (a missing file,
    a checkpoint of the wrong kind, an output that is already there) is one line ``error: ...``
    and exit status 1 (2 for a bad command line); anything else, a bug, keeps its traceback.
    ``main`` itself raises, for callers and tests."""
    try:
        return main(argv) or 0
    except CommandLineError as e:
        fail(str(e), code=2)
    except (*EXPECTED_ERRORS, FileExistsError) as e:
        fail(str(e))
