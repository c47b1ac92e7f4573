"""Speed and accuracy of DSM verification of a shortlist against per-pair RANSAC loops.

Every contender gets the same tentative correspondences: a synthetic shortlist of pairs,
each with ~300 correspondences of which 10-50% are inliers of a random up-right affine map
(2 px Gaussian noise on the centres, 10% noise on the ellipse shapes) and the rest random.
The contenders:

  ours-batched   ``jax.jit(jax.vmap(ransac_affine))`` over the whole shortlist at once:
                 every correspondence is a hypothesis (deterministic), 1 LO refit.
  ours-batched-H the same with a hypothesis budget: only the first H (=128) correspondences
                 become hypotheses, scored against all of them.
  ours-loop      the same ``ransac_affine`` jitted, called per pair in a Python loop.
  cv2            ``cv2.estimateAffine2D`` (RANSAC, 2000 iterations, confidence 0.99) per pair.
  skimage        ``skimage.measure.ransac`` with ``AffineTransform`` per pair (as DELF's
                 re-ranking; 1000 trials).

cv2 and skimage use only the point correspondences; ours also uses the ellipse shapes
(one correspondence fixes an up-right affine map). All use the same inlier threshold.
Inlier recall and precision are against the synthetic ground truth.

    .venv/bin/python -m benchmarks.verification_speed            # 100 pairs (skimage on 20)
    .venv/bin/python -m benchmarks.verification_speed --quick    # 20 pairs (skimage on 5)

Times are the best of --repeats runs after one warm-up (compile) run.
"""

import argparse
import os
import platform
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import best_time
from jaxretrieval.spatial_verification.ransac import ransac_affine


def synthetic_shortlist(num_pairs, num_correspondences, *, seed=0, noise=2.0, size=1024.0):
    """Correspondence sets (K, P, ...) with a ground-truth inlier mask (K, P)."""
    rng = np.random.default_rng(seed)
    k, p = num_pairs, num_correspondences
    means_a = rng.uniform(0, size, (k, p, 2))
    means_b = rng.uniform(0, size, (k, p, 2))
    angles = rng.uniform(0, np.pi, (k, p))
    axes = rng.uniform(100.0, 2000.0, (k, p, 2))
    rot = np.stack(
        [
            np.stack([np.cos(angles), -np.sin(angles)], -1),
            np.stack([np.sin(angles), np.cos(angles)], -1),
        ],
        -2,
    )  # (K, P, 2, 2)
    covs_a = np.einsum("kpij,kpj,kplj->kpil", rot, axes, rot)  # (K, P, 2, 2)
    covs_b = np.einsum("kpij,kpj,kplj->kpil", rot, rng.permutation(axes, axis=1), rot)
    truth = np.zeros((k, p), bool)
    for pair in range(k):
        num_in = int(rng.uniform(0.1, 0.5) * p)
        scale = rng.uniform(0.6, 1.6)
        linear = np.array([[scale * rng.uniform(0.8, 1.25), 0.0], [rng.uniform(-0.3, 0.3), scale]])
        translation = rng.uniform(-200, 200, 2)
        idx = rng.choice(p, num_in, replace=False)
        truth[pair, idx] = True
        means_b[pair, idx] = (
            means_a[pair, idx] @ linear.T + translation + rng.normal(0, noise, (num_in, 2))
        )
        shape_noise = np.eye(2) + 0.1 * rng.normal(size=(num_in, 2, 2))  # (n, 2, 2)
        mapped = np.einsum("ij,njk,lk->nil", linear, covs_a[pair, idx], linear)
        covs_b[pair, idx] = np.einsum("nij,njk,nlk->nil", shape_noise, mapped, shape_noise)
    arrays = [x.astype(np.float32) for x in (means_a, covs_a, means_b, covs_b)]
    return arrays, truth


