"""The GS-LoRA paper's continual-forgetting baselines: their batch terms, penalties and state.

Each follows the authors' code (bjzhb666/GS-LoRA: train/train_own_forget_cl.py, engine_cl.py,
baselines/*.py, the 4-task runs of scripts/run_cl_forget.sh) and trains every param but the
head, as theirs do. Their baselines "learn" the forget set under wrong labels
(image_iter.py CLDatasetWrapper: y -> (y + randint(1, 100)) mod N_f, y + 1 mod N_f if that
is y, with N_f the task's number of forget classes), drawn anew at every step (`relabel`).
CE_w below is the CE of the forget batch under those labels.

  l2, ewc, mas   (CE(R) + CE_w) / 2 + lambda * sum_k sum I_k (theta - theta_k)^2
  lwf            CE_w + lwf_kd * KD_T(R; teacher) + lwf_remain * CE(R)
  der            CE_w + der * |emb(R) - emb_teacher(R)|^2
  der_pp         der + der_plus * CE(R)
  fdr            CE_w + fdr * mean_b |logits(R) - logits_teacher(R)|_2
  scrub          max steps: -KL_T(F) + S; min steps: scrub_gamma CE(R) + scrub_alpha KL_T(R) + S
  scrub_s        scrub with S = smoothing * sum_W |W - W_swa|_F (smoothing 0 in scrub)
  lirf           (1 - a) CE_w - 300 AT(F) + 10 a T^2 KL_T(F, classes >= N_f) + 5 CE(R),
                 training the lower half of the blocks (and the embeddings) only

The teacher is the pretrained model (the authors deep-copy it once, before the task loop),
kept per member in state["teacher"] (the trainable subset of its params).
l2/ewc/mas (engine_cl.py get_reg_loss; train_own_forget_cl.py, "CL baselines"): with the
scripts' `--replay`, one batch mixes R and the relabelled F; term k anchors theta_k, the
params a task starts from, with importance I_k measured then: ones (l2), the squared mean-CE
gradients of each batch times its size over the number of batches (ewc), or the absolute
gradients of mean(logits^2) over the number of batches (mas), with the true labels, in eval
mode, in batches of the training batch size. Task 0 measures on its retain training set (the
authors draw another data_ratio subset), task t > 0 on the whole retain split of task t (their
`importance_dataset_train`); terms add up over tasks (no `--online`).
state["reg"] keeps their sum in closed form (`add_term`), so its shape never changes.
lwf: the authors' L_old_kd_loss takes the log of a log-softmax, which is NaN everywhere and
zeroed, so their KD term is 0; ours is the intended LwF term, the cross-entropy of
softmax(student / T) against softmax(teacher / T).
der/der_pp: no replay buffer in the authors' code: the teacher's embeddings of the current
retain batch (DERtrain.py, squared L2 over the whole batch); DER++'s CE uses the same retain
batch (ours; theirs draws the next one).
scrub: per superepoch, 10 epochs: the first 5 make one max epoch over F, then one min epoch
over R; the last 5 one min epoch over R (SCRUBtrain.py). KL_T: sum KL(softmax(t / T) ||
softmax(s / T)) T^2 / B to the teacher. After each superepoch the weight average moves:
swa = W at its first update, then 0.9 swa + 0.1 W (train_own_forget_cl.py, AveragedModel with
beta 0.1); it starts from the pretrained model and carries over tasks. Their SCRUB runs use
Adam (`--opt adam`, lr 1e-4, L2 5e-4) with lr steps (sgda_adjust_learning_rate) read from
config keys their script never sets; ours: the recipe's AdamW, weight decay and cosine
schedule, lr 1e-4.
lirf (LIRFtrain.py): AT = mean((at(h_s) - at(h_t))^2), at(h) = l2-normalised token mean of
h^2 with entries below 0.005 zeroed, h the tokens after block depth/2 - 1; KL_T over the
logit columns >= N_f (their `[:, split:]`; the relabelled classes are < N_f). The authors'
deposit module is trained beside the student but never feeds it, so it does not change the
released model and is not trained here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from kswap_jax import losses, trees

# Loss weights (state["hparams"], a study may vary them), the values of the 4-task runs in
# scripts/run_cl_forget.sh (sh:LINE) where they set one, else the util/args.py default (args:LINE).
WEIGHTS = {
    "l2_lambda": 0.1,      # sh:245 --l2_lambda 0.1 (args:208)
    "ewc_lambda": 10.0,    # sh:257 --ewc_lambda 10 (args:213 0.1)
    "mas_lambda": 0.005,   # sh:269 --mas_lambda 0.005 (args:217 0.1)
    "lwf_kd": 0.5,         # args:275 --Lwf_lambda_kd
    "lwf_remain": 10.0,    # sh:281 --Lwf_lambda_remain 10 (args:278 1)
    "der": 0.01,           # sh:293 --DER_lambda 0.01 (der_pp: sh:305 0.005; args:284 0.1)
    "der_plus": 0.005,     # sh:306 --DER_plus_lambda 0.005 (args:289 0.1)
    "fdr": 50.0,           # sh:318 --FDR_lambda 50 (args:295 0.1)
    "scrub_gamma": 0.99,   # args:246 --sgda_gamma
    "scrub_alpha": 0.001,  # args:248 --sgda_alpha
    "smoothing": 0.0,      # args:244 --sgda_smoothing (scrub_s: sh:356 0.1)
    "lirf_alpha": 0.1,     # args:238 --LIRF_alpha
}
METHOD_WEIGHTS = {"der_pp": {"der": 0.005}, "scrub_s": {"smoothing": 0.1}}
MAX_SHIFT = 100     # image_iter.py CLDatasetWrapper: random.randint(1, 100)
SWA_BETA = 0.1      # train_own_forget_cl.py: `beta = 0.1`, the SCRUB weight average's step
SCRUB_EPOCHS = (5, 10)  # SCRUBtrain.py: 10 epochs per superepoch, the first 5 with a max epoch
LIRF_COEFS = (300.0, 10.0, 5.0)  # LIRFtrain.py loss_total: AT, KP and replay weights
AT_FLOOR = 0.005    # LIRFtrain.py at(): attention entries below it are zeroed


def weights(method: str) -> dict[str, float]:
  """The baselines' loss weights for config.weights, with `method`'s own defaults."""
  return {**WEIGHTS, **METHOD_WEIGHTS.get(method, {})}


def settings() -> ml_collections.ConfigDict:
  """config.baselines: what does not vary within a study."""
  return ml_collections.ConfigDict(dict(
      lwf_T=2.0,          # args:273 --Lwf_T
      kd_T=2.0,           # args:263 --kd_T (SCRUB)
      lirf_T=10.0,        # args:237 --LIRF_T
      superepochs=10))    # args:260 --SCRUB_superepoch (SCRUB's length per task)


# --- pure terms --------------------------------------------------------------------------

def relabel(rng: jax.Array, labels: jax.Array, num_forget: int) -> jax.Array:
  """The authors' wrong labels: (y + U{1..MAX_SHIFT}) mod num_forget, or y + 1 mod num_forget
  where that equals y. (B,) int -> (B,) int in [0, num_forget)."""
  shift = jax.random.randint(rng, labels.shape, 1, MAX_SHIFT + 1)
  wrong = (labels + shift) % num_forget
  return jnp.where(wrong == labels, (labels + 1) % num_forget, wrong)


def soft_ce(student: jax.Array, teacher: jax.Array, temp: float) -> jax.Array:
  """Mean over the batch of -sum softmax(teacher / T) log softmax(student / T): (B, K) -> ()."""
  return optax.softmax_cross_entropy(student / temp, jax.nn.softmax(teacher / temp)).mean()


def kd(student: jax.Array, teacher: jax.Array, temp: float, axis_from: int = 0) -> jax.Array:
  """sum KL(softmax(t / T) || softmax(s / T)) * T^2 / B over columns >= axis_from:
  (B, K) -> () (SCRUB's DistillKL; LIRF's batchmean KL times T^2)."""
  s, t = student[:, axis_from:] / temp, teacher[:, axis_from:] / temp
  log_p = jax.nn.log_softmax(t, -1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(s, -1)))
  return kl * temp**2 / student.shape[0]


def squared_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """|a - b|^2 summed over every entry (DER): (B, D) -> ()."""
  return jnp.sum(jnp.square(a - b))


def mean_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean over rows of |a_i - b_i|_2 (FDR): (B, K) -> ()."""
  return _norm(a - b, -1).mean()


