#!/usr/bin/env python
"""Thin CLI over the fewshot_nsl library; see ``python run_benchmarks.py --help``."""
import sys

if __name__ == "__main__":
    try:
        from fewshot_nsl.cli import main
    except KeyboardInterrupt:  # Ctrl-C while Python starts up: no traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
