import json
import logging
from pathlib import Path

import pytest
import yaml
from huggingface_hub import model_info, snapshot_download
from PIL import Image

from diffit_diffusers.hub import (
    DIFFIT_TAGS,
    SAMPLE_GRID_FILENAME,
    BackgroundHubUploads,
    create_model_card,
    push_folder_to_hub,
)

from hub_server import CreatedRepo, FakeHubServer, point_huggingface_hub_at


REPO_ID = "me/diffit-tiny"
TILE_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def split_card(card_path: Path) -> tuple[dict, str]:
    """(front matter parsed with yaml.safe_load, Markdown body) of a model card."""
    text = card_path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    front_matter, body = text[len("---\n") :].split("\n---\n", 1)
    return yaml.safe_load(front_matter), body


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    for relative_path, content in files.items():
        (folder / relative_path).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative_path).write_bytes(content)
    return folder


def local_files(folder: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under `folder`, leaving out huggingface_hub's `.cache` bookkeeping."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file() and ".cache" not in path.relative_to(folder).parts
    }


def checkpoint_files(step: int) -> dict[str, bytes]:
    config = json.dumps({"_class_name": "DiffiTPipeline", "step": step}).encode()
    return {"model_index.json": config, f"transformer/weights-{step}.bin": bytes(range(step % 7, 64))}


