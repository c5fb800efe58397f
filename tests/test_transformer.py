"""The latent DiffiTTransformer2DModel: shapes, conditioning, round trips, checkpointing, presets and errors."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffit_diffusers import DiffiTTransformer2DModel, available_presets, load_preset_config
from model_checks import assert_checkpointing_keeps_gradients


def tiny_transformer(seed=0, **kwargs):
    config = dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=8,
        num_classes=10, learn_sigma=True,
    )
    config.update(kwargs)
    torch.manual_seed(seed)
    model = DiffiTTransformer2DModel(**config)
    # The released initialisation zeroes the output layer; randomise so outputs depend on every weight.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def test_output_shape_with_learned_sigma():
    model = tiny_transformer()
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 9, 10])).sample
    assert out.shape == (3, 8, 8, 8)
    assert model.out_channels == 8


def test_output_shape_without_sigma_and_custom_out_channels():
    model = tiny_transformer(learn_sigma=False, out_channels=3)
    assert model(torch.randn(2, 4, 8, 8), 5, torch.tensor([1, 2])).sample.shape == (2, 3, 8, 8)


def test_default_init_matches_released_recipe():
    model = DiffiTTransformer2DModel(
        sample_size=8, num_layers=1, num_attention_heads=2, attention_head_dim=8, num_classes=10
    )
    assert torch.count_nonzero(model.proj_out.weight) == 0
    attn = model.transformer_blocks[0].attn
    assert all(torch.count_nonzero(getattr(attn, f"{p}_{n}").bias) == 0 for p in ("to", "time_to") for n in "qkv")
    table = model.time_embedding.class_embedder.embedding_table.weight
    assert table.shape == (11, 16) and 0.01 < table.std() < 0.03
    out = model(torch.randn(1, 4, 8, 8), 1, torch.tensor([3])).sample
    assert torch.count_nonzero(out) == 0


def test_timestep_forms_agree():
    model = tiny_transformer()
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    reference = model(x, torch.tensor([7, 7]), labels).sample
    for timestep in (7, 7.0, torch.tensor(7)):
        torch.testing.assert_close(model(x, timestep, labels).sample, reference)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        model(x, torch.tensor([1, 2, 3]), labels)


def test_time_and_label_change_the_output():
    model = tiny_transformer()
    x = torch.randn(1, 4, 8, 8)
    base = model(x, 10, torch.tensor([1])).sample
    assert not torch.allclose(base, model(x, 900, torch.tensor([1])).sample)
    assert not torch.allclose(base, model(x, 10, torch.tensor([2])).sample)


def test_batch_items_are_independent():
    model = tiny_transformer()
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([1, 200, 400, 999]), torch.tensor([0, 1, 2, 10])
    full = model(x, t, y).sample
    torch.testing.assert_close(model(x[2:3], t[2:3], y[2:3]).sample, full[2:3], atol=1e-5, rtol=1e-5)


def test_unconditional_model():
    model = tiny_transformer(num_classes=None)
    assert model(torch.randn(2, 4, 8, 8), 3).sample.shape == (2, 8, 8, 8)
    assert model.time_embedding.null_class_id is None
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(2, 4, 8, 8), 3, torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "shape, message",
    [((2, 3, 8, 8), r"received \(2, 3, 8, 8\)"), ((2, 4, 16, 16), "sample_size"), ((4, 8, 8), "batch")],
)
def test_bad_input_shapes_raise(shape, message):
    model = tiny_transformer()
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape), 1, torch.tensor([0, 1]))


def test_bad_labels_raise():
    model = tiny_transformer()
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="class-conditional.*use 10 for the null class"):
        model(x, 1)
    with pytest.raises(ValueError, match=r"\[0, 9\], or 10 for the null class; received values from 0 to 11"):
        model(x, 1, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="received values from -1"):
        model(x, 1, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        model(x, 1, torch.tensor([0.0, 1.0]))
    no_null = tiny_transformer(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match=r"\[0, 9\]; received"):
        no_null(x, 1, torch.tensor([0, 10]))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="divisible by `patch_size`"):
        DiffiTTransformer2DModel(sample_size=9, patch_size=2, num_layers=1, num_attention_heads=1)
    with pytest.raises(ValueError, match="class_dropout_prob"):
        DiffiTTransformer2DModel(sample_size=8, num_layers=1, num_attention_heads=1, class_dropout_prob=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        DiffiTTransformer2DModel(sample_size=8, num_layers=1, num_attention_heads=1, num_classes=0)


def test_save_load_round_trip(tmp_path):
    model = tiny_transformer()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DiffiTTransformer2DModel.from_pretrained(tmp_path).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 50]), torch.tensor([1, 10])
    assert torch.equal(model(x, t, y).sample, loaded(x, t, y).sample)
    assert loaded.config.num_classes == 10 and loaded.config.learn_sigma


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny_transformer().train()
    model.time_embedding.class_embedder.dropout_prob = 0.0  # deterministic labels for the comparison
    assert_checkpointing_keeps_gradients(model, torch.randn(2, 4, 8, 8), torch.tensor([5, 50]), torch.tensor([1, 2]))
    assert model.gradient_checkpointing


def test_ddpm_scheduler_step_on_learned_sigma_output():
    model = tiny_transformer()
    scheduler = DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range")
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    t = scheduler.timesteps[0]
    with torch.no_grad():
        out = model(sample, t, torch.tensor([1, 2])).sample
    step = scheduler.step(out, t, sample, generator=generator).prev_sample
    assert step.shape == sample.shape and torch.isfinite(step).all()


def test_presets_load_by_name():
    names = available_presets("DiffiTTransformer2DModel")
    assert {"DiffiT-S/2", "DiffiT-B/2", "DiffiT-L/2", "DiffiT-XL/2", "DiffiT-XL/2-512"} <= set(names)
    config = load_preset_config("DiffiT-XL/2")
    assert (config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]) == (28, 1152)
    small = DiffiTTransformer2DModel.from_preset("diffit-s-2", sample_size=8, num_layers=1)
    assert small.inner_dim == 384 and small.config.num_layers == 1
    with pytest.raises(ValueError, match="Unknown preset 'DiffiT-Q/2'.*DiffiT-B/2"):
        DiffiTTransformer2DModel.from_preset("DiffiT-Q/2")


@pytest.mark.slow
def test_xl_preset_has_the_paper_parameter_count():
    with torch.device("meta"):
        model = DiffiTTransformer2DModel.from_preset("DiffiT-XL/2")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 561
