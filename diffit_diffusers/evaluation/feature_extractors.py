"""Feature extractors that map image batches to the features that generative-model metrics compare."""

import importlib
import importlib.util
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch


# Name of the FID Inception-v3 weights (TensorFlow 2015-12-05 graph converted by torch-fidelity).
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME
)

# Slack allowed above 1 and below 0 before float images are rejected as not being in [0, 1].
_RANGE_TOLERANCE = 1e-3


@dataclass
class FeatureExtractorOutput:
    """
    Output of ``FeatureExtractor.extract``.

    Args:
        features (torch.Tensor): float32 features ``(batch_size, feature_dim)``.
        logits (torch.Tensor, optional): class logits ``(batch_size, num_classes)``, used by the Inception Score;
            ``None`` when the extractor has no classifier head.
    """

    features: torch.Tensor
    logits: Optional[torch.Tensor] = None


def images_to_unit_range(images: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    """
    Validates an image batch and returns it as float32 in [0, 1] (on ``device`` when given).

    Args:
        images (torch.Tensor): images ``(batch_size, channels, height, width)``, ``uint8`` in [0, 255] or floating
            point in [0, 1]. Images in [-1, 1] (the raw output of most diffusion models) are rejected; map them with
            ``(images + 1) / 2`` first.
        device (torch.device, optional): where to move the images before converting them.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"Expected images as a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}.")
    if device is not None:
        images = images.to(device)
    if images.ndim != 4:
        raise ValueError(f"Expected images of shape (B, C, H, W), got shape {tuple(images.shape)}.")
    if images.shape[0] == 0:
        raise ValueError("Received an empty image batch.")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"Expected uint8 or floating point images, got dtype {images.dtype}.")
    minimum, maximum = images.aminmax()
    if not (torch.isfinite(minimum) and torch.isfinite(maximum)):
        raise ValueError("Images contain NaN or infinite values.")
    if minimum < -_RANGE_TOLERANCE or maximum > 1 + _RANGE_TOLERANCE:
        raise ValueError(
            f"Float images must lie in [0, 1], got values in [{minimum.item():.4g}, {maximum.item():.4g}]. "
            "Map [-1, 1] images with `(images + 1) / 2` (or pass uint8 images in [0, 255])."
        )
    return images.float().clamp(0.0, 1.0)


class FeatureExtractor(torch.nn.Module, ABC):
    """
    Base class of feature extractors: a module mapping images to features ``(B, D)`` and, optionally, class logits.

    Inputs are ``(B, C, H, W)`` tensors, either ``uint8`` in [0, 255] or floating point in [0, 1] (see
    ``images_to_unit_range``). Calling the extractor returns the features; ``FeatureExtractor.extract`` also returns
    the logits. Extraction always runs without gradients and with the wrapped network in eval mode.

    Subclasses set ``name`` (recorded in evaluation reports), ``provides_logits``, and implement ``_extract``, which
    receives float32 images in [0, 1] on the extractor's device.
    """

    name: str = "feature_extractor"
    provides_logits: bool = False
    # Whether the Frechet distance in this extractor's feature space is the standard FID.
    computes_standard_fid: bool = False

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    def train(self, mode: bool = True) -> "FeatureExtractor":
        # Feature statistics must not depend on batch statistics or dropout, so extractors stay in eval mode.
        return super().train(False)

    @abstractmethod
    def _extract(self, images: torch.Tensor) -> FeatureExtractorOutput:
        """Maps float32 images ``(B, C, H, W)`` in [0, 1] on ``self.device`` to features (and logits)."""

    @torch.inference_mode()
    def extract(self, images: torch.Tensor) -> FeatureExtractorOutput:
        """
        Features and, when the extractor provides them, class logits of an image batch.

        Args:
            images (torch.Tensor): images ``(batch_size, channels, height, width)``, ``uint8`` or float in [0, 1].

        Returns:
            ``FeatureExtractorOutput`` with float32 ``features`` ``(B, D)`` and optional ``logits`` ``(B, K)``.
        """
        images = images_to_unit_range(images, self.device)
        output = self._extract(images)
        features = output.features.reshape(images.shape[0], -1).float()
        logits = None if output.logits is None else output.logits.reshape(images.shape[0], -1).float()
        return FeatureExtractorOutput(features=features, logits=logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(images).features


def _first_floating_dtype(module: torch.nn.Module) -> Optional[torch.dtype]:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return None


class ModuleFeatureExtractor(FeatureExtractor):
    """
    Wraps any ``torch.nn.Module`` (for example a small classifier) as a feature extractor.

    Features are taken from one of three places:

    - ``features_fn(module, images)`` when given;
    - the output of the submodule named ``layer`` (captured with a forward hook while ``module(images)`` runs), in
      which case ``output_is_logits=True`` additionally reports the module's output as class logits;
    - otherwise the module's output itself.

    Features with more than two dimensions are flattened to ``(B, D)``.

    Args:
        module (torch.nn.Module): the network; it is put in eval mode and used without gradients.
        preprocess (Callable, optional): maps float images ``(B, C, H, W)`` in [0, 1] to the module's input (e.g.
            resizing and normalisation). Defaults to the identity.
        layer (str, optional): dotted name of the submodule whose output are the features (see
            ``module.named_modules()``), e.g. the penultimate layer of a classifier.
        features_fn (Callable[[torch.nn.Module, torch.Tensor], torch.Tensor], optional): computes features from the
            module and preprocessed images. Mutually exclusive with ``layer``.
        output_is_logits (bool): with ``layer``, report ``module(images)`` as class logits (for the Inception Score
            computed with this classifier).
        name (str, optional): recorded in evaluation reports; defaults to the module's class and layer name.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        *,
        layer: Optional[str] = None,
        features_fn: Optional[Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = None,
        output_is_logits: bool = False,
        name: Optional[str] = None,
    ):
        super().__init__()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
        if layer is not None and features_fn is not None:
            raise ValueError("Pass either `layer` or `features_fn`, not both.")
        if output_is_logits and layer is None:
            raise ValueError(
                "`output_is_logits=True` needs `layer`: the features then come from that layer and the module's "
                "output is used as logits."
            )
        self.module = module.eval()
        self.preprocess = preprocess
        self.features_fn = features_fn
        self.layer = layer
        self.provides_logits = output_is_logits
        if layer is not None:
            names = [module_name for module_name, _ in module.named_modules() if module_name]
            if layer not in names:
                raise ValueError(
                    f"Module {type(module).__name__} has no submodule named {layer!r}. Available names include: "
                    f"{names[:20]}."
                )
        default_name = f"module:{type(module).__name__}" + (f".{layer}" if layer else "")
        self.name = name or default_name
        self.eval()

    def _run_with_hook(self, inputs: torch.Tensor) -> tuple:
        captured = []

        def capture(_module, _inputs, output):
            captured.append(output)

        handle = self.module.get_submodule(self.layer).register_forward_hook(capture)
        try:
            output = self.module(inputs)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"Layer {self.layer!r} was not called during the forward pass of the module.")
        features = captured[-1]
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"Layer {self.layer!r} returned {type(features).__name__}, expected a tensor.")
        return features, output

    def _extract(self, images: torch.Tensor) -> FeatureExtractorOutput:
        inputs = self.preprocess(images) if self.preprocess is not None else images
        dtype = _first_floating_dtype(self.module)
        if dtype is not None:
            inputs = inputs.to(dtype)
        if self.features_fn is not None:
            return FeatureExtractorOutput(features=self.features_fn(self.module, inputs))
        if self.layer is not None:
            features, output = self._run_with_hook(inputs)
            if self.provides_logits and not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"`output_is_logits=True` but the module returned {type(output).__name__}, expected a tensor."
                )
            return FeatureExtractorOutput(features=features, logits=output if self.provides_logits else None)
        output = self.module(inputs)
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"The module returned {type(output).__name__}; pass `layer` or `features_fn` to select the features."
            )
        return FeatureExtractorOutput(features=output)


