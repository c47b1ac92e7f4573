"""Train-step and extraction throughput: ours (JAX, 1 and 4 host devices) vs PyTorch.

  .venv/bin/pip install -e ".[compare]"      # torch 2.13 CPU, used only here
  .venv/bin/python -m benchmarks.train_speed [--steps 10] [--size 224]

The same model and batch on both sides: MobileNetV2 with the torchvision ImageNet weights
(the shipped .pth, loaded by our importer for JAX and by torch.load for PyTorch), blocks
1-13 frozen (no gradient), BatchNorm on running statistics, GeM p=3 (learnable), L2,
contrastive loss (margin 0.7) on a batch of 4 tuples x 7 images at 224 x 224, AdamW.
torchvision does not import beside torch 2.13 here, so the PyTorch MobileNetV2 is written
out below (the same layers as torchvision's, and the same state-dict keys).

Extraction: MobileNetV2 + GeM descriptors of batches of 8 images at 224 x 224, jitted
JAX vs torch.inference_mode. Each measurement runs after a warm-up (compile) and reports
images per second; "N host devices" splits the same global batch over N forced host
devices (``--xla_force_host_platform_device_count=N``) on the same cores: one per core is
what ``experiments.train`` runs without an accelerator (``--cpu-devices auto``).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

BATCH_TUPLES, TUPLE_SIZE = 4, 7


def _batch(size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(BATCH_TUPLES, TUPLE_SIZE, size, size, 3)).astype(np.float32)
    scenes = np.tile(np.arange(BATCH_TUPLES)[:, None], (1, TUPLE_SIZE))
    scenes[:, 2:] += 100
    return {
        "images": images,
        "image_sizes": np.full((BATCH_TUPLES, TUPLE_SIZE, 2), size, np.int32),
        "scenes": scenes.astype(np.int32),
    }


def jax_train_images_per_second(size: int, steps: int) -> float:
    import jax

    from jaxretrieval import retrieval_model, sharding
    from jaxretrieval.retrieval_model import ModelConfig
    from jaxretrieval.training import optimizers, state, step

    config = ModelConfig(max_side=size)
    model = retrieval_model.make_model(config, freeze_batch_stats=True)
    variables = retrieval_model.init_model_variables(config)
    trainable = state.freeze_before(state.backbone_layer_names(config.spec.module()), "block14")
    optimizer = optimizers.make_optimizer(learning_rate=1e-5)
    mesh = sharding.data_mesh()
    train_state = sharding.replicate(state.init_train_state(variables, optimizer, trainable), mesh)
    train_step = step.make_train_step(
        step.tuple_batch_loss(model, step.retrieval_loss("contrastive")), optimizer, mesh=mesh
    )
    batch = jax.device_put(_batch(size), sharding.batch_sharding(mesh))
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(2):  # compile + warm-up
            train_state, metrics = train_step(train_state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            train_state, metrics = train_step(train_state, batch)
        jax.block_until_ready(metrics)
    return steps * BATCH_TUPLES * TUPLE_SIZE / (time.perf_counter() - start)


def jax_extract_images_per_second(size: int, steps: int) -> float:
    import jax

    from jaxretrieval import extraction
    from jaxretrieval.retrieval_model import ModelConfig

    extractor = extraction.Extractor.pretrained(
        ModelConfig(max_side=size), extraction.ExtractionSettings(batch_size=8)
    )
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, size, size, 3)).astype(np.float32)
    batch = [(i, 0, images[i]) for i in range(8)]
    for _ in range(2):
        extractor._run_batch(batch, size, size)
    start = time.perf_counter()
    for _ in range(steps):
        extractor._run_batch(batch, size, size)
    jax.effects_barrier()
    return steps * 8 / (time.perf_counter() - start)


# --- PyTorch, written out (torchvision's MobileNetV2 layer for layer) -------------------


def torch_mobilenet_v2():
    import torch
    from torch import nn

    def conv_bn(cin, cout, kernel=3, stride=1, groups=1, relu=True):
        layers = [
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if relu:
            layers.append(nn.ReLU6(inplace=True))
        return nn.Sequential(*layers)

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expansion):
            super().__init__()
            hidden = cin * expansion
            layers = [] if expansion == 1 else [conv_bn(cin, hidden, 1)]
            layers += [
                conv_bn(hidden, hidden, 3, stride, groups=hidden),
                nn.Conv2d(hidden, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            ]
            self.conv = nn.Sequential(*layers)
            self.use_residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.use_residual else self.conv(x)

    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]
    settings += [(6, 160, 3, 2), (6, 320, 1, 1)]
    features = [conv_bn(3, 32, stride=2)]
    cin = 32
    for expansion, cout, repeats, stride in settings:
        for i in range(repeats):
            features.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
            cin = cout
    features.append(conv_bn(cin, 1280, 1))
    model = nn.Module()
    model.features = nn.Sequential(*features)
    model.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))
    from jaxretrieval.backbones import weights

    state_dict = torch.load(weights.shipped_weights_path("mobilenet_v2"), weights_only=True)
    model.load_state_dict(state_dict)
    return model


def torch_images_per_second(size: int, steps: int, *, train: bool) -> float:
    import torch
    import torch.nn.functional as F

    model = torch_mobilenet_v2().eval()  # BatchNorm on running statistics
    p = torch.nn.Parameter(torch.tensor(3.0))
    for index, layer in enumerate(model.features):
        for parameter in layer.parameters():
            parameter.requires_grad = train and index >= 14  # blocks 14-17 + last conv
    for parameter in model.classifier.parameters():
        parameter.requires_grad = False

    def descriptors(images):
        x = model.features(images).clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
        return F.normalize(x, dim=1)

    if not train:
        images = torch.randn(8, 3, size, size)
        with torch.inference_mode():
            for _ in range(2):
                descriptors(images)
            start = time.perf_counter()
            for _ in range(steps):
                descriptors(images)
        return steps * 8 / (time.perf_counter() - start)
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": trainable}, {"params": [p], "lr": 1e-4, "weight_decay": 0.0}], lr=1e-5
    )
    batch = torch.from_numpy(_batch(size)["images"]).permute(0, 1, 4, 2, 3)

    def step():
        d = descriptors(batch.reshape(-1, 3, size, size)).reshape(BATCH_TUPLES, TUPLE_SIZE, -1)
        q = d[:, :1]
        distances = (q - d[:, 1:] + 1e-6).norm(dim=-1)
        positive = 0.5 * distances[:, 0] ** 2
        negative = 0.5 * (0.7 - distances[:, 1:]).clamp(min=0) ** 2
        loss = positive.sum() + negative.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH_TUPLES * TUPLE_SIZE / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--only", choices=["jax-train", "jax-extract"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only == "jax-train":
        print(json.dumps(jax_train_images_per_second(args.size, args.steps)))
        return
    if args.only == "jax-extract":
        print(json.dumps(jax_extract_images_per_second(args.size, args.steps)))
        return

    def in_subprocess(what: str, devices: int) -> float:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.train_speed", "--only", what]
            + ["--steps", str(args.steps), "--size", str(args.size)],
            env=env, check=True, capture_output=True, text=True,
        )  # fmt: skip
        return float(out.stdout.strip().splitlines()[-1])

    from experiments import train  # the CLI's own core count: the row it runs

    cores = train.usable_cores()
    torch_train = torch_images_per_second(args.size, args.steps, train=True)
    torch_extract = torch_images_per_second(args.size, args.steps, train=False)
    rows = [
        ("train step, JAX, 1 device", in_subprocess("jax-train", 1), torch_train),
        # What `experiments.train` runs on a CPU-only machine (--cpu-devices auto).
        (f"train step, JAX, {cores} host devices (one per core)",
         in_subprocess("jax-train", cores), torch_train),
        ("train step, JAX, 4 host devices", in_subprocess("jax-train", 4), torch_train),
        ("train step, PyTorch 2.13", torch_train, torch_train),
        ("extraction, JAX, 1 device", in_subprocess("jax-extract", 1), torch_extract),
        ("extraction, PyTorch 2.13", torch_extract, torch_extract),
    ]  # fmt: skip
    print(f"| what ({args.size} px, {args.steps} steps) | images/s | / PyTorch |")
    print("| --- | --- | --- |")
    for name, value, reference in rows:
        print(f"| {name} | {value:.1f} | {value / reference:.2f}x |")


if __name__ == "__main__":
    main()
