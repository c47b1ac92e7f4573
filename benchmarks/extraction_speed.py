"""Extraction throughput: MobileNetV2 + GeM at max side 224, 512, 1024; jit vs eager.

  .venv/bin/python -m benchmarks.extraction_speed [--quick]

For each size, a batch of random 4:3 images goes through backbone -> GeM -> L2 (a) op by
op without jit (how a first JAX port usually runs), and (b) as one jitted function (our
extraction kernel); both are timed after a warm-up call, and their outputs compared.
Then the whole pipeline (decode + resize + bucket + device) runs on landmarks_mini's 29
real photos through ``Extractor``, cold (compiles included) and warm.
"""

import argparse
import os
import platform
import time

import jax
import numpy as np

from benchmarks.common import DATA
from jaxretrieval import backbones, extraction, normalization, pooling
from jaxretrieval.retrieval_model import ModelConfig


def _time(fn, repeats):
    fn()  # warm-up (compiles the jitted variant)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="224 only, fewer repeats")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.default_backend()}")  # fmt: skip
    module, variables, spec = backbones.load_backbone("mobilenet_v2")

    def descriptors(images):
        _, features = module.apply(variables, images, train=False)
        return normalization.l2_normalize(pooling.gem(features[spec.feature_name], 3.0))

    jitted = jax.jit(descriptors)
    sizes = [224] if args.quick else [224, 512, 1024]
    print("| max side | batch | eager img/s | jit img/s | jit / eager | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    for size in sizes:
        images = rng.normal(size=(args.batch_size, size * 3 // 4, size, 3)).astype(np.float32)
        repeats = 1 if args.quick or size > 512 else 2
        eager_seconds, eager_out = _time(lambda: descriptors(images), repeats)  # noqa: B023
        jit_seconds, jit_out = _time(lambda: jitted(images), 3 * repeats)  # noqa: B023
        diff = float(np.max(np.abs(np.asarray(eager_out) - np.asarray(jit_out))))
        print(
            f"| {size} | {args.batch_size} | {args.batch_size / eager_seconds:.1f} "
            f"| {args.batch_size / jit_seconds:.1f} | {eager_seconds / jit_seconds:.1f}x "
            f"| {diff:.1e} |",
            flush=True,
        )
    paths = sorted((DATA / "landmarks_mini" / "images").glob("*.jpg"))
    if paths:
        print("\n| pipeline on landmarks_mini (29 photos) | max side | img/s | shapes |")
        print("| --- | --- | --- | --- |")
        for size in sizes:
            extractor = extraction.Extractor.pretrained(ModelConfig(max_side=size))
            for label in ("cold (compiles)", "warm"):
                start = time.perf_counter()
                result = extractor(paths, progress=False)
                rate = len(paths) / (time.perf_counter() - start)
                print(f"| {label} | {size} | {rate:.1f} | {len(result.compiled_shapes)} |")


if __name__ == "__main__":
    main()
