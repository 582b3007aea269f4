"""The ``labelsentinel`` command.

Each subcommand lives in the module that owns its logic; a module registers its subcommands with a
``register(subparsers)`` function that sets ``func`` on its parser. ``func(args)`` returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands. Imported lazily in main() so `labelsentinel --help` stays fast
# and a missing optional dependency of one command does not break the others.
COMMAND_MODULES = [
    "labelsentinel.sampledata",
    "labelsentinel.serve",
    "labelsentinel.lead",
    "labelsentinel.importlabels",
    "labelsentinel.dicom",
    "labelsentinel.models.estimator_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labelsentinel",
        description="Label Sentinel: label-quality estimation and quality-driven annotation for MONAI Label",
    )
    from labelsentinel import __version__

    parser.add_argument("--version", action="version", version=f"labelsentinel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # module not written yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from labelsentinel.io import VolumeError

    try:
        return int(args.func(args) or 0)
    except VolumeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
