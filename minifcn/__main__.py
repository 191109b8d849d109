"""Command line: ``python -m minifcn predict CHECKPOINT IMAGE`` (or the ``minifcn`` script)."""

import sys

USAGE = """usage: python -m minifcn predict CHECKPOINT IMAGE [--out PNG] [--device cpu|cuda]

Training is examples/train_fcn8s.py; see README.md."""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] != "predict":
        print(f"error: unknown command {argv[0]!r}; expected 'predict'\n\n{USAGE}", file=sys.stderr)
        return 2
    from minifcn.predict import main as predict_main
    return predict_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
