"""Detection and segmentation swaps: matching, box losses, AP and IoU, the digit scenes, a
runlocal swap of each task, a study member against its single run, real-data configs on mock
data, refused input."""
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds
from scipy import optimize

from kswap_jax import config_lib, dense_metrics, matching, runner, sweep
from kswap_jax.data import dense, pipeline, scenes, sources
from kswap_jax.errors import UserError
from kswap_jax.methods import swap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hungarian_matches_scipy_inside_jit_and_vmap():
  rng = np.random.default_rng(0)
  cost = rng.normal(size=(2, 4, 7, 3)).astype(np.float32)  # (members, B, Q, T)
  valid = rng.random((2, 4, 3)) < 0.7
  got = np.asarray(jax.jit(jax.vmap(matching.hungarian))(cost, valid))
  for m in range(2):
    for b in range(4):
      cols = np.flatnonzero(valid[m, b])
      rows, picked = optimize.linear_sum_assignment(cost[m, b][:, cols])
      want = np.full(7, -1)
      want[rows] = cols[picked]
      np.testing.assert_array_equal(got[m, b], want)


def test_giou_and_detection_loss_by_hand():
  a, b = jnp.array([0.0, 0.0, 2.0, 2.0]), jnp.array([1.0, 1.0, 3.0, 3.0])
  inter, union, hull = 1.0, 4.0 + 4.0 - 1.0, 9.0
  iou, giou = matching.generalized_iou(a, b)
  np.testing.assert_allclose([iou, giou], [inter / union, inter / union - (hull - union) / hull],
                             rtol=1e-6)
  # One target; query 1 is its box shifted by d in cx, query 0 far away: query 1 is matched.
  d, k = 0.1, 3
  target = np.array([[0.5, 0.5, 0.2, 0.2]], np.float32)
  boxes = np.array([[[0.1, 0.1, 0.1, 0.1], [0.5 + d, 0.5, 0.2, 0.2]]], np.float32)
  logits = np.zeros((1, 2, k + 1), np.float32)
  total, parts = matching.detection_loss(
      {"logits": jnp.asarray(logits), "boxes": jnp.asarray(boxes)},
      {"classes": jnp.array([[1]]), "boxes": jnp.asarray(target[None])})
  w = target[0, 2]
  inter = (w - d) * w
  union = 2 * w * w - inter
  hull = (w + d) * w
  want_giou = 1 - (inter / union - (hull - union) / hull)
  np.testing.assert_allclose(parts["l1"], d, rtol=1e-5)
  np.testing.assert_allclose(parts["giou"], want_giou, rtol=1e-5)
  # uniform logits: every query's NLL is log(K + 1); the weighted mean is the same
  np.testing.assert_allclose(parts["ce"], np.log(k + 1), rtol=1e-6)
  np.testing.assert_allclose(total, sum(matching.WEIGHTS[n] * parts[n] for n in parts),
                             rtol=1e-6)


def _boxes(rng, n):
  xy = rng.uniform(0, 20, (n, 2))
  return np.concatenate([xy, xy + rng.uniform(4, 10, (n, 2))], 1)


def test_box_ap_perfect_is_one_and_shuffled_labels_low():
  rng = np.random.default_rng(0)
  k = 5
  gt_boxes = [_boxes(rng, 3) for _ in range(40)]
  gt_classes = [rng.integers(0, k, 3) for _ in range(40)]
  scores = [np.ones(3) for _ in range(40)]
  perfect = dense_metrics.box_ap(gt_boxes, gt_classes, gt_boxes, scores, gt_classes, k)
  np.testing.assert_allclose(perfect["ap"], 1.0)
  np.testing.assert_allclose(perfect["ap50"], 1.0)
  shuffled = [rng.permutation(np.concatenate(gt_classes))[3 * i:3 * i + 3] for i in range(40)]
  low = dense_metrics.box_ap(gt_boxes, gt_classes, gt_boxes, scores, shuffled, k)
  assert np.nanmean(low["ap50"]) < 0.5 * np.nanmean(perfect["ap50"])


