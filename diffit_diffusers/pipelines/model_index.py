"""How a DiffiT pipeline folder's ``model_index.json`` names its classes, for diffusers' two loaders.

A saved folder names the installed ``diffit_diffusers`` library for its DiffiT components
(``"denoiser": ["diffit_diffusers", "DiffiTTransformer2DModel"]``) and ``pipeline_diffit.DiffiTPipeline`` as its
class. diffusers' generic ``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`` only loads classes
from outside diffusers and transformers through module files in the folder, so each such name has a one-line
module that re-exports the installed class (``pipeline_diffit.py``, ``denoiser/diffit_diffusers.py``).

``DiffiTPipeline.from_pretrained`` runs no code from the folder: ``resolve_installed_classes`` points those entries
at the installed classes before diffusers' loader reads them. Folders of version 0.1.0 (``modeling_diffit``
modules) load the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from diffusers.pipelines.pipeline_loading_utils import filter_model_files, variant_compatible_siblings
from huggingface_hub import HfApi, constants, get_cached_repo_tree, hf_hub_download, snapshot_download
from huggingface_hub.errors import CachedRepoTreeNotFoundError, RemoteEntryNotFoundError

from ..loaders.single_file import CHECKPOINT_SUFFIXES


MODEL_INDEX_NAME = "model_index.json"
#: The library name ``model_index.json`` gives this package's component classes.
LIBRARY_NAME = "diffit_diffusers"
#: The module at the folder's root that names the pipeline class for the generic loader.
PIPELINE_MODULE = "pipeline_diffit"
#: Names version 0.1.0 gave the re-exporting modules of components.
LEGACY_COMPONENT_MODULES = ("modeling_diffit",)


def read_model_index(index_file: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``model_index.json``; a ``ValueError`` naming the file and the fix if it is not a JSON object."""
    index_file = Path(index_file)
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{index_file} is not valid JSON ({error}); the pipeline folder is damaged. Save it again with "
            "`save_pretrained` or restore the file."
        ) from error
    if not isinstance(index, dict) or "_class_name" not in index:
        raise ValueError(
            f"{index_file} is not a pipeline index (a JSON object with `_class_name` and one [library, class] entry "
            "per component); save the pipeline again with `save_pretrained`."
        )
    return index


def component_entries(index: Mapping[str, Any]) -> dict[str, list]:
    """The ``[library, class]`` entries of the components the index holds (skipping ``[null, null]`` ones)."""
    return {
        name: entry
        for name, entry in index.items()
        if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and entry[0] is not None
    }


def single_file_checkpoints(filenames: Iterable[str]) -> list[str]:
    """The top-level files among ``filenames`` that look like single-file checkpoints (``.safetensors``, ...)."""
    return sorted(name for name in filenames if "/" not in name and name.lower().endswith(CHECKPOINT_SUFFIXES))


def missing_index_message(source: str, filenames: Iterable[str]) -> str:
    """Why ``source`` (a folder or Hub repo) is not a pipeline, pointing at ``from_single_file`` for raw files."""
    checkpoints = single_file_checkpoints(filenames)
    if checkpoints:
        return (
            f"{source} has no {MODEL_INDEX_NAME}: it holds single-file checkpoints ({', '.join(checkpoints)}), not "
            f"a saved pipeline. Load one with `DiffiTPipeline.from_single_file` (or "
            f"`DiffiTTransformer2DModel.from_single_file`), or convert it with `python -m "
            f"diffit_diffusers.convert_nvlabs`."
        )
    return (
        f"{source} has no {MODEL_INDEX_NAME}: it is not a saved pipeline folder. Save one with "
        "`DiffiTPipeline.save_pretrained` or the training scripts."
    )


def check_pipeline_folder(folder: Path) -> None:
    """Raise ``FileNotFoundError`` for a folder without ``model_index.json`` and ``ValueError`` for a broken one."""
    index_file = folder / MODEL_INDEX_NAME
    if not index_file.is_file():
        raise FileNotFoundError(missing_index_message(str(folder), (path.name for path in folder.iterdir())))
    read_model_index(index_file)


def _installed_class(class_name: str) -> type:
    import diffit_diffusers

    installed = getattr(diffit_diffusers, class_name, None)
    if not isinstance(installed, type):
        raise ValueError(
            f"{MODEL_INDEX_NAME} names the class {class_name!r} of {LIBRARY_NAME}, which the installed version "
            f"{diffit_diffusers.__version__} does not have; upgrade diffit-diffusers."
        )
    return installed


