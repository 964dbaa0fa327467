"""The `xmcnas-fast` command."""
import argparse
import sys

from . import __version__


def main(argv=None):
    parser = argparse.ArgumentParser(prog="xmcnas-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"xmcnas-fast {__version__}")
    parser.parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
