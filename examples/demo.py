"""`make demo`: train the tiny image-space DiffiT on scikit-learn's digits on CPU, then sample a labelled grid.

    python examples/demo.py --output_dir outputs/demo
"""

import sys

from diffit_diffusers.training.demo import main


if __name__ == "__main__":
    sys.exit(main())
