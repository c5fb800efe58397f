"""Loading NVIDIA's released single-file checkpoints, and LoRA weights into a pipeline."""

from .lora_pipeline import DiffiTLoraLoaderMixin
from .single_file import (
    CheckpointConversionError,
    FromOriginalDiffiTMixin,
    convert_state_dict,
    infer_config,
    load_checkpoint_file,
    resolve_checkpoint_file,
)
