"""Train a latent DiffiT transformer on the latents of a VAE (stabilityai/sd-vae-ft-ema by default).

    accelerate launch examples/train_latent_diffit.py --dataset_name imagenet-1k --label_column label \
        --resolution 256 --model_config DiffiT-XL/2 --streaming --mixed_precision bf16 --output_dir diffit-xl

All options: ``python examples/train_latent_diffit.py --help``. The logic lives in ``diffit_diffusers.training``.
"""

import sys

from diffit_diffusers.training.cli import main_latent


if __name__ == "__main__":
    sys.exit(main_latent())
