"""Crash-safe checkpoints (SIGKILL at every file operation of a save), start-up checks, exit statuses and config
files of the training command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, PartialState
from safetensors.torch import load_file

from diffit_diffusers.training import parse_config
from diffit_diffusers.training.cli import EXIT_ERROR, EXIT_HUB_PUSH_FAILED, main_image, main_latent

from test_training import TINY_UNET, digits_args, run_training, write_config


HERE = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {
        **{f"checkpoint/{k}": v for k, v in load_file(folder / "checkpoint-2" / "model.safetensors").items()},
        **{f"ema/{k}": v for k, v in load_file(folder / "denoiser" / "diffusion_pytorch_model.safetensors").items()},
    }


@pytest.mark.slow
def test_sigkill_at_every_file_operation_of_a_save_resumes_bit_identically(tmp_path):
    """Kill the run at each file operation of the step-2 save (which also deletes checkpoint-1, the limit being 1)
    and right after it; every run resumes with `latest` and ends with the weights of an uninterrupted run."""
    flags = digits_args(
        tmp_path, max_train_steps=2, checkpointing_steps=1, checkpoints_total_limit=1, num_inference_steps=1,
        train_batch_size=2,
    )
    flags = flags[: flags.index("--output_dir")] + flags[flags.index("--output_dir") + 2 :]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(HERE / "checkpoint_faults.py"), str(tmp_path), json.dumps(flags), "2"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["reference"] == {"exit_code": 0}
    points = report["points"]
    assert len(points) >= 10, [point["left"] for point in points]
    reference = weights(tmp_path / "reference")
    situations = set()
    for point in points:
        assert point["killed"] == {"signal": 9}, point
        assert point["resumed"] == {"exit_code": 0}, point
        situations.add(tuple(point["left"]))
        resumed = weights(Path(point["output"]))
        assert resumed.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(resumed[name], tensor), (point["kill_at"], name)
    # The kills left the run in all its intermediate states: a partial new checkpoint, both checkpoints, the new
    # one alone, and a half-deleted old one.
    assert (".partial-checkpoint-2", "checkpoint-1") in situations
    assert ("checkpoint-1", "checkpoint-2") in situations
    assert (".deleting-checkpoint-1", "checkpoint-2") in situations
    assert ("checkpoint-2",) in situations


def test_partial_or_corrupt_checkpoints_are_refused_by_name_and_skipped_by_latest(tmp_path, capsys):
    run_training(digits_args(tmp_path, max_train_steps=4, checkpointing_steps=2))
    run = tmp_path / "run"
    (run / "checkpoint-4" / "optimizer.bin").write_bytes(b"truncated")
    assert main_image(digits_args(tmp_path, resume_from_checkpoint=str(run / "checkpoint-4"))) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "optimizer.bin has 9 bytes instead of" in err and "incomplete or corrupt" in err and "Traceback" not in err
    partial = run / ".partial-checkpoint-6"
    partial.mkdir()
    assert main_image(digits_args(tmp_path, resume_from_checkpoint=str(partial))) == EXIT_ERROR
    assert "interrupted" in capsys.readouterr().err

    # `latest` passes over the corrupt checkpoint-4 and resumes from checkpoint-2, to the same end as before.
    before = load_file(run / "denoiser" / "diffusion_pytorch_model.safetensors")
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    run_training(digits_args(tmp_path, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest"))
    after = load_file(run / "denoiser" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not partial.exists()


def test_output_dir_problems_are_one_line_errors_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert main_image(digits_args(tmp_path, output="file")) == EXIT_ERROR
    assert "is a file" in capsys.readouterr().err

    run_training(digits_args(tmp_path, max_train_steps=2, checkpointing_steps=2))
    assert main_image(digits_args(tmp_path, max_train_steps=2)) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--overwrite_output_dir" in err and "Traceback" not in err

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    run_training(digits_args(tmp_path, max_train_steps=3, checkpointing_steps=3, overwrite_output_dir=True))
    assert sorted(path.name for path in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3"]


def test_resuming_with_another_model_config_names_the_differing_keys(tmp_path, capsys):
    run_training(digits_args(tmp_path, max_train_steps=2, checkpointing_steps=2))
    wider = write_config(tmp_path, {**TINY_UNET, "time_embed_dim": 64}, "wider")
    flags = digits_args(tmp_path, max_train_steps=4, model_config=wider, resume_from_checkpoint="latest")
    assert main_image(flags) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "time_embed_dim (32 -> 64)" in err and "--model_config" in err and "Traceback" not in err


def test_missing_vae_and_hub_dataset_offline_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    flags = digits_args(tmp_path, num_channels=3, resolution=16)
    assert main_latent(flags[: flags.index("--model_config")] + ["--vae", "someone/uncached-vae"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "Cannot load the VAE 'someone/uncached-vae'" in err and "offline" in err and "Traceback" not in err
    flags[flags.index("--dataset_name") + 1] = "someone/uncached-dataset"
    assert main_image(flags) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "someone/uncached-dataset" in err and "offline" in err and "Traceback" not in err


def test_failed_final_push_exits_3_after_saving_everything(tmp_path, hub_server, capsys):
    hub_server.fail_with = 500
    flags = digits_args(tmp_path, max_train_steps=2, checkpointing_steps=2, hub_model_id="tester/x", push_to_hub=True)
    assert main_image(flags) == EXIT_HUB_PUSH_FAILED
    err = capsys.readouterr().err
    assert "error: the final push to the Hub failed" in err and "every local file is saved" in err
    assert (tmp_path / "run" / "model_index.json").is_file() and (tmp_path / "run" / "checkpoint-2").is_dir()
    assert not list((tmp_path / "run").glob(".hub-export-*"))


def test_bare_hub_name_is_resolved_for_the_card_and_the_push(tmp_path, hub_server):
    flags = digits_args(tmp_path, max_train_steps=2, checkpointing_steps=2, hub_model_id="digits", hub_token="hf_fake")
    assert main_image([*flags, "--push_to_hub"]) == 0
    files = hub_server.files("tester/digits")
    assert 'DiffiTPipeline.from_pretrained("tester/digits")' in files["README.md"].decode()
    assert not any(name.startswith((".", "checkpoint-")) for name in files)


def test_config_files_set_options_and_flags_override_them(tmp_path):
    options = {"dataset_name": "digits", "resolution": 8, "max_train_steps": 7, "use_ema": False}
    (tmp_path / "options.yaml").write_text(yaml.safe_dump(options))
    config = parse_config(["--config", str(tmp_path / "options.yaml"), "--max_train_steps", "9"], "test")
    assert (config.data.dataset_name, config.data.resolution, config.max_train_steps, config.use_ema) == (
        "digits", 8, 9, False,
    )
    (tmp_path / "options.json").write_text(json.dumps({"dataset_name": "digits", "learning_rat": 1.0}))
    with pytest.raises(SystemExit):
        parse_config(["--config", str(tmp_path / "options.json")], "test")
