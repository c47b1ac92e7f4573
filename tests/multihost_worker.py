"""One process of tests/test_multihost.py: extraction and one training step, then results.

  JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \
      python -m tests.multihost_worker --images LIST.json --workdir DIR --out FILE.json

Without the JAX_* variables it is the single-process reference. Writes a JSON file with
what this process saw: the gathered descriptors (as lists), valid mask, failures, and
the training result.
"""

import argparse
import json
import pathlib


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", required=True, help="JSON list of image paths")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from jaxretrieval import sharding

    sharding.initialize_distributed()  # from the environment; before any JAX computation
    import jax

    from experiments import train_lib
    from experiments.configs import smoke
    from jaxretrieval import extraction
    from jaxretrieval.retrieval_model import ModelConfig

    paths = json.loads(pathlib.Path(args.images).read_text())
    extractor = extraction.Extractor.pretrained(
        ModelConfig(max_side=64), extraction.ExtractionSettings(batch_size=2)
    )
    described = extraction.extract_across_processes(extractor, paths, progress=False)

    config = smoke.get_config()
    config.mining.num_tuples = 4  # one step of 4 tuples
    config.model.first_trainable = "last_conv"  # a small backward pass: a quick compile
    config.data.validation_fraction = 0.0
    config.eval.every_steps = 1000
    config.lock()
    trained = train_lib.train_and_evaluate(config, args.workdir)

    pathlib.Path(args.out).write_text(
        json.dumps(
            {
                "process_index": jax.process_index(),
                "process_count": jax.process_count(),
                "devices": jax.device_count(),
                "descriptors": described.descriptors.tolist(),
                "valid": described.valid.tolist(),
                "failures": described.failures,
                "step": trained["step"],
                "loss": trained["loss"],
            }
        )
    )


if __name__ == "__main__":
    main()
