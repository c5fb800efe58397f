"""Adding classes to a trained class-conditional DiffiT: grow the label table of the time token."""

from __future__ import annotations

import torch
from torch import nn


#: Where the label table sits inside both DiffiT models (a LoRA on it is named after this path).
CLASS_EMBEDDING_TABLE = "time_embedding.class_embedder.embedding_table"


def grow_class_embedding(denoiser: nn.Module, num_classes: int) -> nn.Module:
    """Give a class-conditional DiffiT denoiser ``num_classes`` classes, keeping the ids and rows of the old ones.

    The table ``(num_classes_old [+ 1 null], D_t)`` becomes ``(num_classes [+ 1 null], D_t)``: old rows keep their
    ids, each new class starts as a copy of the null row (so it first samples like unguided generation) or, in a
    model without a null class, of the mean class row; the null class moves to id ``num_classes``. The model's
    ``config.num_classes`` is updated so that ``save_pretrained`` writes the grown model. Train the new rows with a
    LoRA on ``CLASS_EMBEDDING_TABLE`` (what ``diffit_diffusers.training.lora`` does) or by unfreezing the table.

    Args:
        denoiser: a ``DiffiTUNet2DModel`` or ``DiffiTTransformer2DModel`` with ``num_classes`` set, before any
            adapter is added to it.
        num_classes: the new number of classes, at least the current one.

    Returns:
        ``denoiser``, changed in place.
    """
    time_embedding = denoiser.time_embedding
    old_classes = time_embedding.num_classes
    if old_classes is None:
        raise ValueError("The denoiser is unconditional (`num_classes=None`); only a class-conditional one can grow.")
    if num_classes < old_classes:
        raise ValueError(f"`num_classes` ({num_classes}) must be at least the model's {old_classes} classes.")
    label_embedding = time_embedding.class_embedder
    table = label_embedding.embedding_table
    if type(table) is not nn.Embedding:
        raise ValueError("The class table already carries an adapter; grow the classes before adding adapters.")
    if num_classes == old_classes:
        return denoiser
    has_null = time_embedding.null_class_id is not None
    weight = table.weight.detach()
    start = weight[old_classes] if has_null else weight.mean(dim=0)
    rows = [weight[:old_classes], start.expand(num_classes - old_classes, -1), weight[old_classes:]]
    grown = nn.Embedding(num_classes + int(has_null), weight.shape[1], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        grown.weight.copy_(torch.cat(rows))
    grown.weight.requires_grad_(table.weight.requires_grad)
    label_embedding.embedding_table = grown
    label_embedding.num_classes = num_classes
    time_embedding.num_classes = num_classes
    denoiser.register_to_config(num_classes=num_classes)
    return denoiser
