"""``python -m stream``: the stream commands of ``em3`` without the other packages.

``em3`` builds its parser from every package, which imports the model code
(torch) before a join worker can start; ``python -m stream join ...`` takes the
same flags and starts in a fraction of the time and memory. ``em3 join
--workers N`` starts its worker processes this way.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from stream.cli import register

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with the stream subcommands and run the chosen one."""
    parser = argparse.ArgumentParser(prog="python -m stream", description="em3-stream: stream commands")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
