import logging
import pathlib

import cv2
import numpy as np
import pytest

from jaxretrieval import extraction, jit_cache
from jaxretrieval.data import images as image_io
from jaxretrieval.retrieval_model import ModelConfig

# Small images keep the real MobileNetV2 cheap; 64 px max side -> 2x2 feature maps.
SETTINGS = extraction.ExtractionSettings(max_side=64, batch_size=2)


def pretrained(settings=SETTINGS, **model):
    return extraction.Extractor.pretrained(ModelConfig(**model), settings)


@pytest.fixture(scope="module")
def extractor():
    return pretrained()


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    """Three real photos (scikit-image) of different aspect ratios, written as JPEG/PNG."""
    skimage_data = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("photos")
    photos = {
        "chelsea.jpg": skimage_data.chelsea(),
        "coffee.png": skimage_data.coffee(),
        "rocket.jpg": skimage_data.rocket(),
    }
    paths = []
    for name, rgb in photos.items():
        path = folder / name
        cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        paths.append(str(path))
    return paths


def test_descriptors_are_unit_rows_aligned_with_paths(extractor, photo_files):
    result = extractor(photo_files, progress=False)
    assert result.descriptors.shape == (3, extractor.spec.feature_channels)
    assert result.descriptors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.descriptors, axis=1), 1.0, rtol=1e-5)
    assert result.valid.all() and result.failures == [] and result.paths == photo_files
    # Different photos give different descriptors; the same photo twice gives the same.
    again = extractor(photo_files[::-1], progress=False)
    np.testing.assert_allclose(again.descriptors[::-1], result.descriptors, atol=1e-5)
    assert np.max(result.descriptors @ result.descriptors.T - np.eye(3)) < 0.99


def test_batching_and_padding_do_not_change_descriptors(extractor, photo_files):
    """One image alone vs. in a batch with others: identical (the mask hides batch-mates)."""
    alone = [extractor([p], progress=False).descriptors[0] for p in photo_files]
    together = extractor(photo_files, progress=False).descriptors
    np.testing.assert_allclose(np.stack(alone), together, atol=1e-5)


def test_bucket_padding_stays_close_to_exact_size(photo_files):
    """Padding to a bucket changes only the convolutions' border context.

    At 160 px (5x5 maps) the padded descriptor stays close to the exact-size one; on
    landmarks_mini at 224 px, leave-one-out mAP is 0.785 padded vs 0.777 exact, with 6
    compiled shapes instead of 17 (measured when this was written).
    """
    padded = pretrained(extraction.ExtractionSettings(max_side=160, batch_size=1))
    exact = pretrained(extraction.ExtractionSettings(max_side=160, batch_size=1, size_multiple=1))
    cosines = np.sum(
        padded(photo_files, progress=False).descriptors
        * exact(photo_files, progress=False).descriptors,
        axis=1,
    )
    assert np.all(cosines > 0.9), cosines


def test_shapes_are_bucketed(extractor, tmp_path, caplog):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(40, 64), (41, 64), (50, 64), (64, 33), (64, 64), (7, 64)]):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        paths.append(str(path))
    with caplog.at_level(logging.INFO, logger="jaxretrieval.extraction"):
        result = extractor(paths, progress=False)
    # Heights 40, 41, 50 share the 64x64 bucket with 64x64; 7 -> 32; 33 wide -> 64.
    batch = extractor.batch_size  # 2 rounded up to the device count
    assert result.compiled_shapes == [(batch, 32, 64), (batch, 64, 64)]
    assert "2 input shapes" in caplog.text


