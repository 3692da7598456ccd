"""What a detection or segmentation run needs besides the classifier's code: its class sets
with targets, its per-set loss and its per-class metrics (`Dense`).

The task is the model's: `model.task` ("detection" or "segmentation"; absent for a classifier)
in the pretrain config, kept in the exported model, so a swap from that model is of the same
task. `pretrain` and `swap` ask `of(model_cfg)` and use its methods where the classifier uses
cross-entropy, `pipeline` sets and top-1 accuracy; stages, orders, loss weights, the bounded
forget loss, the group-sparse penalty, checkpoints and studies are the same code.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kswap_jax import builders, dense_metrics, matching, sharding
from kswap_jax.data import dense, pipeline, sources
from kswap_jax.errors import UserError
from kswap_jax.models import dense as dense_models


class Dense:
  """A detection or segmentation task.

  metrics: the per-class metrics it reports ("ap50", "ap" or "miou"), the first the headline
  one (a swap's rows: "<metric>_r", "_f", "_l").
  """

  def __init__(self, kind: str):
    if kind not in dense_models.TASKS:
      raise UserError(f"model.task={kind!r} is not allowed; use one of {dense_models.TASKS}")
    self.kind = kind
    self.metrics = ("ap50", "ap") if kind == "detection" else ("miou",)
    self._forward = {}  # id(net) -> jitted (params, lora, images) -> outputs

  def set_loss(self, outputs, batch: dict, name: str):
    """A set's loss: DETR's (`matching.detection_loss`) or per-pixel CE. On the forget set
    a segmentation loss counts only the forget classes' pixels (background ignored), so the
    bounded forget term ascends on those classes' targets alone."""
    if self.kind == "detection":
      return matching.detection_loss(outputs, batch)[0]
    masks = batch["masks"]
    if name == "forget":
      masks = jnp.where(masks == dense.BACKGROUND, dense.IGNORE, masks)
    return matching.segmentation_loss(outputs, masks)[0]

  def example_set(self, data: ml_collections.ConfigDict, spec: ml_collections.ConfigDict,
                  split: str, labels: pipeline.LabelSpace, name: str,
                  subset: bool) -> dense.DenseSet:
    """`builders.example_set` with the targets of spec's classes."""
    if data.get("resize", 0) or data.get("train_crop", "none") != "none" or data.get("flip"):
      raise UserError("detection and segmentation read images whole (boxes and masks follow "
                      "them): set data.resize=0, data.train_crop='none', data.flip=False")
    examples = builders.example_set(data, spec, split, labels, name, subset)
    ids = sources.parse_classes(spec.classes, examples.source.class_names, f"{name}.classes")
    return dense.example_set(self.kind, data, examples, ids,
                             [labels.index(spec.dataset, c) for c in ids])

  batch = staticmethod(dense.batch)
  concat = staticmethod(dense.concat)

  def per_class(self, net, params, lora, examples: dense.DenseSet, num_classes: int,
                batch_size: int, mesh) -> dict[str, np.ndarray]:
    """{metric: (K,) in [0, 1]} over the images of `examples` (`dense_metrics`)."""
    if id(net) not in self._forward:
      self._forward[id(net)] = jax.jit(net.apply)
    fwd = self._forward[id(net)]
    put = sharding.data_sharding(mesh)
    outs = []
    for b in pipeline.eval_batches(examples.examples, batch_size, put):
      keep = np.asarray(b["mask"])
      outs.append(jax.tree.map(lambda x, keep=keep: np.asarray(x)[keep],
                               fwd(params, lora, b["images"])))
    out = jax.tree.map(lambda *x: np.concatenate(x), *outs)
    target = examples.targets(np.arange(len(examples)))
    if self.kind == "segmentation":
      conf = dense_metrics.confusion(out.argmax(-1), target["masks"], num_classes)
      return {"miou": dense_metrics.class_iou(conf)}
    size = examples.examples.shape[0]
    probs = jax.nn.softmax(out["logits"], -1)[..., :-1]
    xyxy = lambda b: np.asarray(matching.cxcywh_to_xyxy(b)) * size  # noqa: E731
    gt = [(xyxy(b[c >= 0]), c[c >= 0]) for b, c in zip(target["boxes"], target["classes"])]
    boxes = xyxy(out["boxes"])
    return dense_metrics.box_ap([g[0] for g in gt], [g[1] for g in gt], list(boxes),
                                list(np.asarray(probs.max(-1))),
                                list(np.asarray(probs.argmax(-1))), num_classes)


def of(model_cfg: ml_collections.ConfigDict) -> Dense | None:
  """The dense task of a model config, None for a classifier."""
  kind = model_cfg.get("task", "")
  return Dense(kind) if kind else None
