"""``segvlm`` command line: one subcommand per module in ``jobs/``.

Each subcommand module exposes ``main(argv: list[str] | None) -> int`` and a one-line docstring; this file only
dispatches, so ``segvlm train ...`` is the same as ``python -m jobs.train ...``.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> module in jobs/. Imported lazily so `segvlm params` does not pay for ray or mlflow.
COMMANDS: dict[str, str] = {
    "params": "jobs.params",
    "predict": "jobs.predict",
    "convert-clipseg": "jobs.convert_clipseg",
    "synth-scenes": "jobs.synth_scenes",
    "synth-prompts": "jobs.synth_prompts",
    "prepare": "jobs.prepare",
    "train": "jobs.train",
    "eval": "jobs.eval",
    "demo": "jobs.demo",
    "ui": "jobs.ui",
    "submit": "jobs.submit",
    "ablate": "jobs.ablate",
}


def _usage() -> str:
    names = "\n".join(f"  {name}" for name in COMMANDS)
    return f"usage: segvlm <command> [args...]\n\ncommands:\n{names}\n\n`segvlm <command> --help` for its options."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"segvlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name])
    except ModuleNotFoundError as err:
        if err.name == COMMANDS[name]:
            print(f"segvlm: command {name!r} is not implemented yet", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
