"""The RADAR head's image decision: how unusual an image's two features are among good parts'.

A k-nearest-neighbour distance in standardised log-feature space, in numpy only, so a station
computes it from the parameters in the bundle without scikit-learn. (RADAR uses a Local Outlier
Factor; the k-NN distance is the same idea without LOF's density ratio, which needs more good
images than the selection split it is fitted on has to be stable.) The score is squashed to [0, 1) by the good
parts' own typical distance, so the product's threshold estimators apply to it unchanged:
logit(score) = log(distance / scale).
"""

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

NEIGHBOURS = 5


class KnnNormalModel(BaseModel):
    """Fitted on the features of good images; `score` needs nothing else."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reference: list[list[float]] = Field(description="standardised log-features of the good images, [N][F]")
    center: list[float] = Field(description="mean of the good images' log-features, [F]")
    spread: list[float] = Field(description="standard deviation of the good images' log-features, [F]")
    neighbours: int = Field(gt=0)
    scale: float = Field(gt=0, description="distance that scores 0.5: the good images' median")

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mean distance of each row of `features` [B, F] (positive) to its nearest good images [B]."""
        return _knn_distance(self.standardise(features), np.asarray(self.reference), self.neighbours)

    def standardise(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != len(self.center):
            raise ValueError(f"features must be [B, {len(self.center)}], got shape {features.shape}")
        return (np.log(np.maximum(features, np.finfo(np.float64).tiny)) - self.center) / self.spread

    def score(self, features: np.ndarray) -> np.ndarray:
        """Image scores in [0, 1): higher is more anomalous."""
        distance = self.distances(features)
        return distance / (distance + self.scale)


def _knn_distance(points: np.ndarray, reference: np.ndarray, neighbours: int,
                  exclude_self: bool = False) -> np.ndarray:
    gaps = np.sqrt(((points[:, None, :] - reference[None, :, :]) ** 2).sum(axis=-1))
    if exclude_self:
        np.fill_diagonal(gaps, np.inf)
    nearest = np.sort(gaps, axis=1)[:, :neighbours]
    return nearest.mean(axis=1)


def fit_knn(features: np.ndarray, neighbours: int = NEIGHBOURS) -> tuple[KnnNormalModel, np.ndarray]:
    """The model of good images' features [N, F], and their own leave-one-out scores [N] (each
    image scored against the others: an honest score for the images it was fitted on)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features of at least 2 good images as [N, F], got shape {features.shape}")
    logs = np.log(np.maximum(features, np.finfo(np.float64).tiny))
    center, spread = logs.mean(axis=0), np.maximum(logs.std(axis=0), 1e-6)
    reference = (logs - center) / spread
    k = min(neighbours, len(features) - 1)
    own = _knn_distance(reference, reference, k, exclude_self=True)
    scale = float(max(np.median(own), 1e-6))
    model = KnnNormalModel(reference=reference.tolist(), center=center.tolist(), spread=spread.tolist(),
                           neighbours=k, scale=scale)
    return model, own / (own + scale)
