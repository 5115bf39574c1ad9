"""``tidings bench``: the benchmark suite (see docs/performance.md).

The CLI wires it in with ``add_bench_parser(commands)`` and ``run_bench(args)``; until
then ``python -m tidings.bench`` runs the same code. Peers and extras come from the
optional ``bench`` dependency group; the load generator is compiled from ``gen.c`` with the
system C compiler the first time it is needed.
"""

from __future__ import annotations

import argparse

__all__ = ["add_bench_parser", "run_bench"]

DESCRIPTION = (
    "Benchmark a Tidings server started here: fan-out, latency, idle memory and handshakes; "
    "with --compare, side by side with a minimal aiohttp+uvloop broadcast server (the floor) "
    "and python-socketio. Prints a table and writes a JSON file."
)


def add_bench_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``bench`` subcommand to the ``tidings`` command's subparsers."""
    from tidings.bench.runner import add_arguments

    parser = commands.add_parser("bench", help="run the benchmark suite", description=DESCRIPTION)
    add_arguments(parser)


def run_bench(args: argparse.Namespace) -> None:
    """Run ``tidings bench`` with parsed arguments."""
    from tidings.bench.runner import run

    run(args)