def _norm(x: jax.Array, axis=None) -> jax.Array:
  """Euclidean norm with gradient 0 (not NaN) at 0."""
  sq = jnp.sum(jnp.square(x), axis)
  return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def param_distance(tree: Any, other: Any) -> jax.Array:
  """sum over leaves of |a - b|_F (SGDA's param_dist before its factor) -> ()."""
  return sum((_norm(a - b) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(other))),
             jnp.zeros((), jnp.float32))


def attention(h: jax.Array) -> jax.Array:
  """LIRF's attention: l2-normalised token mean of h^2, entries < AT_FLOOR zeroed: (B, N, D)
  -> (B, D)."""
  a = jnp.square(h).mean(1)
  a = a / jnp.maximum(_norm(a, -1)[:, None], 1e-12)
  return jnp.where(a < AT_FLOOR, 0.0, a)


def attention_loss(h_s: jax.Array, h_t: jax.Array) -> jax.Array:
  """mean((attention(h_s) - attention(h_t))^2) -> ()."""
  return jnp.mean(jnp.square(attention(h_s) - attention(h_t)))


# --- quadratic penalty (l2, ewc, mas) ----------------------------------------------------

def empty_reg(params: Any) -> dict:
  """No penalty yet: {"imp": zeros like params, "center": zeros, "rest": ()}."""
  zeros = jax.tree.map(jnp.zeros_like, params)
  return {"imp": zeros, "center": jax.tree.map(jnp.zeros_like, params),
          "rest": jnp.zeros((), jnp.float32)}