def test_iou_perfect_is_one_and_background_only_is_zero():
  rng = np.random.default_rng(0)
  target = rng.integers(-1, 4, (5, 8, 8))
  pred = np.where(target == -1, 4, target)
  np.testing.assert_allclose(dense_metrics.class_iou(dense_metrics.confusion(pred, target, 4)),
                             1.0)
  none = dense_metrics.class_iou(dense_metrics.confusion(np.full_like(target, 4), target, 4))
  np.testing.assert_array_equal(none, 0.0)


def test_scene_masks_and_boxes_agree(tmp_path):
  ds = scenes.prepare(str(tmp_path)).as_data_source(split="test")
  for i in range(0, len(ds), 7):
    r = ds[i]
    mask, n = r["mask"], int((r["classes"] >= 0).sum())
    assert 1 <= n <= scenes.MAX_OBJECTS and set(r["classes"][:n]) == {r["label"]}
    covered = np.zeros_like(mask, bool)
    for box in r["boxes"][:n]:
      y0, x0, y1, x1 = np.round(box * scenes.SIZE).astype(int)
      inside = mask[y0:y1, x0:x1] == r["label"] + 1
      # the box is tight: mask pixels on each of its four edges
      assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
      covered[y0:y1, x0:x1] = True
    assert not (mask[~covered] > 0).any()  # every mask pixel lies in a box
    assert set(np.unique(mask)) <= {0, r["label"] + 1}


def _scene_set(data_dir, affine):
  """The segmentation set of the test scenes of classes 0-2 with data.affine = affine."""
  data = config_lib.scenes_data("segmentation")
  data.update(data_dir=str(data_dir), affine=affine)
  src = sources.open_source("digit_scenes", "test", str(data_dir))
  ex = pipeline.select(src, [0, 1, 2], [0, 1, 2], image_size=32, channels=1)
  return dense.example_set("segmentation", data, ex, [0, 1, 2], [0, 1, 2])


def test_affine_warp_moves_image_and_mask_together(tmp_path):
  scenes.prepare(str(tmp_path))
  warped = _scene_set(tmp_path, dict(rotate=30.0, zoom=0.2, shear=0.2))
  still = _scene_set(tmp_path, dict(rotate=0.0, zoom=0.0, shear=0.0))
  assert still.affine is None and warped.affine == (30.0, 0.2, 0.2)
  put = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  sampler = pipeline.EpochSampler(len(warped), 16, seed=3)
  get = lambda s, p: jax.tree.map(np.asarray, dense.batch(s, p, put))  # noqa: E731
  a, plain = get(warped, sampler.positions(5)), get(still, sampler.positions(5))
  np.testing.assert_array_equal(a["labels"], plain["labels"])
  assert (a["images"] != plain["images"]).mean() > 0.05   # the scenes moved
  assert (a["masks"] != plain["masks"]).mean() > 0.05
  on, bright = a["masks"] >= 0, a["images"][..., 0] >= 160
  assert (a["images"][..., 0][on] >= 64).mean() > 0.9     # labelled pixels are ink
  assert on[bright].mean() > 0.9                          # bright ink is labelled
  for k, v in get(warped, sampler.positions(5)).items():  # seeded by (seed, step)
    np.testing.assert_array_equal(v, a[k])
  assert (get(warped, sampler.positions(6))["images"] !=
          get(still, sampler.positions(6))["images"]).any()
  evaluation = get(warped, np.asarray(sampler.positions(5)))  # plain positions: no warp
  for k, v in plain.items():
    np.testing.assert_array_equal(evaluation[k], v)


