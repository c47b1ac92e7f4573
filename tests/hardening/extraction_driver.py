"""A small extraction run for the interruption test: ``extract_cached`` in chunks of 4.

  python -m tests.hardening.extraction_driver --images DIR --out FILE.npz

Prints ``extracted <n>`` for every chunk it computes and ``saved <n>`` after every
atomic save of its progress. After the first save that reaches ``--hold-at`` images it
waits (up to two minutes) for the test's signal, so the signal lands between two saves
however slowly the test reads this output on a loaded machine. Runs through
``experiments.cli.run`` exactly as the CLIs do: Ctrl-C exits with status 130 and one line.
SIGINT gets Python's default handler back first: a test run started in the background of
a non-interactive shell (``bash .ci/run &``) inherits SIGINT ignored, and the signal
would then never reach the driver.
"""

import argparse
import logging
import signal
import sys
import time

from experiments import cli, search_lib
from jaxretrieval import extraction
from jaxretrieval.retrieval_model import ModelConfig


def main(argv=None) -> extraction.ExtractionResult:
    """Extracts with progress saved every 4 images."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--hold-at", type=int, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # see the module docstring
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    save, extract_chunk = extraction.save_descriptors, extraction.Extractor._extract_chunk

    def save_and_report(path, result, key):
        save(path, result, key)
        print(f"saved {len(result.paths)}", flush=True)
        if args.hold_at is not None and len(result.paths) >= args.hold_at:
            time.sleep(120)  # the test signals this process now

    def extract_and_report(self, paths, *rest):
        result = extract_chunk(self, paths, *rest)
        print(f"extracted {len(paths)}", flush=True)
        return result

    extraction.save_descriptors = save_and_report
    extraction.Extractor._extract_chunk = extract_and_report
    extractor = extraction.Extractor.pretrained(ModelConfig(max_side=32))
    paths, _ = search_lib.list_images(args.images)
    result = extraction.extract_cached(
        extractor, paths, cache_file=args.out, chunk_images=4, progress=False
    )
    print(f"done {len(result.paths)}", flush=True)
    return result


if __name__ == "__main__":
    cli.run(main, prog="extract")
