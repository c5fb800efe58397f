"""diffusers' training-free caches (``enable_cache``) on DiffiT models.

diffusers finds what to cache by module names and by the block registry in ``diffusers.hooks._helpers``:

- ``FirstBlockCacheConfig`` and ``MagCacheConfig`` skip the tail of a top-level stack of same-shape Transformer
  blocks (``transformer_blocks``) when the first block's residual barely changed. ``DiffiTTransformerBlock`` is
  registered for them (its forward takes ``hidden_states`` and returns the new ``hidden_states``). Only the latent
  ``DiffiTTransformer2DModel`` has such a stack: the U-Net's blocks change resolution and width.
- ``PyramidAttentionBroadcastConfig`` reuses TMSA outputs between steps and ``TaylorSeerCacheConfig`` extrapolates
  them with a Taylor series. Both find the TMSA layers by name; on the U-Net, whose TMSA layers live inside its
  ResBlocks, their default name patterns are replaced by the model's own (``CacheLayout.attention_pattern``).
- ``FasterCacheConfig`` approximates the unconditional half of a batched ``[uncond; cond]`` forward in frequency space
  (and, on ``transformer_blocks``, reuses attention outputs). ``DiffiTPipeline`` orders its batch that way while it
  is enabled; the model's ``class_labels`` are added to the inputs FasterCache splits, and images are ``"BCHW"``.
- ``SeaCacheConfig`` (video latents) and ``TextKVCacheConfig`` (text encoder states) need inputs DiffiT does not
  have and raise a ``ValueError`` saying so.

The pipeline wraps every denoiser call in ``cache_context`` and exposes ``current_timestep`` on the 0..T training
scale, which the timestep ranges of these configs refer to.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    TextKVCacheConfig,
)
from diffusers.hooks._common import _SPATIAL_TRANSFORMER_BLOCK_IDENTIFIERS
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.hooks.faster_cache import _SPATIAL_ATTENTION_BLOCK_IDENTIFIERS, _UNCOND_COND_INPUT_KWARGS_IDENTIFIERS
from diffusers.models.cache_utils import CacheMixin

from .transformer_block import DiffiTTransformerBlock


TransformerBlockRegistry.register(
    DiffiTTransformerBlock,
    TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None),
)


class CacheLayout(NamedTuple):
    """Where a DiffiT model's cacheable parts are.

    Attributes:
        attention_pattern: regular expression matching the full names of the model's TMSA layers.
        block_stack: name of the top-level ``ModuleList`` of same-shape Transformer blocks, ``None`` if there is none.
        sample_argument: name of the forward argument holding the noisy sample.
    """

    attention_pattern: str
    block_stack: str | None
    sample_argument: str


class DiffiTCacheMixin(CacheMixin):
    """``enable_cache`` / ``disable_cache`` / ``cache_context`` from diffusers' ``CacheMixin``, checked against the
    model's ``_cache_layout`` so that every cache either applies to DiffiT's layers or fails with a clear error."""

    _cache_layout: CacheLayout

    def enable_cache(self, config) -> None:
        """Enable one of diffusers' caches (``FirstBlockCacheConfig``, ``MagCacheConfig``, ``TaylorSeerCacheConfig``,
        ``PyramidAttentionBroadcastConfig``, ``FasterCacheConfig``); see :mod:`diffit_diffusers.models.cache_support`.

        Raises:
            ValueError: if the cache cannot apply to this model.
        """
        super().enable_cache(self._adapt_cache_config(config))

    @classmethod
    def supported_cache_configs(cls) -> list[str]:
        """Names of the diffusers cache configs ``enable_cache`` accepts for this model class."""
        stack_caches = ["FirstBlockCacheConfig", "MagCacheConfig"] if cls._cache_layout.block_stack else []
        return stack_caches + ["TaylorSeerCacheConfig", "PyramidAttentionBroadcastConfig", "FasterCacheConfig"]

    def _adapt_cache_config(self, config):
        """``config`` with DiffiT's layer names in place of diffusers' defaults; raises where the cache cannot apply."""
        name, layout = type(self).__name__, self._cache_layout
        if isinstance(config, (SeaCacheConfig, TextKVCacheConfig)):
            needs = "video latents" if isinstance(config, SeaCacheConfig) else "text-encoder key/value states"
            raise ValueError(
                f"{type(config).__name__} needs {needs}, which {name} does not have; use one of "
                f"{', '.join(self.supported_cache_configs())}."
            )
        if isinstance(config, (FirstBlockCacheConfig, MagCacheConfig)) and layout.block_stack is None:
            raise ValueError(
                f"{type(config).__name__} skips the tail of a stack of same-shape Transformer blocks, but {name}'s "
                f"blocks change resolution and width; use one of {', '.join(self.supported_cache_configs())}, or a "
                "DiffiTTransformer2DModel."
            )
        if isinstance(config, TaylorSeerCacheConfig):
            return self._adapt_taylorseer(config)
        if isinstance(config, PyramidAttentionBroadcastConfig):
            if config.spatial_attention_block_identifiers == _SPATIAL_TRANSFORMER_BLOCK_IDENTIFIERS:
                config = dataclasses.replace(config, spatial_attention_block_identifiers=(layout.attention_pattern,))
            return config
        if isinstance(config, FasterCacheConfig):
            return self._adapt_faster_cache(config)
        return config

    def _adapt_taylorseer(self, config: TaylorSeerCacheConfig) -> TaylorSeerCacheConfig:
        layout = self._cache_layout
        if config.use_lite_mode and layout.block_stack is None:
            raise ValueError(
                f"TaylorSeer's lite mode predicts a final `proj_out` from skipped top-level blocks, which "
                f"{type(self).__name__} does not have; use `use_lite_mode=False`."
            )
        if config.use_lite_mode or config.cache_identifiers or config.skip_predict_identifiers:
            return config
        return dataclasses.replace(config, cache_identifiers=[layout.attention_pattern])

    def _adapt_faster_cache(self, config: FasterCacheConfig) -> FasterCacheConfig:
        if config.tensor_format == "BCFHW":  # diffusers' default, meant for video
            config = dataclasses.replace(config, tensor_format="BCHW")
        if config.tensor_format != "BCHW":
            raise ValueError(
                f"FasterCache on {type(self).__name__} needs `tensor_format='BCHW'` (images), got "
                f"{config.tensor_format!r}."
            )
        if config.spatial_attention_block_identifiers == _SPATIAL_ATTENTION_BLOCK_IDENTIFIERS:
            patterns = (self._cache_layout.attention_pattern,)
            config = dataclasses.replace(config, spatial_attention_block_identifiers=patterns)
        if tuple(config._unconditional_conditional_input_kwargs_identifiers) == _UNCOND_COND_INPUT_KWARGS_IDENTIFIERS:
            inputs = (self._cache_layout.sample_argument, "timestep", "class_labels")
            config = dataclasses.replace(config, _unconditional_conditional_input_kwargs_identifiers=list(inputs))
        return config