def resolve_installed_classes(index: dict[str, Any], pipeline_class: type) -> dict[str, Any]:
    """Point an index's entries for this package at the installed classes, in place (and return it).

    ``_class_name`` becomes ``pipeline_class``'s name, so diffusers builds that class without importing the
    folder's ``pipeline_diffit.py``; each ``["diffit_diffusers" | "modeling_diffit", Class]`` entry becomes
    ``[<installed module>, Class]``, which diffusers imports from the running process. An index of another
    pipeline class raises a ``ValueError``.
    """
    class_name = index["_class_name"]
    named_class = class_name[1] if isinstance(class_name, list) else class_name
    if named_class != pipeline_class.__name__:
        raise ValueError(
            f"The folder holds a {named_class}, not a {pipeline_class.__name__}; load it with "
            f"`{named_class}.from_pretrained` (or `diffusers.DiffusionPipeline.from_pretrained`)."
        )
    index["_class_name"] = pipeline_class.__name__
    for name, (library, component_class) in component_entries(index).items():
        if library == LIBRARY_NAME or library in LEGACY_COMPONENT_MODULES:
            index[name] = [_installed_class(component_class).__module__, component_class]
    return index


def write_generic_loader_files(folder: Path, pipeline: Any) -> None:
    """Rewrite a saved ``model_index.json`` so that it names this package, and add the re-exporting modules the
    generic ``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`` imports."""
    index_file = folder / MODEL_INDEX_NAME
    index = read_model_index(index_file)
    pipeline_name = type(pipeline).__name__
    index["_class_name"] = [PIPELINE_MODULE, pipeline_name]
    (folder / f"{PIPELINE_MODULE}.py").write_text(_reexport_module(type(pipeline)))
    for name, (library, class_name) in component_entries(index).items():
        component_class = type(getattr(pipeline, name))
        if library.split(".")[0] == LIBRARY_NAME:
            index[name] = [LIBRARY_NAME, class_name]
            (folder / name / f"{LIBRARY_NAME}.py").write_text(_reexport_module(component_class))
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _reexport_module(cls: type) -> str:
    return (
        f'"""Lets diffusers\' generic loader find {cls.__name__} (requires `pip install diffit-diffusers`)."""\n\n'
        f"from {LIBRARY_NAME} import {cls.__name__}\n\n"
        f'__all__ = ["{cls.__name__}"]\n'
    )


def download_patterns(
    index: Mapping[str, Any],
    skipped_components: Iterable[str],
    variant: str | None,
    use_safetensors: bool | None,
    repo_files: Iterable[str] | None = None,
) -> tuple[list[str], list[str]]:
    """``(allow_patterns, ignore_patterns)`` for ``snapshot_download`` of a pipeline repo.

    Every component folder is fetched except those in ``skipped_components`` (passed to ``from_pretrained``), and
    ``use_safetensors`` leaves out the other weight format. With the repo's file list (``repo_files``) only the
    weight files diffusers will load are fetched (the ``variant`` ones where a folder has them, as diffusers
    chooses); without it (offline) the variant files are left out unless a ``variant`` is asked for.
    """
    skipped = set(skipped_components)
    folders = [name for name in component_entries(index) if name not in skipped]
    allow = [MODEL_INDEX_NAME, *(f"{name}/*" for name in folders)]
    ignore = {True: ["*.bin"], False: ["*.safetensors"]}.get(use_safetensors, [])
    if repo_files is None:
        if variant is None:
            ignore += ["*/diffusion_pytorch_model.*.safetensors", "*/diffusion_pytorch_model.*.bin", "*.index.*.json"]
        return allow, ignore
    folder_files = [name for name in repo_files if name.split("/")[0] in folders]
    loaded_weights, _ = variant_compatible_siblings(folder_files, variant=variant, ignore_patterns=ignore)
    return allow, ignore + [name for name in filter_model_files(folder_files) if name not in loaded_weights]


def _repo_files(repo_id: str, revision: str | None, cache_dir, token, offline: bool) -> list[str] | None:
    """The repo's file list: from the Hub, or offline the listing a previous download cached (``None`` if none)."""
    if not offline:
        return HfApi(token=token).list_repo_files(repo_id, revision=revision)
    try:
        return [entry.path for entry in get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache_dir)]
    except CachedRepoTreeNotFoundError:
        return None  # snapshot_download raises the offline not-found error


def download_pipeline_repo(
    repo_id: str,
    *,
    skipped_components: Iterable[str],
    variant: str | None,
    use_safetensors: bool | None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> str:
    """Download the files of a pipeline repo that ``from_pretrained`` loads (see ``download_patterns``) and return
    the snapshot folder; a ``FileNotFoundError`` if the repo has no ``model_index.json``."""
    hub_kwargs = {"revision": revision, "cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
    repo_files = _repo_files(repo_id, revision, cache_dir, token, offline=local_files_only or constants.HF_HUB_OFFLINE)
    try:
        index_file = hf_hub_download(repo_id, MODEL_INDEX_NAME, force_download=force_download, **hub_kwargs)
    except RemoteEntryNotFoundError as error:
        raise FileNotFoundError(missing_index_message(f"The Hub repo {repo_id}", repo_files or [])) from error
    allow_patterns, ignore_patterns = download_patterns(
        read_model_index(index_file), skipped_components, variant, use_safetensors, repo_files
    )
    return snapshot_download(
        repo_id,
        allow_patterns=allow_patterns,
        ignore_patterns=ignore_patterns,
        force_download=force_download,
        **hub_kwargs,
    )
