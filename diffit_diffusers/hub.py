"""Hugging Face Hub support: DiffiT model cards, folder uploads and background uploads for training loops."""

import json
import math
import shutil
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

from diffusers.utils import logging, make_image_grid
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id
from PIL import Image


logger = logging.get_logger(__name__)

MODEL_CARD_FILENAME = "README.md"
SAMPLE_GRID_FILENAME = "samples.png"
DIFFIT_TAGS = ("diffit", "diffusers", "diffusers:DiffiTPipeline")
DIFFIT_CITATION = """@inproceedings{hatamizadeh2024diffit,
  title     = {DiffiT: Diffusion Vision Transformers for Image Generation},
  author    = {Hatamizadeh, Ali and Song, Jiaming and Liu, Guilin and Kautz, Jan and Vahdat, Arash},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024},
  eprint    = {2312.02139},
  archivePrefix = {arXiv}
}"""
DIFFIT_DESCRIPTION = (
    "DiffiT (Diffusion Vision Transformers, Hatamizadeh et al., ECCV 2024) is a diffusion model whose denoiser is a "
    "vision transformer built on time-dependent multi-head self-attention (TMSA). In TMSA the queries, keys and "
    "values of every attention layer are linear projections of both the spatial tokens and a time token that embeds "
    "the diffusion timestep, so the attention pattern itself, and not only the features it mixes, changes as "
    "denoising moves from coarse layout to fine detail; a learned relative position bias is added to the attention "
    "logits. This checkpoint runs on [diffusers](https://github.com/huggingface/diffusers) through the "
    "`diffit_diffusers` package."
)


def _as_list(value: str | Sequence[str] | None, name: str) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(item, str) and item for item in values):
        raise TypeError(f"`{name}` must be a string or a list of non-empty strings, got {value!r}.")
    return values


def _sample_grid(sample_images: Sequence[Image.Image]) -> Image.Image:
    """Tile images of one size into a near-square RGB grid, padding the last row with black tiles."""
    if len(sample_images) == 0:
        raise ValueError("`sample_images` is empty; pass None to leave the sample grid out of the model card.")
    for index, image in enumerate(sample_images):
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"`sample_images[{index}]` is a {type(image).__name__}, expected a PIL image "
                "(e.g. `pipeline(...).images` with `output_type='pil'`)."
            )
    sizes = {image.size for image in sample_images}
    if len(sizes) > 1:
        raise ValueError(f"All `sample_images` must have the same size to form a grid, got sizes {sorted(sizes)}.")
    cols = math.ceil(math.sqrt(len(sample_images)))
    rows = math.ceil(len(sample_images) / cols)
    tiles = [image.convert("RGB") for image in sample_images]
    tiles += [Image.new("RGB", tiles[0].size)] * (rows * cols - len(tiles))
    return make_image_grid(tiles, rows=rows, cols=cols)


