"""The documentation: every Python snippet runs (page by page, in order, offline, on tiny models), the presets table
matches the code, and the site builds with `mkdocs build --strict`."""

import importlib
import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from diffit_diffusers import available_presets, load_preset_config
from diffit_diffusers.models.denoiser import denoiser_class


REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS_DIR = REPO_ROOT / "docs"
PYTHON_LANGUAGES = ("python", "py")
#: Languages a fenced block may name. Only Python blocks are executed; every block must name its language so that
#: no Python snippet can slip past the tests untagged.
KNOWN_LANGUAGES = (*PYTHON_LANGUAGES, "bash", "text", "mermaid", "bibtex", "json", "yaml")
FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")
PRESETS_PAGE = DOCS_DIR / "concepts" / "architectures.md"
PRESET_ROW = re.compile(r"^\|\s*`(?P<name>[^`]+)`\s*\|.*\|\s*(?P<parameters>[\d,]+)\s*\|\s*$")
#: What `mkdocs build` needs: the `docs` extra.
DOCS_MODULES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers")
#: Modules whose public classes and functions (or `__all__`) must each have an API reference entry.
API_MODULES = (
    "diffit_diffusers",
    "diffit_diffusers.pipelines",
    "diffit_diffusers.hub",
    "diffit_diffusers.evaluation",
    "diffit_diffusers.evaluation.cli",
    "diffit_diffusers.convert_nvlabs",
    "diffit_diffusers.loaders",
    "diffit_diffusers.loaders.single_file",
    "diffit_diffusers.loaders.lora_pipeline",
    "diffit_diffusers.training",
    "diffit_diffusers.training.cli",
    "diffit_diffusers.training.lora",
)
API_DIRECTIVE = re.compile(r"^:::\s+(?P<path>[\w.]+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class CodeBlock:
    page: Path
    line: int  # 1-based line of the block's first code line
    language: str
    code: str


def code_blocks(page: Path) -> list[CodeBlock]:
    """The fenced code blocks of a Markdown page, with the indentation of their fence (admonitions, tabs) removed."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        match = FENCE_OPEN.match(lines[index])
        if match is None:
            index += 1
            continue
        indent, fence = match["indent"], match["fence"]
        closing = re.compile(rf"^{re.escape(indent)}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = next((i for i in range(index + 1, len(lines)) if closing.match(lines[i])), None)
        if end is None:
            raise ValueError(f"{page}:{index + 1}: code fence {fence!r} is never closed.")
        info = match["info"].split()
        body = [line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[index + 1 : end]]
        blocks.append(CodeBlock(page, index + 2, info[0] if info else "", "\n".join(body) + "\n"))
        index = end + 1
    return blocks


def python_blocks(page: Path) -> list[CodeBlock]:
    return [block for block in code_blocks(page) if block.language in PYTHON_LANGUAGES]


def page_id(page: Path) -> str:
    return page.relative_to(DOCS_DIR).as_posix()


PAGES = sorted(DOCS_DIR.rglob("*.md"))
PAGES_WITH_PYTHON = [page for page in PAGES if python_blocks(page)]


def test_docs_have_python_snippets_to_run():
    assert len(PAGES) >= 10
    assert len(PAGES_WITH_PYTHON) >= 8, [page_id(page) for page in PAGES_WITH_PYTHON]


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_code_block_names_a_known_language(page):
    unknown = [
        f"line {block.line - 1}: {block.language!r}"
        for block in code_blocks(page)
        if block.language not in KNOWN_LANGUAGES
    ]
    assert not unknown, f"{page_id(page)} has code blocks in unknown or missing languages: {unknown}"


def test_code_block_parser_handles_indented_fences(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Text\n\n```python\nx = 1\n```\n\n!!! note\n    ```python\n    if x:\n        y = 2\n    ```\n\n"
        "````text\n```python\nnot code\n```\n````\n"
    )
    blocks = code_blocks(page)
    assert [(b.line, b.language, b.code) for b in blocks] == [
        (4, "python", "x = 1\n"),
        (9, "python", "if x:\n    y = 2\n"),
        (14, "text", "```python\nnot code\n```\n"),
    ]
    page.write_text("```python\nx = 1\n")
    with pytest.raises(ValueError, match="never closed"):
        code_blocks(page)


def resolve(dotted_path: str):
    """The object a mkdocstrings `::: a.b.C` directive names: the longest importable module prefix, then attributes."""
    parts = dotted_path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(f"No module in {dotted_path!r} can be imported.")


def public_api(module_name: str) -> dict[str, object]:
    """`__all__` of a module, else its public classes and functions defined in it (or, for a package, below it)."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return {name: getattr(module, name) for name in module.__all__}
    return {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and (value.__module__ == module_name or value.__module__.startswith(module_name + "."))
    }


def test_api_reference_covers_the_public_api():
    directives = [
        match["path"]
        for page in sorted((DOCS_DIR / "api").glob("*.md"))
        for match in API_DIRECTIVE.finditer(page.read_text(encoding="utf-8"))
    ]
    documented = [resolve(path) for path in directives]  # also fails on a directive naming nothing
    missing = [
        f"{module_name}.{name}"
        for module_name in API_MODULES
        for name, value in public_api(module_name).items()
        if not any(value is entry for entry in documented)
    ]
    assert not missing, f"Add `::: <name>` entries to a page under docs/api/ for: {missing}"


@pytest.mark.parametrize("page", PAGES_WITH_PYTHON, ids=page_id)
def test_page_snippets_run(page, tmp_path, monkeypatch, hub_server):
    """Run a page's Python blocks in order in one namespace, inside an empty working directory.

    `hub_server` answers every Hugging Face Hub call on 127.0.0.1, so the Hub guide's uploads and downloads run for
    real without leaving the machine; nothing else on any page touches the network.
    """
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    reset_accelerate_state()  # the training and evaluation pages each create an Accelerator, as a fresh process would
    namespace = {"__name__": "__main__"}
    try:
        for block in python_blocks(page):
            # Leading newlines make tracebacks point at the block's lines in the Markdown page.
            code = compile("\n" * (block.line - 1) + block.code, str(page.relative_to(REPO_ROOT)), "exec")
            exec(code, namespace)
    finally:
        reset_accelerate_state()


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so that one page's `Accelerator` settings cannot leak into the next."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


@dataclass(frozen=True)
class ScriptCommand:
    """One shell command of a bash block that runs an example script, split at the script."""

    block: CodeBlock
    launcher: list[str]  # the words before the script, e.g. ["accelerate", "launch", "--multi_gpu"]
    script: str
    arguments: list[str]


def script_commands(page: Path) -> list[ScriptCommand]:
    """The commands of a page's bash blocks that run `examples/train_diffit.py`, `train_latent_diffit.py` or
    `evaluate.py` (line continuations joined, comments dropped)."""
    commands = []
    for block in code_blocks(page):
        if block.language != "bash":
            continue
        for line in block.code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            scripts = [index for index, word in enumerate(words) if word.endswith(tuple(EXAMPLE_SCRIPTS))]
            if scripts:
                index = scripts[0]
                commands.append(ScriptCommand(block, words[:index], words[index], words[index + 1 :]))
    return commands


#: The example scripts whose command lines the docs show, with the parser that checks them.
EXAMPLE_SCRIPTS = ("examples/train_diffit.py", "examples/train_latent_diffit.py", "examples/evaluate.py")
PAGES_WITH_SCRIPT_COMMANDS = [page for page in PAGES if script_commands(page)]


def parse_script_arguments(command: ScriptCommand) -> None:
    """Parse a command's flags as the script would; argparse exits on an unknown flag or a bad value."""
    from diffit_diffusers.evaluation.cli import build_parser as evaluation_parser
    from diffit_diffusers.training import parse_config
    from diffit_diffusers.training.cli import IMAGE_DEFAULTS, LATENT_DEFAULTS

    if command.script.endswith("evaluate.py"):
        evaluation_parser().parse_args(command.arguments)
    else:
        defaults = LATENT_DEFAULTS if command.script.endswith("train_latent_diffit.py") else IMAGE_DEFAULTS
        parse_config(command.arguments, "docs", defaults)
    if command.launcher[:2] == ["accelerate", "launch"]:
        from accelerate.commands.launch import launch_command_parser

        launch_command_parser().parse_args([*command.launcher[2:], command.script, *command.arguments])


def test_script_commands_are_found():
    assert len(PAGES_WITH_SCRIPT_COMMANDS) >= 6, [page_id(page) for page in PAGES_WITH_SCRIPT_COMMANDS]
    launched = [command for page in PAGES for command in script_commands(page) if command.launcher[:1] == ["accelerate"]]
    assert any("--use_fsdp" in command.launcher for command in launched)
    assert any(command.script.endswith("evaluate.py") for command in launched)


@pytest.mark.parametrize("page", PAGES_WITH_SCRIPT_COMMANDS, ids=page_id)
def test_script_commands_use_real_flags(page, capsys):
    """Every `accelerate launch` and script flag in the bash blocks exists and takes the value the page gives it."""
    failures = []
    for command in script_commands(page):
        try:
            parse_script_arguments(command)
        except SystemExit:
            failures.append(f"line {command.block.line}: {command.script}: {capsys.readouterr().err.strip()[-300:]}")
    assert not failures, f"{page_id(page)} shows commands that do not parse:\n" + "\n".join(failures)


def test_script_command_check_rejects_bad_flags(capsys):
    page = DOCS_DIR / "guides" / "train-image.md"
    block = CodeBlock(page, 1, "bash", "")
    good = ScriptCommand(block, ["accelerate", "launch", "--multi_gpu"], "examples/train_diffit.py", ["--dataset_name", "digits", "--seed", "1"])
    parse_script_arguments(good)
    bad_commands = [
        ScriptCommand(block, [], "examples/train_diffit.py", ["--dataset_name", "digits", "--sed", "1"]),
        ScriptCommand(block, [], "examples/train_diffit.py", ["--seed", "1"]),  # no training data
        ScriptCommand(block, [], "examples/train_latent_diffit.py", ["--objective", "flow"]),
        ScriptCommand(block, [], "examples/evaluate.py", ["--pipeline", "p", "--num_samples", "0", "--reference", "r"]),
        ScriptCommand(block, ["accelerate", "launch", "--multi_gpus"], "examples/train_diffit.py", []),
    ]
    for command in bad_commands:
        with pytest.raises(SystemExit):
            parse_script_arguments(command)
    capsys.readouterr()


def _parameter_count(preset: str) -> int:
    config = load_preset_config(preset)
    with torch.device("meta"):
        model = denoiser_class(config["_class_name"]).from_preset(preset)
    return sum(parameter.numel() for parameter in model.parameters())


def test_presets_table_lists_every_preset_with_its_parameter_count():
    rows = {}
    for line in PRESETS_PAGE.read_text(encoding="utf-8").splitlines():
        match = PRESET_ROW.match(line)
        if match:
            rows[match["name"]] = int(match["parameters"].replace(",", ""))
    assert sorted(rows) == sorted(available_presets())
    assert rows == {preset: _parameter_count(preset) for preset in rows}


def test_mkdocs_build_strict(tmp_path):
    missing = [name for name in DOCS_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the docs extra is not installed (missing {', '.join(missing)}): pip install -e '.[docs]'")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", "mkdocs.yml", "--site-dir", str(site)],
        cwd=REPO_ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api_page = (site / "api" / "models" / "index.html").read_text(encoding="utf-8")
    assert "DiffiTTransformer2DModel" in api_page and "DiffiTUNet2DModel" in api_page
    tmsa_page = (site / "concepts" / "tmsa" / "index.html").read_text(encoding="utf-8")
    assert 'class="arithmatex"' in tmsa_page
