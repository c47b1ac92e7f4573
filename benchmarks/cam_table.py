r"""CAM class-weighted descriptors (Jimenez et al. BMVC17): the N_c sweep and region re-ranking.

  .venv/bin/python -m benchmarks.cam_table [--max-side 512] [--quick] [--json out.json]

Model: the ImageNet MobileNetV2 (torchvision weights), its last conv map (1280 channels)
and its classifier. The descriptor is the paper's aggregation: for each of an image's
N_c most probable classes, the CAM-weighted sum of the features times CroW's channel
weights (:func:`jaxretrieval.pooling.cam_weighted`); each class vector is L2-normalised,
PCA-whitened, L2-normalised again, summed over the N_c classes and L2-normalised
(:func:`jaxretrieval.pooling.cam_aggregate`). The PCA (512 dimensions, as the paper) is
learned on ANOTHER set, smvs_train: the top --pca-classes class vectors of its 736 images
(8 x 736 = 5,888 vectors for 1,280 dimensions; the paper learns on the top class of 5-6k
Oxford/Paris images for VGG's 512). Never on an evaluation set.

Table 1 (the paper's N_c table): N_c in {1, 8, 32, 64}, with and without PCA, revisited
Medium mAP of each set's own split and of leave-one-out, and the extraction time per
image: file to descriptor (decoding, backbone, CAMs, pooling, PCA), measured after
compiling on --timing-images images of landmarks_mini, batch 1, best of 3 passes;
"backbone only" is the same pipeline with a trivial pooling.

Table 2 (re-ranking, N_c = --region-classes): region proposals from each database image's
top-3 CAMs at thresholds 0.1-0.4 of their maximum, plus the whole image
(:class:`jaxretrieval.cam_regions.CAMRegionExtractor`), each region described by the same
pooling and PCA as the global descriptor; rows: the global ranking, QE alone (the top K
global descriptors, no regions), region re-ranking of the top L = 100, and regions + QE
with K = 10 (the paper's) and K = 2 (small sets: 1-12 images per scene here). The
experiments' ``--rerank cam-regions`` runs the same functions.

--quick: landmarks_mini only, 128 px, PCA from 40 smvs_train images, N_c in {1, 8},
2 timing images: checks that everything runs, the numbers mean nothing.
"""

import pathlib

import jax
import numpy as np

from benchmarks import common
from jaxretrieval import cam_regions, pooling, retrieval_model, whitening
from jaxretrieval.data import datasets, labelled
from jaxretrieval.normalization import l2_normalize

SETS = ("smvs_eval", "poznan_buildings", "landmarks_mini", "multiview_jpg_mini")
NUM_CLASSES = (1, 8, 32, 64)
EXPANSIONS = {"R": 0, "R+QE10": 10, "R+QE2": 2}


def parse_args(argv=None):
    parser = common.table_parser(__doc__, quick="landmarks_mini at 128 px, tiny PCA set")
    parser.set_defaults(max_side=512)
    parser.add_argument("--pca-classes", type=int, default=8, help="class vectors per image")
    parser.add_argument("--pca-dim", type=int, default=512)
    parser.add_argument("--region-classes", type=int, default=32, help="N_c for table 2")
    parser.add_argument("--shortlist", type=int, default=100, help="L, images re-ranked")
    parser.add_argument("--timing-images", type=int, default=8)
    parser.add_argument("--json", default=None, help="write every number here")
    return parser.parse_args(argv)