def _markdown_cell(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", "<br>")


def _markdown_table(rows: Mapping[str, Any]) -> str:
    lines = ["| Setting | Value |", "| --- | --- |"]
    lines += [f"| {_markdown_cell(key)} | {_markdown_cell(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def create_model_card(
    output_dir: str | Path,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    datasets: str | Sequence[str] | None = None,
    tags: str | Sequence[str] | None = None,
    pipeline_tag: str = "unconditional-image-generation",
    sample_images: Sequence[Image.Image] | None = None,
    training_summary: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    usage_snippet: str | None = None,
    extra_text: str | None = None,
) -> Path:
    """Write a Hub model card (`README.md`) for a DiffiT checkpoint saved in `output_dir`.

    The YAML front matter declares `library_name: diffusers`, `pipeline_tag`, `license`, the tags `diffit`,
    `diffusers` and `diffusers:DiffiTPipeline` (plus `tags`), and `datasets` / `base_model` when given. The body
    describes DiffiT, shows `sample_images` as a grid saved to `output_dir/samples.png`, renders
    `training_summary` as a table and `config` as JSON, gives a usage snippet (by default loading `repo_id`, or
    `output_dir` without one) and ends with the DiffiT citation.

    Args:
        output_dir: folder of the checkpoint; created if missing.
        sample_images: PIL images of one size, e.g. `pipeline(...).images`.
        training_summary: flat mapping such as `{"steps": 10000, "learning rate": 1e-4}`.
        config: JSON-serialisable mapping, e.g. the transformer's `config`.

    Returns:
        The path of the written `README.md`.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"`output_dir` {output_dir} is a file; pass the checkpoint folder instead.")
    if repo_id is not None:
        validate_repo_id(repo_id)
    for name, value in (("license", license), ("pipeline_tag", pipeline_tag)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"`{name}` must be a non-empty string, got {value!r}.")
    for name, value in (("training_summary", training_summary), ("config", config)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"`{name}` must be a mapping (e.g. a dict), got {type(value).__name__}.")
    extra_tags = _as_list(tags, "tags")
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        license=license,
        tags=list(dict.fromkeys([*DIFFIT_TAGS, *extra_tags])),
        datasets=_as_list(datasets, "datasets") or None,
        base_model=base_model,
    )
    grid = _sample_grid(sample_images) if sample_images is not None else None

    title = repo_id.split("/")[-1] if repo_id is not None else "DiffiT"
    sections = [f"# {title}", DIFFIT_DESCRIPTION]
    if base_model is not None:
        sections.append(f"Fine-tuned from [{base_model}](https://huggingface.co/{base_model}).")
    if grid is not None:
        sections.append(f"## Samples\n\n![Samples generated by this model]({SAMPLE_GRID_FILENAME})")
    if training_summary:
        sections.append(f"## Training\n\n{_markdown_table(training_summary)}")
    if config:
        sections.append(f"## Configuration\n\n```json\n{json.dumps(dict(config), indent=2, default=str)}\n```")
    if usage_snippet is None:
        source = repo_id if repo_id is not None else output_dir.as_posix()
        usage_snippet = (
            "from diffit_diffusers import DiffiTPipeline\n\n"
            f'pipeline = DiffiTPipeline.from_pretrained("{source}")\n'
            "image = pipeline().images[0]"
        )
    sections.append(f"## Usage\n\n```python\n{usage_snippet.strip()}\n```")
    if extra_text:
        sections.append(extra_text.strip())
    sections.append(f"## Citation\n\n```bibtex\n{DIFFIT_CITATION}\n```")

    output_dir.mkdir(parents=True, exist_ok=True)
    if grid is not None:
        grid.save(output_dir / SAMPLE_GRID_FILENAME)
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    card_path = output_dir / MODEL_CARD_FILENAME
    card.save(card_path)
    return card_path


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    path_in_repo: str | None = None,
    commit_message: str = "Upload DiffiT model",
    create: bool = True,
    endpoint: str | None = None,
) -> str:
    """Upload every file of `folder` to the model repo `repo_id` in one commit and return the commit URL.

    With `create`, the repo is created first (as private if `private`) unless it exists. `path_in_repo` puts the
    files under a sub-folder of the repo; `endpoint` overrides `HF_ENDPOINT`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Cannot push {folder} to the Hub: it is not an existing folder. Save the model there first, e.g. with "
            "`pipeline.save_pretrained(folder)`."
        )
    if not any(path.is_file() for path in folder.rglob("*")):
        raise ValueError(f"Cannot push {folder} to the Hub: the folder has no files.")
    validate_repo_id(repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    if create:
        api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=folder, path_in_repo=path_in_repo, commit_message=commit_message
    )
    return commit.commit_url


def resolve_hub_repo_id(name: str, token: str | None = None, endpoint: str | None = None) -> str:
    """``name`` as a full ``namespace/name`` repo id: a bare name gets the token owner's namespace.

    If the Hub cannot be asked (offline, no token), the bare name is returned with a warning: uploads then fail
    and are retried, but nothing else is affected.
    """
    if "/" in name:
        return name
    try:
        owner = HfApi(endpoint=endpoint, token=token).whoami()["name"]
    except (OSError, ValueError, KeyError) as error:
        logger.warning(f"Could not look up the Hub user to name the repo {name!r} ({error}); pass `namespace/name`.")
        return name
    return f"{owner}/{name}"