class InceptionFeatureExtractor(FeatureExtractor):
    """
    The standard FID Inception-v3 (the TensorFlow 2015-12-05 graph, as ported by torch-fidelity).

    Features are the 2048-d pool features (FID, precision/recall); logits are the 1008 class logits without the final
    bias, as used by the original Inception Score code. Images are quantised to uint8 and resized to 299x299 with
    TensorFlow-compatible bilinear interpolation inside the network; grayscale images are repeated to 3 channels.

    ``torch-fidelity`` is imported only when this class is instantiated (it needs a working torchvision).

    Args:
        weights_path (str or os.PathLike, optional): local copy of ``weights-inception-2015-12-05-6726825d.pth``
            for offline use. Without it the weights are downloaded once into the torch hub cache.
    """

    name = "inception-v3-fid"
    provides_logits = True
    computes_standard_fid = True
    feature_dim = 2048

    def __init__(self, weights_path: Optional[Union[str, os.PathLike]] = None):
        super().__init__()
        if weights_path is not None and not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"Inception weights file {os.fspath(weights_path)!r} does not exist. Download "
                f"{INCEPTION_WEIGHTS_URL} and pass its local path as `weights_path`."
            )
        if importlib.util.find_spec("torch_fidelity") is None:
            raise ImportError(
                "InceptionFeatureExtractor needs torch-fidelity (and a torchvision matching your torch): "
                "`pip install torch-fidelity`. Alternatively use ModuleFeatureExtractor with your own network."
            )
        try:
            inception_module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        except Exception as error:
            raise ImportError(
                f"torch-fidelity is installed but failed to import ({error!r}); it usually means torchvision does not "
                "match the installed torch. Reinstall torchvision for your torch version."
            ) from error
        try:
            self.model = inception_module.FeatureExtractorInceptionV3(
                "inception-v3-compat",
                ["2048", "logits_unbiased"],
                feature_extractor_weights_path=None if weights_path is None else os.fspath(weights_path),
            )
        except OSError as error:
            raise FileNotFoundError(
                f"Could not obtain the Inception weights ({error!r}). Download {INCEPTION_WEIGHTS_URL} and pass its "
                "local path as `weights_path`."
            ) from error
        self.eval()

    def _extract(self, images: torch.Tensor) -> FeatureExtractorOutput:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise ValueError(f"Inception-v3 expects RGB or grayscale images, got {images.shape[1]} channels.")
        images_uint8 = (images * 255.0).round().clamp(0, 255).to(torch.uint8)
        features, logits = self.model(images_uint8)
        return FeatureExtractorOutput(features=features, logits=logits)