class Model:
    """The ImageNet MobileNetV2 with its classifier, and the per-class vector function."""

    def __init__(self, max_side: int, batch_size: int = 4):
        self.config = retrieval_model.ModelConfig(pooling="cam", max_side=max_side)
        self.variables = retrieval_model.init_model_variables(self.config)
        classifier = self.variables["params"]["backbone"]["classifier"]
        self.kernel, self.bias = classifier["kernel"], classifier["bias"]
        self.extractor = cam_regions.CAMRegionExtractor(
            self.config, self.variables, batch_size=batch_size
        )
        self._vector_fns = {}

    def class_vectors(self, features, valid, num_classes: int):
        """``(B, N_c, C)`` CAM-weighted vectors of each image's top N_c classes."""
        return pooling.cam_weighted(
            features, self.kernel, num_classes=num_classes, classifier_bias=self.bias, valid=valid
        )

    def class_vectors_fn(self, num_classes: int):
        """``(features, valid) -> (B, N_c, C)`` L2-normalised class vectors (cached)."""
        if num_classes not in self._vector_fns:

            def fn(features, valid):
                return l2_normalize(self.class_vectors(features, valid, num_classes))

            self._vector_fns[num_classes] = fn
        return self._vector_fns[num_classes]

    def descriptor_fn(self, num_classes: int, pca: whitening.Whitening | None, dim: int | None):
        """``(features, valid) -> (B, D)``: the paper's descriptor of N_c classes."""

        def fn(features, valid):
            vectors = self.class_vectors(features, valid, num_classes)
            return pooling.cam_aggregate(vectors, whitening=pca, dim=dim)

        return fn


def aggregate(vectors: np.ndarray, num_classes: int, pca, dim) -> np.ndarray:
    """Host twin of the descriptor: the first N_c of precomputed class vectors."""
    return np.asarray(
        jax.jit(pooling.cam_aggregate, static_argnames="dim")(
            vectors[:, :num_classes], whitening=pca, dim=dim
        )
    )


def learn_pca(model: Model, args, paths) -> tuple[whitening.Whitening, int]:
    vectors, failures = model.extractor.map_images(
        paths, model.class_vectors_fn(args.pca_classes), progress=not args.quick
    )
    if failures:
        raise RuntimeError(f"unreadable training images: {failures[:3]}")
    rows = vectors.reshape(-1, vectors.shape[-1])  # (N * P, C)
    dim = min(args.pca_dim, len(rows) - 1, rows.shape[1])
    return whitening.learn_pca_whitening(rows, dim=dim), dim