def add_term(reg: dict, importance: Any, anchor: Any) -> dict:
  """Adds I (theta - a)^2 to sum_k I_k (theta - a_k)^2 = sum S (theta - c)^2 + rest, with
  S = sum_k I_k, c = sum_k I_k a_k / S (a where S = 0) and rest what no theta removes."""
  s_new = jax.tree.map(jnp.add, reg["imp"], importance)
  safe = lambda s: jnp.where(s > 0, s, 1.0)  # noqa: E731
  center = jax.tree.map(lambda s, c, i, a, n: jnp.where(n > 0, (s * c + i * a) / safe(n), a),
                        reg["imp"], reg["center"], importance, anchor, s_new)
  gain = jax.tree.map(lambda s, c, i, a, n: jnp.sum(s * i * jnp.square(c - a) / safe(n)),
                      reg["imp"], reg["center"], importance, anchor, s_new)
  return {"imp": s_new, "center": center, "rest": reg["rest"] + sum(jax.tree.leaves(gain))}


def penalty(params: Any, reg: dict) -> jax.Array:
  """sum_k sum I_k (theta - a_k)^2 of the terms in `reg` at `params` -> ()."""
  parts = jax.tree.map(lambda p, s, c: jnp.sum(s * jnp.square(p - c)), params, reg["imp"],
                       reg["center"])
  return sum(jax.tree.leaves(parts), reg["rest"])


def importance_batch(kind: str, grads: Any, count: jax.Array, num_batches: int) -> Any:
  """One batch's share of a task's importance: ewc grads^2 * count / num_batches (grads of the
  batch-mean CE), mas |grads| / num_batches (grads of mean(logits^2))."""
  if kind == "ewc":
    return jax.tree.map(lambda g: jnp.square(g) * count / num_batches, grads)
  return jax.tree.map(lambda g: jnp.abs(g) / num_batches, grads)


def importance_loss(kind: str, logits: jax.Array, labels: jax.Array,
                    mask: jax.Array) -> jax.Array:
  """What the importance differentiates, over a padded batch's valid rows: mean CE (ewc) or
  mean(logits^2) (mas). logits (B, K), labels (B,), mask (B,) -> ()."""
  m = mask.astype(logits.dtype)
  if kind == "ewc":
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(ce * m) / jnp.maximum(m.sum(), 1)
  return jnp.sum(jnp.square(logits) * m[:, None]) / jnp.maximum(m.sum() * logits.shape[1], 1)


