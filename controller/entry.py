"""The ``agentainer`` command. Light on purpose: Ctrl-C while the CLI's modules are still being
imported (most of a second) ends it as Ctrl-C does later, not with a traceback."""

from __future__ import annotations

import sys

EXIT_CANCELLED = 130  # as every command exits when interrupted (controller.commands)


def main() -> int:
    try:
        from controller.cli import main as run
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    return run()
