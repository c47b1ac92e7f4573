"""Download ROxford5k, RParis6k, R1M, SfM-120k or Google Landmarks v2 into our layouts.

  python -m experiments.download roxford5k rparis6k            # into ~/data/<name>
  python -m experiments.download roxford5k --root /data/retrieval
  python -m experiments.download gldv2-index --keep-archives
  python -m experiments.download --list                        # names, sizes, addresses

Files come from the publishers' own addresses (see --list); a broken download is retried
and a re-run resumes it (HTTP Range), extracted archives are skipped. Archives are checked
(md5 where the publisher gives one, gzip's CRC for .tar.gz) and extracted safely (no
absolute paths or '..'), then deleted unless --keep-archives. The result is checked: a
missing or corrupt file is named in a one-line error (exit status 2). ROxford5k/RParis6k
end up in the revisitop layout (gnd_<name>.pkl + jpg/) that `python -m experiments.evaluate
--data-root ~/data/roxford5k` reads. --base-url (or $JAXRETRIEVAL_DOWNLOAD_BASE_URL)
fetches https://host/path from <base-url>/host/path instead: a mirror, or a test server.
"""

import os

from experiments import cli, download_lib


def parse_args(argv=None):
    """Parses the command line."""
    parser = cli.make_parser("download", __doc__)
    names = ", ".join(download_lib.DATASETS)
    parser.add_argument("datasets", nargs="*", metavar="NAME", help=f"one or more of {names}")
    parser.add_argument(
        "--root",
        default=None,
        help=f"parent folder of the datasets (default ${download_lib.ROOT_ENV} or "
        f"{download_lib.DEFAULT_ROOT})",
    )
    parser.add_argument("--list", action="store_true", help="list the datasets and addresses")
    parser.add_argument(
        "--base-url",
        default=None,
        help=f"mirror prefix replacing https:// (default ${download_lib.BASE_URL_ENV})",
    )
    parser.add_argument("--keep-archives", action="store_true", help="keep archives after use")
    parser.add_argument(
        "--retries", type=int, default=2, help="retries of a broken download, resuming (2)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="socket timeout, s (60)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    unknown = [name for name in args.datasets if name not in download_lib.DATASETS]
    if unknown:
        parser.error(
            f"unknown dataset {unknown[0]!r}; choose from {', '.join(download_lib.DATASETS)}"
        )
    if not args.datasets and not args.list:
        parser.error("name at least one dataset, or --list")
    if args.retries < 0:
        parser.error(f"--retries must be 0 or more, found {args.retries}")
    return args


def main(argv=None) -> list[str]:
    """Downloads each named dataset; returns one summary line per dataset."""
    args = parse_args(argv)
    if args.list:
        for spec in download_lib.DATASETS.values():
            print(f"{spec.name}: {spec.description} (addresses from {spec.source})")
            for remote in spec.files:
                checksum = f"  md5: {remote.md5_url}" if remote.md5_url else ""
                print(f"  {remote.url}{checksum}")
        return []
    root = download_lib.default_root() if args.root is None else args.root
    base_url = args.base_url or os.environ.get(download_lib.BASE_URL_ENV)
    summaries = []
    for name in args.datasets:
        try:
            summary = download_lib.download_dataset(
                download_lib.DATASETS[name],
                root,
                base_url=base_url,
                keep_archives=args.keep_archives,
                retries=args.retries,
                timeout=args.timeout,
                progress=not args.quiet,
            )
        except download_lib.DownloadError as e:
            raise cli.CLIError(str(e)) from e
        print(summary)
        summaries.append(summary)
    return summaries


if __name__ == "__main__":
    cli.run(main, prog="download")
