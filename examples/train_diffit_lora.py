"""Fine-tune LoRA layers on a trained DiffiT pipeline (new classes or a new dataset).

    accelerate launch examples/train_diffit_lora.py --pretrained_model_name_or_path digits-diffit \
        --dataset_name digits --label_column label --resolution 16 --num_channels 1 --output_dir digits-lora

All options: ``python examples/train_diffit_lora.py --help``. The logic lives in ``diffit_diffusers.training.lora``.
"""

import sys

from diffit_diffusers.training.lora import main


if __name__ == "__main__":
    sys.exit(main())
