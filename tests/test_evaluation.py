import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffit_diffusers.evaluation import (
    INCEPTION_WEIGHTS_FILENAME,
    FeatureReservoir,
    FeatureStatistics,
    InceptionFeatureExtractor,
    ModuleFeatureExtractor,
    compute_reference_statistics,
    evaluate_samples,
    inception_score,
    iterate_image_batches,
    kernel_inception_distance,
    precision_recall,
)


def correlated_gaussian(num_samples, dim, seed, offset=0.0):
    generator = np.random.default_rng(seed)
    mixing = generator.normal(size=(dim, dim))
    return generator.normal(size=(num_samples, dim)) @ mixing + offset


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )


def tiny_extractor():
    return ModuleFeatureExtractor(tiny_classifier(), layer="3", output_is_logits=True)


def write_random_pngs(folder, num_images, size=(12, 12), seed=0):
    generator = np.random.default_rng(seed)
    images = generator.integers(0, 256, size=(num_images, size[1], size[0], 3), dtype=np.uint8)
    for index, image in enumerate(images):
        subfolder = folder / f"class_{index % 2}"
        subfolder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(subfolder / f"{index:03d}.png")
    return images


# ---------------------------------------------------------------------------------------------- FeatureStatistics


def test_statistics_match_numpy_and_round_trip_through_npz(tmp_path):
    features = correlated_gaussian(1000, 8, seed=0, offset=3.0)
    statistics = FeatureStatistics.from_features(features)
    assert statistics.count == 1000 and statistics.dim == 8
    np.testing.assert_allclose(statistics.mean, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(statistics.covariance, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-9)
    path = tmp_path / "stats.npz"
    statistics.save(path)
    with np.load(path) as archive:
        assert sorted(archive.files) == ["count", "mu", "sigma"]
    loaded = FeatureStatistics.load(path)
    assert loaded.count == 1000
    np.testing.assert_array_equal(loaded.covariance, statistics.covariance)


def test_load_adm_reference_batch_layout(tmp_path):
    generator = np.random.default_rng(5)
    mu, sigma = generator.normal(size=4), np.cov(generator.normal(size=(50, 4)), rowvar=False)
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(
        path,
        arr_0=generator.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8),
        mu=mu,
        sigma=sigma,
        mu_s=generator.normal(size=7),
        sigma_s=np.eye(7),
    )
    loaded = FeatureStatistics.load(path)
    assert loaded.count is None and loaded.dim == 4
    np.testing.assert_array_equal(loaded.mean, mu)
    np.testing.assert_array_equal(loaded.covariance, sigma)
    loaded.save(tmp_path / "copy.npz")
    np.testing.assert_array_equal(FeatureStatistics.load(tmp_path / "copy.npz").covariance, sigma)


