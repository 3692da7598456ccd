"""The PyTorch GS-LoRA face update that `benchmarks/step_speed_torch.py` times against ours
computes the same loss and LoRA gradients (with dropout 0), and its check tells them apart when
they differ."""
from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import step_speed_torch  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_the_pytorch_face_update_equals_ours(tmp_path):
  agree = step_speed_torch.check(torch, "quick", str(tmp_path))
  depth = step_speed_torch.model_sizes(step_speed_torch.WORKLOAD["quick"])["depth"]
  assert agree["grad_leaves"] == 4 * depth  # A, B of both FFN layers
  assert agree["loss_rel_error"] < 1e-5
  assert agree["grad_rel_error_max"] < 1e-4


def test_the_check_tells_another_attention_scale_apart(tmp_path):
  head_scaled = {**step_speed_torch.FACE, "attention_scale": "head"}
  agree = step_speed_torch.check(torch, "quick", str(tmp_path), head_scaled)
  assert agree["grad_rel_error_max"] > 1e-2