def recall_precision(found, truth):
    hits = np.sum(found & truth)
    return hits / max(truth.sum(), 1), hits / max(found.sum(), 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 pairs, skimage on 5")
    parser.add_argument("--pairs", type=int, default=None, help="shortlist size (default 100)")
    parser.add_argument("--skimage-pairs", type=int, default=None)
    parser.add_argument("--correspondences", type=int, default=300)
    parser.add_argument("--threshold", type=float, default=8.0, help="inlier distance, px")
    parser.add_argument("--refinement-steps", type=int, default=3, help="LO refits (ours)")
    parser.add_argument("--max-hypotheses", type=int, default=128, help="budget variant H")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    num_pairs = args.pairs or (20 if args.quick else 100)
    skimage_pairs = args.skimage_pairs or (5 if args.quick else 20)
    arrays, truth = synthetic_shortlist(num_pairs, args.correspondences)
    valid = np.ones(truth.shape, bool)
    threshold = args.threshold
    steps = args.refinement_steps
    rows = []

    # ours, batched over the shortlist.
    batched = jax.jit(
        jax.vmap(
            lambda a, b, c, d, v: ransac_affine(
                a, b, c, d, v, error_threshold=threshold, refinement_steps=steps
            )
        )
    )
    device_arrays = [jnp.asarray(x) for x in (*arrays, valid)]
    jax.block_until_ready(batched(*device_arrays))  # compile

    def run_batched():
        return jax.block_until_ready(batched(*device_arrays))

    seconds, out = best_time(run_batched, args.repeats)
    rows.append(("ours-batched", num_pairs, seconds, np.asarray(out.inlier_mask), truth))

    # ours, batched, with a hypothesis budget (the first H correspondences).
    budget = jax.jit(
        jax.vmap(
            lambda a, b, c, d, v: ransac_affine(
                a,
                b,
                c,
                d,
                v,
                error_threshold=threshold,
                refinement_steps=steps,
                max_hypotheses=args.max_hypotheses,
            )
        )
    )
    jax.block_until_ready(budget(*device_arrays))  # compile
    seconds, out = best_time(lambda: jax.block_until_ready(budget(*device_arrays)), args.repeats)
    rows.append(
        (
            f"ours-batched-H{args.max_hypotheses}",
            num_pairs,
            seconds,
            np.asarray(out.inlier_mask),
            truth,
        )
    )

    # ours, jitted per pair in a Python loop.
    single = jax.jit(
        lambda a, b, c, d, v: ransac_affine(
            a, b, c, d, v, error_threshold=threshold, refinement_steps=steps
        )
    )
    jax.block_until_ready(single(*(x[0] for x in device_arrays)))  # compile

    def run_loop():
        return [
            np.asarray(single(*(x[k] for x in device_arrays)).inlier_mask) for k in range(num_pairs)
        ]

    seconds, out = best_time(run_loop, args.repeats)
    rows.append(("ours-loop", num_pairs, seconds, np.stack(out), truth))

    # OpenCV RANSAC per pair.
    import cv2

    def run_cv2():
        masks = []
        for k in range(num_pairs):
            _, inliers = cv2.estimateAffine2D(
                arrays[0][k],
                arrays[2][k],
                method=cv2.RANSAC,
                ransacReprojThreshold=threshold,
                maxIters=2000,
                confidence=0.99,
            )
            masks.append(
                np.zeros(truth.shape[1], bool) if inliers is None else inliers[:, 0].astype(bool)
            )
        return masks

    seconds, out = best_time(run_cv2, args.repeats)
    rows.append(("cv2.estimateAffine2D", num_pairs, seconds, np.stack(out), truth))

    # scikit-image RANSAC per pair (DELF's re-ranking), on fewer pairs: it is slow.
    from skimage.measure import ransac as skimage_ransac
    from skimage.transform import AffineTransform

    def run_skimage():
        masks = []
        for k in range(skimage_pairs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, inliers = skimage_ransac(
                    (arrays[0][k].astype(np.float64), arrays[2][k].astype(np.float64)),
                    AffineTransform,
                    min_samples=3,
                    residual_threshold=threshold,
                    max_trials=1000,
                    rng=0,
                )
            masks.append(np.zeros(truth.shape[1], bool) if inliers is None else inliers)
        return masks

    seconds, out = best_time(run_skimage, 1)
    rows.append(
        ("skimage.measure.ransac", skimage_pairs, seconds, np.stack(out), truth[:skimage_pairs])
    )

    print(
        f"DSM verification: {num_pairs} pairs x {args.correspondences} correspondences, "
        f"threshold {threshold} px; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__} on {jax.default_backend()}"
    )
    header = (
        f"{'contender':24s} {'pairs':>5s} {'seconds':>9s} {'pairs/s':>10s} "
        f"{'recall':>7s} {'precision':>9s}"
    )
    print(header)
    throughput = {}
    for name, pairs, seconds, found, expected in rows:
        recall, precision = recall_precision(found, expected)
        throughput[name] = pairs / seconds
        print(
            f"{name:24s} {pairs:5d} {seconds:9.4f} {pairs / seconds:10.1f} "
            f"{recall:7.3f} {precision:9.3f}"
        )
    ours = throughput["ours-batched"]
    print("ratios (ours-batched throughput / contender):")
    for name in ("ours-loop", "cv2.estimateAffine2D", "skimage.measure.ransac"):
        print(f"  vs {name:24s} {ours / throughput[name]:10.1f}x")
    ours_h = throughput[f"ours-batched-H{args.max_hypotheses}"]
    print(f"ratios (ours-batched-H{args.max_hypotheses} throughput / contender):")
    for name in ("ours-loop", "cv2.estimateAffine2D", "skimage.measure.ransac"):
        print(f"  vs {name:24s} {ours_h / throughput[name]:10.1f}x")


if __name__ == "__main__":
    main()