class BackgroundHubUploads:
    """Upload folders to one Hub model repo in the background, with huggingface_hub's own machinery.

    Every upload is an `HfApi.upload_folder` run through `HfApi.run_as_future` (one at a time, in submission order,
    on huggingface_hub's worker thread), so a training loop never waits on the network. The repo id is resolved
    lazily in the background: a bare name gets the token owner's namespace (see `resolve_hub_repo_id`), and the repo
    is created (as private if `private`) before the first upload. If the Hub is unreachable, the resolution and each
    upload fail with a logged warning and are counted in `failures` (the last reason in `last_error`); nothing is
    ever raised to the caller, and the next upload tries the resolution again.

    Example:
        ```py
        uploads = BackgroundHubUploads("diffit-cifar10", private=True)
        for step in range(num_steps):
            ...
            if step % checkpoint_every == 0:
                pipeline.save_pretrained(output_dir)
                uploads.upload(output_dir, commit_message=f"Step {step}", ignore_patterns=["checkpoint-*"])
        ok = uploads.wait()  # True if every upload reached the Hub
        ```
    """

    def __init__(
        self, repo_name: str, *, token: str | None = None, private: bool = False, endpoint: str | None = None
    ):
        self.repo_name = repo_name
        self.private = private
        self.api = HfApi(endpoint=endpoint, token=token)
        self.failures = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._repo_id: str | None = None
        self._futures: list[Future] = []
        self._track(self.api.run_as_future(self._ensure_repo), f"Creating the Hub repo {repo_name!r}")

    def _ensure_repo(self) -> str:
        """Resolve the repo id and create the repo (once it worked, later calls return it at once)."""
        with self._lock:
            if self._repo_id is not None:
                return self._repo_id
        repo_id = resolve_hub_repo_id(self.repo_name, token=self.api.token, endpoint=self.api.endpoint)
        if "/" not in repo_id:
            raise ValueError(f"No Hub user to put the repo {repo_id!r} under; log in or pass `namespace/name`.")
        validate_repo_id(repo_id)
        self.api.create_repo(repo_id, private=self.private, exist_ok=True)
        with self._lock:
            self._repo_id = repo_id
        return repo_id

    @property
    def repo_id(self) -> str | None:
        """The resolved `namespace/name`, or `None` while it is not known (not yet asked, or the Hub unreachable)."""
        with self._lock:
            return self._repo_id

    def resolved_repo_id(self, timeout: float | None = 30.0) -> str:
        """The resolved repo id, waiting up to `timeout` seconds for the background resolution; the configured name
        if it could not be resolved."""
        wait(self._futures[:1], timeout=timeout)
        return self.repo_id or self.repo_name

    def upload(
        self,
        folder: str | Path,
        *,
        path_in_repo: str | None = None,
        commit_message: str = "Upload checkpoint",
        ignore_patterns: Sequence[str] | None = None,
        delete_after: bool = False,
    ) -> Future:
        """Queue the upload of `folder` (minus `ignore_patterns`) and return its `Future` at once.

        The files are read when the upload runs: pass a folder that stays as it is until then, or a private copy
        with `delete_after=True`, which deletes it once the upload finished or failed.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"Cannot upload {folder}: it is not an existing folder.")

        def run() -> str:
            try:
                commit = self.api.upload_folder(
                    repo_id=self._ensure_repo(),
                    folder_path=folder,
                    path_in_repo=path_in_repo,
                    commit_message=commit_message,
                    ignore_patterns=list(ignore_patterns) if ignore_patterns else None,
                )
                return commit.commit_url
            finally:
                if delete_after:
                    shutil.rmtree(folder, ignore_errors=True)

        return self._track(self.api.run_as_future(run), f"Uploading {folder} to the Hub repo {self.repo_name!r}")

    def _track(self, future: Future, what: str) -> Future:
        def report(done: Future) -> None:
            error = done.exception()
            if error is not None:
                with self._lock:
                    self.failures += 1
                    self.last_error = f"{type(error).__name__}: {error}"
                logger.warning(f"{what} failed ({type(error).__name__}: {error}).")

        self._futures.append(future)
        future.add_done_callback(report)
        return future

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every queued upload (at most `timeout` seconds); True if all of them reached the Hub."""
        done, pending = wait(self._futures, timeout=timeout)
        return not pending and all(future.exception() is None for future in done)
