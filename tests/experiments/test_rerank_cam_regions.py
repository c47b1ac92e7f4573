"""The cam-regions method of experiments.rerank_lib and the evaluate CLI's --rerank cam-regions."""

import numpy as np
import pytest

from experiments import evaluate, rerank_lib
from jaxretrieval import cam_regions


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class FakeRegionExtractor:
    """Region descriptors per path from a table; records the settings it was called with."""

    def __init__(self, paths, regions, valid):
        self.table = {p: (r, v) for p, r, v in zip(paths, regions, valid, strict=True)}
        self.calls = []

    def __call__(self, paths, **kwargs):
        self.calls.append(kwargs)
        regions = np.stack([self.table[p][0] for p in paths])
        valid = np.stack([self.table[p][1] for p in paths])
        return cam_regions.RegionDescriptors(regions, valid, None, None, None, list(paths), [])


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    database = _unit(rng.normal(size=(10, 5)))
    queries = _unit(rng.normal(size=(3, 5)))
    regions = _unit(rng.normal(size=(10, 3, 5)))
    valid = rng.random((10, 3)) < 0.7
    paths = [f"db{i}.jpg" for i in range(10)]
    return queries, database, regions * valid[..., None], valid, paths


def test_split_and_leave_one_out_match_the_library(problem):
    queries, database, regions, valid, paths = problem
    settings = rerank_lib.RerankSettings(
        cam_shortlist=5, cam_expansion=2, cam_thresholds=(0.3,), cam_max_side=96
    )
    fake = FakeRegionExtractor(paths, regions, valid)
    ranks = rerank_lib.rerank_split(
        "cam-regions", queries, database, settings=settings, database_paths=paths,
        cam_extractor=fake,
    )  # fmt: skip
    expected = cam_regions.region_rerank(
        queries, database, regions, valid, shortlist_size=5, num_expansion=2
    )
    np.testing.assert_array_equal(ranks, expected.ranks)
    assert fake.calls == [dict(max_side=96, thresholds=(0.3,), num_box_classes=3)]
    loo = rerank_lib.rerank_leave_one_out(
        "cam-regions", database, settings=settings, paths=paths, cam_extractor=fake
    )
    expected = cam_regions.region_rerank(
        database, database, regions, valid, shortlist_size=5, num_expansion=2,
        exclude=np.arange(10),
    )  # fmt: skip
    np.testing.assert_array_equal(loo, expected.ranks)
    # The paper's defaults are capped at what a small database allows.
    ranks = rerank_lib.rerank_split(
        "cam-regions", queries, database, database_paths=paths, cam_extractor=fake
    )
    expected = cam_regions.region_rerank(
        queries, database, regions, valid, shortlist_size=10, num_expansion=10
    )
    np.testing.assert_array_equal(ranks, expected.ranks)


def test_errors(problem):
    queries, database, regions, valid, paths = problem
    with pytest.raises(ValueError, match="needs the database image paths"):
        rerank_lib.rerank_split("cam-regions", queries, database, cam_extractor=object())
    with pytest.raises(ValueError, match="needs a CAMRegionExtractor"):
        rerank_lib.rerank_split("cam-regions", queries, database, database_paths=paths)
    with pytest.raises(ValueError, match="same model"):
        rerank_lib.rerank_split(
            "cam-regions", queries[:, :4], database[:, :4], database_paths=paths,
            cam_extractor=FakeRegionExtractor(paths, regions, valid),
        )  # fmt: skip


@pytest.mark.slow  # 19 s; the library path runs in CI
def test_evaluate_cli_reranks_with_cam_regions(shared_data):
    results = evaluate.main(
        ["--data-root", str(shared_data / "landmarks_mini"), "--max-side", "64"]
        + ["--rerank", "cam-regions", "--quiet"]
    )
    assert results["rerank_settings"]["cam_shortlist"] == 100
    assert results["rerank_settings"]["cam_expansion"] == 10
    for key in ("split", "split+cam-regions"):
        assert 0.0 < results[key]["medium"]["map"] <= 1.0
