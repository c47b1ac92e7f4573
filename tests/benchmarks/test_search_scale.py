"""benchmarks/search_scale.py: its quick path runs end to end and reports sane numbers."""

import faiss
import numpy as np
import pytest

from benchmarks import search_scale
from jaxretrieval.search import DescriptorFiles


@pytest.fixture(autouse=True)
def restore_faiss_threads():
    """The benchmark sets faiss's process-wide thread count; put it back."""
    threads = faiss.omp_get_max_threads()
    yield
    faiss.omp_set_num_threads(threads)


def test_search_scale_main_small(tmp_path, capsys):
    dim = 32
    results = search_scale.main(
        ["--quick", "--num-images", "3000", "--dim", str(dim), "--files", "3"]
        + ["--queries", "40", "--single-queries", "4", "--num-lists", "32"]
        + ["--num-probes", "1,4,32", "--subquantizers", "8", "--parts", "1,2"]
        + ["--shortlist", "300", "--workdir", str(tmp_path)]
    )
    assert "recall@100" in capsys.readouterr().out
    assert len(list((tmp_path / "descriptors").glob("*.npy"))) == 3
    assert [b["parts"] for b in results["builds"]] == [1, 2]
    for build in results["builds"]:
        assert 0 < build["bytes_per_image"] < 4 * dim
    rows = results["rows"]
    assert rows[0]["recall"] == 1.0
    assert rows[1]["recall"] == pytest.approx(1.0)  # NumPy exact agrees with faiss
    for row in rows:
        assert 0.0 <= row["recall"] <= 1.0
        assert row["batch_ms_per_query"] > 0 and row["single_ms"] > 0
    for method in ("IVF-PQ", "IVF-PQ + exact re-rank of top-300"):
        for build in results["builds"]:
            recalls = [
                r["recall"] for r in rows if r["method"] == method and r["build"] == build["label"]
            ]
            if recalls:
                assert recalls[-1] >= recalls[0]  # probes 32 (all lists) vs 1
    ivfpq = [r for r in rows if r["method"] == "IVF-PQ"]
    one_part = [r["recall"] for r in ivfpq if r["build"].endswith("x1")]
    two_parts = [r["recall"] for r in ivfpq if r["build"].endswith("x2")]
    assert one_part == two_parts  # one training: the merged parts return the same top-k


def test_numpy_exact_top_k_matches_sort(tmp_path):
    rng = np.random.default_rng(0)
    database = rng.standard_normal((500, 8)).astype(np.float32)
    paths = []
    for number, rows in enumerate(np.array_split(database, 3)):
        paths.append(tmp_path / f"d{number}.npy")
        np.save(paths[-1], rows)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    scores, ids = search_scale.numpy_exact_top_k(
        DescriptorFiles(paths), queries, k=10, block_rows=64
    )
    expected = np.argsort(-(queries @ database.T), axis=1)[:, :10]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ database.T, expected, 1))