def test_model_card_metadata_body_and_sample_grid(tmp_path):
    samples = [Image.new("RGB", (8, 6), color) for color in TILE_COLORS]
    card_path = create_model_card(
        tmp_path / "checkpoint",
        repo_id=REPO_ID,
        base_model="nvidia/DiffiT",
        license="cc-by-nc-sa-4.0",
        datasets="cifar10",
        tags=["cifar10", "diffit"],
        pipeline_tag="unconditional-image-generation",
        sample_images=samples,
        training_summary={"steps": 1000, "learning rate": 1e-4, "formulation": "EDM | Heun"},
        config={"sample_size": 32, "window_size": 4},
        extra_text="Trained for a smoke test.",
    )

    assert card_path == tmp_path / "checkpoint" / "README.md"
    metadata, body = split_card(card_path)
    assert metadata["library_name"] == "diffusers"
    assert metadata["license"] == "cc-by-nc-sa-4.0"
    assert metadata["pipeline_tag"] == "unconditional-image-generation"
    assert metadata["tags"] == [*DIFFIT_TAGS, "cifar10"]
    assert metadata["datasets"] == ["cifar10"]
    assert metadata["base_model"] == "nvidia/DiffiT"

    assert body.lstrip().startswith("# diffit-tiny\n")
    assert "time-dependent multi-head self-attention (TMSA)" in body
    assert f"]({SAMPLE_GRID_FILENAME})" in body
    assert "| steps | 1000 |" in body and "| learning rate | 0.0001 |" in body
    assert "| formulation | EDM \\| Heun |" in body
    assert '"window_size": 4' in body
    assert f'DiffiTPipeline.from_pretrained("{REPO_ID}")' in body
    assert "Trained for a smoke test." in body
    assert "arXiv" in body and "2312.02139" in body and "ECCV" in body
    assert "Hatamizadeh, Ali and Song, Jiaming and Liu, Guilin and Kautz, Jan and Vahdat, Arash" in body

    # 5 tiles of 8x6 -> 3 columns x 2 rows, the sixth tile black padding.
    grid = Image.open(tmp_path / "checkpoint" / SAMPLE_GRID_FILENAME)
    assert grid.size == (3 * 8, 2 * 6)
    for index, color in enumerate(TILE_COLORS):
        assert grid.getpixel((index % 3 * 8 + 4, index // 3 * 6 + 3)) == color
    assert grid.getpixel((2 * 8 + 4, 6 + 3)) == (0, 0, 0)


def test_model_card_minimal_leaves_optional_parts_out(tmp_path):
    card_path = create_model_card(tmp_path)

    metadata, body = split_card(card_path)
    assert metadata == {
        "library_name": "diffusers",
        "license": "apache-2.0",
        "pipeline_tag": "unconditional-image-generation",
        "tags": list(DIFFIT_TAGS),
    }
    assert not (tmp_path / SAMPLE_GRID_FILENAME).exists()
    assert "## Samples" not in body and "## Training" not in body and "## Configuration" not in body
    assert f'DiffiTPipeline.from_pretrained("{tmp_path.as_posix()}")' in body


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"sample_images": []}, ValueError, "empty"),
        ({"sample_images": [Image.new("RGB", (4, 4)), "not an image"]}, TypeError, r"sample_images\[1\]"),
        ({"sample_images": [Image.new("RGB", (4, 4)), Image.new("RGB", (4, 5))]}, ValueError, "same size"),
        ({"training_summary": [("steps", 10)]}, TypeError, "training_summary"),
        ({"tags": ["ok", ""]}, TypeError, "tags"),
        ({"license": ""}, ValueError, "license"),
        ({"repo_id": "not a/valid/repo"}, ValueError, "not a/valid/repo"),
    ],
)
def test_model_card_rejects_bad_arguments(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        create_model_card(tmp_path, **kwargs)
    assert not (tmp_path / "README.md").exists()


def test_model_card_rejects_a_file_as_output_dir(tmp_path):
    file_path = tmp_path / "model.safetensors"
    file_path.write_bytes(b"weights")
    with pytest.raises(NotADirectoryError, match="is a file"):
        create_model_card(file_path)


def test_push_folder_to_hub_round_trips_through_the_hub(hub_server, tmp_path):
    folder = write_files(tmp_path / "checkpoint", checkpoint_files(step=3))
    create_model_card(folder, repo_id=REPO_ID, sample_images=[Image.new("RGB", (4, 4), "white")])
    expected = local_files(folder)

    commit_url = push_folder_to_hub(folder, REPO_ID, private=True, commit_message="First upload")

    assert hub_server.created_repos == [CreatedRepo(repo_id=REPO_ID, repo_type="model", private=True)]
    assert sorted(hub_server.files(REPO_ID)) == sorted(["README.md", SAMPLE_GRID_FILENAME, *checkpoint_files(3)])
    assert hub_server.files(REPO_ID) == expected
    last_commit = hub_server.commits(REPO_ID)[-1]
    assert last_commit.summary == "First upload"
    assert commit_url == f"{hub_server.url}/{REPO_ID}/commit/{last_commit.oid}"

    downloaded = Path(snapshot_download(REPO_ID, local_dir=tmp_path / "download"))
    assert local_files(downloaded) == expected
    info = model_info(REPO_ID)
    assert info.sha == last_commit.oid
    assert set(DIFFIT_TAGS) <= set(info.tags)


def test_push_folder_to_hub_into_a_subfolder_of_an_existing_repo(hub_server, tmp_path):
    hub_server.seed_repo(REPO_ID, {"README.md": b"# existing\n"})
    folder = write_files(tmp_path / "checkpoint-10", checkpoint_files(step=10))

    push_folder_to_hub(folder, REPO_ID, path_in_repo="checkpoint-10", token="hf_fake_token")

    assert hub_server.created_repos == []
    commit_request = next(request for request in hub_server.requests if request.path.endswith("/commit/main"))
    assert commit_request.headers["authorization"] == "Bearer hf_fake_token"
    assert hub_server.files(REPO_ID) == {
        "README.md": b"# existing\n",
        **{f"checkpoint-10/{path}": content for path, content in checkpoint_files(10).items()},
    }


def test_push_folder_to_hub_rejects_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an existing folder"):
        push_folder_to_hub(tmp_path / "missing", REPO_ID)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no files"):
        push_folder_to_hub(tmp_path / "empty", REPO_ID)


def test_background_uploads_survive_server_errors(hub_server, tmp_path, caplog):
    first = write_files(tmp_path / "first", checkpoint_files(step=1))
    second = write_files(tmp_path / "second", checkpoint_files(step=2))
    hub_server.fail_with = 500
    with caplog.at_level(logging.WARNING, logger="diffit_diffusers.hub"):
        uploads = BackgroundHubUploads(REPO_ID)  # the repo is created in the background: no error here
        failed = uploads.upload(first, path_in_repo="step-1")
        assert not uploads.wait(timeout=30)
    assert failed.exception() is not None and uploads.failures == 2  # creating the repo, then the upload
    assert "500" in uploads.last_error
    assert any(REPO_ID in record.message and "500" in record.message for record in caplog.records)
    assert not hub_server.has_repo(REPO_ID) and uploads.repo_id is None

    hub_server.fail_with = None
    assert uploads.upload(second, path_in_repo="step-2").result(timeout=30).startswith("http")
    assert uploads.repo_id == REPO_ID
    assert hub_server.files(REPO_ID) == {f"step-2/{path}": content for path, content in checkpoint_files(2).items()}


def test_background_uploads_to_an_unreachable_hub_only_warn(hub_server, tmp_path, caplog):
    folder = write_files(tmp_path / "checkpoint", checkpoint_files(step=5))
    with point_huggingface_hub_at(FakeHubServer.refused_url(), cache_dir=tmp_path / "unused-cache"):
        with caplog.at_level(logging.WARNING, logger="diffit_diffusers.hub"):
            uploads = BackgroundHubUploads("diffit-tiny", token="hf_fake", private=True)
            future = uploads.upload(folder)
            assert not uploads.wait(timeout=30)
    assert "ConnectError" in uploads.last_error and "Connection refused" in str(future.exception())
    assert uploads.repo_id is None and uploads.resolved_repo_id(timeout=1) == "diffit-tiny"
    assert any("Creating the Hub repo 'diffit-tiny' failed" in record.message for record in caplog.records)
    assert hub_server.request_paths() == []


def test_background_uploads_resolve_a_bare_name_to_the_token_owner(hub_server, tmp_path):
    uploads = BackgroundHubUploads("diffit-tiny", token="hf_fake", private=True)
    assert uploads.resolved_repo_id() == "tester/diffit-tiny"
    uploads.upload(write_files(tmp_path / "checkpoint", checkpoint_files(step=5))).result(timeout=30)
    assert hub_server.created_repos == [CreatedRepo(repo_id="tester/diffit-tiny", repo_type="model", private=True)]
    assert hub_server.files("tester/diffit-tiny") == checkpoint_files(5)


def test_background_uploads_leave_out_ignored_files_and_delete_private_copies(hub_server, tmp_path):
    folder = write_files(tmp_path / "run", {**checkpoint_files(step=1), "checkpoint-1/optimizer.bin": b"state"})
    copy = write_files(tmp_path / "copy", checkpoint_files(step=2))
    uploads = BackgroundHubUploads(REPO_ID)
    uploads.upload(folder, ignore_patterns=["checkpoint-*"], commit_message="final")
    uploads.upload(copy, path_in_repo="step-2", delete_after=True)
    assert uploads.wait(timeout=30)
    files = hub_server.files(REPO_ID)
    assert not any(name.startswith("checkpoint-") for name in files)
    assert {name: files[name] for name in checkpoint_files(1)} == checkpoint_files(1)
    assert "step-2/model_index.json" in files and not copy.exists()
    assert [commit.summary for commit in hub_server.commits(REPO_ID)][1] == "final"


def test_bare_repo_names_get_the_token_owners_namespace(hub_server, caplog):
    from diffit_diffusers.hub import resolve_hub_repo_id

    assert resolve_hub_repo_id("org/model") == "org/model"
    assert resolve_hub_repo_id("model", token="hf_fake") == "tester/model"
    with caplog.at_level("WARNING"):
        assert resolve_hub_repo_id("model", token=False) == "model"
    assert "pass `namespace/name`" in caplog.text
