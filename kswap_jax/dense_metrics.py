"""Detection and segmentation metrics per class: COCO box AP (pycocotools) and IoU.

Per set (retain / forget / learn) the value is the mean over the set's classes that occur in
the evaluated images, in percent (`set_mean`).
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools import coco, cocoeval


def box_ap(gt_boxes: list[np.ndarray], gt_classes: list[np.ndarray], det_boxes: list[np.ndarray],
           det_scores: list[np.ndarray], det_classes: list[np.ndarray], num_classes: int,
           ) -> dict[str, np.ndarray]:
  """COCO box AP (IoU 0.50:0.95) and AP50 per class, by pycocotools' COCOeval.

  Per image i: gt_boxes[i] (n, 4) and det_boxes[i] (m, 4) xyxy in pixels, gt_classes[i] (n,)
  and det_classes[i] (m,) ints in [0, num_classes), det_scores[i] (m,). Returns {"ap": (K,),
  "ap50": (K,)} in [0, 1], NaN for a class without ground truth; area "all", 100
  detections per image.
  """
  images, anns, dets = [], [], []
  for i, (boxes, classes) in enumerate(zip(gt_boxes, gt_classes)):
    images.append({"id": i})
    for b, c in zip(boxes, classes):
      w, h = float(b[2] - b[0]), float(b[3] - b[1])
      anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c) + 1,
                   "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h, "iscrowd": 0})
  for i, (boxes, scores, classes) in enumerate(zip(det_boxes, det_scores, det_classes)):
    for b, s, c in zip(boxes, scores, classes):
      dets.append({"image_id": i, "category_id": int(c) + 1, "score": float(s),
                   "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
  gt = coco.COCO()
  gt.dataset = {"images": images, "annotations": anns,
                "categories": [{"id": k + 1} for k in range(num_classes)]}
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
    out = {"ap": np.full(num_classes, np.nan), "ap50": np.full(num_classes, np.nan)}
    if not dets:
      has = np.bincount(np.concatenate(gt_classes).astype(int), minlength=num_classes) > 0
      return {k: np.where(has, 0.0, np.nan) for k in out}
    ev = cocoeval.COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
  precision = ev.eval["precision"]  # (IoU thresholds, recall, class, area, max dets)
  for k in range(num_classes):
    p = precision[:, :, k, 0, -1]
    if (p > -1).any():
      out["ap"][k] = p[p > -1].mean()
      out["ap50"][k] = p[0][p[0] > -1].mean()
  return out


def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
  """(K + 1, K + 1) pixel counts [target, predicted] over pixels whose target is not ignored.

  pred int (...) in [0, K] (K: background); target int (...) in [0, K) or -1 (background)
  or -2 (ignored)."""
  keep = target != -2
  t = np.where(target[keep] == -1, num_classes, target[keep])
  return np.bincount(t * (num_classes + 1) + pred[keep],
                     minlength=(num_classes + 1) ** 2).reshape(num_classes + 1, -1)


def class_iou(conf: np.ndarray) -> np.ndarray:
  """IoU per class (K,) of a `confusion` matrix, NaN for a class absent from both."""
  tp = np.diag(conf)[:-1].astype(float)
  denom = conf.sum(0)[:-1] + conf.sum(1)[:-1] - tp
  return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)


def set_mean(per_class: np.ndarray, classes) -> float:
  """Mean of a per-class metric in [0, 1] over `classes` with a value, in percent (NaN if
  none has one)."""
  vals = np.asarray(per_class, float)[np.asarray(list(classes), int)]
  vals = vals[~np.isnan(vals)]
  return float(100 * vals.mean()) if vals.size else float("nan")
