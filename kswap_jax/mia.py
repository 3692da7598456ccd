"""Membership inference without shadow models: how much a model still treats a forget set as
training data.

An attacker sees a model's output on an example and its label. Features per example: the
cross-entropy loss, the confidence (max probability), the true-class probability and the
entropy of the softmax. A logistic regression is fitted on the model's retain-train examples
(members, 1) against held-out test examples (non-members, 0), the larger group subsampled to
the size of the smaller, and applied to the forget set's train examples:

  mia_efficacy = fraction of forget-train examples predicted "member"

High: the model still behaves on the forget set as on its training data; near the
non-members' false-positive rate (about 0.5 for a model that fits nothing): forgotten.
(Jia et al.'s "MIA-Efficacy" reports the complement, the fraction predicted non-member.)
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kswap_jax import sharding
from kswap_jax.data import pipeline
from kswap_jax.progress import Ticker

FEATURES = ("loss", "confidence", "true_prob", "entropy")


def features(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """(N, K) logits and (N,) int labels -> (N, 4) attack features (FEATURES order)."""
  z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  p = np.exp(logp)
  true_logp = np.take_along_axis(logp, labels[:, None].astype(np.int64), -1)[:, 0]
  return np.stack([-true_logp, p.max(-1), np.exp(true_logp), -(p * logp).sum(-1)], -1)


def efficacy(member: np.ndarray, nonmember: np.ndarray, target: np.ndarray,
             seed: int = 0) -> float:
  """Fraction of `target` rows a member/non-member classifier calls "member".

  member, nonmember, target: (N_m, F), (N_n, F), (N_t, F) features; the classifier (scaled
  logistic regression) is fitted on equally many members and non-members, drawn with `seed`.
  """
  rng = np.random.default_rng(seed)
  n = min(len(member), len(nonmember))
  x = np.concatenate([member[rng.permutation(len(member))[:n]],
                      nonmember[rng.permutation(len(nonmember))[:n]]])
  y = np.concatenate([np.ones(n), np.zeros(n)])
  attack = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
  attack.fit(x, y)
  return float(attack.predict(target).mean())


def set_features(logits_fn: Callable[[dict], jax.Array], examples: pipeline.ExampleSet,
                 batch_size: int, mesh) -> np.ndarray:
  """(N, 4) features of every example of a set; logits_fn(batch) -> (B, K) logits."""
  out, tick = [], Ticker(f"membership features of {examples.name or 'a set'}",
                         -(-len(examples) // batch_size))
  for i, b in enumerate(pipeline.eval_batches(examples, batch_size,
                                              sharding.data_sharding(mesh))):
    keep = np.asarray(b["mask"])
    out.append(features(np.asarray(logits_fn(b))[keep], np.asarray(b["labels"])[keep]))
    tick(i + 1)
  return np.concatenate(out)


def measure(apply_fn: Callable[[dict, jax.Array], jax.Array], params: dict,
            sets: dict[str, pipeline.ExampleSet], batch_size: int, mesh,
            seed: int = 0) -> dict[str, float]:
  """{"mia_efficacy", "mia_retain", "mia_test"} of a model: the fraction predicted member of
  sets["target"] (the forget set), and of the attack's own member / non-member sets.

  apply_fn(params, images uint8 (B, H, W, C)) -> logits (B, K); sets: "member", "nonmember",
  "target".
  """
  jitted = jax.jit(lambda p, b: apply_fn(p, b["images"]))
  fn = lambda b: jitted(params, b)  # noqa: E731
  feats = {k: set_features(fn, sets[k], batch_size, mesh)
           for k in ("member", "nonmember", "target")}
  return {"mia_efficacy": efficacy(feats["member"], feats["nonmember"], feats["target"], seed),
          "mia_retain": efficacy(feats["member"], feats["nonmember"], feats["member"], seed),
          "mia_test": efficacy(feats["member"], feats["nonmember"], feats["nonmember"], seed)}
