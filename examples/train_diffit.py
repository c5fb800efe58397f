"""Train an image-space DiffiT U-Net.

    accelerate launch examples/train_diffit.py --dataset_name digits --label_column label --resolution 16 \
        --num_channels 1 --model_config tiny --output_dir digits-diffit

All options: ``python examples/train_diffit.py --help``. The logic lives in ``diffit_diffusers.training``.
"""

import sys

from diffit_diffusers.training.cli import main_image


if __name__ == "__main__":
    sys.exit(main_image())
