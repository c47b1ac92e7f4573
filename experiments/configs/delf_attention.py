r"""DELF stage 2, attention: only the attention head and its classifier train.

  python -m experiments.train --config experiments/configs/delf_attention.py \
      --workdir checkpoints/delf_attention_mobilenet_v2 \
      --config.model.init_checkpoint=checkpoints/delf_descriptor_mobilenet_v2

It starts from the stage-1 work directory (experiments/configs/delf_descriptor.py);
then learn the PCA: python -m experiments.delf_pca --checkpoint
checkpoints/delf_attention_mobilenet_v2 --train-csv ../shared/data/smvs_train/labels.csv
--max-images 150 --out checkpoints/delf_mobilenet_v2 (150 images x 1000 keypoints; all
736 took ~1 s per image). The ablation without fine-tuning trains the head on
the ImageNet backbone instead:

  python -m experiments.train --config experiments/configs/delf_attention.py \
      --workdir checkpoints/delf_attention_imagenet --config.delf.attention_on_imagenet=true

``:smoke`` shrinks everything for the tests (its init_checkpoint must be a smoke
stage-1 run).

The head (1x1 conv to 512, ReLU, 1x1 conv to 1, softplus) weights the L2-normalised
stage3 cells; their weighted mean feeds a dense classifier over the 293 training
scenes, trained with cross-entropy (label smoothing 0.1). The backbone is frozen (and
the head reads it through stop_gradient). Images are rescaled by U[0.5, 1] so that the
attention sees objects at several sizes, as the paper's random rescaling does.

Hardware: 2 CPU cores. 6 epochs (510 steps, forward-only backbone): 15 minutes
(2026-12-02, sharing the cores with another run). Held-out accuracy of the attention
classifier: 0.06 / 0.14 / 0.18 after epochs 2, 4, 6 on the stage-1 model; 0.02 on the
ImageNet backbone (``attention_on_imagenet``, 7 minutes on the faster code). Validation
is that accuracy on the 50 held-out photos; untuned settings.
"""

import ml_collections

from experiments.configs import delf_descriptor


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = delf_descriptor.get_config(None)
    if arg not in (None, "smoke"):
        raise ValueError(f"unknown argument {arg!r}; use none or 'smoke'")
    config.delf.stage = "attention"
    # True (and no init_checkpoint): attention on the ImageNet backbone, the ablation
    # "attention without fine-tuning" (checkpoints/delf_attention_imagenet).
    config.delf.attention_on_imagenet = False
    config.model.first_trainable = None  # unused: the backbone is frozen
    config.data.augment.min_scale = 0.5
    config.data.augment.crop_fraction = 1.0
    config.optim.num_epochs = 6
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 50
    if arg == "smoke":
        delf_descriptor.shrink_for_smoke(config)
        config.model.first_trainable = None
    return config
