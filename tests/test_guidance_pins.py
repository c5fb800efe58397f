"""The default guidance path and NVIDIA's converted recipe give the samples of the code before guiders (up to the
float32 rounding of the CPU's kernels: the pins were taken on an AVX-512 host).

``tests/data/guidance_pins`` holds two tiny random-weight denoisers and the latents ``DiffiTPipeline`` sampled with them
at commit 5b5497c (before guidance became a guider): power-cosine and constant guidance, 2 or 3 guided channels,
learned variance, DDPM and DDIM schedulers.
"""

import json
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from diffit_diffusers import DiffiTPipeline, DiffiTTransformer2DModel, DiffiTUNet2DModel


PINS = Path(__file__).parent / "data" / "guidance_pins"
CASES = json.loads((PINS / "cases.json").read_text())
DENOISERS = {"unet": DiffiTUNet2DModel, "transformer": DiffiTTransformer2DModel}


@pytest.mark.parametrize("case", list(CASES))
def test_samples_match_the_pinned_ones(case):
    spec = CASES[case]
    denoiser = DENOISERS[spec["denoiser"]].from_pretrained(PINS / spec["denoiser"]).eval()
    denoiser.set_attention_backend("native")  # as pinned, whatever backend earlier tests left set
    scheduler = getattr(diffusers, spec["scheduler"]).from_config(spec["scheduler_config"])
    pipe = DiffiTPipeline(denoiser=denoiser, scheduler=scheduler, **spec["pipeline_init"])
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(
        class_labels=[1, 3], num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="latent",
        **spec["call"],
    ).images
    torch.testing.assert_close(latents, load_file(PINS / "outputs.safetensors")[case], rtol=1e-4, atol=1e-4)
