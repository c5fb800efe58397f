"""The image trainer, recording what each process trains on; run it under ``accelerate launch``.

    accelerate launch --multi_gpu --num_processes 2 tests/multiprocess_training.py FLAGS...

Trains like ``examples/train_diffit.py FLAGS...``; in addition every process appends one JSON line per training
step to ``<output_dir>/seen-<rank>.jsonl``: ``{"step": ..., "examples": [...]}`` with, for each example of its
batch, the gray level of its pixel (0, 0) (the test fixtures write a different level into every image). A killed and
resumed run appends the steps it trains again.
"""

import json
import sys

import torch

from diffit_diffusers.training import Trainer, parse_config
from diffit_diffusers.training.cli import IMAGE_DEFAULTS, run_trainer


class RecordingTrainer(Trainer):
    def training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        levels = ((batch["pixel_values"][:, 0, 0, 0] + 1) * 127.5).round().int().tolist()
        record = {"step": self.global_step, "examples": levels}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / f"seen-{self.accelerator.process_index}.jsonl", "a") as records:
            records.write(json.dumps(record) + "\n")
        return super().training_step(batch)


if __name__ == "__main__":
    config = parse_config(sys.argv[1:], "Train, recording the examples of every step.", IMAGE_DEFAULTS)
    sys.exit(run_trainer(lambda: RecordingTrainer(config), "the trained DiffiTPipeline"))
