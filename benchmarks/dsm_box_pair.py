"""Object localisation by DSM verification: the OpenCV box / box_in_scene pair.

  .venv/bin/python -m benchmarks.dsm_box_pair            # scales 1, 1/sqrt(2), 1/2
  .venv/bin/python -m benchmarks.dsm_box_pair --quick    # scale 1 only (the test: 2x)
  .venv/bin/python -m benchmarks.dsm_box_pair --out box.png   # box_x1.png, box_x2.png

box.png (the object, 324x223) is verified against box_in_scene.png (512x384) with DSM
(MobileNetV2 last conv, stride 32, at the images' own size, or ``--upscale`` times it). The
verified affine map sends the box's four corners into the scene. Both images are run at
their own size and enlarged 2x (``--upscale``): at its own size the box is only 11x7 cells
of the stride-32 map, too few blobs to pin its pose. The pair has no ground
truth, so the reference is OpenCV SIFT + Lowe's ratio test (0.75) + a RANSAC homography
(``cv2.findHomography``, 5 px): its corners are the "true" corners. Printed: inliers,
tentative correspondences, each corner under both maps and their distance in scene pixels.
A corner error of a few tens of pixels is expected: DSM's features are activation blobs of
32 px cells, and an affine map cannot follow the homography's perspective.
"""

import argparse
import pathlib
import time

import cv2
import numpy as np

from benchmarks.common import DATA, map_affine, map_homography
from experiments import match_lib
from jaxretrieval.data.images import load_image
from jaxretrieval.spatial_verification import DSMFeatureExtractor
from jaxretrieval.spatial_verification.feature_extraction import DEFAULT_SCALES


def corners(image: np.ndarray) -> np.ndarray:
    """(4, 2) outer corners (x, y) of an image: top-left, top-right, bottom-right, bottom-left."""
    height, width = image.shape[:2]
    return np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64)


def sift_homography(object_image: np.ndarray, scene_image: np.ndarray, *, ratio: float = 0.75):
    """Reference: SIFT, ratio test, RANSAC homography object -> scene; (H, inliers)."""
    sift = cv2.SIFT_create()
    grey_a = cv2.cvtColor(object_image, cv2.COLOR_RGB2GRAY)
    grey_b = cv2.cvtColor(scene_image, cv2.COLOR_RGB2GRAY)
    keypoints_a, descriptors_a = sift.detectAndCompute(grey_a, None)
    keypoints_b, descriptors_b = sift.detectAndCompute(grey_b, None)
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(descriptors_a, descriptors_b, k=2)
    good = [m for m, n in pairs if m.distance < ratio * n.distance]
    points_a = np.float32([keypoints_a[m.queryIdx].pt for m in good])
    points_b = np.float32([keypoints_b[m.trainIdx].pt for m in good])
    homography, mask = cv2.findHomography(points_a, points_b, cv2.RANSAC, 5.0)
    return homography, int(mask.sum())


def box_pair_errors(
    folder: pathlib.Path,
    *,
    scales=DEFAULT_SCALES,
    upscale: float = 1.0,
    max_features: int = 512,
    threshold_cells: float = 2.0,
) -> dict:
    """DSM vs SIFT corners of the box in the scene (scene pixels of the original image)."""
    object_image = load_image(folder / "box.png")
    scene_image = load_image(folder / "box_in_scene.png")
    homography, sift_inliers = sift_homography(object_image, scene_image)
    extractor = DSMFeatureExtractor.pretrained(
        scales=scales, max_features=max_features, pad_multiple=64
    )

    def prepared(image):
        if upscale == 1.0:
            return image
        size = (round(image.shape[1] * upscale), round(image.shape[0] * upscale))
        return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)

    match = match_lib.match_features(
        extractor(prepared(object_image)),
        extractor(prepared(scene_image)),
        error_threshold=threshold_cells * extractor.feature_stride,
    )
    # The map between the upscaled images, brought back to the original pixels.
    transform = np.array(match["transform"], np.float64)
    transform[:, 2] /= upscale
    box_corners = corners(object_image)
    dsm_corners = map_affine(transform, box_corners)
    sift_corners = map_homography(homography, box_corners)
    return {
        "num_inliers": match["num_inliers"],
        "num_tentative": match["num_tentative"],
        "sift_inliers": sift_inliers,
        "transform": transform,
        "dsm_corners": dsm_corners,
        "sift_corners": sift_corners,
        "corner_errors": np.linalg.norm(dsm_corners - sift_corners, axis=1),
        "object_image": object_image,
        "scene_image": scene_image,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA / "opencv_box_pair"))
    parser.add_argument("--quick", action="store_true", help="scale 1 only")
    parser.add_argument(
        "--upscale",
        type=float,
        nargs="+",
        default=[1.0, 2.0],
        help="enlarge both images first (at 1x the box is only 11x7 cells of the map)",
    )
    parser.add_argument("--out", default=None, help="PNG of the scene with both outlines")
    args = parser.parse_args(argv)
    scales = (1.0,) if args.quick else DEFAULT_SCALES
    for upscale in args.upscale:
        start = time.perf_counter()
        r = box_pair_errors(pathlib.Path(args.data), scales=scales, upscale=upscale)
        print(
            f"DSM (MobileNetV2, scales {', '.join(f'{s:.3f}' for s in scales)}, upscale "
            f"{upscale}): {r['num_inliers']} inliers of {r['num_tentative']} tentative; "
            f"SIFT reference: {r['sift_inliers']} RANSAC inliers; "
            f"{time.perf_counter() - start:.1f} s"
        )
        print(f"{'corner':>12s} {'DSM affine':>18s} {'SIFT homography':>18s} {'error px':>9s}")
        names = ("top-left", "top-right", "bottom-right", "bottom-left")
        for name, d, s, e in zip(
            names, r["dsm_corners"], r["sift_corners"], r["corner_errors"], strict=True
        ):
            print(f"{name:>12s} {d[0]:8.1f} {d[1]:8.1f}  {s[0]:8.1f} {s[1]:8.1f}  {e:9.1f}")
        errors = r["corner_errors"]
        diagonal = float(np.hypot(*r["object_image"].shape[:2]))
        print(
            f"corner error: mean {errors.mean():.1f} px, max {errors.max():.1f} px "
            f"(box diagonal in the object image {diagonal:.0f} px)\n"
        )
        if args.out:
            out = pathlib.Path(args.out)
            out = out.with_name(f"{out.stem}_x{upscale:g}{out.suffix}")
            picture = np.ascontiguousarray(r["scene_image"])
            for points, colour in (
                (r["sift_corners"], (0, 255, 0)),
                (r["dsm_corners"], (255, 0, 0)),
            ):
                cv2.polylines(picture, [np.round(points).astype(np.int32)], True, colour, 2)
            cv2.imwrite(str(out), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
            print(f"wrote {out} (green: SIFT homography, red: DSM affine)")


if __name__ == "__main__":
    main()
