#!/usr/bin/env python
"""Thin CLI over the fewshot_nsl library; see ``python run_benchmarks.py --help``."""
import sys

from fewshot_nsl.cli import main

if __name__ == "__main__":
    sys.exit(main())
