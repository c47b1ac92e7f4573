"""Slow, obvious references for CAM region proposals and region re-ranking (loops, float64)."""

import numpy as np


def largest_component_box(mask):
    """Flood fill with 8-connectivity; the largest component (first met in raster order)."""
    mask = np.asarray(mask, bool)
    height, width = mask.shape
    seen = np.zeros_like(mask)
    best = None  # (area, box)
    for i in range(height):
        for j in range(width):
            if not mask[i, j] or seen[i, j]:
                continue
            stack, cells = [(i, j)], []
            seen[i, j] = True
            while stack:
                y, x = stack.pop()
                cells.append((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, x + dx
                        inside = 0 <= ny < height and 0 <= nx < width
                        if inside and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
            ys, xs = zip(*cells, strict=True)
            box = (min(ys), min(xs), max(ys) + 1, max(xs) + 1)
            if best is None or len(cells) > best[0]:
                best = (len(cells), box)
    return None if best is None else best[1]


def region_rerank(queries, database, regions, valid, shortlist_size, num_expansion, exclude=None):
    """Per query: global order, best-region re-scoring of the shortlist, then QE."""
    queries, database = np.asarray(queries, np.float64), np.asarray(database, np.float64)
    regions = np.asarray(regions, np.float64)
    num_database, num_regions, _ = regions.shape
    all_ranks = []
    for i, query in enumerate(queries):
        scores = [float(query @ database[n]) for n in range(num_database)]
        if exclude is not None:
            scores[exclude[i]] = -np.inf
        order = sorted(range(num_database), key=lambda n: (-scores[n], n))
        shortlist = order[:shortlist_size]
        best = {}
        for n in shortlist:
            candidates = [
                (float(query @ regions[n, r]), r) for r in range(num_regions) if valid[n, r]
            ]
            # max() keeps the first of equal scores, as argmax does.
            best[n] = max(candidates, key=lambda c: c[0]) if candidates else (scores[n], None)
        reordered = sorted(shortlist, key=lambda n: -best[n][0])  # stable: global order on ties
        ranks = reordered + order[shortlist_size:]
        if num_expansion:
            expanded = query.copy()
            for n in reordered[:num_expansion]:
                region = best[n][1]
                expanded += database[n] if region is None else regions[n, region]
            expanded /= np.linalg.norm(expanded)
            scores = [float(expanded @ database[n]) for n in range(num_database)]
            if exclude is not None:
                scores[exclude[i]] = -np.inf
            ranks = sorted(range(num_database), key=lambda n: (-scores[n], n))
        all_ranks.append(ranks)
    return np.array(all_ranks)
