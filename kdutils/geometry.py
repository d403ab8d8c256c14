"""Per-layer feature geometry: class-balanced sampling, cosine / norm / distance statistics from one Gram matrix,
class-wise PCA spectra (embedding dimension, SVD entropy), a 2-D PCA projection and a linear probe.

Everything here works on plain tensors (features of one layer, flattened per sample). `kdutils.kq` combines the
statistics into the knowledge-quality terms (METHOD.md section 3) and drives the per-layer feature extraction.

Numerics (documented choices):
- the n x n Gram matrix G = F F^T is computed once, in the features' dtype (float32 for model features), and
  gives all cosines and an approximate distance matrix d2 = |f_i|^2 + |f_j|^2 - 2 G_ij; norms are float64;
- float32 distances from a Gram suffer cancellation, so for each class the closest cross-class pair is found
  exactly: every pair whose d2 lies within the rounding bound of G (|error| <= D*u*|f_i||f_j|, u = unit roundoff)
  of the smallest upper bound is recomputed in float64 directly from the two feature vectors;
- class spectra are the eigenvalues of the centred class Gram (or of the D x D scatter matrix when the layer is
  narrower than the class), computed from explicitly centred features (mean in float64, so identical samples
  centre to exact zeros), eigen-decomposed in float64 and truncated to the rank bound min(n_c - 1, D);
- the cosine of a zero vector with anything is defined as 0; a class whose samples are identical has a zero
  spectrum, embedding dimension 0 and entropy 0 (convention 0 * log 0 = 0).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from kdutils.precision import Precision, autocast, batch_to, precision_for

MAX_DIM = 262_144          # flattened size above which a 4-D map is max-pooled first (upstream iMaxDimension)
VARIANCE_THRESHOLD = 0.95  # cumulative explained variance that defines a class's embedding dimension
_CHUNK_ELEMS = 1 << 22     # elements per float64 temporary in chunked loops (32 MiB)
_GRAM_ROW_ELEMS = 1 << 19  # elements per (rows x n) float64 slice of the Gram in gram_statistics (4 MiB each)


@dataclass(frozen=True)
class Sample:
    """A seeded class-balanced sample: nested per-class prefixes A (geometry) and B (class spectra).

    `index` lists the union of A and B as rows of the labels it was drawn from, grouped by class (classes in
    ascending order), each class in the order of its seeded permutation; `rows_a` / `rows_b` are positions in
    `index`. `codes` are the class codes 0..C-1 of the union rows; `classes` the original label of each code.
    """

    seed: int
    classes: np.ndarray     # (C,) original label values, ascending
    index: np.ndarray       # (U,) int64 rows of the source labels (union of A and B)
    codes: np.ndarray       # (U,) int64 class code of each union row
    rows_a: np.ndarray      # (n_A,) positions in `index` of subset A
    rows_b: np.ndarray      # (n_B,) positions in `index` of subset B
    count_a: np.ndarray     # (C,) samples per class in A
    count_b: np.ndarray     # (C,) samples per class in B

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.classes)

    @property
    def n_a(self) -> int:
        """Size of subset A."""
        return len(self.rows_a)

    @property
    def n_b(self) -> int:
        """Size of subset B."""
        return len(self.rows_b)

    @property
    def width(self) -> int:
        """Padded width of the class spectra: the largest class in B."""
        return int(self.count_b.max())

    def info(self) -> dict:
        """Seed and sample sizes as plain Python values (recorded in every result)."""
        return {"seed": self.seed, "num_classes": self.num_classes, "n_a": self.n_a, "n_b": self.n_b,
                "count_a": self.count_a.tolist(), "count_b": self.count_b.tolist()}


def class_balanced_sample(labels: torch.Tensor | np.ndarray | Sequence[int], max_samples: int = 5000,
                          per_class: int = 500, seed: int = 0) -> Sample:
    """Seeded nested class-balanced sample: A = first floor(max_samples / C), B = first per_class of each class.

    One permutation per class (ascending class order) is drawn from a torch.Generator seeded with `seed`; a class
    with fewer samples than a cap contributes all of them. A class needs at least 2 samples in A.
    """
    y = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
    if y.size == 0:
        raise ValueError("class_balanced_sample got no labels.")
    if max_samples < 1 or per_class < 1:
        raise ValueError(f"max_samples and per_class must be >= 1, got {max_samples} and {per_class}.")
    classes, counts = np.unique(y, return_counts=True)
    cap_a = max_samples // len(classes)
    if cap_a < 2:
        raise ValueError(f"max_samples={max_samples} leaves {cap_a} sample(s) per class for {len(classes)} classes; "
                         f"pass max_samples >= {2 * len(classes)} (2 per class are needed for pairwise statistics).")
    too_small = classes[counts < 2]
    if len(too_small):
        raise ValueError(f"classes {too_small.tolist()} have fewer than 2 samples; within-class pairs need >= 2. "
                         f"Drop those classes or use more data.")
    gen = torch.Generator().manual_seed(int(seed))
    order = np.argsort(y, kind="stable")              # members of each class in ascending row order
    bounds = np.concatenate([[0], np.cumsum(counts)])
    index, codes, rows_a, rows_b, count_a, count_b = [], [], [], [], [], []
    pos = 0
    for c in range(len(classes)):
        members = order[bounds[c]:bounds[c + 1]]
        perm = torch.randperm(len(members), generator=gen).numpy()
        a, b = min(cap_a, len(members)), min(per_class, len(members))
        u = max(a, b)
        index.append(members[perm[:u]])
        codes.append(np.full(u, c, dtype=np.int64))
        rows_a.append(pos + np.arange(a))
        rows_b.append(pos + np.arange(b))
        count_a.append(a)
        count_b.append(b)
        pos += u
    cat = lambda xs: np.concatenate(xs).astype(np.int64)  # noqa: E731
    return Sample(seed=int(seed), classes=classes, index=cat(index), codes=cat(codes), rows_a=cat(rows_a),
                  rows_b=cat(rows_b), count_a=np.asarray(count_a, dtype=np.int64),
                  count_b=np.asarray(count_b, dtype=np.int64))


# ------------------------------------------------------------------------------------------------------------------
# features

def flatten_features(out: torch.Tensor, max_dim: int | None = MAX_DIM) -> torch.Tensor:
    """Flatten a layer output to (N, D) floats; a 4-D map larger than max_dim is max-pooled first (as upstream)."""
    if out.dim() == 4 and max_dim is not None and out[0].numel() > max_dim:
        k = math.ceil(math.sqrt(out[0].numel() / max_dim))
        out = F.max_pool2d(out, k)
    out = out.reshape(len(out), -1)
    return out if out.dtype in (torch.float32, torch.float64) else out.float()


def pool_features(out: torch.Tensor) -> torch.Tensor:
    """Global average pooling for the probe: channels of a conv map (N,C,H,W), token mean of (N,T,W), else as is."""
    if out.dim() == 4:
        return out.float().mean(dim=(2, 3))
    if out.dim() == 3:
        return out.float().mean(dim=1)
    return out.float().reshape(len(out), -1)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each row in float64, computed in row chunks (no full float64 copy)."""
    step = max(1, _CHUNK_ELEMS // max(1, x.shape[1]))
    return torch.cat([torch.linalg.vector_norm(x[s:s + step].double(), dim=1) for s in range(0, len(x), step)])


def _column_mean64(x: torch.Tensor) -> torch.Tensor:
    """Column means in float64, in column chunks (exact for identical rows)."""
    step = max(1, _CHUNK_ELEMS // max(1, x.shape[0]))
    return torch.cat([x[:, s:s + step].double().mean(0) for s in range(0, x.shape[1], step)])


def _unit_roundoff(x: torch.Tensor) -> float:
    """Unit roundoff of x @ x.T on x's device (TF32 / bf16 matmul modes on CUDA are taken into account)."""
    if x.dtype == torch.float64:
        return 2.0 ** -53
    if x.device.type == "cuda":
        precision = torch.get_float32_matmul_precision()   # "high" / "medium": TF32 / bf16 products allowed
        if precision == "medium":
            return 2.0 ** -8
        if precision == "high":
            return 2.0 ** -11
    return 2.0 ** -24


# ------------------------------------------------------------------------------------------------------------------
# statistics from the Gram matrix

def gram_statistics(x: torch.Tensor, codes: torch.Tensor, num_classes: int, gram: torch.Tensor | None = None,
                    norms: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Class-wise absolute-cosine, norm and minimum cross-class distance statistics of features x (n, D).

    Returns float64 arrays: avg_intra (C,) mean |cos| over distinct within-class pairs i<j, min_intra (C,),
    avg_inter (C, C) mean |cos| between classes (diagonal NaN), norm (C,) mean feature norm, min_inter_dist (C,)
    exact minimum Euclidean distance to another class, and candidates (C,) the number of pairs recomputed exactly.
    Rows are processed in small chunks, so the float64 temporaries stay at a few MiB.
    """
    n, d = x.shape
    codes = codes.to(x.device)
    g = x @ x.T if gram is None else gram
    nrm = row_norms(x) if norms is None else norms
    inv = torch.where(nrm > 0, 1.0 / nrm.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(nrm))
    sq = nrm * nrm
    du = d * _unit_roundoff(x)
    gamma = du / (1.0 - du) if du < 0.5 else 1.0
    counts = torch.bincount(codes, minlength=num_classes).double()
    step = max(1, _GRAM_ROW_ELEMS // n)
    avg_intra, min_intra, norm, min_dist = (np.zeros(num_classes) for _ in range(4))
    avg_inter = np.full((num_classes, num_classes), np.nan)
    candidates = np.zeros(num_classes, dtype=np.int64)
    for c in range(num_classes):
        rows = torch.nonzero(codes == c).flatten()
        nc = len(rows)
        if nc < 2:
            raise ValueError(f"class code {c} has {nc} sample(s); pairwise statistics need >= 2 per class.")
        other = codes != c
        if not bool(other.any()):
            raise ValueError("distances to other classes need at least 2 classes.")
        col_sums = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
        intra = torch.empty(nc, nc, dtype=torch.float64, device=x.device)
        upper = torch.tensor(float("inf"), dtype=torch.float64, device=x.device)
        found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for s in range(0, nc, step):
            r = rows[s:s + step]
            block = g[r].double()                                          # (chunk, n)
            cos = block.abs().mul_(inv[r, None]).mul_(inv[None, :])
            col_sums.index_add_(0, codes, cos.sum(0))                     # |cos| summed per column class
            intra[s:s + step] = cos[:, rows]
            # closest other-class pair: approximate from the Gram, exact on the candidates (see module docstring)
            d2 = block.mul_(-2.0).add_(sq[r, None]).add_(sq[None, :]).clamp_min_(0.0)
            tol = (nrm[r, None] * nrm[None, :]).mul_(2.0 * gamma).add_(1e-12 * (sq[r, None] + sq[None, :]))
            upper = torch.minimum(upper, (d2 + tol)[:, other].min())
            lower = d2.sub_(tol)
            ii, jj = torch.nonzero((lower <= upper) & other[None, :], as_tuple=True)
            found.append((r[ii], jj, lower[ii, jj]))
            del block, cos, d2, tol, lower
        ii, jj, lower = (torch.cat(t) for t in zip(*found))
        keep = lower <= upper                                             # the final bound is the tightest
        candidates[c] = int(keep.sum())
        min_dist[c] = pair_distances(x, ii[keep], jj[keep]).min().item()
        inter = (col_sums / (nc * counts)).cpu().numpy()
        inter[c] = np.nan
        avg_inter[c] = inter
        iu = torch.triu_indices(nc, nc, offset=1, device=x.device)        # distinct pairs i<j only
        pairs = intra[iu[0], iu[1]]
        avg_intra[c] = pairs.mean().item()
        min_intra[c] = pairs.min().item()
        norm[c] = nrm[rows].mean().item()
    return {"avg_intra": avg_intra, "min_intra": min_intra, "avg_inter": avg_inter, "norm": norm,
            "min_inter_dist": min_dist, "candidates": candidates}


def pair_distances(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Exact (float64) Euclidean distances ||x_i - x_j|| for the given index pairs, in chunks."""
    step = max(1, _CHUNK_ELEMS // max(1, x.shape[1]))
    return torch.cat([torch.linalg.vector_norm(x[i[s:s + step]].double() - x[j[s:s + step]].double(), dim=1)
                      for s in range(0, len(i), step)])


def class_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Explained-variance ratios (float64, descending) of one class's centred features x (n_c, D).

    Eigenvalues of the centred class Gram (n_c <= D) or covariance (D < n_c) = squared singular values of the
    centred features; only the rank bound min(n_c - 1, D) values are kept. All zeros if the class has no variance.
    """
    n, d = x.shape
    rank = min(n - 1, d)
    if rank < 1:
        return torch.zeros(0, dtype=torch.float64)
    mean = _column_mean64(x).to(x.dtype)
    if d >= n:                             # n x n Gram of the centred rows, accumulated over column chunks
        k = torch.zeros(n, n, dtype=torch.float64, device=x.device)
        step = max(1, _CHUNK_ELEMS // n)
        for s in range(0, d, step):
            xc = x[:, s:s + step] - mean[s:s + step]
            k += (xc @ xc.T).double()
    else:                                  # D x D scatter matrix (narrow layer)
        xc = x - mean
        k = (xc.T @ xc).double()
    del xc
    ev = _eigvalsh(k).flip(0)[:rank].clamp_min(0.0)
    total = ev.sum()
    return ev / total if total > 0 else torch.zeros(rank, dtype=torch.float64)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch's CPU kernels (OpenMP and MKL) on one thread inside the block. torch.set_num_threads costs
    microseconds, where threadpoolctl rescans every loaded library (about 4 ms a call with the course's imports,
    hundreds of calls per KQ table); threadpoolctl stays for scikit-learn's BLAS (linear_probe)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _eigvalsh(k: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues (CPU float64 tensor) of a symmetric matrix. On the CPU the solver runs single-threaded:
    its many short parallel regions made the 2-thread solver 30-100x slower when other processes share the cores."""
    if k.device.type != "cpu":
        return torch.linalg.eigvalsh(k).cpu()
    with one_torch_thread():
        return torch.linalg.eigvalsh(k)


def spectrum_summary(spectra: Sequence[torch.Tensor], width: int, threshold: float = VARIANCE_THRESHOLD) -> dict:
    """Embedding dimensions, truncation T and SVD entropies of class spectra (METHOD.md 3.2, 0 * log 0 = 0).

    ED_c = smallest k with cumulative ratio >= threshold, capped at width - 1 (width = padded spectrum width, the
    largest class in B); 0 for a class without variance. T = floor(sum_c ED_c); H_c = entropy (natural log) of the
    first T padded ratios, renormalised.
    """
    num = len(spectra)
    padded = torch.zeros(num, width, dtype=torch.float64)
    ed = np.zeros(num, dtype=np.int64)
    for c, r in enumerate(spectra):
        r = r.double().cpu()
        if len(r) > width:
            raise ValueError(f"class spectrum {c} has {len(r)} values but the padded width is {width}.")
        padded[c, :len(r)] = r
        if len(r) and r.sum() > 0:
            k = int(torch.searchsorted(torch.cumsum(r, 0), torch.tensor([threshold], dtype=torch.float64))) + 1
            ed[c] = min(k, len(r), width - 1)
    truncation = int(np.floor(ed.sum()))
    entropy = np.zeros(num)
    for c in range(num):
        p = padded[c, :truncation]
        s = p.sum()
        if s > 0:
            p = p[p > 0] / s
            entropy[c] = float(-(p * torch.log(p)).sum())
    return {"class_spectra": padded.numpy(), "ed": ed, "ed_mean": float(ed.mean()), "ed_sum": int(ed.sum()),
            "truncation": truncation, "entropy": entropy, "entropy_mean": float(entropy.mean())}


def pca_2d(gram: torch.Tensor, seed: int = 0, iters: int = 30) -> np.ndarray:
    """2-D PCA projection (n, 2) of the samples behind a Gram matrix G: top eigenvectors of the centred Gram H G H
    (kernel PCA = PCA), by seeded subspace iteration without copying G. Signs are fixed so that each component's
    largest-magnitude coordinate is positive. For plots only.
    """
    n = gram.shape[0]
    if n < 3:
        return np.zeros((n, 2))

    def centred_product(b: torch.Tensor) -> torch.Tensor:
        """H G H b with H = I - 11^T / n, in float64."""
        w = (gram @ (b - b.mean(0)).to(gram.dtype)).double()
        return w - w.mean(0)

    gen = torch.Generator().manual_seed(int(seed))
    basis = torch.randn(n, min(8, n), generator=gen, dtype=torch.float64).to(gram.device)
    for _ in range(iters):
        basis = torch.linalg.qr(centred_product(basis)).Q
    vals, vecs = torch.linalg.eigh(basis.T @ centred_product(basis))
    coords = (basis @ vecs[:, -2:].flip(1)) * vals[-2:].flip(0).clamp_min(0.0).sqrt()[None, :]
    coords = coords.cpu().numpy()
    sign = np.sign(coords[np.abs(coords).argmax(0), [0, 1]])
    return coords * np.where(sign == 0, 1.0, sign)


def linear_probe(train_x: torch.Tensor | np.ndarray, train_y: torch.Tensor | np.ndarray,
                 test_x: torch.Tensor | np.ndarray, test_y: torch.Tensor | np.ndarray, max_iter: int = 300) -> float:
    """Test accuracy of a standardised multinomial logistic regression (scikit-learn) fit on the train features."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    to_np = lambda t: np.asarray(torch.as_tensor(t).detach().cpu(), dtype=np.float64)  # noqa: E731
    xtr, xte = to_np(train_x), to_np(test_x)
    ytr, yte = np.asarray(torch.as_tensor(train_y).cpu()), np.asarray(torch.as_tensor(test_y).cpu())
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    with warnings.catch_warnings(), threadpool_limits(limits=1):   # small BLAS calls: one thread is faster
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xtr, ytr)
    return float((clf.predict(xte) == yte).mean())


# ------------------------------------------------------------------------------------------------------------------
# one layer, end to end

def feature_geometry(x: torch.Tensor, codes: torch.Tensor, spectra: Sequence[torch.Tensor], width: int, *,
                     pca_seed: int | None = None) -> dict:
    """All geometry of one layer: Gram statistics of subset-A features x (n_A, D) with class codes, the summary of
    the given class spectra (subset B), ID_g = min(n_A, D), and optionally a seeded 2-D PCA projection."""
    num_classes = len(spectra)
    norms = row_norms(x)                                   # float64: finite for every finite float32 row
    if not torch.isfinite(norms).all():
        raise ValueError("features contain NaN or inf; check the model (e.g. a diverged checkpoint).")
    gram = x @ x.T
    # the rest is O(n^2) and memory-bound: one thread, since OpenMP spin-waits of 2 threads stall on shared cores
    with one_torch_thread():
        out = gram_statistics(x, codes, num_classes, gram=gram, norms=norms)
        out.update(spectrum_summary(spectra, width))
        out["id_g"] = int(min(x.shape[0], x.shape[1]))
        out["dim"] = int(x.shape[1])
        if pca_seed is not None:
            out["pca2d"] = pca_2d(gram, pca_seed)
    return out


def collect_features(outputs: Iterable[dict[int, torch.Tensor]], sample: Sample, layers: Sequence[int], *,
                     max_dim: int | None = MAX_DIM, pooled: bool = False
                     ) -> dict[int, tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]]:
    """Consume batches {layer: output} for the union rows of `sample` (in order) and return, per layer, the subset-A
    feature matrix (n_A, D), the class spectra of subset B, and (if `pooled`) pooled subset-A features for a probe.

    Each batch is written straight into preallocated per-layer matrices (no list of batches, no second copy). Only
    subset A is held as a matrix; a class whose B part is larger than its A part is buffered on its own and
    reduced to its spectrum as soon as it is complete.
    """
    num_classes, codes = sample.num_classes, sample.codes
    rank = np.zeros(len(codes), dtype=np.int64)                       # rank of each union row within its class
    starts = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=num_classes))])
    for c in range(num_classes):
        rank[starts[c]:starts[c + 1]] = np.arange(starts[c + 1] - starts[c])
    dest_a = np.full(len(codes), -1, dtype=np.int64)
    dest_a[sample.rows_a] = np.arange(sample.n_a)
    start_a = np.concatenate([[0], np.cumsum(sample.count_a)])
    buffered = sample.count_b > sample.count_a                       # classes whose spectrum needs extra rows
    fa: dict[int, torch.Tensor] = {}
    pool_a: dict[int, torch.Tensor] = {}
    buffers: dict[tuple[int, int], torch.Tensor] = {}
    filled: dict[tuple[int, int], int] = {}
    spectra: dict[int, list[torch.Tensor | None]] = {i: [None] * num_classes for i in layers}
    pos = 0
    for outs in outputs:
        m = len(outs[layers[0]])
        if pos + m > len(codes):
            raise ValueError(f"got more feature rows than the sample's {len(codes)} rows.")
        span = np.arange(pos, pos + m)
        dst_np = dest_a[span]
        in_a = dst_np >= 0
        whole = bool(in_a.all()) and m > 0 and dst_np[-1] - dst_np[0] == m - 1
        for i in layers:
            out = outs[i]
            flat = flatten_features(out, max_dim)
            if i not in fa:
                fa[i] = torch.empty(sample.n_a, flat.shape[1], dtype=flat.dtype, device=flat.device)
                if pooled:
                    pool_a[i] = torch.empty(sample.n_a, pool_features(out[:1]).shape[1], device=flat.device)
            if whole:                                                 # the common case: a run of A rows
                fa[i][dst_np[0]:dst_np[0] + m] = flat
                if pooled:
                    pool_a[i][dst_np[0]:dst_np[0] + m] = pool_features(out)
            elif in_a.any():
                sel = torch.from_numpy(np.flatnonzero(in_a)).to(flat.device)
                dst = torch.from_numpy(dst_np[in_a]).to(flat.device)
                fa[i].index_copy_(0, dst, flat.index_select(0, sel))
                if pooled:
                    pool_a[i].index_copy_(0, dst, pool_features(out.index_select(0, sel)))
            for c in np.unique(codes[span]):
                if not buffered[c]:
                    continue
                keep = np.flatnonzero((codes[span] == c) & (rank[span] < sample.count_b[c]))
                if (i, c) not in buffers:
                    buffers[i, c] = torch.empty(sample.count_b[c], flat.shape[1], dtype=flat.dtype,
                                                device=flat.device)
                    filled[i, c] = 0
                buffers[i, c][rank[span][keep]] = flat[torch.from_numpy(keep).to(flat.device)]
                filled[i, c] += len(keep)
                if filled[i, c] == sample.count_b[c]:
                    spectra[i][c] = class_spectrum(buffers.pop((i, c)))
            del out, flat
        pos += m
        del outs
    if pos != len(codes):
        raise ValueError(f"got {pos} feature rows for a sample of {len(codes)} rows.")
    for i in layers:
        for c in range(num_classes):
            if spectra[i][c] is None:
                spectra[i][c] = class_spectrum(fa[i][start_a[c]:start_a[c] + sample.count_b[c]])
    return {i: (fa[i], spectra[i], pool_a.get(i)) for i in layers}


def layer_outputs(model: nn.Module, x: torch.Tensor, layers: Sequence[int], *, mean: Sequence[float],
                  std: Sequence[float], batch_size: int = 128, device: torch.device | None = None,
                  precision: Precision | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Yield {layer: output (float32)} of the given generalized layers for uint8 images x, batch by batch, in order.

    One forward pass per batch under torch.inference_mode that stops after the deepest requested layer
    (kdutils.layers.extract, stop_early=True), in `precision` (kdutils.precision; None: fp32 NCHW), outputs cast
    to fp32; the caller sets eval mode. Several layers per pass assume the model
    does not modify a tapped output in place later in the same forward (true for the kdutils models).
    """
    from kdutils.data import batches
    from kdutils.layers import extract

    device = torch.device(device) if device is not None else next(model.parameters()).device
    precision = precision if precision is not None else precision_for(device, amp=False)
    xs = x.to(device)
    dummy = torch.zeros(len(xs), dtype=torch.int64)
    for xb, _ in batches(xs, dummy, batch_size, mean=mean, std=std):
        with torch.inference_mode(), autocast(precision):  # per batch: the mode must not leak to the consumer
            outs = {i: out.float() for i, out in extract(model, batch_to(xb, precision), layers,
                                                          stop_early=True).items()}
        yield outs
