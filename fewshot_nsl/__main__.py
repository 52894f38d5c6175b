"""``python -m fewshot_nsl``: the command line (same as ``fewshot-nsl`` and ``run_benchmarks.py``)."""
import sys

if __name__ == "__main__":
    try:
        from .cli import main
    except KeyboardInterrupt:  # Ctrl-C while Python starts up: no traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
