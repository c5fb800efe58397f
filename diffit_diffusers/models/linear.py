"""Token-wise linear layers whose large float32 CPU products run on oneDNN's convolution kernels.

PyTorch multiplies float32 matrices on the CPU with MKL's ``sgemm``. On AMD CPUs MKL takes a code path that uses
about half of what AVX-512 cores can do: on an AMD EPYC with Zen 5 cores a ``(2048, 384) x (384, 1536)`` product
runs at ~95 GFLOP/s through ``F.linear`` and at ~205 GFLOP/s as a oneDNN 1x1 convolution
(``benchmarks/bench_linear.py``). A linear layer over tokens *is* a 1x1 convolution over the channels, so
``OneDNNLinear`` computes ``y = x W^T + b`` as one: the ``M`` rows of ``x`` are viewed, without a copy, as a
channels-last batch of ``M / 64`` maps of ``1 x 64`` pixels, the layout for which oneDNN picks its JIT kernels (a
batch of fewer than 16 maps falls back to a GEMM-based convolution that is no faster than MKL). Outputs and gradients
equal ``nn.Linear``'s up to float32 rounding.

The convolution runs only where it was measured to pay: float32 on the CPU, on an AMD x86-64 CPU with AVX-512 and
PyTorch's MKL and oneDNN, for at least 1024 rows (a multiple of 64) and 4M multiply-adds per product, outside autocast
and ``torch.compile`` (whose code generation picks its own kernels), with an unquantized weight. On Zen 5, whose
AVX-512 units are 512 bits wide, that is every such product; on Zen 4, whose units are 256 bits wide and where
oneDNN's lead is 1.0-1.1x instead of about 2x, only products at least 128 features wide on both sides (narrower ones,
the ``tiny`` U-Net's 32-64 channels, measured 0.77-0.95x of MKL's in forward + backward there). Everything else, and
every layer after ``disable_onednn_linears()``, runs ``nn.Linear.forward``. On Intel CPUs MKL takes its AVX-512 path,
and on AMD CPUs without AVX-512 (Zen 3) MKL's AVX2 products beat oneDNN's: the layers stay on ``nn.Linear`` there
unless ``enable_onednn_linears()`` is called.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn


#: Rows of ``x`` per 1 x ``ROWS_PER_MAP`` map of the convolution.
ROWS_PER_MAP = 64
#: Fewest rows (``16`` maps) for which oneDNN runs its JIT kernels rather than a GEMM-based convolution.
MIN_ROWS = 16 * ROWS_PER_MAP
#: Fewest multiply-adds per product for which the convolution beats MKL (``2048 x 32 x 32`` does not).
MIN_MULTIPLY_ADDS = 1 << 22


#: Narrowest product (the smaller of ``in_features`` and ``out_features``) that runs on oneDNN on Zen 4.
ZEN4_MIN_FEATURES = 128
#: ``cpu family`` of AMD's Zen 3 and Zen 4 cores (Zen 5 is 26); of the two only Zen 4 has AVX-512.
AMD_ZEN3_ZEN4_FAMILY = 25


def first_processor_info(cpuinfo_path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's entries of a Linux ``/proc/cpuinfo`` (``vendor_id``, ``cpu family``, ``model name``,
    ``flags``, ...), or nothing where the file cannot be read."""
    fields = {}
    try:
        with open(cpuinfo_path) as cpuinfo:
            for line in cpuinfo:
                if not line.strip():  # the first processor's block ends at the first blank line
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return {}
    return fields


def onednn_min_features(cpuinfo_path: str = "/proc/cpuinfo") -> int | None:
    """The narrowest product (fewest of ``in_features`` and ``out_features``) for which oneDNN's float32 kernels
    outrun PyTorch's MKL products on this machine, or ``None`` where they never do.

    ``1`` (every product above the size thresholds) on AMD x86-64 CPUs with 512-bit AVX-512 units (Zen 5 and later),
    ``ZEN4_MIN_FEATURES`` on Zen 4, ``None`` on AMD CPUs without AVX-512 (Zen 3: ``OneDNNLinear`` measured at
    0.75-0.93x of ``nn.Linear`` in forward + backward there), Intel CPUs, other architectures and PyTorch builds
    without both libraries.
    """
    if not (torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()):
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    processor = first_processor_info(cpuinfo_path)
    if processor.get("vendor_id") != "AuthenticAMD" or "avx512f" not in processor.get("flags", "").split():
        return None
    family = processor.get("cpu family", "")
    if family.isdigit() and int(family) <= AMD_ZEN3_ZEN4_FAMILY:
        return ZEN4_MIN_FEATURES
    return 1


