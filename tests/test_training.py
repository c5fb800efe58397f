"""Training: objectives, end-to-end runs (image and latent), exact resume after SIGKILL, multi-process, corrupt
data, Hub pushes (healthy, failing and unreachable servers) and the command line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, PartialState
from diffusers import AutoencoderKL, DDPMScheduler, EDMEulerScheduler, UNet2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from PIL import Image
from safetensors.torch import load_file

from diffit_diffusers import DiffiTPipeline
from diffit_diffusers.training import DataConfig, TrainingConfig, build_adamw, build_objective, parse_config, train
from diffit_diffusers.training.cli import main_image
from diffit_diffusers.training.objectives import LearnedSigmaObjective
from diffit_diffusers.training.trainer import Trainer


REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = {
    "_class_name": "DiffiTUNet2DModel",
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "window_size": 4,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "time_embed_dim": 32,
    "class_dropout_prob": 0.1,
}
TINY_TRANSFORMER = {
    "_class_name": "DiffiTTransformer2DModel",
    "patch_size": 2,
    "num_layers": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "class_dropout_prob": 0.1,
}


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def write_config(tmp_path: Path, config: dict, name: str) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


def digits_args(tmp_path: Path, output: str = "run", **overrides) -> list[str]:
    options = {
        "dataset_name": "digits",
        "label_column": "label",
        "resolution": 8,
        "num_channels": 1,
        "model_config": write_config(tmp_path, TINY_UNET, "unet"),
        "train_batch_size": 4,
        "max_train_steps": 4,
        "checkpointing_steps": 2,
        "num_inference_steps": 2,
        "num_validation_images": 1,
        "learning_rate": 1e-3,
        "ema_decay": 0.9,
        "output_dir": str(tmp_path / output),
        **overrides,
    }
    args = []
    for key, value in options.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def run_training(args: list[str]) -> Path:
    return train(parse_config(args, "test"))


# Objectives ---------------------------------------------------------------------------------------------------


class OracleDenoiser(torch.nn.Module):
    """Returns whatever ``fn(x, t)`` says: lets a test hand the objective a perfect model."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t, labels):
        return Transformer2DModelOutput(sample=self.fn(x, t))


