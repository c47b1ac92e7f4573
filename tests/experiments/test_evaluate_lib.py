import dataclasses

import numpy as np
import pytest

from experiments import evaluate_lib
from jaxretrieval import extraction
from jaxretrieval.data import datasets
from jaxretrieval.retrieval_model import ModelConfig


@pytest.fixture(scope="module")
def extractor():
    extractor = extraction.Extractor.pretrained(ModelConfig(max_side=64))
    return evaluate_lib.cached_extraction(extractor, progress=False)


def test_shared_extraction_equals_separate_protocols(shared_data, extractor):
    dataset = datasets.load_dataset(shared_data / "landmarks_mini")
    # Shrink query 0's box so that the shared path must re-extract (crop) that query.
    gnd = list(dataset.gnd)
    gnd[0] = {**gnd[0], "bbx": (10.0, 20.0, 200.0, 180.0)}
    dataset = dataclasses.replace(dataset, gnd=tuple(gnd))
    both = evaluate_lib.rank_protocols(dataset, extractor)
    split = evaluate_lib.rank_split(dataset, extractor)
    loo = evaluate_lib.rank_leave_one_out(dataset, extractor)
    np.testing.assert_allclose(both["split"].query_descriptors, split.query_descriptors, atol=1e-6)
    np.testing.assert_array_equal(both["split"].ranks, split.ranks)
    np.testing.assert_array_equal(both["leave_one_out"].ranks, loo.ranks)
    assert both["split"].database_paths == [str(p) for p in dataset.database_paths]
    metrics = evaluate_lib.score(both["split"])
    assert 0.0 < metrics["medium"]["map"] <= 1.0 and np.isnan(metrics["hard"]["map"])


def test_unknown_protocol_is_refused(shared_data, extractor):
    dataset = datasets.load_dataset(shared_data / "landmarks_mini")
    with pytest.raises(ValueError, match="unknown protocols"):
        evaluate_lib.rank_protocols(dataset, extractor, ("holdout",))


def test_evaluate_with_any_extraction_function_records_rerank_settings(shared_data):
    """The evaluator takes a plain function (as the training loop passes one)."""
    dataset = datasets.load_dataset(shared_data / "landmarks_mini")
    calls = []
    labels = dict(
        line.split(",")[:2]
        for line in (shared_data / "landmarks_mini" / "labels.csv").read_text().split()[1:]
    )
    scenes = sorted(set(labels.values()))

    def by_scene(paths, boxes):
        # A perfect "descriptor": the one-hot of the image's landmark name.
        calls.append(len(paths))
        rows = [scenes.index(labels[p.split("/")[-1]]) for p in paths]
        return extraction.ExtractionResult(
            descriptors=np.eye(len(scenes), dtype=np.float32)[rows],
            valid=np.ones(len(paths), bool),
            paths=list(paths),
            failures=[],
            compiled_shapes=[],
        )

    settings = evaluate_lib.rerank_lib.RerankSettings(qe_k=1)
    results, rankings = evaluate_lib.evaluate(
        dataset, by_scene, reranking=["none", "alpha-qe"], rerank_settings=settings
    )
    assert results["split"]["medium"]["map"] == 1.0
    assert results["rerank_settings"]["qe_k"] == 1
    assert set(rankings) == {"split", "split+alpha-qe"} and calls == [7, 22]
    results, rankings = evaluate_lib.evaluate(
        dataset, by_scene, protocols=evaluate_lib.PROTOCOLS, reranking=["alpha-qe"]
    )
    assert results["leave_one_out+alpha-qe"]["medium"]["map"] == 1.0
    assert rankings["leave_one_out+alpha-qe"].ranks.shape == (29, 29)
    with pytest.raises(ValueError, match="unknown re-ranking"):
        evaluate_lib.evaluate(dataset, by_scene, reranking=["magic"])


def test_delf_reranking_needs_a_delf_model(shared_data):
    dataset = datasets.load_dataset(shared_data / "landmarks_mini")

    def constant(paths, boxes):
        return extraction.ExtractionResult(
            np.ones((len(paths), 2), np.float32) / np.sqrt(2.0),
            np.ones(len(paths), bool),
            list(paths),
            [],
            [],
        )

    with pytest.raises(ValueError, match="needs a DELF model"):
        evaluate_lib.evaluate(dataset, constant, reranking=["delf"])
