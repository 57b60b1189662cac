"""The distilled strategy's regressor (scoring/distill.py): ridge on z-scored pooled features, its strength
chosen by k-fold held-out Spearman, an out-of-distribution distance in the sample's principal components, the
rank metrics it is judged by, and the fidelity gate. Pure numpy on the driver: no model, no Ray."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

ALPHAS = tuple(float(a) for a in np.logspace(-3, 3, 13))  # x mean(diag K): the ridge strengths tried
PCS = 16  # principal components of the sample's features for the out-of-distribution distance


def ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den else float("nan")


def top_recall(true: np.ndarray, pred: np.ndarray, fraction: float) -> float:
    """Share of the exact top ``fraction`` that is in the predicted top ``fraction``."""
    k = max(1, round(fraction * len(true)))
    return len(set(np.argsort(-true)[:k]) & set(np.argsort(-pred)[:k])) / k


def _ridge_dual(X: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Primal weights of ridge regression from its dual (n << d): w = X^T (X X^T + alpha I)^-1 y."""
    K = X @ X.T
    return X.T @ np.linalg.solve(K + alpha * np.eye(len(X)), y)


@dataclass
class Regressor:
    """z-scored features -> z-scored score, linear; plus the sample's PCA frame for the OOD distance."""

    mean: np.ndarray  # [d]
    std: np.ndarray  # [d]
    w: np.ndarray  # [d]
    y_mean: float
    y_std: float
    alpha: float
    pcs: np.ndarray  # [k, d] unit directions in z-space
    pc_std: np.ndarray  # [k]
    ood_threshold: float
    meta: dict = field(default_factory=dict)

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (score in the exact scorer's units, OOD distance, OOD flag)."""
        Z = (X - self.mean) / self.std
        score = Z @ self.w * self.y_std + self.y_mean
        dist = self.distance(Z)
        return score, dist, dist > self.ood_threshold

    def distance(self, Z: np.ndarray) -> np.ndarray:
        """RMS of the row's coordinates in the sample's top principal components, in units of their std."""
        return np.sqrt((((Z @ self.pcs.T) / self.pc_std) ** 2).mean(1))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {k: getattr(self, k) for k in ("mean", "std", "w", "pcs", "pc_std")}
        scalars = np.array([self.y_mean, self.y_std, self.alpha, self.ood_threshold])
        np.savez(buf, scalars=scalars, meta=np.frombuffer(json.dumps(self.meta).encode(), np.uint8), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Regressor:
        z = np.load(io.BytesIO(data))
        y_mean, y_std, alpha, thr = (float(v) for v in z["scalars"])
        meta = json.loads(z["meta"].tobytes().decode())
        return cls(z["mean"], z["std"], z["w"], y_mean, y_std, alpha, z["pcs"], z["pc_std"], thr, meta)


def fit_regressor(
    X: np.ndarray,
    y: np.ndarray,
    folds: int,
    seed: int,
    top_fraction: float,
    ood_factor: float,
    blocks: list[int] | None = None,
) -> tuple[Regressor, dict]:
    """Ridge on z-scored features and scores, strength chosen by k-fold held-out Spearman (pooled
    out-of-fold predictions). Returns the regressor fitted on all rows and the k-fold figures. ``blocks``:
    the widths of the features' pool blocks, each z-scored block then weighted 1 / sqrt(width) (folded into
    the regressor's ``std``)."""
    X = X.astype(np.float64)
    mean, std = X.mean(0), X.std(0)
    std[std < 1e-8] = 1.0
    if blocks is not None:
        if sum(blocks) != X.shape[1]:
            raise ValueError(f"pool blocks {blocks} do not add up to {X.shape[1]} features")
        std = std * np.concatenate([np.full(b, np.sqrt(b)) for b in blocks])
    Z = (X - mean) / std
    y_mean, y_std = float(y.mean()), float(y.std()) or 1.0
    yz = (y - y_mean) / y_std
    scale = float(np.mean((Z * Z).sum(1))) or 1.0
    fold_of = np.random.default_rng(seed).permutation(len(y)) % folds
    best = None
    for a in ALPHAS:
        oof = np.zeros(len(y))
        for f in range(folds):
            tr, te = fold_of != f, fold_of == f
            oof[te] = Z[te] @ _ridge_dual(Z[tr], yz[tr], a * scale)
        rho = spearman(yz, oof)
        if best is None or rho > best[0]:
            best = (rho, a, oof)
    rho, a, oof = best
    w = _ridge_dual(Z, yz, a * scale)
    k = max(1, min(PCS, len(y) - 1))
    _, sv, vt = np.linalg.svd(Z - Z.mean(0), full_matrices=False)
    pcs, pc_std = vt[:k], np.maximum(sv[:k] / np.sqrt(max(len(y) - 1, 1)), 1e-8)
    reg = Regressor(mean, std, w, y_mean, y_std, a * scale, pcs, pc_std, 0.0)
    reg.ood_threshold = float(ood_factor * reg.distance(Z).max())
    cv = {
        "folds": folds,
        "alpha": a,
        "spearman": rho,
        "top_recall": top_recall(yz, oof, top_fraction),
        "rows": len(y),
    }
    return reg, cv


def gate(cv: dict, audit: dict, s) -> dict:
    """The fidelity gate: k-fold and audit Spearman >= gate_min_spearman, k-fold top recall >=
    gate_min_recall (the audit's recall too when it has at least 1 / gate_top_fraction rows)."""
    failed = []
    if not cv["spearman"] >= s.gate_min_spearman:
        failed.append(f"k-fold Spearman {cv['spearman']:.3f} < {s.gate_min_spearman}")
    if not cv["top_recall"] >= s.gate_min_recall:
        failed.append(
            f"k-fold top-{s.gate_top_fraction:.0%} recall {cv['top_recall']:.3f} < {s.gate_min_recall}"
        )
    if audit.get("rows", 0) >= 3 and not audit["spearman"] >= s.gate_min_spearman:
        failed.append(f"audit Spearman {audit['spearman']:.3f} < {s.gate_min_spearman}")
    if audit.get("rows", 0) * s.gate_top_fraction >= 1 and not audit["top_recall"] >= s.gate_min_recall:
        failed.append(f"audit top recall {audit['top_recall']:.3f} < {s.gate_min_recall}")
    return {
        "passed": not failed,
        "failed": failed,
        "fallback": None if not failed else s.gate_fallback,
        "thresholds": {"spearman": s.gate_min_spearman, "top_recall": s.gate_min_recall},
    }
