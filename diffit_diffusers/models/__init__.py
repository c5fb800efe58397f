from .attention import (
    MASK_CAPABLE_BACKENDS,
    TimeDependentAttnProcessor,
    TimeDependentExplicitAttnProcessor,
    TimeDependentFlexAttnProcessor,
    TimeDependentSelfAttention,
)
from .cache_support import CacheLayout, DiffiTCacheMixin
from .class_embedding import grow_class_embedding
from .denoiser import DENOISER_CLASSES, DenoiserParameterization, DiffiTDenoiserMixin, denoiser_class, register_denoiser
from .embeddings import DiffiTTimeEmbedding
from .transformer_block import DiffiTTransformerBlock
from .transformer_diffit import DiffiTTransformer2DModel
from .unet_diffit import DiffiTUNet2DModel
