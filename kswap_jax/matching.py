"""DETR's set prediction loss: boxes, generalized IoU, Hungarian matching, CE + L1 + GIoU.

Boxes are (cx, cy, w, h) in [0, 1] unless named xyxy (x0, y0, x1, y1). Queries Q, targets T
(padded: class -1), classes K (+1 "no object", the last logit).

Matching: `hungarian` solves each image's assignment exactly with scipy's
`linear_sum_assignment`, called from inside the compiled step through `jax.pure_callback`
(ours). The cost matrices are tiny (Q x T, e.g. 6 x 3; COCO 100 x <= 100), the host solves
them in microseconds, the step stays one compiled program per stage, and the assignment is
the one scipy gives, which a pure-JAX auction or Sinkhorn solver only approximates (ties and
epsilon). The cost gets no gradient (DETR's matcher runs under no_grad). Under `vmap` (a
study's members) the callback receives the members stacked and solves each.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

# Matching cost and loss weights of the authors' swap config (KnowledgeSwapping
# object-detection/config/DINO/DINO_4scale_swin_swap.py:76-78 set_cost_class 2.0,
# set_cost_bbox 5.0, set_cost_giou 2.0; :79, :82, :83 cls_loss_coef 1.0, bbox_loss_coef 5.0,
# giou_loss_coef 2.0).
COST = {"class": 2.0, "l1": 5.0, "giou": 2.0}
WEIGHTS = {"ce": 1.0, "l1": 5.0, "giou": 2.0}
# Ours: softmax CE with DETR's down-weighted "no object" class (eos_coef 0.1) instead of
# DINO's sigmoid focal loss, and a class cost of -p(class) (DETR's matcher) accordingly.
NO_OBJECT_WEIGHT = 0.1


def cxcywh_to_xyxy(b: jax.Array) -> jax.Array:
  """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1)."""
  cx, cy, w, h = jnp.moveaxis(b, -1, 0)
  return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def generalized_iou(a: jax.Array, b: jax.Array, eps: float = 1e-9):
  """(iou, giou) of xyxy boxes a (..., 4) and b (..., 4), broadcast -> (...) each.

  GIoU = IoU - (C - U) / C with C the area of the smallest box enclosing both."""
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
  lo, hi = jnp.maximum(a[..., :2], b[..., :2]), jnp.minimum(a[..., 2:], b[..., 2:])
  inter = jnp.prod(jnp.clip(hi - lo, 0), -1)
  union = area(a) + area(b) - inter
  iou = inter / (union + eps)
  hull = jnp.prod(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), -1)
  return iou, iou - (hull - union) / (hull + eps)


def _solve(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Host side of `hungarian`: cost (..., Q, T), valid (..., T) -> (..., Q) int32."""
  lead = cost.shape[:-2]
  cost, valid = cost.reshape(-1, *cost.shape[-2:]), valid.reshape(-1, valid.shape[-1])
  out = np.full(cost.shape[:2], -1, np.int32)
  for i in range(len(cost)):
    cols = np.flatnonzero(valid[i])
    rows, picked = optimize.linear_sum_assignment(cost[i][:, cols])
    out[i, rows] = cols[picked]
  return out.reshape(*lead, cost.shape[1])


def hungarian(cost: jax.Array, valid: jax.Array) -> jax.Array:
  """Minimum-cost matching per image: cost (..., Q, T), valid bool (..., T) -> int32 (..., Q),
  the target each query is matched to, -1 for none; needs Q >= the valid targets."""
  cost, valid = jax.lax.stop_gradient(cost), jnp.broadcast_to(valid, cost.shape[:-2]
                                                              + cost.shape[-1:])
  return jax.pure_callback(_solve, jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32),
                           cost.astype(jnp.float32), valid, vmap_method="broadcast_all")


def match_cost(logits: jax.Array, boxes: jax.Array, classes: jax.Array,
               target_boxes: jax.Array) -> jax.Array:
  """(B, Q, T) cost: class * -p(target class) + l1 * |box - target|_1 - giou * GIoU.

  logits (B, Q, K + 1), boxes (B, Q, 4), classes int (B, T) (-1: padding), target_boxes
  (B, T, 4)."""
  prob = jax.nn.softmax(logits, -1)
  idx = jnp.broadcast_to(jnp.maximum(classes, 0)[:, None, :], prob.shape[:2] + classes.shape[1:])
  p = jnp.take_along_axis(prob, idx, -1)
  l1 = jnp.abs(boxes[:, :, None] - target_boxes[:, None]).sum(-1)
  _, giou = generalized_iou(cxcywh_to_xyxy(boxes)[:, :, None],
                            cxcywh_to_xyxy(target_boxes)[:, None])
  return COST["class"] * -p + COST["l1"] * l1 - COST["giou"] * giou


def detection_loss(outputs: dict, batch: dict, weights: dict = WEIGHTS):
  """DETR's loss of a batch -> (scalar, {"ce", "l1", "giou"}).

  outputs: {"logits": (B, Q, K + 1), "boxes": (B, Q, 4)}; batch: {"classes": int (B, T),
  "boxes": (B, T, 4)}. Queries matched by `hungarian` learn their target's class and box;
  the others learn "no object" (CE weight NO_OBJECT_WEIGHT). CE is the weighted mean over
  queries; L1 and 1 - GIoU are summed over matched pairs and divided by the number of
  targets in the batch (at least 1).
  """
  logits, boxes = outputs["logits"], outputs["boxes"]
  classes, tboxes = batch["classes"], batch["boxes"]
  valid = classes >= 0
  assign = hungarian(match_cost(logits, boxes, classes, tboxes), valid)
  matched = assign >= 0
  safe = jnp.maximum(assign, 0)
  no_object = logits.shape[-1] - 1
  target = jnp.where(matched, jnp.take_along_axis(classes, safe, 1), no_object)
  w = jnp.where(matched, 1.0, NO_OBJECT_WEIGHT)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), target[..., None], -1)[..., 0]
  ce = (w * nll).sum() / w.sum()
  tb = jnp.take_along_axis(tboxes, safe[..., None], 1)
  n = jnp.maximum(valid.sum(), 1)
  l1 = (matched * jnp.abs(boxes - tb).sum(-1)).sum() / n
  _, giou = generalized_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(tb))
  giou_loss = (matched * (1 - giou)).sum() / n
  total = weights["ce"] * ce + weights["l1"] * l1 + weights["giou"] * giou_loss
  return total, {"ce": ce, "l1": l1, "giou": giou_loss}


def segmentation_loss(logits: jax.Array, masks: jax.Array):
  """Per-pixel CE -> (scalar, {}): logits (B, H, W, K + 1), masks int (B, H, W) with a
  class, -1 background (the last logit) or -2 ignored; mean over the non-ignored pixels."""
  target = jnp.where(masks == -1, logits.shape[-1] - 1, jnp.maximum(masks, 0))
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), target[..., None], -1)[..., 0]
  keep = masks != -2
  return (keep * nll).sum() / jnp.maximum(keep.sum(), 1), {}