def test_load_reports_missing_arrays_bad_shapes_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureStatistics.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="sigma"):
        FeatureStatistics.load(tmp_path / "no_sigma.npz")
    np.savez(tmp_path / "mismatch.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="shape"):
        FeatureStatistics.load(tmp_path / "mismatch.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(ValueError, match="not a readable"):
        FeatureStatistics.load(tmp_path / "corrupt.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        FeatureStatistics.load(tmp_path / "single.npy")


def test_from_features_rejects_bad_features():
    with pytest.raises(ValueError, match="shape"):
        FeatureStatistics.from_features(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        FeatureStatistics.from_features(np.array([[0.0, np.nan, 1.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        FeatureStatistics.from_features(np.zeros((1, 3)))


# ------------------------------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_of_a_sample_with_itself_is_zero():
    statistics = FeatureStatistics.from_features(correlated_gaussian(2000, 16, seed=6, offset=2.0))
    assert statistics.frechet_distance(statistics) == pytest.approx(0.0, abs=1e-8)
    # Singular covariance (fewer samples than dimensions): zero up to rounding relative to the total variance.
    rank_deficient = FeatureStatistics.from_features(correlated_gaussian(10, 32, seed=7))
    total_variance = np.trace(rank_deficient.covariance)
    assert rank_deficient.frechet_distance(rank_deficient) == pytest.approx(0.0, abs=1e-7 * total_variance)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    generator = np.random.default_rng(8)
    mu1, mu2 = generator.normal(size=10), generator.normal(size=10)
    variance1, variance2 = generator.uniform(0.1, 3.0, size=10), generator.uniform(0.1, 3.0, size=10)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(variance1 + variance2 - 2 * np.sqrt(variance1 * variance2))
    first = FeatureStatistics(mean=mu1, covariance=np.diag(variance1), count=None)
    second = FeatureStatistics(mean=mu2, covariance=np.diag(variance2), count=None)
    assert first.frechet_distance(second) == pytest.approx(expected, rel=1e-10)


def test_metrics_match_plain_numpy_and_scipy_on_fixed_features():
    """FID, KID and IS on fixed features equal their textbook formulas."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    real = correlated_gaussian(400, 12, seed=9)
    fake = correlated_gaussian(300, 12, seed=10, offset=0.5)
    mu1, sigma1 = real.mean(axis=0), np.cov(real, rowvar=False)
    mu2, sigma2 = fake.mean(axis=0), np.cov(fake, rowvar=False)
    fid = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * scipy_linalg.sqrtm(sigma1 @ sigma2).real)
    first, second = FeatureStatistics.from_features(real), FeatureStatistics.from_features(fake)
    assert first.frechet_distance(second) == pytest.approx(fid, rel=1e-9)
    assert second.frechet_distance(first) == pytest.approx(fid, rel=1e-9)

    # Unbiased MMD^2 with the cubic polynomial kernel; one subset of all rows makes the subset draw irrelevant.
    real = real[:300]
    kernel = lambda x, y: (x @ y.T / x.shape[1] + 1) ** 3  # noqa: E731
    k_rr, k_ff, k_rf = kernel(real, real), kernel(fake, fake), kernel(real, fake)
    kid = (
        (k_rr.sum() - np.trace(k_rr)) / (300 * 299) + (k_ff.sum() - np.trace(k_ff)) / (300 * 299) - 2 * k_rf.mean()
    )
    assert kernel_inception_distance(real, fake, subsets=1, subset_size=300)[0] == pytest.approx(kid, rel=1e-9)

    logits = np.random.default_rng(11).normal(size=(200, 7)) * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    kl = (probabilities * (np.log(probabilities) - np.log(probabilities.mean(axis=0)))).sum(axis=1)
    assert inception_score(logits, splits=1)[0] == pytest.approx(np.exp(kl.mean()), rel=1e-9)


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="different feature dimensions"):
        FeatureStatistics.from_features(np.eye(3)).frechet_distance(FeatureStatistics.from_features(np.eye(4)))


# --------------------------------------------------------------------------------------------------- KID and IS


def test_kid_is_near_zero_for_one_distribution_and_seeded():
    features = correlated_gaussian(600, 6, seed=12)
    same = kernel_inception_distance(features[:300], features[300:], subsets=20, subset_size=100, seed=1)
    shifted = kernel_inception_distance(features[:300], features[300:] + 3.0, subsets=20, subset_size=100, seed=1)
    assert abs(same[0]) < 0.1 * shifted[0] and same[2] == 100
    assert kernel_inception_distance(features[:300], features[300:], subsets=20, subset_size=100, seed=1) == same
    assert kernel_inception_distance(features[:50], features[300:], subset_size=1000)[2] == 50


def test_inception_score_of_uniform_and_confident_balanced_predictions():
    num_classes, splits = 7, 4
    assert inception_score(np.zeros((280, num_classes)), splits=splits)[0] == pytest.approx(1.0, abs=1e-12)
    # One chunk: torchmetrics shuffles the samples before chunking, which unbalances the classes of a chunk.
    confident = np.eye(num_classes)[np.arange(280) % num_classes] * 50.0
    assert inception_score(confident, splits=1)[0] == pytest.approx(num_classes, rel=1e-6)


def test_inception_score_rejects_bad_inputs():
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.zeros((5, 3)), splits=10)
    with pytest.raises(ValueError, match="shape"):
        inception_score(np.ones(20))


# ----------------------------------------------------------------------------------------------- Precision / recall


def test_precision_recall_of_identical_clouds_is_one():
    real = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(real, real.clone()) == pytest.approx((1.0, 1.0))


def test_precision_recall_of_far_apart_clouds_is_zero():
    generator = torch.Generator().manual_seed(1)
    real = torch.randn(200, 8, generator=generator)
    fake = torch.randn(200, 8, generator=generator) + 100.0
    assert precision_recall(real, fake, batch_size=64) == (0.0, 0.0)


def test_precision_recall_of_mode_collapse_and_block_size_independence():
    generator = torch.Generator().manual_seed(2)
    modes = torch.tensor([[20.0, 20.0], [20.0, -20.0], [-20.0, 20.0], [-20.0, -20.0]])
    real = (modes[torch.arange(800) % 4] + torch.randn(800, 2, generator=generator)).double()
    fake = (modes[torch.zeros(400, dtype=torch.long)] + torch.randn(400, 2, generator=generator)).double()
    precision, recall = precision_recall(real, fake, k=3, batch_size=4096)
    assert precision > 0.9 and recall < 0.35
    assert precision_recall(real, fake, k=3, batch_size=37) == (precision, recall)


def test_precision_recall_rejects_bad_inputs():
    with pytest.raises(ValueError, match="different dimensions"):
        precision_recall(torch.zeros(10, 3), torch.zeros(10, 4))
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2))


# ------------------------------------------------------------------------------------------------- FeatureReservoir


def test_feature_reservoir_keeps_a_uniform_subset_of_the_stream():
    stream = torch.arange(5000, dtype=torch.float32)[:, None].repeat(1, 2)
    reservoir = FeatureReservoir(capacity=500, seed=0)
    for batch in stream.split(333):
        reservoir.add(batch)
    kept = reservoir.features[:, 0]
    assert reservoir.num_seen == 5000 and kept.shape == (500,)
    assert kept.unique().numel() == 500
    # Uniform over 0..4999: mean 2499.5, standard error of the mean of 500 draws ~ 64.
    assert abs(kept.mean().item() - 2499.5) < 300
    assert (kept >= 2500).sum().item() == pytest.approx(250, abs=50)

    small = FeatureReservoir(capacity=10)
    small.add(stream[:4])
    torch.testing.assert_close(small.features, stream[:4])


# ------------------------------------------------------------------------------------------------ Feature extractors


def test_module_extractor_layer_hook_features_and_logits():
    extractor = tiny_extractor()
    images = torch.rand(3, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    output = extractor.extract(images)
    module = extractor.module
    expected_features = module[:4](images)
    torch.testing.assert_close(output.features, expected_features)
    torch.testing.assert_close(output.logits, module[4](expected_features))
    torch.testing.assert_close(extractor(images), expected_features)
    assert extractor.name == "module:Sequential.3" and extractor.provides_logits
    # uint8 images are read as value / 255.
    images_uint8 = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(extractor(images_uint8), extractor(images_uint8.float() / 255))


def test_module_extractor_features_fn_output_and_eval_mode():
    dropout_module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5))
    extractor = ModuleFeatureExtractor(dropout_module, preprocess=lambda images: images * 2)
    images = torch.rand(2, 1, 4, 4)
    extractor.train()
    torch.testing.assert_close(extractor(images), images.flatten(1) * 2)
    assert not dropout_module.training and not extractor.provides_logits
    pooled = ModuleFeatureExtractor(tiny_classifier(), features_fn=lambda module, x: module[:3](x), name="pooled")
    assert pooled(images.expand(-1, 3, -1, -1)).shape == (2, 8) and pooled.name == "pooled"


def test_module_extractor_rejects_bad_configuration_and_images():
    with pytest.raises(ValueError, match="no submodule named 'head'"):
        ModuleFeatureExtractor(tiny_classifier(), layer="head")
    with pytest.raises(ValueError, match="not both"):
        ModuleFeatureExtractor(tiny_classifier(), layer="3", features_fn=lambda module, x: x)
    with pytest.raises(ValueError, match="needs `layer`"):
        ModuleFeatureExtractor(tiny_classifier(), output_is_logits=True)
    extractor = tiny_extractor()
    with pytest.raises(ValueError, match=r"\(images \+ 1\) / 2"):
        extractor(torch.rand(2, 3, 8, 8) * 2 - 1)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        extractor(torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        extractor(np.zeros((1, 3, 8, 8)))


def test_inception_extractor_reports_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights_path"):
        InceptionFeatureExtractor(weights_path=tmp_path / INCEPTION_WEIGHTS_FILENAME)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed here")
def test_inception_extractor_reports_missing_library(tmp_path):
    weights = tmp_path / INCEPTION_WEIGHTS_FILENAME
    weights.write_bytes(b"")
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        InceptionFeatureExtractor(weights_path=weights)


def test_inception_extractor_features_and_logits():
    if importlib.util.find_spec("torch_fidelity") is None:
        pytest.skip("torch-fidelity is not installed (it needs a working torchvision)")
    try:
        importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    except Exception as error:
        pytest.skip(f"torch-fidelity cannot be imported here: {error!r}")
    weights = os.environ.get("DIFFIT_INCEPTION_WEIGHTS") or os.path.join(
        torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILENAME
    )
    if not os.path.isfile(weights):
        pytest.skip(f"Inception weights not found at {weights}; set DIFFIT_INCEPTION_WEIGHTS to a local copy")
    extractor = InceptionFeatureExtractor(weights_path=weights)
    output = extractor.extract(torch.rand(2, 3, 32, 32))
    assert output.features.shape == (2, 2048) and output.logits.shape == (2, 1008)
    assert extractor.computes_standard_fid


# ------------------------------------------------------------------------------------------- Reference statistics


def test_reference_statistics_from_an_image_folder(tmp_path):
    images = write_random_pngs(tmp_path / "folder", 10)
    extractor = tiny_extractor()
    statistics = compute_reference_statistics(tmp_path / "folder", extractor, batch_size=3)
    # Files are read sorted by path: class_0/000, 002, ..., then class_1/001, 003, ...
    order = list(range(0, 10, 2)) + list(range(1, 10, 2))
    expected = extractor(torch.from_numpy(images[order]).permute(0, 3, 1, 2))
    assert statistics.count == 10
    np.testing.assert_allclose(statistics.mean, expected.double().mean(0).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(statistics.covariance, np.cov(expected.double().numpy(), rowvar=False), atol=1e-7)
    assert compute_reference_statistics(tmp_path / "folder", extractor, max_samples=4).count == 4


def test_image_batches_need_resolution_for_mixed_sizes(tmp_path):
    write_random_pngs(tmp_path, 2, size=(12, 12))
    Image.fromarray(np.zeros((16, 20, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(ValueError, match="resolution="):
        list(iterate_image_batches(tmp_path, batch_size=4))
    batches = list(iterate_image_batches(tmp_path, batch_size=2, resolution=8))
    assert [batch.shape for batch in batches] == [(2, 3, 8, 8), (1, 3, 8, 8)]
    assert all(batch.dtype == torch.uint8 for batch in batches)


def test_reference_statistics_from_npz_files(tmp_path):
    images = write_random_pngs(tmp_path / "folder", 6)
    extractor = tiny_extractor()
    from_folder = compute_reference_statistics(tmp_path / "folder", extractor)
    from_folder.save(tmp_path / "stats.npz")
    loaded = compute_reference_statistics(tmp_path / "stats.npz", extractor)
    np.testing.assert_array_equal(loaded.covariance, from_folder.covariance)

    # An ADM-style batch: the images as `arr_0` (streamed, here in the folder's sorted order) plus statistics.
    order = [0, 2, 4, 1, 3, 5]
    np.savez(tmp_path / "batch.npz", arr_0=images[order], mu=np.zeros(8), sigma=np.eye(8))
    reservoir = FeatureReservoir(capacity=100)
    from_images = compute_reference_statistics(tmp_path / "batch.npz", extractor, feature_reservoir=reservoir)
    np.testing.assert_allclose(from_images.covariance, from_folder.covariance, rtol=1e-6, atol=1e-9)
    assert reservoir.features.shape == (6, 8)
    np.testing.assert_array_equal(
        compute_reference_statistics(tmp_path / "batch.npz", extractor).covariance, np.eye(8)
    )

    np.savez(tmp_path / "neither.npz", other=np.zeros(3))
    with pytest.raises(ValueError, match="arr_0"):
        compute_reference_statistics(tmp_path / "neither.npz", extractor)


def test_reference_statistics_from_local_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = write_random_pngs(tmp_path / "folder", 6)
    extractor = tiny_extractor()
    order = [0, 2, 4, 1, 3, 5]
    expected = compute_reference_statistics(tmp_path / "folder", extractor)
    dataset = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(image) for image in images[order]], "label": [0, 0, 0, 1, 1, 1]}
    ).cast_column("img", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "saved"))
    dataset.to_parquet(str(tmp_path / "data.parquet"))
    for source in (tmp_path / "saved", tmp_path / "data.parquet"):
        statistics = compute_reference_statistics(source, extractor, image_column="img", batch_size=4)
        np.testing.assert_allclose(statistics.covariance, expected.covariance, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="no column 'image'"):
        compute_reference_statistics(tmp_path / "saved", extractor)


def test_reference_statistics_reports_missing_local_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compute_reference_statistics(tmp_path / "missing_folder", tiny_extractor())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compute_reference_statistics("reference.npz", tiny_extractor())


# ------------------------------------------------------------------------------------------------ evaluate_samples


def test_evaluate_samples_report():
    extractor = tiny_extractor()
    generator = torch.Generator().manual_seed(0)
    real_images = torch.rand(64, 3, 10, 10, generator=generator)
    real_features = extractor(real_images)
    reference = FeatureStatistics.from_features(real_features)
    sample_batches = [torch.rand(16, 3, 10, 10, generator=generator) * 0.8 for _ in range(4)]
    report = evaluate_samples(
        iter(sample_batches),
        extractor,
        reference,
        real_features=real_features,
        compute_pr=True,
        compute_kid=True,
        compute_is=True,
        max_feature_samples=40,
        kid_subset_size=30,
        is_splits=2,
    )
    json.dumps(report)
    sample_features = extractor(torch.cat(sample_batches))
    expected_distance = FeatureStatistics.from_features(sample_features).frechet_distance(reference)
    assert report["frechet_distance"] == pytest.approx(expected_distance, rel=1e-6)
    assert "fid" not in report and report["feature_extractor"] == "module:Sequential.3"
    assert report["num_samples"] == 64 and report["reference_num_samples"] == 64
    assert report["num_fake_features"] == 40 and report["num_real_features"] == 64
    assert 0.0 <= report["precision"] <= 1.0 and 0.0 <= report["recall"] <= 1.0
    assert report["kid_subset_size"] == 30 and report["kid_subsets"] == 100 and math.isfinite(report["kid"])
    expected_score = inception_score(extractor.extract(torch.cat(sample_batches)).logits, splits=2)
    assert (report["inception_score"], report["inception_score_std"]) == pytest.approx(expected_score)


def test_evaluate_samples_rejects_mismatches():
    extractor = tiny_extractor()
    images = [torch.rand(4, 3, 10, 10)]
    reference = FeatureStatistics.from_features(torch.randn(10, 8))
    no_logits = ModuleFeatureExtractor(tiny_classifier(), layer="3")
    with pytest.raises(ValueError, match="compute_is"):
        evaluate_samples(images, no_logits, reference, compute_is=True)
    with pytest.raises(ValueError, match="same feature extractor"):
        evaluate_samples(images, extractor, FeatureStatistics.from_features(torch.randn(10, 4)))
    with pytest.raises(ValueError, match=r"\(images \+ 1\) / 2"):
        evaluate_samples([images[0] * 2 - 1], extractor, reference)
    with pytest.raises(TypeError, match="ModuleFeatureExtractor"):
        evaluate_samples(images, tiny_classifier(), reference)
    with pytest.raises(ValueError, match="need `real_features`"):
        evaluate_samples(images, extractor, reference, compute_kid=True)
