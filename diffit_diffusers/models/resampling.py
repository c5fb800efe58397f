"""Resolution changes between the stages of the image-space DiffiT U-Net (paper Section 3.2, Fig. 4).

The paper only says "convolutional downsampling/upsampling"; this project's decision is a stride-2 ``Conv3x3`` to
halve the resolution and nearest-neighbour x2 followed by a ``Conv3x3`` to double it. Both keep the channel count.
The convolution-free variants (2x2 average pooling, plain nearest x2) exist for ablations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Downsample2x(nn.Module):
    """Halve the spatial resolution: ``(B, C, H, W)`` -> ``(B, C, H/2, W/2)`` for even ``H`` and ``W``.

    Args:
        channels: number of input (and output) channels.
        use_conv: stride-2 ``Conv3x3`` (padding 1) if set, else 2x2 average pooling.
    """

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1) if use_conv else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(hidden_states, kernel_size=2, stride=2)
        return self.conv(hidden_states)


class Upsample2x(nn.Module):
    """Double the spatial resolution: ``(B, C, H, W)`` -> ``(B, C, 2H, 2W)``.

    Args:
        channels: number of input (and output) channels.
        use_conv: follow the nearest-neighbour x2 upsampling by a ``Conv3x3`` (padding 1).
    """

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1) if use_conv else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        if self.conv is None:
            return hidden_states
        return self.conv(hidden_states)