def test_edm_objective_matches_diffusers_edm_preconditioning():
    objective = build_objective("edm")
    clean = torch.rand(4, 3, 8, 8) * 2 - 1
    scheduler = EDMEulerScheduler(sigma_data=objective.sigma_data)

    def perfect(x_in, c_noise):
        sigma = (4 * c_noise).exp().view(-1, 1, 1, 1)
        noisy = x_in * (sigma**2 + objective.sigma_data**2).sqrt()  # undo c_in
        c_skip = objective.sigma_data**2 / (sigma**2 + objective.sigma_data**2)
        c_out = sigma * objective.sigma_data / (sigma**2 + objective.sigma_data**2).sqrt()
        output = (clean - c_skip * noisy) / c_out
        # diffusers' EDM schedulers must reconstruct the clean image from this output.
        torch.testing.assert_close(scheduler.precondition_outputs(noisy, output, sigma), clean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(scheduler.precondition_noise(sigma.flatten()), c_noise)
        return output

    torch.manual_seed(0)
    assert objective.loss(OracleDenoiser(perfect), clean, None) < 1e-8
    noisy_model = OracleDenoiser(lambda x, t: torch.zeros_like(x))
    assert objective.loss(noisy_model, clean, None) > 0.1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_objectives_are_zero_for_a_perfect_model(prediction_type):
    objective = build_objective(prediction_type)
    clean = torch.rand(4, 3, 8, 8) * 2 - 1
    alphas_cumprod = objective.noise_scheduler.alphas_cumprod

    def perfect(noisy, timesteps):
        a = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noise = (noisy - a.sqrt() * clean) / (1 - a).sqrt()
        return noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * clean

    assert objective.loss(OracleDenoiser(perfect), clean, None) < 1e-8
    assert objective.loss(OracleDenoiser(lambda x, t: torch.zeros_like(x)), clean, None) > 0.1


def test_learned_sigma_vlb_is_zero_at_the_true_posterior():
    objective = LearnedSigmaObjective()
    clean = torch.rand(3, 4, 4, 4) * 2 - 1
    noise = torch.randn_like(clean)
    timesteps = torch.tensor([1, 10, 100])
    noisy = objective.noise_scheduler.add_noise(clean, noise, timesteps)
    at_posterior = torch.full_like(clean, -1.0)  # v = -1 selects the posterior variance beta~_t
    vlb = objective.variational_bound(noise, at_posterior, clean, noisy, timesteps)
    assert vlb.abs().max() < 1e-4
    # v = +1 selects beta_t, a different variance early in the chain: a positive KL.
    assert (objective.variational_bound(noise, torch.ones_like(clean), clean, noisy, timesteps) > 0).all()
    first = torch.zeros(3, dtype=torch.long)  # t = 0 scores the decoder likelihood instead
    nll = objective.variational_bound(noise, at_posterior, clean, objective.noise_scheduler.add_noise(clean, noise, first), first)
    assert torch.isfinite(nll).all() and (nll > 0).all()
    with pytest.raises(ValueError, match="needs 8 output channels"):
        objective.loss(OracleDenoiser(lambda x, t: x), clean, None)
    scheduler = objective.make_scheduler()
    assert isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type == "learned_range"


def test_unknown_objective_raises():
    with pytest.raises(ValueError, match="Unknown training objective 'flow'"):
        build_objective("flow")


# End-to-end runs ----------------------------------------------------------------------------------------------


def _adamw_run(optimizer_factory, steps, state=None):
    """AdamW steps on a fixed quadratic from a fixed start; returns the parameters and the optimizer state."""
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(16))
    frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    if state is not None:
        weight.data, bias.data = state["params"]
    optimizer = optimizer_factory([weight, bias, frozen])
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    inputs = torch.randn(32, 8)
    for _ in range(steps):
        optimizer.zero_grad()
        (inputs @ weight.T + bias).square().mean().backward()
        optimizer.step()
    return {"params": (weight.detach().clone(), bias.detach().clone()), "optimizer": optimizer.state_dict()}


