"""DiffiT (Diffusion Vision Transformers with time-dependent self-attention) for Hugging Face diffusers."""

__version__ = "0.1.0"

from .models import (
    MASK_CAPABLE_BACKENDS,
    DiffiTTimeEmbedding,
    DiffiTTransformer2DModel,
    DiffiTTransformerBlock,
    DiffiTUNet2DModel,
    TimeDependentAttnProcessor,
    TimeDependentExplicitAttnProcessor,
    TimeDependentFlexAttnProcessor,
    TimeDependentSelfAttention,
    grow_class_embedding,
)
from .presets import available_presets, load_preset_config
from .pipelines import DiffiTGuidance, DiffiTPipeline
