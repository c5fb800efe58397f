"""Hugging Face Hub support: DiffiT model cards, folder uploads and a background uploader for training loops."""

import json
import math
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


@dataclass
class _UploadJob:
    """A private copy of a folder waiting to be uploaded; `snapshot_root` is deleted once it is no longer needed."""

    source: Path
    snapshot_root: Path
    path_in_repo: str | None
    commit_message: str

    @property
    def target(self) -> str:
        return (self.path_in_repo or "").strip("/")

    @property
    def folder(self) -> Path:
        return self.snapshot_root / "folder"

    @classmethod
    def snapshot(cls, source: Path, path_in_repo: str | None, commit_message: str) -> "_UploadJob":
        snapshot_root = Path(tempfile.mkdtemp(prefix="diffit-hub-upload-"))
        job = cls(source=source, snapshot_root=snapshot_root, path_in_repo=path_in_repo, commit_message=commit_message)
        try:
            shutil.copytree(source, job.folder)
        except OSError:
            job.discard()
            raise
        return job

    def discard(self) -> None:
        shutil.rmtree(self.snapshot_root, ignore_errors=True)


class BackgroundHubUploader:
    """Push folders to one Hub model repo from a worker thread, so a training loop never waits on the network.

    `submit` copies the folder right away (later writes to it cannot leak into the upload) and returns; one upload
    runs at a time. A newer submission for the same `path_in_repo` replaces one still waiting. Failures are logged
    with their reason, counted in `failures` (the last reason in `last_error`) and never raised; the latest failed
    snapshot of each `path_in_repo` is kept and retried on the next `submit` (unless that submission replaces it)
    and on `close`. `successes` counts finished uploads, `last_commit_url` is the latest commit. Call `close` (or use
    the uploader as a context manager) before the process exits: the worker is a daemon thread.

    Example:
        ```py
        uploader = BackgroundHubUploader("me/diffit-cifar10", private=True)
        for step in range(num_steps):
            ...
            if step % checkpoint_every == 0:
                pipeline.save_pretrained(output_dir)
                uploader.submit(output_dir, commit_message=f"Step {step}")
        uploader.close()
        ```
    """

    def __init__(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool = False,
        create: bool = True,
        endpoint: str | None = None,
    ):
        validate_repo_id(repo_id)
        self.repo_id = repo_id
        self.token = token
        self.private = private
        self.create = create
        self.endpoint = endpoint
        self.successes = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_commit_url: str | None = None
        self._condition = threading.Condition()
        self._queued: dict[str, _UploadJob] = {}
        self._failed: dict[str, _UploadJob] = {}
        self._in_flight = False
        self._closed = False
        self._abandoned = 0
        self._worker = threading.Thread(target=self._run, name="diffit-hub-uploader", daemon=True)
        self._worker.start()

    def submit(
        self, folder: str | Path, path_in_repo: str | None = None, commit_message: str = "Upload checkpoint"
    ) -> bool:
        """Snapshot `folder` and queue its upload; returns False (and logs why) if the snapshot could not be made.

        Raises `FileNotFoundError` if `folder` is not a folder and `RuntimeError` after `close`.
        """
        folder = Path(folder)
        with self._condition:
            closed = self._closed
        if closed:
            raise RuntimeError("This BackgroundHubUploader is closed; create a new one to upload more folders.")
        if not folder.is_dir():
            raise FileNotFoundError(f"Cannot upload {folder}: it is not an existing folder.")
        try:
            job = _UploadJob.snapshot(folder, path_in_repo, commit_message)
        except OSError as error:
            with self._condition:
                reason = f"{type(error).__name__}: {error}"
                self._record_failure(reason, folder, "the folder could not be copied for upload")
            return False
        with self._condition:
            self._requeue_failed(replaced_target=job.target)
            replaced = self._queued.pop(job.target, None)
            if replaced is not None:
                replaced.discard()
            self._queued[job.target] = job
            self._condition.notify_all()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no upload is queued or running; False if `timeout` seconds passed first."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._queued and not self._in_flight, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Retry failed uploads once, wait for every upload (at most `timeout` seconds) and stop the worker.

        Returns True if everything submitted reached the Hub (or was replaced by a newer upload that did).
        """
        with self._condition:
            if not self._closed:
                self._closed = True
                self._requeue_failed(replaced_target=None)
                self._condition.notify_all()
        self._worker.join(timeout)
        with self._condition:
            return not self._worker.is_alive() and self._abandoned == 0

    def __enter__(self) -> "BackgroundHubUploader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _requeue_failed(self, replaced_target: str | None) -> None:
        """Queue failed snapshots again, except the one a new submission for `replaced_target` supersedes."""
        for target, job in self._failed.items():
            if target == replaced_target:
                job.discard()
            else:
                self._queued[target] = job
        self._failed.clear()

    def _record_failure(self, reason: str, source: Path, outcome: str) -> None:
        self.failures += 1
        self.last_error = reason
        logger.warning(f"Uploading {source} to the Hub repo {self.repo_id} failed ({reason}); {outcome}.")

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._queued or self._closed)
                if not self._queued:
                    return
                job = self._queued.pop(next(iter(self._queued)))
                self._in_flight = True
            try:
                commit_url = push_folder_to_hub(
                    job.folder,
                    self.repo_id,
                    token=self.token,
                    private=self.private,
                    path_in_repo=job.path_in_repo,
                    commit_message=job.commit_message,
                    create=self.create,
                    endpoint=self.endpoint,
                )
            except Exception as error:
                with self._condition:
                    if job.target in self._queued:
                        outcome = "a newer upload of the same target is queued"
                        job.discard()
                    elif self._closed:
                        outcome = "giving up since the uploader is closed"
                        self._abandoned += 1
                        job.discard()
                    else:
                        outcome = "it will be retried on the next submit() or on close()"
                        self._failed[job.target] = job
                    self._record_failure(f"{type(error).__name__}: {error}", job.source, outcome)
                    self._in_flight = False
                    self._condition.notify_all()
            else:
                job.discard()
                with self._condition:
                    self.successes += 1
                    self.last_commit_url = commit_url
                    self._in_flight = False
                    self._condition.notify_all()