def test_trainer_adamw_is_fused_adamw_and_resumes_default_adamw_state():
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, eps=1e-8)
    cpu = torch.device("cpu")

    def default(params):
        return torch.optim.AdamW(params, **hyper)

    def trainers(params):
        return build_adamw(params, cpu, **hyper)

    reference = _adamw_run(default, 6)
    fused = _adamw_run(trainers, 6)
    for ours, theirs in zip(fused["params"], reference["params"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert trainers([torch.nn.Parameter(torch.zeros(1))]).defaults["fused"]  # torch's fused kernel on CPU
    # A checkpoint written by the default implementation resumes into the trainer's (and back).
    for first, then in ((default, trainers), (trainers, default)):
        start = _adamw_run(first, 3)
        resumed = _adamw_run(then, 3, state=start)
        for ours, theirs in zip(resumed["params"], reference["params"]):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert fused["optimizer"]["state"].keys() == {0, 1}  # the frozen parameter has no state


def test_image_training_end_to_end(tmp_path):
    output = run_training(
        digits_args(tmp_path, validation_steps=2, report_to="tensorboard", checkpoints_total_limit=1)
    )
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4"]
    assert (output / "validation" / "step-4.png").is_file()
    assert list((output / "logs").rglob("events.out.tfevents*"))
    card = (output / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert "diffit" in metadata["tags"] and metadata["datasets"] == ["digits"]
    assert "| steps | 4 |" in card

    pipe = DiffiTPipeline.from_pretrained(output)
    assert pipe.denoiser.config.num_classes == 10 and pipe.config.id2label[3] == "3"
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[1, 7], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def tiny_vae_folder(tmp_path: Path) -> str:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
    )
    vae.save_pretrained(tmp_path / "vae")
    return str(tmp_path / "vae")


def test_latent_training_end_to_end_with_learned_sigma(tmp_path):
    args = digits_args(
        tmp_path,
        model_config=write_config(tmp_path, TINY_TRANSFORMER, "transformer"),
        objective="learned_sigma",
        vae=tiny_vae_folder(tmp_path),
        resolution=16,
        num_channels=3,
        max_train_steps=3,
        checkpointing_steps=3,
    )
    output = run_training(args)
    pipe = DiffiTPipeline.from_pretrained(output)
    assert pipe.vae is not None and pipe.denoiser.config.learn_sigma and pipe.denoiser.config.sample_size == 8
    assert pipe.scheduler.config.variance_type == "learned_range"
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[0], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    common = dict(max_train_steps=12, checkpointing_steps=2, use_ema=True)
    args = digits_args(tmp_path, output="killed", **common)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO_ROOT / "examples" / "train_diffit.py"), *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_dir = tmp_path / "killed"
    deadline = time.time() + 240
    while not (killed_dir / "checkpoint-4" / "training_state.json").exists():
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, "training never reached its second checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "model_index.json").exists(), "the run finished before it could be killed"

    resumed = run_training(digits_args(tmp_path, output="killed", resume_from_checkpoint="latest", **common))
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    straight = run_training(digits_args(tmp_path, output="straight", **common))

    resumed_weights = checkpoint_weights(resumed / "checkpoint-12")
    straight_weights = checkpoint_weights(straight / "checkpoint-12")
    assert resumed_weights.keys() == straight_weights.keys()
    for name, tensor in straight_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name
    final_resumed = load_file(resumed / "denoiser" / "diffusion_pytorch_model.safetensors")
    final_straight = load_file(straight / "denoiser" / "diffusion_pytorch_model.safetensors")
    for name, tensor in final_straight.items():
        assert torch.equal(final_resumed[name], tensor), f"EMA weights differ: {name}"


def test_activation_recomputation_flag_trains_the_same_weights(tmp_path):
    """Recomputing norm and activation outputs changes memory, never the result: the same run with it on (the
    U-Net's default) and off ends in the same weights."""
    common = dict(max_train_steps=2, checkpointing_steps=2, use_ema=False)
    recomputed = run_training(digits_args(tmp_path, output="recomputed", activation_recomputation="on", **common))
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    kept = run_training(digits_args(tmp_path, output="kept", activation_recomputation="off", **common))
    recomputed_weights = checkpoint_weights(recomputed / "checkpoint-2")
    kept_weights = checkpoint_weights(kept / "checkpoint-2")
    assert recomputed_weights.keys() == kept_weights.keys()
    for name, tensor in kept_weights.items():
        assert torch.equal(recomputed_weights[name], tensor), name


def test_activation_recomputation_flag_needs_a_diffit_model():
    peer = UNet2DModel(
        sample_size=8, block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
    )
    with pytest.raises(ValueError, match="needs a DiffiT model, but the denoiser is a UNet2DModel; leave it at 'model'"):
        Trainer.apply_activation_recomputation(peer, "on")
    Trainer.apply_activation_recomputation(peer, "model")  # the default asks nothing of the model


IMAGES_PER_FILE, NUM_FILES = 12, 4


def identity_dataset(tmp_path: Path) -> str:
    """A folder of 4 parquet files (4 shards when streamed) of 48 noisy 8x8 gray images; pixel (0, 0) of image `i`
    is `5 * i`, its identity, and its label is `i % 2`."""
    folder = tmp_path / "identities"
    folder.mkdir()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["even", "odd"])})
    rng = np.random.default_rng(0)
    for file in range(NUM_FILES):
        indices = range(file * IMAGES_PER_FILE, (file + 1) * IMAGES_PER_FILE)
        images = []
        for index in indices:
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            pixels[0, 0] = 5 * index
            images.append(Image.fromarray(pixels))
        table = {"image": images, "label": [index % 2 for index in indices]}
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(folder / f"train-{file}.parquet"))
    return str(folder)


