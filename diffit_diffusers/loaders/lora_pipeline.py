"""LoRA loading for ``DiffiTPipeline``: diffusers' ``LoraBaseMixin`` with the ``denoiser`` as the LoRA component.

Modelled on diffusers' transformer-only loaders (``SanaLoraLoaderMixin``): LoRA files hold PEFT keys prefixed with
``denoiser.``; ``load_lora_weights`` hands them to the denoiser's ``PeftAdapterMixin.load_lora_adapter``. A LoRA
trained with new classes also carries a class table LoRA larger than the base model's table; loading it grows the
base model's classes first (``grow_class_embedding``), so such a file loads into the unchanged base pipeline.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict
from diffusers.utils import USE_PEFT_BACKEND, logging
from huggingface_hub.utils import validate_hf_hub_args

from ..models.class_embedding import CLASS_EMBEDDING_TABLE, grow_class_embedding


logger = logging.get_logger(__name__)

DENOISER_NAME = "denoiser"
#: PEFT's key for the row factor of a LoRA on an embedding: shape ``(rank, num_embeddings)``.
_EMBEDDING_LORA_A = f"{DENOISER_NAME}.{CLASS_EMBEDDING_TABLE}.lora_embedding_A"


class DiffiTLoraLoaderMixin(LoraBaseMixin):
    r"""Load, save, fuse and unload LoRA layers of the ``denoiser`` of a [`DiffiTPipeline`].

    Besides the methods below, ``LoraBaseMixin`` provides ``set_adapters``, ``delete_adapters``,
    ``disable_lora`` / ``enable_lora``, ``get_active_adapters`` and ``get_list_adapters``.
    """

    _lora_loadable_modules = [DENOISER_NAME]
    denoiser_name = DENOISER_NAME

    @classmethod
    @validate_hf_hub_args
    def lora_state_dict(
        cls, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor], **kwargs
    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict | None]:
        """The LoRA state dict of a folder, Hub repo, file name (``weight_name=``) or dict, keys prefixed ``denoiser.``.

        Accepts diffusers' keywords (``cache_dir``, ``force_download``, ``local_files_only``, ``token``,
        ``revision``, ``subfolder``, ``weight_name``, ``use_safetensors``); with ``return_lora_metadata=True`` it
        returns ``(state_dict, metadata)``.
        """
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        use_safetensors = kwargs.pop("use_safetensors", None)
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
            weight_name=kwargs.pop("weight_name", None),
            use_safetensors=True if use_safetensors is None else use_safetensors,
            local_files_only=kwargs.pop("local_files_only", None),
            cache_dir=kwargs.pop("cache_dir", None),
            force_download=kwargs.pop("force_download", False),
            proxies=kwargs.pop("proxies", None),
            token=kwargs.pop("token", None),
            revision=kwargs.pop("revision", None),
            subfolder=kwargs.pop("subfolder", None),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=use_safetensors is None,
        )
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ) -> None:
        """Load a LoRA into the denoiser as adapter ``adapter_name`` (see ``lora_state_dict`` for the sources).

        Raises:
            ValueError: if the PEFT backend is missing, the file holds non-LoRA keys or no ``denoiser.`` keys.
        """
        if not USE_PEFT_BACKEND:
            raise ValueError("Loading LoRA weights needs the PEFT backend: `pip install peft`.")
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        state_dict, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        if not all("lora" in key for key in state_dict):
            raise ValueError("Invalid LoRA checkpoint: every parameter name must contain 'lora'.")
        if not any(key.startswith(f"{DENOISER_NAME}.") for key in state_dict):
            raise ValueError(
                f"The LoRA checkpoint has no '{DENOISER_NAME}.' keys; it was not saved for a DiffiTPipeline denoiser."
            )
        self._grow_classes_for(state_dict)
        self.load_lora_into_denoiser(
            state_dict,
            denoiser=getattr(self, self.denoiser_name),
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    def _grow_classes_for(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Grow the denoiser's classes to the size of a class table LoRA trained with new classes."""
        lora_a = state_dict.get(_EMBEDDING_LORA_A)
        denoiser = getattr(self, self.denoiser_name)
        if lora_a is None or denoiser.config.num_classes is None:
            return
        has_null = denoiser.null_class_id is not None
        num_classes = lora_a.shape[1] - int(has_null)
        if num_classes > denoiser.config.num_classes:
            logger.info("Growing the denoiser from %d to %d classes for this LoRA.", denoiser.config.num_classes, num_classes)
            grow_class_embedding(denoiser, num_classes)

    @classmethod
    def load_lora_into_denoiser(
        cls,
        state_dict: dict[str, torch.Tensor],
        denoiser,
        adapter_name: str | None = None,
        _pipeline=None,
        low_cpu_mem_usage: bool = False,
        hotswap: bool = False,
        metadata: dict | None = None,
    ) -> None:
        """Load the ``denoiser.``-prefixed layers of ``state_dict`` into ``denoiser`` through PEFT."""
        denoiser.load_lora_adapter(
            state_dict,
            prefix=cls.denoiser_name,
            network_alphas=None,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=_pipeline,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        denoiser_lora_layers: dict[str, torch.nn.Module | torch.Tensor] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        denoiser_lora_adapter_metadata: dict | None = None,
    ) -> None:
        """Save the denoiser's LoRA layers (e.g. ``peft.utils.get_peft_model_state_dict(denoiser)``) in
        ``save_directory`` as ``pytorch_lora_weights.safetensors``, with the adapter's ``LoraConfig`` as metadata."""
        if not denoiser_lora_layers:
            raise ValueError("Pass the denoiser's LoRA layers as `denoiser_lora_layers`.")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers={cls.denoiser_name: denoiser_lora_layers},
            lora_metadata={cls.denoiser_name: denoiser_lora_adapter_metadata},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Merge the (active or named) LoRA layers, scaled by ``lora_scale``, into the denoiser's weights."""
        super().fuse_lora(
            components=components or [DENOISER_NAME], lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names, **kwargs
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        """Undo ``fuse_lora``: restore the denoiser's own weights, keeping the LoRA layers loaded."""
        super().unfuse_lora(components=components or [DENOISER_NAME], **kwargs)
