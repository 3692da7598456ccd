"""Evaluation metrics: top-1 accuracy per class and per set, and GS-LoRA's H-Mean."""
from __future__ import annotations

import numpy as np


def per_class_correct(predictions: np.ndarray, labels: np.ndarray,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(correct (K,), count (K,)) from predicted and true labels (N,)."""
  correct = np.bincount(labels[predictions == labels], minlength=num_classes)
  count = np.bincount(labels, minlength=num_classes)
  return correct[:num_classes], count[:num_classes]


def set_accuracy(correct: np.ndarray, count: np.ndarray, classes) -> float:
  """Top-1 accuracy in percent over the examples of `classes` (NaN if they have none)."""
  classes = np.asarray(list(classes), int)
  n = count[classes].sum() if classes.size else 0
  return float(100.0 * correct[classes].sum() / n) if n else float("nan")


def h_mean(acc_r: float, acc_f_before: float, acc_f_after: float) -> float:
  """H = 2 * drop * Acc_r / (drop + Acc_r), drop = Acc_f(before) - Acc_f(after); in percent."""
  drop = acc_f_before - acc_f_after
  return float(2 * drop * acc_r / (drop + acc_r)) if drop + acc_r > 0 else 0.0