def test_affine_refuses_detection_and_bad_fields():
  data = config_lib.scenes_data("detection")
  data.affine = dict(rotate=10.0, zoom=0.0, shear=0.0)
  with pytest.raises(UserError, match="warps masks, not boxes"):
    dense.affine_of("detection", data)
  data.affine = dict(rotate=10.0, scale=0.1)
  with pytest.raises(UserError, match=r"unknown fields \['scale'\]"):
    dense.affine_of("segmentation", data)
  data.affine = dict(rotate=10.0, zoom=1.5, shear=0.0)
  with pytest.raises(UserError, match="0 <= zoom, shear < 1"):
    dense.affine_of("segmentation", data)
  c = config_lib.load(os.path.join(ROOT, "configs", "swap_seg_scenes.py"), "runlocal")
  c.data.affine.rotate = -5.0
  with pytest.raises(UserError, match=r"data.affine.rotate=-5.0: must be a number >= 0"):
    config_lib.check(c)


def _swap_config(task, **kw):
  c = config_lib.load(os.path.join(ROOT, "configs", f"swap_{task[:3]}_scenes.py"),
                      "runlocal,order=lbf")
  c.init.pretrain.data.fraction = 0.1
  for s in ("retain", "forget", "learn"):
    c.sets[s].fraction = 0.15
  # Evaluation on a quarter of the test scenes (each set keeps 18 or more), in batches of 8:
  # every set is at least one full batch, so each network compiles one evaluation shape.
  # Checkpoints only at the ends of stages (no test here resumes).
  for d in (c.data, c.init.pretrain.data):
    d.update(test_split="test[:25%]", eval_batch_size=8)
  for cfg in (c, c.init.pretrain):
    cfg.checkpoint.every_steps = 0
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def det_study(tmp_path_factory):
  """A 2-member detection study (pretraining included) and member 1's single run."""
  d = tmp_path_factory.mktemp("det")
  c = config_lib.sweep("swap", _swap_config("detection"), {}, runlocal=True)
  c.base.data.val_split = "train[90%:95%]"  # validation sets of 46 / 14 / 12 scenes
  c.checkpoint.every_steps = 0
  c.members = ({"train.lr": 1e-2}, {"train.lr": 3e-3, "weights.forget": 1.0})
  study = runner.sweep(c, str(d / "study"))
  single = sweep.member_config(c.base, c.members[1])
  single.init.checkpoint = str(d / "study" / "pretrain")
  return study, runner.run("swap", single, str(d / "single")), d / "single"


def _check_swap(res, metric, run_dir):
  assert [r["after"] for r in res["evals"]] == ["pretrained", "learn", "forget"]
  for row in res["evals"]:
    for s in "rfl":
      assert 0 <= row[f"{metric}_{s}"] <= 100
  assert len(res["blocks"]["forget"]) == 2 + 1  # the Nano encoder's 2 blocks, the decoder's
  assert os.path.exists(run_dir / "model" / "model.json")


def test_detection_swap_reports_each_set(det_study):
  _, single, run_dir = det_study
  _check_swap(single, "ap50", run_dir)
  assert {"ap_r", "ap_f", "ap_l"} <= set(single["evals"][-1])


def test_study_member_equals_its_single_run(det_study):
  study, single, _ = det_study
  for k in ("ap50_r", "ap50_f", "ap50_l", "val_ap50_r", "val_ap50_l"):
    assert study["members"][1][k] == pytest.approx(single["evals"][-1][k], abs=1e-4), k
  assert study["score"].startswith("val AP50_R + val AP50_L - val AP50_F; below all others "
                                   "where val AP50_R fell more than 5 points")  # the task's metric
  pretrained = next(r for r in single["evals"] if r["after"] == "pretrained")
  assert study["members"][1]["val_ap50_r_pretrained"] == pytest.approx(
      pretrained["val_ap50_r"], abs=1e-4)