def test_unreadable_images_are_reported_and_skipped(extractor, photo_files, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")
    result = extractor([photo_files[0], str(broken), photo_files[1]], progress=False)
    np.testing.assert_array_equal(result.valid, [True, False, True])
    np.testing.assert_array_equal(result.descriptors[1], 0.0)
    assert len(result.failures) == 1 and result.failures[0][0] == str(broken)
    assert result.failures[0][1] == "file is empty (0 bytes)"  # the path is [0]: not repeated
    with pytest.raises(image_io.ImageDecodeError, match="broken.jpg"):
        extractor([str(broken)], strict=True, progress=False)


def test_query_boxes_crop_before_resizing(extractor, photo_files):
    whole = extractor(photo_files[:1], progress=False).descriptors[0]
    height, width = image_io.load_image(photo_files[0]).shape[:2]
    full_box = extractor(photo_files[:1], [(0, 0, width, height)], progress=False)
    np.testing.assert_allclose(full_box.descriptors[0], whole, atol=1e-6)
    corner = extractor(photo_files[:1], [(0, 0, width / 4, height / 4)], progress=False)
    assert float(corner.descriptors[0] @ whole) < 0.99


def test_multi_scale_combination_known_values():
    per_scale = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # (S=2, N=1, D=2)
    np.testing.assert_allclose(extraction.combine_scales(per_scale, 1.0), [[0.5**0.5, 0.5**0.5]])
    # GeM over scales with p=3 of (0.6, 0.8) and (1, 0): ((0.216 + 1) / 2)^(1/3) and
    # (0.512 / 2)^(1/3), i.e. (0.8472, 0.6350) before L2 -> (0.8002, 0.5998). The plain
    # mean (0.8, 0.4) would give (0.894, 0.447): the exponent matters.
    per_scale = np.array([[[0.6, 0.8]], [[1.0, 0.0]]])
    gem = np.array([(1.216 / 2) ** (1 / 3), (0.512 / 2) ** (1 / 3)])
    np.testing.assert_allclose(
        extraction.combine_scales(per_scale, 3.0), [gem / np.linalg.norm(gem)], rtol=1e-6
    )
    np.testing.assert_allclose(
        extraction.combine_scales(per_scale, 3.0), [[0.80019, 0.59975]], atol=1e-5
    )


def test_multi_scale_extraction(photo_files):
    multi = pretrained(extraction.ExtractionSettings(max_side=64, scales=extraction.MULTI_SCALES))
    result = multi(photo_files[:2], progress=False)
    np.testing.assert_allclose(np.linalg.norm(result.descriptors, axis=1), 1.0, rtol=1e-5)
    single = pretrained()(photo_files[:2], progress=False)
    assert not np.allclose(result.descriptors, single.descriptors)


def test_progress_advances_per_image_within_a_chunk(photo_files, tmp_path, monkeypatch):
    """The bar moves as each image's last scale is done, unreadable images at once."""
    counts = []

    class RecordingBar:
        def __init__(self, *, total, initial, **_):
            self.total, self.n = total, initial

        def update(self, n):
            self.n += n
            counts.append(self.n)

        def close(self):
            pass

    monkeypatch.setattr(extraction, "tqdm", RecordingBar)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")
    multi = pretrained(
        extraction.ExtractionSettings(
            max_side=64, scales=extraction.MULTI_SCALES, size_multiple=1, batch_size=1
        )
    )
    photo = cv2.imread(photo_files[0])
    square, wide = tmp_path / "square.png", tmp_path / "wide.png"
    cv2.imwrite(str(square), cv2.resize(photo, (64, 64)))
    cv2.imwrite(str(wide), cv2.resize(photo, (64, 40)))
    multi([str(square), str(broken), str(wide)], chunk_images=256)  # one chunk
    # The broken image first (decoding fails before anything runs), then one image at a
    # time: the two photos' six scales are six shape buckets, run in order.
    assert counts == [1, 2, 3]


def test_exact_sizes_keep_few_compiled_shapes_alive(photo_files, tmp_path, monkeypatch):
    """Exact sizes compile a shape per image; old ones are dropped, results unchanged."""
    photo = cv2.imread(photo_files[0])
    paths = []
    for width in (64, 60, 56, 52):
        path = tmp_path / f"w{width}.png"
        cv2.imwrite(str(path), cv2.resize(photo, (width, 48)))
        paths.append(str(path))
    exact = pretrained(extraction.ExtractionSettings(max_side=64, size_multiple=1, batch_size=1))
    exact._kernel.clear_cache()
    expected = exact(paths, progress=False).descriptors
    assert jit_cache.live_executables(exact._kernel) == 4
    monkeypatch.setattr(jit_cache, "MAX_LIVE_EXECUTABLES", 2)
    exact._kernel.clear_cache()
    result = exact(paths, progress=False)
    assert jit_cache.live_executables(exact._kernel) <= 2
    np.testing.assert_array_equal(result.descriptors, expected)


def test_second_run_reuses_saved_descriptors(extractor, photo_files, tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "d.npz"
    first = extraction.extract_cached(extractor, photo_files, cache_file=cache, progress=False)
    assert cache.exists()

    def fail(*args, **kwargs):
        raise AssertionError("should have reused the cache")

    monkeypatch.setattr(extraction.Extractor, "__call__", fail)
    second = extraction.extract_cached(extractor, photo_files, cache_file=cache, progress=False)
    np.testing.assert_array_equal(first.descriptors, second.descriptors)
    assert second.paths == photo_files
    # Other settings or other files invalidate the cache.
    assert extraction.load_descriptors(cache, key="other") is None


def test_settings_are_validated():
    with pytest.raises(ValueError, match="pooling must be one of"):
        extraction.ExtractionSettings(extra_poolings=("avg",))
    with pytest.raises(ValueError, match="pooling must be one of"):
        ModelConfig(pooling="avg")
    with pytest.raises(ValueError, match="unknown backbone"):
        ModelConfig(backbone="alexnet")
    with pytest.raises(ValueError, match="scales must be positive"):
        extraction.ExtractionSettings(scales=())
    with pytest.raises(ValueError, match="boxes"):
        pretrained()(["a.jpg"], boxes=[], progress=False)


def test_all_poolings_in_one_pass(extractor, photo_files, tmp_path):
    names = tuple(extraction.POOLINGS)
    settings = extraction.ExtractionSettings(max_side=64, batch_size=2, extra_poolings=names)
    many = pretrained(settings)
    result = many(photo_files, progress=False)
    assert set(result.by_pooling) == set(names)
    for name, descriptors in result.by_pooling.items():
        expected_dim = 2 * 1280 if name == "ramac" else 1280
        assert descriptors.shape == (3, expected_dim), name
        np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, rtol=1e-4)
    # The main pooling is unchanged by computing the others alongside it.
    np.testing.assert_allclose(
        result.descriptors, extractor(photo_files, progress=False).descriptors, atol=1e-5
    )
    assert not np.allclose(result.by_pooling["mac"], result.by_pooling["spoc"])
    # Every pooling survives the on-disk cache.
    cache = tmp_path / "many.npz"
    first = extraction.extract_cached(many, photo_files, cache_file=cache, progress=False)
    loaded = extraction.load_descriptors(cache)
    for name in names:
        np.testing.assert_array_equal(loaded.by_pooling[name], first.by_pooling[name])


def test_regional_pooling_needs_stride_sized_buckets():
    with pytest.raises(ValueError, match="size_multiple == the feature stride"):
        pretrained(extraction.ExtractionSettings(size_multiple=64), pooling="rmac")


def test_default_buckets_follow_the_stride_only_where_regional_poolings_need_it(photo_files):
    """Unset size_multiple: 32 px, or the stride for regional poolings (VGG16's is 16)."""
    unset = extraction.ExtractionSettings(max_side=64, batch_size=1)
    assert unset.size_multiple is None
    assert pretrained(unset, pooling="rmac").settings.size_multiple == 32  # MobileNetV2
    assert pretrained(unset, backbone="vgg16").settings.size_multiple == 32  # GeM: unchanged
    vgg_rmac = pretrained(unset, backbone="vgg16", pooling="rmac")
    assert vgg_rmac.settings.size_multiple == 16  # was a ValueError before
    result = vgg_rmac(photo_files[:1], progress=False)
    assert result.valid.all() and np.isfinite(result.descriptors).all()
    assert {shape[1:] for shape in result.compiled_shapes} <= {
        (h, w) for h in range(16, 65, 16) for w in range(16, 65, 16)
    }


def test_multi_scale_uses_the_models_learnt_gem_exponent(photo_files):
    """The scales are combined with the model's own p (params["gem"]["p"]), not 3."""
    settings = extraction.ExtractionSettings(max_side=64, scales=(1.0, 0.5), batch_size=2)
    base = pretrained(settings)
    variables = {
        **base.variables,
        "params": {**base.variables["params"], "gem": {"p": np.array(6.0, np.float32)}},
    }
    assert base.gem_p == 3.0 and base.with_variables(variables).gem_p == 6.0


def test_padding_mask_at_size_multiple_64(photo_files, tmp_path):
    """A 32x128 image padded to 64x128 pools only its own feature row.

    The map is 2x4 cells, the image covers the first row: the pooled descriptor must be
    GeM of that row alone (computed here by slicing), not of both rows.
    """
    import jax.numpy as jnp

    from jaxretrieval import pooling, retrieval_model

    config = ModelConfig(max_side=128)
    model = retrieval_model.make_model(config)
    variables = retrieval_model.init_model_variables(config)
    rng = np.random.default_rng(0)
    images = np.zeros((1, 64, 128, 3), np.float32)
    images[0, :32] = rng.normal(size=(32, 128, 3))
    out = model.apply(variables, images, np.array([[32, 128]], np.int32))
    assert out["valid"].tolist() == [[[True] * 4, [False] * 4]]
    own_row = pooling.gem(out["features"][:, :1], 3.0)
    np.testing.assert_allclose(
        out["pooled"], np.asarray(own_row) / np.linalg.norm(own_row), rtol=1e-4, atol=1e-6
    )
    both_rows = pooling.gem(out["features"], 3.0)
    assert not np.allclose(out["pooled"], both_rows / jnp.linalg.norm(both_rows), atol=1e-3)


def test_cache_key_covers_the_weights(extractor, photo_files, tmp_path):
    """Perturbed weights never read the descriptors of the original ones."""
    cache = tmp_path / "d.npz"
    first = extraction.extract_cached(extractor, photo_files, cache_file=cache, progress=False)
    params = extractor.variables["params"]
    perturbed_backbone = {**params["backbone"]}
    kernel = np.asarray(perturbed_backbone["last_conv"]["conv"]["kernel"])
    perturbed_backbone["last_conv"] = {
        **perturbed_backbone["last_conv"],
        "conv": {"kernel": kernel * np.float32(-1.0)},
    }
    other = extractor.with_variables(
        {**extractor.variables, "params": {**params, "backbone": perturbed_backbone}}
    )
    assert other.cache_key != extractor.cache_key
    second = extraction.extract_cached(other, photo_files, cache_file=cache, progress=False)
    assert second.reused_from is None
    assert not np.allclose(first.descriptors, second.descriptors, atol=1e-3)
    third = extraction.extract_cached(other, photo_files, cache_file=cache, progress=False)
    assert third.reused_from == str(cache)


def test_cache_key_covers_file_size_and_mtime(extractor, photo_files, tmp_path):
    import os
    import shutil

    copies = []
    for path in photo_files:
        copies.append(str(tmp_path / pathlib.Path(path).name))
        shutil.copy(path, copies[-1])
    cache = tmp_path / "cache.npz"
    extraction.extract_cached(extractor, copies, cache_file=cache, progress=False)
    assert extraction.extract_cached(
        extractor, copies, cache_file=cache, progress=False
    ).reused_from
    # Same size, new mtime: recomputed.
    stat = os.stat(copies[0])
    os.utime(copies[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert (
        extraction.extract_cached(extractor, copies, cache_file=cache, progress=False).reused_from
        is None
    )
    # Another photo under the same name (new size): recomputed, with its descriptor.
    shutil.copy(photo_files[1], copies[0])
    result = extraction.extract_cached(extractor, copies, cache_file=cache, progress=False)
    assert result.reused_from is None
    np.testing.assert_allclose(result.descriptors[0], result.descriptors[1], atol=1e-5)


def test_corrupt_cache_is_reported_and_recomputed(extractor, photo_files, tmp_path, caplog):
    cache = tmp_path / "d.npz"
    first = extraction.extract_cached(extractor, photo_files, cache_file=cache, progress=False)
    cache.write_bytes(cache.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="jaxretrieval.extraction"):
        again = extraction.extract_cached(extractor, photo_files, cache_file=cache, progress=False)
    assert "unreadable" in caplog.text and str(cache) in caplog.text
    np.testing.assert_allclose(again.descriptors, first.descriptors, atol=1e-6)
    assert extraction.load_descriptors(cache) is not None  # rewritten whole


def test_interrupted_extraction_resumes_without_recomputing(photo_files, tmp_path, monkeypatch):
    extractor = pretrained()
    paths = photo_files * 2  # 6 images, chunks of 2
    cache = tmp_path / "d.npz"
    calls = []
    original = extraction.Extractor._extract_chunk

    def interrupt_after_two_chunks(self, chunk_paths, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(list(chunk_paths))
        return original(self, chunk_paths, *args)

    monkeypatch.setattr(extraction.Extractor, "_extract_chunk", interrupt_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        extraction.extract_cached(
            extractor, paths, cache_file=cache, chunk_images=2, progress=False
        )
    assert not cache.exists() and (tmp_path / "d.npz.partial.npz").exists()
    calls.clear()
    monkeypatch.setattr(extraction.Extractor, "_extract_chunk", original)
    monkeypatch.setattr(
        extraction.Extractor,
        "_extract_chunk",
        lambda self, chunk_paths, *args: (
            calls.append(list(chunk_paths)) or original(self, chunk_paths, *args)
        ),
    )
    result = extraction.extract_cached(
        extractor, paths, cache_file=cache, chunk_images=2, progress=False
    )
    assert calls == [paths[4:6]]  # only the last chunk was extracted
    assert result.paths == paths and result.valid.all()
    np.testing.assert_allclose(result.descriptors[:3], result.descriptors[3:], atol=1e-5)
    assert cache.exists() and not (tmp_path / "d.npz.partial.npz").exists()


def test_unwritable_cache_folder_fails_before_extracting(extractor, photo_files, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="cannot write"):
        extraction.extract_cached(
            extractor, photo_files, cache_file=blocker / "d.npz", progress=False
        )


def test_sharded_over_four_devices_equals_one_device(photo_files):
    import jax

    assert jax.device_count() == 4  # tests/conftest.py forces 4 host devices
    sharded = pretrained(extraction.ExtractionSettings(max_side=64, batch_size=4))
    single = extraction.Extractor.pretrained(
        ModelConfig(),
        extraction.ExtractionSettings(max_side=64, batch_size=4),
        devices=jax.devices()[:1],
    )
    assert sharded.mesh.devices.size == 4 and single.mesh.devices.size == 1
    np.testing.assert_allclose(
        sharded(photo_files, progress=False).descriptors,
        single(photo_files, progress=False).descriptors,
        atol=1e-5,
    )


def test_decoding_refuses_images_above_the_pixel_limit(extractor, tmp_path):
    big = tmp_path / "big.png"
    cv2.imwrite(str(big), np.zeros((300, 400, 3), np.uint8))
    limited = extractor.with_variables(extractor.variables)
    limited.settings = extraction.ExtractionSettings(max_side=64, max_pixels=100_000).resolved(
        limited.model
    )
    result = limited([str(big)], progress=False)
    assert not result.valid[0] and "400 x 300 pixels" in result.failures[0][1]


def test_pooling_another_feature_map(photo_files):
    """A model pooling stage4 (320 channels), not the default 1280-channel last conv."""
    extractor = pretrained(feature_name="stage4")
    result = extractor(photo_files[:2], progress=False)
    assert result.descriptors.shape == (2, 320) and result.valid.all()
    assert extractor([], progress=False).descriptors.shape == (0, 320)
