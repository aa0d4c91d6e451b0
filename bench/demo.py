"""Kept for old instructions: `python -m bench.demo` is `python -m bench --quick`."""

import sys

from .__main__ import main

if __name__ == "__main__":
    args = sys.argv[1:]
    main(args if {"--quick", "--full", "--smoke"} & set(args) else ["--quick", *args])
