"""Import a script of `benchmarks/` (not a package) as a module, for the tests that keep the benchmarks working."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark_script(filename: str, module_name: str) -> ModuleType:
    """`benchmarks/<filename>` imported as `module_name` (registered in `sys.modules`, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
