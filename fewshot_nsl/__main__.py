"""``python -m fewshot_nsl``: the command line (same as ``fewshot-nsl`` and ``run_benchmarks.py``)."""
import sys


def entry() -> int:
    """Run the command line; a Ctrl-C while it is still importing ends with one line, no traceback."""
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(entry())
