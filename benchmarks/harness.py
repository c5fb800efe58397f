"""Shared pieces of the speed benchmarks: interleaved timing, machine description, peak memory and JSON output.

Timings on a shared machine drift as other work comes and goes. Every benchmark therefore times its contestants in
interleaved rounds (one call of each per round, after warm-up) and reports medians, so a slow spell hits all of them
alike and a single outlier moves nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffit_diffusers.models.linear import MACHINE_MIN_FEATURES, first_processor_info


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a timer read afterwards covers them (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_samples(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall time of each function in each of ``repeats`` rounds, every round calling all of them once in turn.

    Each function first runs ``warmup`` times (lazy initialisation, allocator growth, compilation).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def interleaved_median_seconds(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, float]:
    """Median wall time of each function over ``interleaved_samples`` rounds."""
    samples = interleaved_samples(fns, repeats, device, warmup)
    return {name: statistics.median(values) for name, values in samples.items()}


def median_round_ratio(samples: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of ``numerator``'s time over ``denominator``'s in the same round: a machine that speeds up
    or slows down between rounds moves both times of a round together, so this ratio drifts less than the ratio of
    the two medians."""
    return statistics.median(a / b for a, b in zip(samples[numerator], samples[denominator]))


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: processor, threads, library versions, accelerator, and the load when measured."""
    processor = first_processor_info()
    info = {
        "cpu": processor.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model": "/".join(processor.get(key, "?") for key in ("cpu family", "model")),
        "onednn_linear_min_features": MACHINE_MIN_FEATURES,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "allocator_environment": {name: os.environ[name] for name in sorted(os.environ) if is_allocator_setting(name)},
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def is_allocator_setting(name: str) -> bool:
    """Whether environment variable ``name`` changes how the process allocates CPU memory (glibc's ``MALLOC_*_``
    settings and tunables, a preloaded allocator such as jemalloc or tcmalloc, PyTorch's huge-page option)."""
    return name.startswith("MALLOC_") or name in ("GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")


def page_faults_per_call(fn: Callable[[], Any], calls: int = 3) -> dict[str, float] | None:
    """Minor page faults and kernel CPU time per call of ``fn`` (``getrusage`` over ``calls`` calls), or ``None``
    where the platform has no ``resource`` module.

    A minor fault is the first touch of memory the process got from the OS; when the allocator hands freed memory
    back between calls (glibc trims the top of its heap once more than ``M_TRIM_THRESHOLD`` is free), every call
    faults it in again.
    """
    try:
        import resource
    except ImportError:
        return None
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(calls):
        fn()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "minor_page_faults": (after.ru_minflt - before.ru_minflt) / calls,
        "system_cpu_ms": (after.ru_stime - before.ru_stime) * 1e3 / calls,
    }


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by the ops run under this mode and alive at the same time.

    Storage that existed before (weights, inputs) is not counted, so on any device this is the working memory of
    the measured call: activations, saved tensors for backward, gradients, optimiser temporaries.
    """

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self._current = 0
        self.peak_bytes = 0

    def _release_dead(self) -> None:
        for key, (ref, nbytes) in list(self._live.items()):
            if ref.expired():
                del self._live[key]
                self._current -= nbytes

    @staticmethod
    def _storages(tree: Any) -> dict[int, torch.UntypedStorage]:
        return {
            StorageWeakRef(leaf.untyped_storage()).cdata: leaf.untyped_storage()
            for leaf in tree_leaves(tree)
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta"
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._release_dead()
        inputs = self._storages((args, kwargs))
        for key, storage in self._storages(out).items():
            # Views and in-place results share an input's storage: only fresh storage is new memory.
            if key not in inputs and key not in self._live:
                self._live[key] = (StorageWeakRef(storage), storage.nbytes())
                self._current += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self._current)
        return out


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory that one call of ``fn`` allocates on top of what was already allocated, in MiB.

    CUDA reads the caching allocator's statistics (which also see inside compiled graphs); elsewhere the tensors the
    call creates are tracked op by op with ``PeakTensorMemory``.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with PeakTensorMemory() as tracker:
        fn()
    return tracker.peak_bytes / 2**20


def checked_device(parser: argparse.ArgumentParser, device: str) -> torch.device:
    """``--device`` as a ``torch.device``: a usage error for a malformed name or for CUDA where there is none."""
    try:
        checked = torch.device(device)
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if checked.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested but CUDA is not available; use --device cpu.")
    return checked


def report_head(benchmark: str, device: torch.device, dtype: torch.dtype, **settings: Any) -> dict[str, Any]:
    """The start of a JSON report: the benchmark's name, the machine, and its settings (device and dtype first)."""
    return {
        "benchmark": benchmark,
        "machine": machine_info(device),
        "settings": {"device": str(device), "dtype": str(dtype).removeprefix("torch."), **settings},
    }


def write_report(report: dict[str, Any], output: str | None) -> None:
    """Print ``report`` as JSON and, if ``output`` is set, also write it there (creating parent folders)."""
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
