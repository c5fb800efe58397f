"""LoRA: PEFT adapters on both DiffiT models, the pipeline's LoRA loader, and LoRA fine-tuning on real digits."""

import copy

import datasets
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from tiny_models import tiny_transformer, tiny_unet

from diffit_diffusers import DiffiTPipeline, DiffiTUNet2DModel, grow_class_embedding
from diffit_diffusers.training import DataConfig, TrainingConfig, build_objective, load_digits_dataset, train
from diffit_diffusers.training.lora import LoraArguments, default_lora_target_modules, parse_lora_config, train_lora


#: Layer names both the fused (``to_qkv``) and the separate (``to_q``, ...) TMSA layouts have.
SHARED_TARGETS = ["to_out", "ff.net.0.proj", "ff.net.2"]


MODELS = {"unet": (tiny_unet, (1, 16, 16)), "transformer": (tiny_transformer, (4, 8, 8))}


def inputs(shape):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, *shape, generator=generator), torch.tensor([10, 700]), torch.tensor([3, 10])


def predict(model, sample, timestep, labels):
    with torch.no_grad():
        return model(sample, timestep, labels).sample


def random_lora(targets, seed=0) -> LoraConfig:
    torch.manual_seed(seed)
    return LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)


@pytest.fixture(params=list(MODELS))
def model_and_inputs(request):
    build, shape = MODELS[request.param]
    return build, inputs(shape)


