"""`benchmarks/harness.py`'s page-fault count, which the training benchmark reports per step."""

import sys

import pytest
import torch

from benchmark_scripts import load_benchmark_script


harness = load_benchmark_script("harness.py", "benchmark_harness")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and getrusage fault counts")
def test_page_faults_count_fresh_memory_per_call():
    # 64 MiB is above glibc's largest mmap threshold: every call maps fresh pages and touches them all.
    touching = harness.page_faults_per_call(lambda: torch.ones(16 * 2**20), calls=3)
    kept = torch.zeros(16 * 2**20)  # touched once here
    reusing = harness.page_faults_per_call(lambda: kept.fill_(1.0), calls=3)
    assert set(touching) == {"minor_page_faults", "system_cpu_ms"}
    # At least one fault per 2 MiB huge page, and many more than refilling memory the process already holds.
    assert touching["minor_page_faults"] >= 32 > reusing["minor_page_faults"]


def test_allocator_settings_are_recognised():
    assert harness.is_allocator_setting("MALLOC_TRIM_THRESHOLD_") and harness.is_allocator_setting("LD_PRELOAD")
    assert not harness.is_allocator_setting("OMP_NUM_THREADS")
