"""``python -m zsad_jax``: the package's commands, each with the first line of its docstring.

Each command runs as its own module (``python -m zsad_jax.train ...``). The docstrings are read
from the source files, not imported, so this answers at once and never starts JAX.
"""

from __future__ import annotations

import ast
import importlib.util
import sys

COMMANDS = (
    "train", "evaluate", "predict", "reproduce", "summary", "pretrain.backbone",
    "data.tfds_builder", "data.synthetic", "data.procedural",
)  # fmt: skip


def first_docstring_line(module: str) -> str:
    """The first line of ``module``'s docstring, read from its source file."""
    with open(importlib.util.find_spec(module).origin, encoding="utf-8") as source:
        docstring = ast.get_docstring(ast.parse(source.read())) or ""
    line = docstring.strip().splitlines()[0] if docstring.strip() else ""
    # "Trains ...: ``python -m zsad_jax.train``." names the command the table already names.
    return line.split(": ``python -m")[0].rstrip(".").replace("``", "")


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = [f"  {c:<{width}}  {first_docstring_line(f'zsad_jax.{c}')}" for c in COMMANDS]
    return "\n".join([
        "usage: python -m zsad_jax.COMMAND [flags]  (python -m zsad_jax.COMMAND --help: its flags)",
        "", "commands:", *rows,
    ])  # fmt: skip


def main(argv: list[str]) -> int:
    if argv and argv[0] not in ("-h", "--help"):
        if argv[0] in COMMANDS:
            typed = " ".join([f"python -m zsad_jax.{argv[0]}", *argv[1:]])
            message = f"a command is a module of its own: type {typed}"
        else:
            message = f"no command {argv[0]!r}; the commands: {', '.join(COMMANDS)}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(usage())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
