"""Evaluate a DiffiT pipeline: sample it and report FID/FD, precision/recall and Inception Score as JSON.

    accelerate launch examples/evaluate.py --pipeline PIPELINE_DIR --num_samples 50000 \
        --reference imagenet_256_reference.npz --precision_recall --inception_score --output report.json

Run `python examples/evaluate.py --help` for every flag; the logic lives in `diffit_diffusers.evaluation.cli`.
"""

from diffit_diffusers.evaluation.cli import main


if __name__ == "__main__":
    main()
