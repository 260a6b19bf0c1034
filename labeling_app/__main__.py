"""`python -m labeling_app ARGS` runs `align label ARGS`, with align's error handling."""

import argparse
import sys

from align.errors import AlignError
from labeling_app import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="align")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["label", *(sys.argv[1:] if argv is None else argv)])
    try:
        return cli.run(args)
    except AlignError as e:
        print(f"align: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
