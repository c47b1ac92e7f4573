"""Search a folder of your own photos with a query image.

  python -m experiments.search --images ~/Pictures/trip --query ~/Pictures/trip/IMG_0042.jpg
  python -m experiments.search --images ~/Pictures/trip --query q.jpg --checkpoint checkpoints/NAME

The query is read first (a bad query fails at once), then the folder is indexed: the
first run extracts descriptors for every image (a progress bar shows it) and saves them
in --index-dir (an interrupted run resumes); later runs reuse them and only embed the
query. Prints the ranked list and writes a picture of the results (--out), which, like
the index folder, is never indexed itself.
"""

import logging
import pathlib

import numpy as np

from experiments import cli, plotting, search_lib


def parse_args(argv=None):
    """Parses the command line."""
    parser = cli.make_parser("search", __doc__)
    parser.add_argument("--images", required=True, help="folder of photos to index (recursive)")
    parser.add_argument("--query", required=True, nargs="+", help="query image file(s)")
    parser.add_argument("--top-k", type=cli._positive_int, default=10, help="results per query")
    parser.add_argument(
        "--index-dir",
        default=None,
        help=f"where descriptors are cached (default: <images>/{search_lib.INDEX_DIR_NAME})",
    )
    parser.add_argument("--out", default="search_results.png", help="result picture (PNG)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    cli.add_model_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> list[list[str]]:
    """Checks the query, indexes the folder (or reuses the cache), ranks, draws."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if not pathlib.Path(args.images).is_dir():
        raise cli.CLIError(f"--images {args.images}: no such folder")
    for query in args.query:
        if not pathlib.Path(query).is_file():
            raise cli.CLIError(f"--query {query}: no such file")
    cli.check_output_file(args.out)
    extractor = cli.extractor_from_args(args)
    queries = extractor(args.query, strict=True, progress=False)  # fails before indexing
    index_dir = pathlib.Path(
        args.index_dir or pathlib.Path(args.images) / search_lib.INDEX_DIR_NAME
    )
    index = search_lib.FolderIndex(extractor, index_dir).build(
        args.images, exclude=[args.out], progress=not args.quiet
    )
    reused = f" (descriptors reused from {index_dir})" if index.reused else ""
    print(f"indexed {len(index.paths)} images from {args.images}{reused}")
    for path, reason in index.failures:
        print(f"  skipped {path}: {reason}")
    scores, indices = index.search(queries.descriptors, k=args.top_k)
    results = []
    for query, query_scores, query_indices in zip(args.query, scores, indices, strict=True):
        print(f"\nquery {query}")
        for rank, (score, i) in enumerate(zip(query_scores, query_indices, strict=True), 1):
            print(f"  {rank:3d}  {score:.4f}  {index.paths[i]}")
        results.append([index.paths[i] for i in query_indices])
    out = plotting.save_result_grid(
        args.query, index.paths, np.asarray(indices), args.out, top_k=args.top_k
    )
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    cli.run(main, prog="search")
