"""Small helpers shared by training, evaluation, conversion and the benchmarks."""

import numpy as np
import torch


# Dtype names accepted on command lines.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of non-negative integers, e.g. ``(seed, sample_index)`` or
    ``(seed, epoch, position)``: different keys give independent streams, the same key the same stream."""
    seed = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)
