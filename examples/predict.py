"""Segment an image with a trained checkpoint; see minifcn/predict.py.

    python examples/predict.py runs/fcn8s/checkpoint.npz my_photo.jpg
"""

import sys

from minifcn.predict import main

if __name__ == "__main__":
    sys.exit(main())
