from .guidance import apply_guidance, guidance_weight
from .guiders import DiffiTGuidance
from .pipeline_diffit import DiffiTPipeline