def test_adapter_round_trip_fuse_scales_and_base_untouched(model_and_inputs, tmp_path):
    build, args = model_and_inputs
    model = build()
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    base_out = predict(model, *args)
    model.add_adapter(random_lora(SHARED_TARGETS))
    lora_out = predict(model, *args)
    assert (lora_out - base_out).abs().max() > 1e-3

    model.save_lora_adapter(tmp_path)
    reloaded = build()
    reloaded.load_lora_adapter(tmp_path, prefix=None, weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(predict(reloaded, *args), lora_out, atol=0, rtol=0)

    model.set_adapters("default", 0.0)
    torch.testing.assert_close(predict(model, *args), base_out, atol=1e-6, rtol=0)
    model.set_adapters("default", 1.0)
    model.fuse_lora()
    torch.testing.assert_close(predict(model, *args), lora_out, atol=1e-5, rtol=1e-5)
    model.unfuse_lora()
    torch.testing.assert_close(predict(model, *args), lora_out, atol=1e-5, rtol=1e-5)

    model.delete_adapters("default")
    torch.testing.assert_close(predict(model, *args), base_out, atol=1e-6, rtol=0)
    model.unload_lora()
    assert model.state_dict().keys() == base_state.keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, base_state[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_two_adapters_combine_by_set_adapters(model_and_inputs):
    build, args = model_and_inputs
    model = build()
    model.add_adapter(random_lora(SHARED_TARGETS, seed=1), adapter_name="a")
    model.add_adapter(random_lora(SHARED_TARGETS, seed=2), adapter_name="b")
    model.set_adapters("a")
    only_a = predict(model, *args)
    model.set_adapters(["a", "b"], [1.0, 0.0])
    torch.testing.assert_close(predict(model, *args), only_a, atol=1e-6, rtol=0)
    model.set_adapters(["a", "b"], [1.0, 1.0])
    assert (predict(model, *args) - only_a).abs().max() > 1e-4


def test_attention_projections_are_targeted_by_the_names_present(model_and_inputs):
    build, args = model_and_inputs
    model = build()
    targets = default_lora_target_modules(model)
    attention = [t for t in targets if t not in SHARED_TARGETS and "class_embedder" not in t]
    assert set(attention) in ({"to_qkv", "time_to_qkv"}, {"to_q", "to_k", "to_v", "time_to_q", "time_to_k", "time_to_v"})
    base_out = predict(model, *args)
    model.add_adapter(random_lora(attention))
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == set(attention)
    assert (predict(model, *args) - base_out).abs().max() > 1e-3


def test_pipeline_lora_save_load_fuse_and_unload(tmp_path):
    model = tiny_unet()
    pipeline = DiffiTPipeline(denoiser=copy.deepcopy(model), scheduler=DDPMScheduler(num_train_timesteps=100))
    pipeline.set_progress_bar_config(disable=True)

    def images():
        generator = torch.Generator().manual_seed(0)
        return pipeline(class_labels=[1, 2], num_inference_steps=3, generator=generator, output_type="np").images

    base_images = images()
    model.add_adapter(random_lora(default_lora_target_modules(model)))
    DiffiTPipeline.save_lora_weights(
        tmp_path,
        denoiser_lora_layers=get_peft_model_state_dict(model),
        denoiser_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    pipeline.load_lora_weights(tmp_path, adapter_name="digits")
    args = inputs((1, 16, 16))
    torch.testing.assert_close(predict(pipeline.denoiser, *args), predict(model, *args), atol=0, rtol=0)
    lora_images = images()
    assert abs(lora_images - base_images).max() > 1e-3

    pipeline.fuse_lora()
    assert pipeline.num_fused_loras == 1
    assert abs(images() - lora_images).max() < 1e-4
    pipeline.unfuse_lora()
    pipeline.set_adapters("digits", 0.0)
    assert abs(images() - base_images).max() < 1e-5
    pipeline.unload_lora_weights()
    assert abs(images() - base_images).max() < 1e-5


def test_pipeline_rejects_files_that_are_not_denoiser_loras(tmp_path):
    pipeline = DiffiTPipeline(denoiser=tiny_unet(), scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="contain 'lora'"):
        pipeline.load_lora_weights({"denoiser.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no 'denoiser.' keys"):
        pipeline.load_lora_weights({"transformer.to_out.lora_A.weight": torch.zeros(1)})


def test_grow_class_embedding_keeps_old_classes_and_starts_new_ones_as_null():
    model = tiny_unet()
    args = inputs((1, 16, 16))
    old = predict(model, *args)
    null = predict(model, args[0], args[1], torch.tensor([10, 10]))
    grow_class_embedding(model, 12)
    assert (model.config.num_classes, model.null_class_id) == (12, 12)
    torch.testing.assert_close(predict(model, args[0], args[1], torch.tensor([3, 12])), old, atol=0, rtol=0)
    torch.testing.assert_close(predict(model, args[0], args[1], torch.tensor([10, 11])), null, atol=0, rtol=0)
    with pytest.raises(ValueError, match="at least"):
        grow_class_embedding(model, 5)
    with pytest.raises(ValueError, match="unconditional"):
        grow_class_embedding(DiffiTUNet2DModel.from_config({**model.config, "num_classes": None}), 3)


def test_lora_script_reports_a_missing_base_folder(tmp_path, capsys):
    from diffit_diffusers.training.lora import main

    status = main(["--pretrained_model_name_or_path", str(tmp_path / "missing"), "--dataset_name", "digits",
                   "--output_dir", str(tmp_path / "out")])
    assert status == 1 and "does not exist" in capsys.readouterr().err


def test_lora_arguments_reject_bad_values():
    with pytest.raises(ValueError, match="lora_rank"):
        LoraArguments("base", lora_rank=0)
    with pytest.raises(SystemExit):
        parse_lora_config(["--pretrained_model_name_or_path", "base", "--dataset_name", "digits", "--lora_dropout", "1"])


def digits_subset(tmp_path, num_classes: int) -> str:
    """The real digits 0..num_classes-1 (8x8) as a saved dataset with a ``ClassLabel`` of ``num_classes`` names."""
    names = [str(i) for i in range(num_classes)]
    digits = load_digits_dataset(8).filter(lambda example: example["label"] < num_classes)
    path = tmp_path / f"digits-{num_classes}"
    digits.cast_column("label", datasets.ClassLabel(names=names)).save_to_disk(str(path))
    return str(path)


def edm_loss(model, images, labels) -> float:
    """The EDM loss with noise fixed by a seed, so two models are compared on identical noisy inputs."""
    torch.manual_seed(123)
    with torch.no_grad():
        return build_objective("edm").loss(model, images, labels).item()


@pytest.mark.slow
def test_lora_fine_tuning_learns_new_digit_classes_and_reloads(tmp_path):
    data = dict(label_column="label", resolution=8, num_channels=1)
    common = dict(
        train_batch_size=32, use_ema=False, cpu=True, checkpointing_steps=10_000, num_inference_steps=3,
        num_validation_images=1, objective="edm",
    )
    base_dir = train(
        TrainingConfig(
            data=DataConfig(dataset_name=digits_subset(tmp_path, 8), **data), model_config="tiny",
            output_dir=str(tmp_path / "base"), max_train_steps=150, learning_rate=2e-3, **common,
        )
    )
    lora_dir = train_lora(
        TrainingConfig(
            data=DataConfig(dataset_name="digits", **data), output_dir=str(tmp_path / "lora"), max_train_steps=100,
            learning_rate=3e-3, **common,
        ),
        LoraArguments(str(base_dir), lora_rank=8),
    )
    card = (lora_dir / "README.md").read_text()
    assert "lora" in card and "load_lora_weights" in card and (lora_dir / "samples.png").is_file()

    new_digits = load_digits_dataset(8).filter(lambda example: example["label"] >= 8).select(range(128))
    pixels = np.stack([np.asarray(image, dtype=np.float32) for image in new_digits["image"]])
    images = torch.from_numpy(pixels).unsqueeze(1) / 127.5 - 1.0
    labels = torch.tensor(new_digits["label"])

    pipeline = DiffiTPipeline.from_pretrained(base_dir)
    base_state = {name: tensor.clone() for name, tensor in pipeline.denoiser.state_dict().items()}
    base_as_null = copy.deepcopy(pipeline.denoiser)
    null_loss = edm_loss(base_as_null, images, torch.full_like(labels, base_as_null.null_class_id))
    pipeline.load_lora_weights(lora_dir)
    assert pipeline.denoiser.config.num_classes == 10
    lora_loss = edm_loss(pipeline.denoiser.eval(), images, labels)
    assert lora_loss < 0.9 * null_loss, (lora_loss, null_loss)

    pipeline.unload_lora_weights()
    for name, tensor in base_state.items():
        if "class_embedder" not in name:
            torch.testing.assert_close(pipeline.denoiser.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
