"""Local training at a site."""

from fedcare.training.local import LocalResult, predict_proba, train_local

__all__ = ["LocalResult", "predict_proba", "train_local"]