def launch_two_processes(args: list[str], log: Path, **popen_kwargs) -> subprocess.Popen:
    """`tests/multiprocess_training.py` with `args` under `accelerate launch` with 2 processes, output into `log`.
    On a machine without GPUs, accelerate's `--multi_gpu` launches CPU processes (DistributedType.MULTI_CPU)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / "tests" / "multiprocess_training.py"), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as output:
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, **popen_kwargs)


def finish(process: subprocess.Popen, log: Path) -> None:
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]


def examples_by_step(output: Path, rank: int) -> dict[int, list[int]]:
    """The identities of the examples process `rank` trained on at each step (a step trained again after a resume
    counts as trained then)."""
    lines = (output / f"seen-{rank}.jsonl").read_text().splitlines()
    return {record["step"]: record["examples"] for record in map(json.loads, lines)}


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_two_processes_with_workers_resume_bit_identically_on_disjoint_data(tmp_path, streaming):
    """Two accelerate processes with a DataLoader worker each, killed with SIGKILL after a checkpoint and resumed,
    end with the weights of an uninterrupted run, having trained on the same examples; the processes' batches are
    disjoint and every epoch covers the dataset."""
    common = dict(
        dataset_name=identity_dataset(tmp_path), streaming=streaming, shuffle_buffer_size=8, dataloader_num_workers=1,
        max_train_steps=12, checkpointing_steps=4, use_ema=True,
    )
    log = tmp_path / "straight.log"
    finish(launch_two_processes(digits_args(tmp_path, output="straight", **common), log), log)

    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    process = launch_two_processes(digits_args(tmp_path, output="killed", **common), log, start_new_session=True)
    deadline = time.time() + 240
    while not (killed / "checkpoint-4" / "training_state.json").exists():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "training never reached its first checkpoint"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher, both training processes and their DataLoader workers
    process.wait()
    assert not (killed / "model_index.json").exists(), "the run finished before it could be killed"
    log = tmp_path / "resumed.log"
    resume = digits_args(tmp_path, output="killed", resume_from_checkpoint="latest", **common)
    finish(launch_two_processes(resume, log), log)

    straight = tmp_path / "straight"
    for weights_file in ("checkpoint-12/model.safetensors", "denoiser/diffusion_pytorch_model.safetensors"):
        expected, resumed = load_file(straight / weights_file), load_file(killed / weights_file)
        assert expected.keys() == resumed.keys()
        for name, tensor in expected.items():
            assert torch.equal(resumed[name], tensor), (weights_file, name)
    checkpoint = killed / "checkpoint-12"
    assert json.loads((checkpoint / "training_state.json").read_text())["num_processes"] == 2
    states = [json.loads((checkpoint / f"data_state_{rank}.json").read_text()) for rank in (0, 1)]
    assert [state["process_index"] for state in states] == [0, 1]

    seen = [examples_by_step(straight, rank) for rank in (0, 1)]
    assert [examples_by_step(killed, rank) for rank in (0, 1)] == seen
    # 48 examples, 2 processes x 4 per step: every 6 steps are one epoch, split between the processes.
    everything = sorted(5 * index for index in range(IMAGES_PER_FILE * NUM_FILES))
    for epoch in range(2):
        shares = [[level for step in range(6 * epoch, 6 * epoch + 6) for level in share[step]] for share in seen]
        assert not set(shares[0]) & set(shares[1]), epoch
        assert sorted(shares[0] + shares[1]) == everything, epoch


# Data problems ------------------------------------------------------------------------------------------------


def image_folder(tmp_path: Path, corrupt: int, good: int) -> str:
    root = tmp_path / "images"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(good):
            pixels = np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
        for i in range(corrupt):
            (root / label / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return str(root)


def test_corrupt_images_are_skipped_and_training_completes(tmp_path, caplog):
    args = digits_args(tmp_path, max_train_steps=2, checkpointing_steps=2, num_channels=3)
    args[args.index("--dataset_name") : args.index("--dataset_name") + 2] = [
        "--train_data_dir", image_folder(tmp_path, corrupt=1, good=3),
    ]
    with caplog.at_level("WARNING"):
        output = run_training(args)
    assert (output / "model_index.json").is_file()
    assert "broken0.png" in caplog.text


def test_dataset_without_usable_images_fails_with_a_clear_message(tmp_path, capsys):
    args = digits_args(tmp_path, num_channels=3)
    args[args.index("--dataset_name") : args.index("--dataset_name") + 2] = [
        "--train_data_dir", image_folder(tmp_path, corrupt=2, good=0),
    ]
    assert main_image(args) == 1
    err = capsys.readouterr().err
    assert "image" in err and "images" in err and "Traceback" not in err


def test_bad_flags_exit_with_usage(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_image(digits_args(tmp_path, objective="flow"))
    assert exit_info.value.code == 2
    assert "invalid choice: 'flow'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_image(digits_args(tmp_path, max_train_steps=0))
    assert "max_train_steps" in capsys.readouterr().err
    assert main_image(digits_args(tmp_path, model_config=str(tmp_path / "missing.json"))) == 1
    assert "missing.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        run_training(digits_args(tmp_path, model_config="huge"))
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        run_training(digits_args(tmp_path, resume_from_checkpoint=str(tmp_path)))


# Hub ----------------------------------------------------------------------------------------------------------


def test_push_to_hub_during_and_after_training(tmp_path, hub_server):
    args = digits_args(
        tmp_path, max_train_steps=4, checkpointing_steps=2, hub_model_id="tester/digits-diffit"
    ) + ["--push_to_hub", "--hub_push_training_state", "--hub_private_repo"]
    output = run_training(args)
    assert [repo.repo_id for repo in hub_server.created_repos] == ["tester/digits-diffit"]
    assert hub_server.is_private("tester/digits-diffit")
    files = hub_server.files("tester/digits-diffit")
    assert {"model_index.json", "README.md", "samples.png", "denoiser/config.json", "scheduler/scheduler_config.json"} <= set(files)
    assert not any(name.startswith(("checkpoint-", "logs/")) for name in files)
    assert any(name.startswith("training_state/checkpoint-2/") for name in files)
    assert "optimizer.bin" in {Path(name).name for name in files if name.startswith("training_state/")}
    assert files["model_index.json"] == (output / "model_index.json").read_bytes()
    card = yaml.safe_load(files["README.md"].decode().split("---")[1])
    assert "diffit" in card["tags"]


@pytest.mark.parametrize("failure", ["http_500", "connection_refused"])
def test_failed_uploads_never_harm_training(tmp_path, hub_server, failure, caplog):
    from hub_server import FakeHubServer, point_huggingface_hub_at

    args = digits_args(tmp_path, max_train_steps=2, checkpointing_steps=2, hub_model_id="tester/x") + ["--push_to_hub"]
    with caplog.at_level("WARNING"):
        if failure == "http_500":
            hub_server.fail_with = 500
            output = run_training(args)
        else:
            with point_huggingface_hub_at(FakeHubServer.refused_url(), tmp_path / "cache"):
                output = run_training(args)
    assert (output / "model_index.json").is_file() and (output / "checkpoint-2" / "model.safetensors").is_file()
    assert "Some Hub uploads failed" in caplog.text


def test_training_config_validates_values():
    digits = DataConfig(dataset_name="digits")
    with pytest.raises(ValueError, match="hub_push_training_state"):
        TrainingConfig(data=digits, hub_push_training_state=True)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainingConfig(data=digits, ema_decay=1.5)
    with pytest.raises(TypeError, match="must be a DataConfig"):
        TrainingConfig()