# --- one step's view and the terms of each baseline ----------------------------------------

@dataclasses.dataclass(frozen=True)
class View:
  """One step as a baseline's terms see it.

  logits (2B, K), emb (2B, D), mid (2B, N, D) or None: the student on R then F (n = B rows
  of R); labels (2B,); images uint8 (2B, H, W, C); params / frozen: the student's full and
  frozen params; ctx: state entries the loss reads ("teacher", "reg", "swa", "stage_step");
  trainable_params: the student's trainable params; settings: config.baselines.
  """
  net: Any
  logits: jax.Array
  emb: jax.Array
  mid: jax.Array | None
  labels: jax.Array
  images: jax.Array
  n: int
  frozen: Any
  trainable_params: Any
  ctx: dict
  rng: jax.Array
  num_forget: int
  settings: ml_collections.ConfigDict


def apply_capturing(net, params, lora, images, block: str | None, **kwargs):
  """net.apply(..., return_embedding=True) -> (logits, emb, tokens after the module named
  `block` or None)."""
  if block is None:
    return (*net.apply(params, lora, images, return_embedding=True, **kwargs), None)
  seen = []

  def capture(next_fun, args, kw, context):
    out = next_fun(*args, **kw)
    if context.module.name == block and context.method_name == "__call__":
      seen.append(out)
    return out

  with nn.intercept_methods(capture):
    logits, emb = net.apply(params, lora, images, return_embedding=True, **kwargs)
  return logits, emb, seen[0]


def _teacher(v: View, images: jax.Array, block: str | None = None):
  """The teacher (pretrained) model on `images`, eval mode, no gradient."""
  params = trees.combine(v.frozen, v.ctx["teacher"])
  out = apply_capturing(v.net, params, None, images, block)
  return jax.tree.map(jax.lax.stop_gradient, out)


def _ce_wrong(v: View) -> jax.Array:
  wrong = relabel(jax.random.fold_in(v.rng, 1), v.labels[v.n:], v.num_forget)
  return losses.cross_entropy(v.logits[v.n:], wrong)


def reg_terms(v: View) -> dict:
  return {"ce_w": _ce_wrong(v), "penalty": penalty(v.trainable_params, v.ctx["reg"])}


def lwf_terms(v: View) -> dict:
  t_logits, _, _ = _teacher(v, v.images[:v.n])
  return {"ce_w": _ce_wrong(v), "kd_r": soft_ce(v.logits[:v.n], t_logits, v.settings.lwf_T)}


def der_terms(v: View) -> dict:
  _, t_emb, _ = _teacher(v, v.images[:v.n])
  return {"ce_w": _ce_wrong(v), "der": squared_distance(v.emb[:v.n], t_emb)}


def fdr_terms(v: View) -> dict:
  t_logits, _, _ = _teacher(v, v.images[:v.n])
  return {"ce_w": _ce_wrong(v), "fdr": mean_distance(v.logits[:v.n], t_logits)}


def scrub_terms(v: View) -> dict:
  t_logits, _, _ = _teacher(v, v.images)
  temp = v.settings.kd_T
  return {"kl_r_t": kd(v.logits[:v.n], t_logits[:v.n], temp),
          "kl_f_t": kd(v.logits[v.n:], t_logits[v.n:], temp),
          "smooth": param_distance(v.trainable_params, v.ctx["swa"]["params"]),
          "max_step": jnp.asarray(v.ctx["max_step"], jnp.float32)}


def lirf_terms(v: View) -> dict:
  f = v.images[v.n:]
  t_logits, _, t_mid = _teacher(v, f, lirf_block(v.net))
  temp = v.settings.lirf_T
  return {"ce_w": _ce_wrong(v), "at": attention_loss(v.mid[v.n:], t_mid),
          "kp": kd(v.logits[v.n:], t_logits, temp, axis_from=v.num_forget)}


# --- losses: (terms, hparams) -> () --------------------------------------------------------

