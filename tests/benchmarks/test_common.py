"""benchmarks/common.py: the memoized DSM extractor keys on pixels and the query/database role."""

import numpy as np

from benchmarks import common


class _CountingExtractor:
    feature_stride = 16

    def __init__(self):
        self.calls = []

    def __call__(self, image, *, as_query=False):
        self.calls.append(as_query)
        return ("features", float(image.mean()), as_query)

    def query_and_database_features(self, image):
        self.calls.append("both")
        return ("features", float(image.mean()), True), ("features", float(image.mean()), False)


def test_memoized_dsm_extractor_keys_on_pixels_and_role():
    inner = _CountingExtractor()
    memoized = common.MemoizedDSMExtractor(inner)
    image = np.full((8, 8, 3), 7, np.uint8)
    assert memoized(image) == ("features", 7.0, False)
    assert memoized(image.copy()) == ("features", 7.0, False)  # a hit: same pixels
    assert memoized(image, as_query=True) == ("features", 7.0, True)  # rerank_lib's query call
    assert inner.calls == [False, True]
    assert memoized.feature_stride == 16  # everything else is the extractor's


def test_memoized_dsm_extractor_shares_both_roles_with_leave_one_out():
    inner = _CountingExtractor()
    memoized = common.MemoizedDSMExtractor(inner)
    image = np.full((8, 8, 3), 3, np.uint8)
    assert memoized(image) == ("features", 3.0, False)  # split: database role only
    both = (("features", 3.0, True), ("features", 3.0, False))
    assert memoized.query_and_database_features(image) == both  # query missing: one pass
    assert memoized.query_and_database_features(image.copy()) == both  # a hit
    assert memoized(image, as_query=True) == both[0]  # filled by the pass above
    other = np.full((8, 8, 3), 4, np.uint8)
    assert memoized.query_and_database_features(other)[1] == ("features", 4.0, False)
    assert inner.calls == [False, "both", "both"]