#: ``onednn_min_features()`` of this machine, read once at import.
MACHINE_MIN_FEATURES = onednn_min_features()


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` over the last dimension of ``(..., in_features)`` tokens; large float32 CPU products run as a
    oneDNN 1x1 convolution (see the module docstring), everything else as ``nn.Linear``.

    It is an ``nn.Linear`` with the same parameters, so state dicts, PEFT's LoRA layers and quantizers treat it as one.
    """

    #: Whether large CPU products may run on oneDNN; on by default where oneDNN outruns MKL.
    use_onednn: bool = MACHINE_MIN_FEATURES is not None
    #: Narrowest product (fewest of ``in_features`` and ``out_features``) that runs on oneDNN: this machine's
    #: (``onednn_min_features()``), else ``1``.
    min_features: int = MACHINE_MIN_FEATURES or 1

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "OneDNNLinear":
        """An ``OneDNNLinear`` holding ``linear``'s parameters (shared, not copied)."""
        layer = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.forward_on(hidden_states, self.runs_on_onednn(hidden_states))

    def forward_on(self, hidden_states: torch.Tensor, on_onednn: bool) -> torch.Tensor:
        """``forward`` with the kernel chosen by the caller: the oneDNN convolution where ``on_onednn`` (which must be
        ``runs_on_onednn(hidden_states)``), ``F.linear`` otherwise."""
        if not on_onednn:
            return F.linear(hidden_states, self.weight, self.bias)
        out = F.conv2d(rows_as_maps(hidden_states), self.weight_as_kernel(), self.bias)
        return out.permute(0, 2, 3, 1).reshape(*hidden_states.shape[:-1], self.out_features)

    def weight_as_kernel(self) -> torch.Tensor:
        """The weight as the ``(out_features, in_features, 1, 1)`` kernel of the oneDNN convolution (a view)."""
        return self.weight.view(self.out_features, self.in_features, 1, 1)

    def product_gradients(
        self,
        grad_output: torch.Tensor,
        inputs: torch.Tensor,
        on_onednn: bool,
        grad_input: torch.Tensor | None,
        needs_input_grad: bool,
        needs_weight_grad: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Backward of the product ``inputs @ W^T`` (``forward`` without its bias) on the kernel its forward ran:
        oneDNN's convolution backward where ``on_onednn``, two matrix products otherwise.

        Args:
            grad_output: ``(M, out_features)``.
            inputs: ``(M, in_features)``, the forward's input.
            grad_input: an ``(M, in_features)`` gradient of ``inputs`` from other layers that this one's is added to
                (in place), or ``None``.

        Returns:
            The gradient of ``inputs`` (``grad_input`` plus this layer's; ``grad_input`` when not
            ``needs_input_grad``) and of the weight (``None`` when not ``needs_weight_grad``).
        """
        weight_grad = None
        if on_onednn:
            input_maps_grad, kernel_grad, _ = torch.ops.aten.convolution_backward(
                rows_as_maps(grad_output), rows_as_maps(inputs), self.weight_as_kernel(), None,
                (1, 1), (0, 0), (1, 1), False, (0, 0), 1, (needs_input_grad, needs_weight_grad, False),
            )
            if needs_weight_grad:
                weight_grad = kernel_grad.view(self.out_features, self.in_features)
            if needs_input_grad:
                layer_grad = input_maps_grad.permute(0, 2, 3, 1).reshape(inputs.shape)
                grad_input = layer_grad if grad_input is None else grad_input.add_(layer_grad)
            return grad_input, weight_grad
        if needs_weight_grad:
            weight_grad = grad_output.t().mm(inputs)
        if needs_input_grad and grad_input is None:
            grad_input = grad_output.mm(self.weight)
        elif needs_input_grad:
            grad_input = grad_input.addmm_(grad_output, self.weight)
        return grad_input, weight_grad

    @property
    def may_run_on_onednn(self) -> bool:
        """Whether some input runs this layer on oneDNN: it is enabled and at least ``min_features`` wide."""
        return self.use_onednn and min(self.in_features, self.out_features) >= self.min_features

    def runs_on_onednn(self, hidden_states: torch.Tensor) -> bool:
        """Whether ``forward(hidden_states)`` runs as a oneDNN convolution."""
        if not self.may_run_on_onednn:
            return False
        rows = hidden_states.numel() // self.in_features
        return (
            rows >= MIN_ROWS  # first: most small products (sampling, time tokens) stop here
            and not torch.compiler.is_compiling()
            and hidden_states.shape[-1] == self.in_features
            and rows % ROWS_PER_MAP == 0
            and rows * self.in_features * self.out_features >= MIN_MULTIPLY_ADDS
            and hidden_states.device.type == "cpu"
            and hidden_states.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and type(self.weight.data) is torch.Tensor  # not a quantized tensor subclass
            and not torch.is_autocast_enabled("cpu")
        )


def rows_as_maps(rows: torch.Tensor) -> torch.Tensor:
    """``(..., features)`` rows as the channels-last ``(M / ROWS_PER_MAP, features, 1, ROWS_PER_MAP)`` maps of the
    oneDNN convolution, a view without a copy for contiguous rows."""
    features = rows.shape[-1]
    count = rows.numel() // features
    return rows.reshape(count // ROWS_PER_MAP, 1, ROWS_PER_MAP, features).permute(0, 3, 1, 2)


def use_onednn_linears(module: nn.Module) -> nn.Module:
    """Replace every plain ``nn.Linear`` inside ``module`` (e.g. diffusers' ``FeedForward``) by an ``OneDNNLinear``
    holding the same parameters; returns ``module``."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, OneDNNLinear.from_linear(child))
        else:
            use_onednn_linears(child)
    return module


class OneDNNLinearMixin:
    """``enable_onednn_linears`` / ``disable_onednn_linears`` for a DiffiT model."""

    def enable_onednn_linears(self) -> None:
        """Run the large float32 CPU products of every ``OneDNNLinear`` as oneDNN convolutions (the default on AMD
        x86-64 CPUs with AVX-512; on Zen 4 only for products at least ``ZEN4_MIN_FEATURES`` wide)."""
        self._set_onednn_linears(True)

    def disable_onednn_linears(self) -> None:
        """Run every linear layer as ``nn.Linear`` (PyTorch's MKL product on the CPU)."""
        self._set_onednn_linears(False)

    def _set_onednn_linears(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, OneDNNLinear):
                module.use_onednn = enabled
