"""Data layer (host side).

* :mod:`jaxretrieval.data.images`: decoding to ``uint8`` RGB with clear errors, resizing,
  normalisation, cropping to query boxes.
* :mod:`jaxretrieval.data.datasets`: revisitop-layout ground truth (``gnd_<name>.pkl``),
  :class:`~jaxretrieval.data.datasets.RetrievalDataset`, the leave-one-out protocol.
* :mod:`jaxretrieval.data.labelled`: labelled training sets
  (:class:`~jaxretrieval.data.labelled.LabelledImages`) from a CSV, scene folders, a
  revisitop ground truth or an unlabelled folder; scene-disjoint validation splits and
  their conversion to a ``RetrievalDataset``.
* :mod:`jaxretrieval.data.tuple_mining`: training tuples (query, positive, hard
  negatives) mined from the current descriptors with faiss, cirtorch-style.
* :mod:`jaxretrieval.data.training_pipeline`: grain input pipelines (no TensorFlow):
  augmented tuples or single images as NumPy dicts, deterministic per element so that
  runs resume exactly; batching with thread prefetch; an up-front image check.
"""