def reg_loss(name: str) -> Callable[[dict, dict], jax.Array]:
  """(CE(R) + CE_w) / 2 + hp[name] * penalty."""

  def loss(t, hp):
    return 0.5 * (t["ce_r"] + t["ce_w"]) + hp[name] * t["penalty"]

  loss.__doc__ = f"(CE(R) + CE_w) / 2 + {name} * penalty -> ()."
  return loss


def lwf_loss(t, hp):
  """CE_w + lwf_kd * KD_T(R) + lwf_remain * CE(R) -> ()."""
  return t["ce_w"] + hp["lwf_kd"] * t["kd_r"] + hp["lwf_remain"] * t["ce_r"]


def der_loss(t, hp):
  """CE_w + der * |emb(R) - emb_teacher(R)|^2 -> ()."""
  return t["ce_w"] + hp["der"] * t["der"]


def der_pp_loss(t, hp):
  """der_loss + der_plus * CE(R) -> ()."""
  return der_loss(t, hp) + hp["der_plus"] * t["ce_r"]


def fdr_loss(t, hp):
  """CE_w + fdr * mean |logits(R) - logits_teacher(R)| -> ()."""
  return t["ce_w"] + hp["fdr"] * t["fdr"]


def scrub_loss(t, hp):
  """Max step: -KL_T(F) + S; min step: scrub_gamma CE(R) + scrub_alpha KL_T(R) + S -> ()."""
  s = hp["smoothing"] * t["smooth"]
  return jnp.where(t["max_step"] > 0, -t["kl_f_t"],
                   hp["scrub_gamma"] * t["ce_r"] + hp["scrub_alpha"] * t["kl_r_t"]) + s


def lirf_loss(t, hp):
  """(1 - a) CE_w - 300 AT + 10 a KL_T(F, classes >= N_f) + 5 CE(R) -> ()."""
  a = hp["lirf_alpha"]
  w_at, w_kp, w_r = LIRF_COEFS
  return (1 - a) * t["ce_w"] - w_at * t["at"] + w_kp * a * t["kp"] + w_r * t["ce_r"]


# --- SCRUB's schedule, SWA, LIRF's half ------------------------------------------------------

def scrub_length(n_f: int, n_r: int) -> int:
  """Steps of one superepoch with n_f forget and n_r retain steps per epoch."""
  max_epochs, epochs = SCRUB_EPOCHS
  return max_epochs * (n_f + n_r) + (epochs - max_epochs) * n_r


def scrub_max_step(s, n_f: int, n_r: int):
  """Whether stage step s (int or int32 array) is a max step (a forget batch)."""
  p = s % scrub_length(n_f, n_r)
  return (p < SCRUB_EPOCHS[0] * (n_f + n_r)) & (p % (n_f + n_r) < n_f)


def scrub_positions(s: int, n_f: int, n_r: int) -> tuple[int, int]:
  """(forget batches, retain batches) taken before stage step s."""
  length, block = scrub_length(n_f, n_r), n_f + n_r
  k, p = divmod(s, length)
  blocks, q = divmod(min(p, SCRUB_EPOCHS[0] * block), block)
  f = k * SCRUB_EPOCHS[0] * n_f + blocks * n_f + min(q, n_f)
  return f, s - f


def swa_update(swa: dict, params: Any) -> dict:
  """AveragedModel's step: params at the first update, then (1 - beta) swa + beta params."""
  first = swa["n"] == 0
  avg = jax.tree.map(lambda a, p: jnp.where(first, p, (1 - SWA_BETA) * a + SWA_BETA * p),
                     swa["params"], params)
  return {"params": avg, "n": swa["n"] + 1}


def lirf_block(net) -> str:
  """Name of the block whose output LIRF's student hands to the frozen upper half."""
  return f"encoderblock_{net.base.model.depth // 2 - 1}"


def lirf_trainable(depth: int) -> str:
  """Regex of LIRF's student: the embeddings and the lower depth // 2 blocks."""
  blocks = "|".join(str(i) for i in range(depth // 2))
  return rf"(embedding|pos_embedding|cls|Transformer/encoderblock_({blocks}))(/.*)?"
