"""Slow, obvious float64 references for PCA whitening and learned whitening (Lw).

Written from the formulas of Jégou & Chum (ECCV 2012) and Radenović et al. (TPAMI 2018),
with explicit loops for the means and covariances and the general ``np.linalg.eig``
(not ``eigh``). The supervised reference whitens with a Cholesky factor, as cirtorch
does, instead of the symmetric inverse square root: the two differ by a rotation that
the final PCA absorbs, so agreement also checks that claim.

``supervised_whitening`` centres with the mean of all descriptors (our ``"all"``);
``whitenlearn_columns`` / ``whitenapply_columns`` transcribe cirtorch's definition
(``cirtorch/utils/whiten.py``) in its own layout, descriptors as COLUMNS ``(D, N)``: the
centre is the mean of the query columns (our ``"queries"``), and the PCA runs over every
column about that centre.
"""

import numpy as np


def _mean(x):
    total = np.zeros(x.shape[1])
    for row in x:
        total = total + row
    return total / len(x)


def _covariance(rows):
    """(1/N) sum_i r_i r_i^T over the given (already centred) rows."""
    out = np.zeros((rows.shape[1], rows.shape[1]))
    for row in rows:
        out += np.outer(row, row)
    return out / len(rows)


def _sorted_eig(matrix):
    values, vectors = np.linalg.eig(matrix)
    values, vectors = values.real, vectors.real
    order = np.argsort(-values)
    return values[order], vectors[:, order]


def pca_whitening(x, shrinkage=1.0, eps=1e-6):
    """Returns (mean, projection): rows v_k^T / lambda_k^(shrinkage / 2)."""
    x = np.asarray(x, np.float64)
    mean = _mean(x)
    covariance = _covariance(x - mean) + eps * np.eye(x.shape[1])
    values, vectors = _sorted_eig(covariance)
    projection = np.zeros((x.shape[1], x.shape[1]))
    for k in range(x.shape[1]):
        projection[k] = vectors[:, k] / values[k] ** (shrinkage / 2.0)
    return mean, projection


def supervised_whitening(x, query_idx, positive_idx, eps=1e-6):
    """Lw: whiten the matching-pair differences (Cholesky), then PCA; returns (mean, P)."""
    x = np.asarray(x, np.float64)
    mean = _mean(x)
    differences = np.stack([x[q] - x[p] for q, p in zip(query_idx, positive_idx, strict=True)])
    intra = _covariance(differences) + eps * np.eye(x.shape[1])
    whiten = np.linalg.inv(np.linalg.cholesky(intra))  # L^-1, with L L^T = C_S
    whitened = (x - mean) @ whiten.T
    _, rotation = _sorted_eig(_covariance(whitened))
    return mean, rotation.T @ whiten


def whitenlearn_columns(X, qidxs, pidxs):
    """cirtorch's Lw on columns: returns (m (D, 1), P (D, D)); no ridge (well-conditioned X).

    m = mean of X[:, q] over the pair list (a query counts once per pair);
    S = sum over pairs of (x_q - x_p)(x_q - x_p)^T / #pairs = L L^T (Cholesky);
    D = sum over ALL columns of L^-1 (x - m) (x - m)^T L^-T, eigenvectors by decreasing
    eigenvalue (general ``eig``); P = eigvec^T L^-1.
    """
    X = np.asarray(X, np.float64)
    d, n = X.shape
    m = np.zeros(d)
    for q in qidxs:
        m = m + X[:, q]
    m = m / len(qidxs)
    S = np.zeros((d, d))
    for q, p in zip(qidxs, pidxs, strict=True):
        diff = X[:, q] - X[:, p]
        S += np.outer(diff, diff)
    S = S / len(qidxs)
    L_inv = np.linalg.inv(np.linalg.cholesky(S))
    scatter = np.zeros((d, d))
    for j in range(n):
        y = L_inv @ (X[:, j] - m)
        scatter += np.outer(y, y)
    _, eigvec = _sorted_eig(scatter)
    return m[:, None], eigvec.T @ L_inv


def whitenapply_columns(X, m, P, dimensions=None):
    """cirtorch's apply on columns: P[:dim] (X - m), each column / (its norm + 1e-6)."""
    X = np.asarray(X, np.float64)
    dimensions = P.shape[0] if dimensions is None else dimensions
    out = np.zeros((dimensions, X.shape[1]))
    for j in range(X.shape[1]):
        y = P[:dimensions] @ (X[:, j] - m[:, 0])
        out[:, j] = y / (np.linalg.norm(y) + 1e-6)
    return out


def apply(mean, projection, x, dim=None):
    """L2-normalised ((x - mean) @ projection[:dim].T), row by row."""
    dim = projection.shape[0] if dim is None else dim
    out = []
    for row in np.asarray(x, np.float64):
        y = projection[:dim] @ (row - mean)
        out.append(y / max(np.linalg.norm(y), 1e-6))
    return np.stack(out)
