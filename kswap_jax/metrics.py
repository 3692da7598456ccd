"""Evaluation metrics: top-1 accuracy of a set of classes, and GS-LoRA's H-Mean."""
from __future__ import annotations

import numpy as np


def set_accuracy(correct: np.ndarray, count: np.ndarray, classes=None) -> float:
  """Top-1 accuracy in percent over the examples of `classes` (default: all; NaN if none).

  correct, count: (K,) per-class hits and examples, as `train.evaluate` returns them.
  """
  classes = np.arange(len(count)) if classes is None else np.asarray(list(classes), int)
  n = count[classes].sum() if classes.size else 0
  return float(100.0 * correct[classes].sum() / n) if n else float("nan")


def h_mean(acc_r: float, acc_f_before: float, acc_f_after: float) -> float:
  """H = 2 * drop * Acc_r / (drop + Acc_r), drop = Acc_f(before) - Acc_f(after); in percent."""
  drop = acc_f_before - acc_f_after
  return float(2 * drop * acc_r / (drop + acc_r)) if drop + acc_r > 0 else 0.0
