"""``python -m tidings.bench``: the same as ``tidings bench``."""

from __future__ import annotations

import argparse

from tidings.bench import DESCRIPTION, run_bench
from tidings.bench.runner import add_arguments


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tidings.bench", description=DESCRIPTION)
    add_arguments(parser)
    run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    main()
