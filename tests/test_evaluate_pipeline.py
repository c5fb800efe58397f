"""Sampling-based pipeline evaluation: `evaluate_pipeline`, feature extractor specs, the `examples/evaluate.py` CLI."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image

from diffit_diffusers import DiffiTPipeline, DiffiTTransformer2DModel, DiffiTUNet2DModel
from diffit_diffusers.evaluation import (
    FeatureStatistics,
    ModuleFeatureExtractor,
    build_feature_extractor,
    class_labels_for_samples,
    compute_reference_statistics,
    evaluate_pipeline,
    evaluate_samples,
    iterate_image_batches,
    load_module_file,
    match_channels,
)
from diffit_diffusers.evaluation.cli import build_parser, main


REPOSITORY = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"seconds", "samples_per_second"}


@pytest.fixture
def fresh_accelerate_state():
    """`main` creates an Accelerator, whose process-wide state must not leak between tests."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def randomise(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def conditional_pipeline(num_classes=3):
    denoiser = DiffiTUNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, window_size=4,
        attention_head_dim=8, norm_num_groups=4, time_embed_dim=16, num_classes=num_classes, class_dropout_prob=0.1,
    )
    pipe = DiffiTPipeline(denoiser=randomise(denoiser), scheduler=DDPMScheduler(), default_num_inference_steps=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def grayscale_unconditional_pipeline():
    denoiser = DiffiTTransformer2DModel(
        sample_size=8, in_channels=1, num_layers=1, num_attention_heads=2, attention_head_dim=8, num_classes=None,
        learn_sigma=False,
    )
    return DiffiTPipeline(denoiser=randomise(denoiser), scheduler=DDIMScheduler(), default_num_inference_steps=2)


def tiny_classifier(in_channels=3, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, 6, 3, stride=2),
        torch.nn.Tanh(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(6, 4),
    )


def write_random_pngs(folder, num_images, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(seed).integers(0, 256, size=(num_images, 8, 8, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    return folder


def read_pngs(folder):
    return np.stack([np.array(Image.open(path)) for path in sorted(Path(folder).glob("*.png"))]).astype(np.int16)


@pytest.fixture
def workspace(tmp_path):
    """A saved conditional pipeline, a torch.save'd classifier and a folder of reference PNGs."""
    conditional_pipeline().save_pretrained(tmp_path / "pipeline")
    torch.save(tiny_classifier(), tmp_path / "classifier.pt")
    write_random_pngs(tmp_path / "reference", 8)
    return tmp_path


def cli_args(workspace, *extra):
    return [
        "--pipeline", str(workspace / "pipeline"), "--num_samples", "6", "--batch_size", "4",
        "--reference", str(workspace / "reference"), "--feature_extractor", f"module:{workspace / 'classifier.pt'}",
        "--device", "cpu", "--no_progress", *extra,
    ]


def without_timing(report):
    return {key: value for key, value in report.items() if key not in TIMING_KEYS}


# ----------------------------------------------------------------------------------------------------------- CLI


def test_cli_writes_a_complete_report_and_is_reproducible(workspace, fresh_accelerate_state, capsys):
    args = cli_args(
        workspace, "--feature_layer", "3", "--precision_recall", "--kid", "--kid_subsets", "3",
        "--max_feature_samples", "5", "--inception_score",
        "--inception_score_splits", "2", "--seed", "3", "--output", str(workspace / "out" / "report.json"),
        "--save_samples", str(workspace / "samples"),
    )
    report = main(args)
    written = json.loads((workspace / "out" / "report.json").read_text())
    assert written == report == json.loads(capsys.readouterr().out)
    expected_keys = {
        "feature_extractor", "num_samples", "reference_num_samples", "frechet_distance", "precision", "recall",
        "precision_recall_k", "kid", "kid_std", "kid_subsets", "kid_subset_size", "num_real_features",
        "num_fake_features", "inception_score",
        "inception_score_std", "pipeline", "num_inference_steps", "guidance_scale", "guidance_schedule",
        "class_labels", "seed", "batch_size", "num_processes", "seconds", "samples_per_second",
    }
    assert set(report) == expected_keys
    assert report["feature_extractor"] == "module:classifier.pt:3"
    assert report["num_samples"] == 6 and report["reference_num_samples"] == 8
    assert report["num_fake_features"] == report["num_real_features"] == report["kid_subset_size"] == 5
    assert report["pipeline"] == str(workspace / "pipeline")
    assert (report["num_inference_steps"], report["guidance_scale"], report["class_labels"]) == (2, 1.0, "balanced")
    assert report["seed"] == 3 and report["num_processes"] == 1
    for key in ("frechet_distance", "precision", "recall", "inception_score", "samples_per_second"):
        assert math.isfinite(report[key]) and report[key] >= 0
    assert report["frechet_distance"] > 0 and report["inception_score"] >= 1.0
    assert sorted(os.listdir(workspace / "samples")) == [f"{index:06d}.png" for index in range(6)]

    assert without_timing(main(args)) == without_timing(report)
    other_seed = main([*args[:-2], "--seed", "4"])
    assert other_seed["frechet_distance"] != report["frechet_distance"]


def test_cli_reference_statistics_npz_round_trip(workspace, fresh_accelerate_state):
    statistics_path = workspace / "reference_stats.npz"
    from_folder = main(cli_args(workspace, "--save_reference_statistics", str(statistics_path)))
    from_npz = main([*cli_args(workspace), "--reference", str(statistics_path)])
    assert FeatureStatistics.load(statistics_path).count == 8
    assert from_npz["reference_num_samples"] == 8
    assert from_npz["frechet_distance"] == pytest.approx(from_folder["frechet_distance"], rel=1e-9)


def test_fd_against_the_pipelines_own_saved_samples_is_zero(workspace):
    pipe = DiffiTPipeline.from_pretrained(workspace / "pipeline")
    extractor = ModuleFeatureExtractor(load_module_file(workspace / "classifier.pt"))
    settings = dict(num_samples=7, batch_size=3, extractor=extractor, show_progress=False)
    other_reference = compute_reference_statistics(workspace / "reference", extractor)
    report = evaluate_pipeline(pipe, reference=other_reference, save_samples_dir=workspace / "samples", **settings)

    # The report equals evaluate_samples over the PNG files written during the run.
    offline = evaluate_samples(iterate_image_batches(workspace / "samples", batch_size=4), extractor, other_reference)
    assert report["frechet_distance"] == pytest.approx(offline["frechet_distance"], rel=1e-5)

    own_reference = compute_reference_statistics(workspace / "samples", extractor)
    assert evaluate_pipeline(pipe, reference=own_reference, **settings)["frechet_distance"] < 1e-9
    assert evaluate_pipeline(pipe, reference=own_reference, seed=1, **settings)["frechet_distance"] > 1e-3


def test_samples_do_not_depend_on_the_batch_size(workspace):
    pipe = DiffiTPipeline.from_pretrained(workspace / "pipeline")
    extractor = ModuleFeatureExtractor(tiny_classifier())
    reference = compute_reference_statistics(workspace / "reference", extractor)
    reports = {}
    for batch_size in (2, 5):
        reports[batch_size] = evaluate_pipeline(
            pipe, num_samples=5, batch_size=batch_size, extractor=extractor, reference=reference, show_progress=False,
            save_samples_dir=workspace / f"samples_{batch_size}",
        )
    assert np.abs(read_pngs(workspace / "samples_2") - read_pngs(workspace / "samples_5")).max() <= 1
    assert reports[2]["frechet_distance"] == pytest.approx(reports[5]["frechet_distance"], rel=1e-3)


# -------------------------------------------------------------------------------------------------- class labels


class RecordingPipeline(DiffiTPipeline):
    def __call__(self, class_labels=None, batch_size=1, **kwargs):
        self.calls.append((class_labels, batch_size, len(kwargs["generator"])))
        return super().__call__(class_labels=class_labels, batch_size=batch_size, **kwargs)


def recording_pipeline(pipe):
    recording = RecordingPipeline(denoiser=pipe.denoiser, scheduler=pipe.scheduler, default_num_inference_steps=1)
    recording.calls = []
    return recording


def test_balanced_labels_cycle_over_classes_in_batches():
    pipe = recording_pipeline(conditional_pipeline(num_classes=3))
    extractor = ModuleFeatureExtractor(tiny_classifier())
    reference = FeatureStatistics.from_features(torch.randn(16, 4))
    evaluate_pipeline(pipe, num_samples=7, batch_size=3, extractor=extractor, reference=reference, show_progress=False)
    assert pipe.calls == [([0, 1, 2], 3, 3), ([0, 1, 2], 3, 3), ([0], 1, 1)]

    pipe.calls.clear()
    evaluate_pipeline(
        pipe, num_samples=5, batch_size=5, class_labels=[2, 0], extractor=extractor, reference=reference,
        show_progress=False,
    )
    assert pipe.calls == [([2, 0, 2, 0, 2], 5, 5)]


def test_class_labels_for_samples_modes_and_errors():
    assert class_labels_for_samples("balanced", 4, 6).tolist() == [0, 1, 2, 3, 0, 1]
    random_labels = class_labels_for_samples("random", 10, 200, seed=5)
    assert torch.equal(random_labels, class_labels_for_samples("random", 10, 200, seed=5))
    assert set(random_labels.tolist()) == set(range(10))
    assert class_labels_for_samples([3, 1], 4, 3).tolist() == [3, 1, 3]
    assert class_labels_for_samples("balanced", None, 3) is None
    with pytest.raises(ValueError, match="Unknown `class_labels` 'even'"):
        class_labels_for_samples("even", 4, 3)
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\]"):
        class_labels_for_samples([4], 4, 3)
    with pytest.raises(ValueError, match="unconditional"):
        class_labels_for_samples([0], None, 3)
    with pytest.raises(ValueError, match="class-conditional"):
        class_labels_for_samples(None, 4, 3)


# ---------------------------------------------------------------------------------------------------- channels


def test_grayscale_pipeline_is_repeated_to_rgb_for_a_three_channel_extractor(tmp_path):
    pipe = grayscale_unconditional_pipeline()
    extractor = ModuleFeatureExtractor(tiny_classifier(in_channels=3), layer="3")
    reference = FeatureStatistics.from_features(torch.randn(16, 6))
    report = evaluate_pipeline(
        pipe, num_samples=4, batch_size=4, extractor=extractor, reference=reference, show_progress=False,
        save_samples_dir=tmp_path,
    )
    assert report["class_labels"] is None and report["num_samples"] == 4
    grayscale = torch.from_numpy(read_pngs(tmp_path).astype(np.uint8))[:, None]
    assert grayscale.shape == (4, 1, 8, 8)
    expected = FeatureStatistics.from_features(extractor(grayscale.expand(-1, 3, -1, -1)))
    assert report["frechet_distance"] == pytest.approx(expected.frechet_distance(reference), rel=1e-9)


def test_match_channels_conversions():
    gray = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    assert torch.equal(match_channels(gray, 3), gray.expand(-1, 3, -1, -1))
    assert match_channels(gray, None) is gray
    rgb = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    expected = np.stack([np.array(Image.fromarray(image).convert("L")) for image in rgb.permute(0, 2, 3, 1).numpy()])
    luma = match_channels(rgb, 1)
    assert luma.dtype == torch.uint8 and luma.shape == (2, 1, 4, 4)
    assert np.abs(luma[:, 0].numpy().astype(int) - expected).max() <= 1
    assert torch.equal(match_channels(gray.expand(-1, 3, -1, -1), 1), gray)
    with pytest.raises(ValueError, match="4-channel images"):
        match_channels(torch.zeros(1, 4, 2, 2), 3)


# ------------------------------------------------------------------------------------------ feature extractor specs


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_module_specs_from_torch_save_and_torchscript_agree(tmp_path):
    classifier = tiny_classifier()
    torch.save(classifier, tmp_path / "saved.pt")
    torch.jit.save(torch.jit.script(classifier), tmp_path / "scripted.pt")
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    saved = build_feature_extractor(f"module:{tmp_path / 'saved.pt'}")
    scripted = build_feature_extractor(f"module:{tmp_path / 'scripted.pt'}")
    expected = classifier(images.float() / 255)
    torch.testing.assert_close(saved(images), expected)
    torch.testing.assert_close(scripted(images), expected)
    hooked = build_feature_extractor(f"module:{tmp_path / 'saved.pt'}", feature_layer="3", output_is_logits=True)
    output = hooked.extract(images)
    assert output.features.shape == (3, 6) and output.logits.shape == (3, 4)


def test_module_spec_converts_rgb_references_for_a_grayscale_network(tmp_path):
    classifier = tiny_classifier(in_channels=1)
    torch.save(classifier, tmp_path / "gray.pt")
    extractor = build_feature_extractor(f"module:{tmp_path / 'gray.pt'}")
    gray = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(extractor(gray.expand(-1, 3, -1, -1)), classifier(gray.float() / 255))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_feature_extractor_spec_errors(tmp_path):
    torch.save(tiny_classifier().state_dict(), tmp_path / "state_dict.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.jit.save(torch.jit.script(tiny_classifier()), tmp_path / "scripted.pt")
    torch.save(tiny_classifier(), tmp_path / "module.pt")
    with pytest.raises(ValueError, match="Unknown feature extractor 'resnet'"):
        build_feature_extractor("resnet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_feature_extractor(f"module:{tmp_path / 'missing.pt'}")
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        build_feature_extractor(f"module:{tmp_path / 'state_dict.pt'}")
    with pytest.raises(ValueError, match="Could not load a module"):
        build_feature_extractor(f"module:{tmp_path / 'garbage.pt'}")
    with pytest.raises(ValueError, match="TorchScript"):
        build_feature_extractor(f"module:{tmp_path / 'scripted.pt'}", feature_layer="3")
    with pytest.raises(ValueError, match="no submodule named 'fc'"):
        build_feature_extractor(f"module:{tmp_path / 'module.pt'}", feature_layer="fc")
    with pytest.raises(ValueError, match="only apply to 'module:PATH'"):
        build_feature_extractor("inception", feature_layer="pool")
    with pytest.raises(ValueError, match="only applies to the 'inception'"):
        build_feature_extractor(f"module:{tmp_path / 'scripted.pt'}", weights_path=tmp_path / "w.pth")


# ------------------------------------------------------------------------------------------------------- errors


def run_cli_expecting_error(args, capsys, status=1):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == status
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--pipeline": "{tmp}/missing_pipeline"}, "Pipeline folder '.*missing_pipeline' does not exist"),
        ({"--feature_extractor": "resnet50"}, "Unknown feature extractor 'resnet50'"),
        ({"--feature_extractor": "module:{tmp}/nothing.pt"}, "nothing.pt' does not exist"),
        ({"--reference": "{tmp}/no_reference"}, "no_reference' does not exist"),
        ({"--num_samples": "1"}, r"`num_samples` must be an integer >= 2"),
        ({"--class_labels": "0,7"}, r"class ids in \[0, 2\]"),
        ({"--guidance_scale": "0.5"}, "guidance_scale"),
    ],
)
def test_cli_user_errors_exit_with_a_message(workspace, fresh_accelerate_state, capsys, change, message):
    args = cli_args(workspace)
    for flag, value in change.items():
        args += [flag, value.format(tmp=workspace)]
    error = run_cli_expecting_error(args, capsys)
    # diffusers' "Loading pipeline components" progress bar may come first on stderr; the error is the last line.
    assert error.splitlines()[-1].startswith("evaluate.py: error: ") and "Traceback" not in error
    assert re.search(message, error), error


def test_cli_flag_conflicts_and_precision_recall_on_statistics_only_npz(workspace, fresh_accelerate_state, capsys):
    inception_with_layer = cli_args(workspace, "--feature_extractor", "inception", "--feature_layer", "x")
    error = run_cli_expecting_error(inception_with_layer, capsys)
    assert "--feature_layer only applies to --feature_extractor module:FILE" in error
    error = run_cli_expecting_error([*cli_args(workspace), "--inception_score"], capsys)
    assert "--inception_score with a module extractor needs --feature_layer" in error
    error = run_cli_expecting_error([*cli_args(workspace), "--feature_extractor", "inception"], capsys)
    assert "torch-fidelity" in error or "Inception" in error
    FeatureStatistics.from_features(torch.randn(8, 6)).save(workspace / "stats.npz")
    error = run_cli_expecting_error(
        [*cli_args(workspace), "--reference", str(workspace / "stats.npz"), "--precision_recall"], capsys
    )
    assert "no `arr_0` image array" in error


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_cli_rejects_bad_num_samples_flags(workspace, capsys, value):
    args = cli_args(workspace)
    args[args.index("--num_samples") + 1] = value
    error = run_cli_expecting_error(args, capsys, status=2)
    assert f"argument --num_samples: must be a positive integer, got '{value}'" in error


def test_parser_defaults():
    args = build_parser().parse_args(["--pipeline", "p", "--num_samples", "8", "--reference", "r"])
    assert (args.feature_extractor, args.class_labels, args.seed, args.batch_size) == ("inception", "balanced", 0, 64)
    assert args.num_inference_steps is None and args.guidance_scale is None and not args.precision_recall
    assert build_parser().parse_args(["--pipeline", "p", "--num_samples", "8", "--reference", "r",
                                      "--class_labels", "3,1"]).class_labels == [3, 1]


@pytest.mark.slow  # a fresh interpreter importing torch and diffusers takes several seconds
def test_script_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "examples" / "evaluate.py"), "--pipeline", str(tmp_path / "missing"),
         "--num_samples", "4", "--reference", str(tmp_path), "--device", "cpu"],
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------- two processes


def _evaluate_in_process(args):
    main(args)


def test_two_processes_sample_the_same_images_and_report_the_same_metrics(workspace, fresh_accelerate_state):
    from accelerate import debug_launcher
    from accelerate.state import AcceleratorState

    # 7 samples: uneven shards of 3 and 4 samples, in batches of 2.
    common = ["--num_samples", "7", "--feature_layer", "3", "--precision_recall", "--kid", "--max_feature_samples", "5",
              "--inception_score", "--inception_score_splits", "2", "--batch_size", "2"]
    single = main([*cli_args(workspace, *common), "--save_samples", str(workspace / "single")])
    AcceleratorState._reset_state(True)  # the forked processes must not inherit the single-process state
    debug_launcher(
        _evaluate_in_process,
        args=([*cli_args(workspace, *common), "--save_samples", str(workspace / "double"), "--output",
               str(workspace / "double.json")],),
        num_processes=2,
    )
    double = json.loads((workspace / "double.json").read_text())
    assert double["num_processes"] == 2 and double["num_samples"] == 7
    assert np.abs(read_pngs(workspace / "single") - read_pngs(workspace / "double")).max() <= 1
    for key in ("frechet_distance", "precision", "recall", "kid", "kid_std", "inception_score", "inception_score_std"):
        assert double[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
