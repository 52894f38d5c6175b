#!/usr/bin/env python
"""Thin CLI over the fewshot_nsl library; see ``python run_benchmarks.py --help``."""
import sys

if __name__ == "__main__":
    from fewshot_nsl.__main__ import entry

    sys.exit(entry())