def time_per_image(model: Model, paths, fns: dict, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per image of each pooling function, file to descriptor, batch 1.

    The best of ``repeats`` passes after a compiling one (the machine is shared).
    """
    timer = cam_regions.CAMRegionExtractor(model.config, model.variables, batch_size=1)
    out = {}
    for name, fn in fns.items():
        timer.map_images(paths, fn)  # compiles every shape
        seconds, _ = common.best_time(lambda fn=fn: timer.map_images(paths, fn), repeats)
        out[name] = 1000 * seconds / len(paths)
    return out


def evaluate(queries, database, loo, dataset, gnd_loo) -> tuple[float, float]:
    split_ranks = np.argsort(-(queries @ database.T), axis=1, kind="stable")
    loo_ranks = np.argsort(-(loo @ loo.T), axis=1, kind="stable")
    return common.medium_map(split_ranks, dataset.gnd), common.medium_map(loo_ranks, gnd_loo)


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.max_side, args.timing_images = 128, 2
    sets = ("landmarks_mini",) if args.quick else SETS
    counts = (1, 8) if args.quick else NUM_CLASSES
    region_classes = min(args.region_classes, max(counts))
    data = pathlib.Path(args.data)
    model = Model(args.max_side)

    train = labelled.from_csv(data / "smvs_train" / "labels.csv")
    train_paths = list(train.paths)[: 40 if args.quick else None]
    pca, dim = learn_pca(model, args, train_paths)
    results = {"settings": {**vars(args), "pca_dim_used": dim, "pca_images": len(train_paths)}}

    # Regions described by the paper's pooling: N_c classes and the same PCA.
    region_extractor = cam_regions.CAMRegionExtractor(
        model.config, model.variables, pool=model.descriptor_fn(region_classes, pca, dim)
    )
    table1 = {f"N_c={n}{suffix}": [] for n in counts for suffix in ("", " +PCA")}
    table2 = {"global": [], "QE10 (no regions)": [], **{k: [] for k in EXPANSIONS}}
    for name in sets:
        dataset = datasets.load_dataset(data / name)
        loo_paths, gnd_loo = datasets.leave_one_out(dataset)
        num_queries = dataset.num_queries
        top = max(counts)
        vectors, _ = model.extractor.map_images(
            loo_paths, model.class_vectors_fn(top), progress=not args.quick
        )
        query_vectors, _ = model.extractor.map_images(
            dataset.query_paths, model.class_vectors_fn(top), boxes=dataset.query_boxes
        )
        for n in counts:
            for suffix, w, d in (("", None, None), (" +PCA", pca, dim)):
                loo = aggregate(vectors, n, w, d)
                queries = aggregate(query_vectors, n, w, d)
                table1[f"N_c={n}{suffix}"] += evaluate(
                    queries, loo[num_queries:], loo, dataset, gnd_loo
                )

        # Table 2: region re-ranking with the PCA descriptor of region_classes classes.
        loo = aggregate(vectors, region_classes, pca, dim)
        queries = aggregate(query_vectors, region_classes, pca, dim)
        regions = region_extractor(loo_paths, progress=not args.quick)
        gap = float(np.abs(regions.descriptors[:, 0] - loo).max())
        results.setdefault("region0_vs_global_max_abs", {})[name] = gap
        database_regions = regions._replace(
            descriptors=regions.descriptors[num_queries:], valid=regions.valid[num_queries:]
        )
        split = (queries, loo[num_queries:], database_regions)
        whole = (loo, loo, regions)
        shortlist = args.shortlist
        table2["global"] += evaluate(queries, loo[num_queries:], loo, dataset, gnd_loo)
        for label, expansion, use_regions in (
            ("QE10 (no regions)", 10, False),
            *((k, v, True) for k, v in EXPANSIONS.items()),
        ):
            scores = []
            for (q, x, r), exclude, gnd in (
                (split, None, dataset.gnd),
                (whole, np.arange(len(loo)), gnd_loo),
            ):
                if not use_regions:  # one "region" per image: its global descriptor
                    r = cam_regions.RegionDescriptors(
                        x[:, None], np.ones((len(x), 1), bool), None, None, None, [], []
                    )
                ranks = cam_regions.rerank_with_regions(
                    q, x, r, shortlist_size=shortlist, num_expansion=expansion, exclude=exclude
                )
                scores.append(common.medium_map(ranks, gnd))
            table2[label] += scores

    timing = time_per_image(
        model,
        sorted((data / "landmarks_mini" / "images").glob("*.jpg"))[: args.timing_images],
        {  # backbone last: the first function timed also pays the warm-up of the files
            **{f"N_c={n} +PCA": model.descriptor_fn(n, pca, dim) for n in counts},
            "backbone only": lambda features, valid: features[:, 0, 0, :1],
        },
    )
    header = ["descriptor"] + [f"{s} {p}" for s in sets for p in ("split", "LOO")]
    print(f"\nCAM descriptors, MobileNetV2 at max side {args.max_side}; PCA on smvs_train")
    rows = [
        [label, *cells, f"{timing[label]:.0f}" if label in timing else ""]
        for label, cells in table1.items()
    ]
    rows.append(["backbone only", *[""] * (len(header) - 1), f"{timing['backbone only']:.0f}"])
    print(common.markdown_table(header + ["ms/image"], rows))
    print(
        f"\nCAM region re-ranking, N_c={region_classes} +PCA, L={args.shortlist}, regions: "
        "whole image + top-3 CAMs x thresholds 0.1/0.2/0.3/0.4"
    )
    print(common.markdown_table(header, [[label, *cells] for label, cells in table2.items()]))
    results.update({"sets": list(sets), "table1": table1, "table2": table2, "ms_per_image": timing})
    common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
