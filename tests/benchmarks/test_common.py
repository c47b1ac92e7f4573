"""benchmarks/common.py: the memoized DSM extractor forwards the query/database role."""

import numpy as np

from benchmarks import common


class _CountingExtractor:
    feature_stride = 16

    def __init__(self):
        self.calls = []

    def __call__(self, image, *, as_query=False):
        self.calls.append(as_query)
        return ("features", float(image.mean()), as_query)


def test_memoized_dsm_extractor_keys_on_pixels_and_role():
    inner = _CountingExtractor()
    memoized = common.MemoizedDSMExtractor(inner)
    image = np.full((8, 8, 3), 7, np.uint8)
    assert memoized(image) == ("features", 7.0, False)
    assert memoized(image.copy()) == ("features", 7.0, False)  # a hit: same pixels
    assert memoized(image, as_query=True) == ("features", 7.0, True)  # rerank_lib's query call
    assert inner.calls == [False, True]
    assert memoized.feature_stride == 16  # everything else is the extractor's
