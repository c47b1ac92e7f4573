"""Extract global descriptors for a dataset folder or any folder of images.

  python -m experiments.extract --data-root ../shared/data/landmarks_mini --out lm.npz
  python -m experiments.extract --images ~/Pictures --out pictures.npz --multi-scale
  python -m experiments.extract --images ~/Pictures --out p.npz --checkpoint checkpoints/NAME

Writes an .npz with `descriptors` (N, D) float32 L2-normalised rows, `paths` (N,), `valid`
(N,) and `failures`. Unreadable images are reported and skipped (their row is zero and
valid is False) unless --strict is given. Running again with the same images, model,
weights and settings reuses the saved file (and says so); an interrupted run resumes.
"""

import logging

from experiments import cli, evaluate, search_lib
from jaxretrieval import extraction
from jaxretrieval.data import datasets


def parse_args(argv=None):
    """Parses the command line."""
    parser = cli.make_parser("extract", __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-root", help="dataset folder (revisitop layout): all its images")
    source.add_argument("--images", help="any folder of images (recursive)")
    parser.add_argument("--out", required=True, help="output .npz file")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad image")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    cli.add_model_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> extraction.ExtractionResult:
    """Extracts and saves the descriptors."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    cli.check_output_file(args.out)
    skipped: list[tuple[str, str]] = []
    if args.data_root:
        paths, _ = datasets.leave_one_out(evaluate.load_dataset(args.data_root))
    else:
        paths, skipped = search_lib.list_images(args.images, exclude=[args.out])
    extractor = cli.extractor_from_args(args)
    result = extraction.extract_cached(
        extractor, paths, cache_file=args.out, strict=args.strict, progress=not args.quiet
    )
    if result.reused_from:
        print(f"reused {result.reused_from}: same images, model, weights and settings")
    print(f"{int(result.valid.sum())} descriptors of dimension {result.descriptors.shape[1]}")
    failures = skipped + result.failures
    if failures:
        print(f"{len(failures)} images could not be read and were skipped:")
        for path, reason in failures:
            print(f"  {path}: {reason}")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    cli.run(main, prog="extract")
