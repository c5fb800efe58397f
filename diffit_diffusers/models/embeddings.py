"""The DiffiT time token: sinusoidal timestep features -> SiLU MLP, plus an optional class embedding."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import LabelEmbedding, TimestepEmbedding, Timesteps
from torch import nn


#: Parts of both DiffiT models whose precision matters more than their size: the time token (sinusoid, MLP and
#: class table) and the relative position bias tables. Layerwise casting never stores them in low precision.
PRECISION_SENSITIVE_MODULES = ["time_embedding", "relative_position_bias_table"]


def broadcast_timestep(timestep: torch.Tensor | float | int, batch_size: int, device: torch.device) -> torch.Tensor:
    """Turn a Python number, a 0-d tensor or a ``(B,)`` tensor into a ``(B,)`` tensor on ``device``."""
    if not torch.is_tensor(timestep):
        timestep = torch.tensor(timestep, device=device)
    timestep = timestep.to(device)
    if timestep.ndim == 0:
        return timestep.expand(batch_size)
    if timestep.shape != (batch_size,):
        raise ValueError(
            f"`timestep` must be a number, a 0-d tensor or a tensor of shape ({batch_size},) for a batch of "
            f"{batch_size}; received shape {tuple(timestep.shape)}."
        )
    return timestep


class DiffiTTimeEmbedding(nn.Module):
    """The time token ``x_t`` shared by every TMSA layer (paper Section 3.2).

    ``x_t = MLP(sinusoid(t)) [+ LabelEmbedding(y)]`` with sinusoidal features in ``[cos, sin]`` order, max period
    10000, and an MLP ``Linear -> SiLU -> Linear``. Class conditioning adds a label embedding whose table has a
    last "null" row when ``class_dropout_prob > 0`` (label dropout for classifier-free guidance).

    Args:
        time_proj_dim: width of the sinusoidal features (256 in the released latent model).
        time_embed_dim: width ``D_t`` of the time token.
        num_classes: number of classes, ``None`` for an unconditional model.
        class_dropout_prob: probability of replacing a label by the null class while training.
    """

    def __init__(
        self,
        time_proj_dim: int,
        time_embed_dim: int,
        num_classes: int | None = None,
        class_dropout_prob: float = 0.0,
    ):
        super().__init__()
        self.time_proj = Timesteps(time_proj_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(time_proj_dim, time_embed_dim)
        self.num_classes = num_classes
        self.class_embedder = (
            LabelEmbedding(num_classes, time_embed_dim, class_dropout_prob) if num_classes is not None else None
        )

    @property
    def null_class_id(self) -> int | None:
        """Label id of the null (unconditional) class, or ``None`` if the model has none."""
        # The table's weight rather than ``num_embeddings``: a LoRA-wrapped table (PEFT) only exposes the weight.
        if self.class_embedder is None or self.class_embedder.embedding_table.weight.shape[0] == self.num_classes:
            return None
        return self.num_classes

    def check_class_labels(self, class_labels: torch.Tensor | None, batch_size: int) -> None:
        """Raise a ``ValueError`` for labels an unconditional model cannot take, or a conditional one needs."""
        if self.num_classes is None:
            if class_labels is not None:
                raise ValueError(
                    "This model is unconditional (`num_classes=None`) but `class_labels` were given; drop them."
                )
            return
        if class_labels is None:
            null = self.null_class_id
            hint = f" (use {null} for the null class)" if null is not None else ""
            raise ValueError(f"This model is class-conditional: pass `class_labels` of shape ({batch_size},){hint}.")
        if class_labels.shape != (batch_size,) or class_labels.dtype.is_floating_point:
            raise ValueError(
                f"`class_labels` must be an integer tensor of shape ({batch_size},); received "
                f"{class_labels.dtype} of shape {tuple(class_labels.shape)}."
            )
        if torch.compiler.is_compiling():
            return
        highest = self.num_classes if self.null_class_id is not None else self.num_classes - 1
        if class_labels.numel() and (int(class_labels.min()) < 0 or int(class_labels.max()) > highest):
            null = f", or {self.null_class_id} for the null class" if self.null_class_id is not None else ""
            raise ValueError(
                f"`class_labels` must lie in [0, {self.num_classes - 1}]{null}; received values from "
                f"{int(class_labels.min())} to {int(class_labels.max())}."
            )

    def forward(
        self, timestep: torch.Tensor, class_labels: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Map timesteps ``(B,)`` (and labels ``(B,)``) to the time token ``(B, time_embed_dim)`` in ``dtype``.

        The token is computed in the embedding's own precision (e.g. float32 where layerwise casting or a
        quantization backend leaves it so) and cast to ``dtype`` (default: that precision) at the end.
        """
        own_dtype = self.timestep_embedder.linear_1.weight.dtype
        time_token = self.timestep_embedder(self.time_proj(timestep).to(own_dtype))
        if self.class_embedder is not None:
            time_token = time_token + self.class_embedder(class_labels).to(time_token.dtype)
        return time_token.to(dtype or own_dtype)
