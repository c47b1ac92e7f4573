r"""Picture: CAMs of a photo's top-3 ImageNet classes and the region proposals they give.

  .venv/bin/python -m benchmarks.cam_picture [--image PATH] [--max-side 512] \
      [--out benchmarks/figures/cam_regions.png]

Panels: the photo with every proposed box (colour = class, line width = threshold), then
one panel per class: its CAM (min-max normalised) over the photo, with the boxes of the
largest connected component at each threshold (0.1, 0.2, 0.3, 0.4 of the map's maximum).
The same code as re-ranking (:meth:`jaxretrieval.cam_regions.CAMRegionExtractor.proposals`);
MobileNetV2 ImageNet weights. The default photo is RoMa's Sacre Coeur demo image (MIT,
see ../shared/data/multiview_jpg_mini/SOURCE.md); classes are ImageNet indices.
"""

import argparse
import pathlib

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from jaxretrieval import cam_regions, retrieval_model  # noqa: E402

DEFAULT_IMAGE = (
    common.DATA / "multiview_jpg_mini" / "images" / "sacre_coeur__roma_sacre_coeur_A.jpg"
)
COLORS = ("#e41a1c", "#377eb8", "#ffd92f")
THRESHOLDS = cam_regions.DEFAULT_THRESHOLDS


def draw(proposals: dict, out: pathlib.Path) -> pathlib.Path:
    """The figure of one image's :meth:`CAMRegionExtractor.proposals`."""
    image, cams = proposals["image"], proposals["cams"]
    stride = int(proposals["feature_stride"])
    num_classes = len(cams)
    fig, axes = plt.subplots(1, num_classes + 1, figsize=(4.2 * (num_classes + 1), 4.0))
    axes[0].imshow(image)
    axes[0].set_title("proposed regions")
    height, width = image.shape[:2]
    for k in range(num_classes):
        heat = cv2.resize(cams[k], (width, height), interpolation=cv2.INTER_LINEAR)
        axes[k + 1].imshow(image)
        axes[k + 1].imshow(heat, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        axes[k + 1].set_title(f"CAM of class {int(proposals['classes'][k])} (top {k + 1})")
        for t, threshold in enumerate(THRESHOLDS):
            region = 1 + k * len(THRESHOLDS) + t  # region 0 is the whole image
            if not proposals["valid"][region]:
                continue
            top, left, bottom, right = proposals["boxes"][region] * stride
            bottom, right = min(bottom, height), min(right, width)
            for ax in (axes[0], axes[k + 1]):
                ax.add_patch(
                    plt.Rectangle(
                        (left - 0.5, top - 0.5),
                        right - left,
                        bottom - top,
                        fill=False,
                        edgecolor=COLORS[k % len(COLORS)],
                        linewidth=1.0 + 1.2 * t,
                    )
                )
            axes[k + 1].text(
                left + 2, top + 12 * (t + 1), f"{threshold:g}", color="white", fontsize=7
            )
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=82)
    plt.close(fig)
    _quantize(out)
    return out


def _quantize(path: pathlib.Path, colors: int = 192) -> None:
    """Rewrites the PNG with a palette: ~8x smaller for the repository, same look."""
    from PIL import Image  # matplotlib's own dependency

    with Image.open(path) as image:
        palette = image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    palette.save(path, optimize=True)


def main(argv=None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", default=str(DEFAULT_IMAGE))
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument(
        "--out", default=str(common.REPO_ROOT / "benchmarks/figures/cam_regions.png")
    )
    args = parser.parse_args(argv)
    config = retrieval_model.ModelConfig(pooling="cam", max_side=args.max_side)
    extractor = cam_regions.CAMRegionExtractor(
        config, retrieval_model.init_model_variables(config), batch_size=1
    )
    proposals = extractor.proposals(args.image, thresholds=THRESHOLDS, num_box_classes=3)
    out = draw(proposals, pathlib.Path(args.out))
    valid = int(np.sum(proposals["valid"]))
    print(f"wrote {out}: classes {proposals['classes'].tolist()}, {valid} valid regions")
    return out


if __name__ == "__main__":
    main()