def test_study_score_ranks_members_that_keep_retain_first():
  rec = types.SimpleNamespace(metrics=("miou",),
                              config=ml_collections.ConfigDict({"select_retain_drop": 5.0}))
  score = lambda r, l, f, pre=60.0: swap.Recipe.score(rec, {  # noqa: E731
      "val_miou_r": r, "val_miou_l": l, "val_miou_f": f, "val_miou_r_pretrained": pre})
  kept = [score(55.5, 20.0, 10.0), score(58.0, 40.0, 0.0)]
  lost = [score(54.0, 90.0, 0.0), score(30.0, 100.0, 0.0)]
  assert kept == [65.5, 98.0]
  assert max(lost) < min(kept)        # a high learn score does not buy a retain loss back
  assert lost[0] > lost[1]            # among those that lost R: the smaller shortfall first
  assert score(40.0, 50.0, 0.0, pre=float("nan")) == 90.0  # no pretrained value: no condition
  rec.config.select_retain_drop = 100.0
  assert score(30.0, 100.0, 0.0) == 130.0


def test_segmentation_swap_reports_each_set(tmp_path):
  res = runner.run("swap", _swap_config("segmentation"), str(tmp_path))
  _check_swap(res, "miou", tmp_path)
  assert os.path.exists(tmp_path / "pretrain" / "model" / "model.json")


def test_refuses_bad_input(tmp_path):
  c = _swap_config("segmentation")
  c.init.pretrain.data.resize = 40
  with pytest.raises(UserError, match="read images whole"):
    runner.run("swap", c, str(tmp_path / "a"))
  c = _swap_config("segmentation")
  c.init.pretrain.model.task = "pose"
  with pytest.raises(UserError, match="model.task='pose' is not allowed"):
    runner.run("swap", c, str(tmp_path / "b"))
  for split in ("train", "test"):  # an image folder of the scenes' 10 classes
    for k in range(10):
      os.makedirs(tmp_path / "folder" / split / str(k))
      Image.new("L", (32, 32)).save(tmp_path / "folder" / split / str(k) / "0.png")
  c = _swap_config("segmentation")
  c.init.pretrain.data.update(dataset=f"folder:{tmp_path / 'folder'}", train_split="train",
                              test_split="test")
  with pytest.raises(UserError, match="is an image folder, which has none"):
    runner.run("swap", c, str(tmp_path / "c"))


def test_ade20k_config_on_mock_data(tmp_path):
  c = config_lib.load(os.path.join(ROOT, "configs", "swap_seg_ade20k.py"),
                      "runlocal,retain=0-99,forget=100-179,learn=180-254")
  for d in (c.data, c.init.pretrain.data):
    d.data_dir = str(tmp_path / "tfds")
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    res = runner.run("swap", c, str(tmp_path / "run"))
  assert [r["after"] for r in res["evals"]] == ["pretrained", "learn", "forget"]
  assert all(0 <= r["miou_r"] <= 100 for r in res["evals"])


def test_coco_config_reads_coco_objects():
  """TFDS' coco builder needs TensorFlow and its mock sequences disagree in length, so the
  config's feature paths are checked on a record in coco/2017's layout."""
  c = config_lib.load(os.path.join(ROOT, "configs", "swap_det_coco.py"), "runlocal")
  boxes = np.array([[0.1, 0.2, 0.5, 0.4], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.6, 0.9]])
  record = {"image": None, "objects": {"bbox": boxes, "label": np.array([15, 0, 19])}}
  mapping = {15: 0, 19: 1}  # the forget classes 15 and 19 in a two-class label space
  got = dense._objects(  # pylint: disable=protected-access
      record, c.data, mapping, c.data.max_objects)
  np.testing.assert_array_equal(got["classes"][:3], [0, 1, -1])
  for j, i in enumerate((0, 2)):
    y0, x0, y1, x1 = boxes[i]
    np.testing.assert_allclose(got["boxes"][j], [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
  # an image's set: its most frequent object class, or mask class (value - 1, 0 = none)
  assert sources.image_label(np.array([3, 7, 7])) == 7
  assert sources.image_label(np.array([[0, 3], [3, 1]])) == 2
