from .guidance import apply_guidance, guidance_weight
from .pipeline_diffit import DiffiTPipeline
