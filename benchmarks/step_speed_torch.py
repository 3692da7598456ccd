"""The GS-LoRA face update in PyTorch (eager, as the authors run it) against ours, in one process.

The PyTorch model is built here with the structure of GS-LoRA's `ViT_face`
(bjzhb666/GS-LoRA vit_pytorch_face/vit_face.py): patches flattened (p1 p2 c) into a Linear,
class token and position embedding, pre-LayerNorm blocks (torch's eps 1e-5) with a bias-free
fused qkv and the softmax scaled by width ** -0.5, exact GELU, the final LayerNorm on the class
token, and a CosFace head (s 64, m 0.35). LoRA is loralib's `Linear` on both FFN layers (rank 8,
alpha 1: scale 1/8; the authors' `--lora_pos FFN`), the only trained tensors. Dropout 0.1 sits
where the authors put it (after the embeddings, after attention, after the GELU and after the
FFN) and where ours does. The update is `step_speed.py`'s face workload: a retain and a forget
batch of 8 in one forward pass, `CE(R) + 0.2 relu(105 - CE(F)) + 1e-4 S` (S: one group per
block), AdamW (lr 1e-2, weight decay 0.05) on the LoRA. Ours runs with the same model settings
(`torch_import.MODEL_DEFAULTS["gs_lora_face"]`).

First a check: the PyTorch weights (the base through `kswap_jax.torch_import`, the LoRA factors
transposed) go into ours, and with dropout 0 both give the same loss and LoRA gradients on one
batch; the timing runs only if they agree (relative error below --tolerance). Then rounds of
--block updates of PyTorch followed by --block of ours, so that a shared machine's load weighs
on both alike; the first update of each block is not timed (it would pay for the other's
threads winding down), nor is a first, extra round: median and best step time over the
--rounds x (--block - 1) timed updates of each, GFLOP/s from XLA's FLOP count of our step
(the same function for both), and MFU against the float32 2048^2 matmul peak (JAX's, best of
the runs just before and just after the timing; PyTorch's own peak is recorded beside it).
PyTorch gets the images already normalised, NCHW float32, as the authors' data loader hands
them over; ours normalises uint8 images inside its step. Host memory is set up for both as
`kswap` sets it (`--host_memory default`: glibc's defaults).

  python benchmarks/step_speed_torch.py [--rounds 8] [--block 3] [--threads 0]
      [--tolerance 1e-3] [--matmul_n 2048] [--host_memory retained|default] [--quick] [--out FILE]

--quick: a tiny model (Mu/8: 4 blocks, width 64, at 32 px) and 2 rounds unless --rounds is
given, a smoke run. Needs PyTorch (`pip install -e '.[torch]'`). Writes
benchmarks/results/step_speed_torch_<backend>.json (--quick: step_speed_torch_quick.json) and
prints a table.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import step_speed
import step_timing

from kswap_jax import host_memory, sharding, torch_import, trees, workdir
from kswap_jax.models import vit
from kswap_jax.progress import table

FACE = torch_import.MODEL_DEFAULTS[torch_import.GS_LORA_FACE]
SCALE, MARGIN = 64.0, 0.35  # CosFace, vit_face.py `CosFace(s=64.0, m=0.35)`
# step_speed's face workload (F6/8 at 112 px, 100 classes, batch 8 + 8) and --quick's Mu/8 at
# 32 px, as `step_speed.WORKLOADS` entries.
WORKLOAD = {"full": step_speed.WORKLOADS["face"], "quick": ("Mu/8", 32, 3, 10, "cosface", 4)}


def model_sizes(workload: tuple) -> dict:
  """`face_vit`'s sizes for a `step_speed.WORKLOADS` entry (its variant's: `vit.get_variant`)."""
  variant, image, _, classes, _, _ = workload
  v = vit.get_variant(variant)
  return dict(image=image, patch=v["patch_size"], width=v["width"], depth=v["depth"],
              heads=v["num_heads"], mlp=v["mlp_dim"], classes=classes)


def face_vit(torch, *, image, patch, width, depth, heads, mlp, classes, dropout, rank=8):
  """The GS-LoRA face ViT with rank-`rank` LoRA on its FFN layers (0: plain Linear layers):
  (images (B, C, H, W), labels (B,)) -> CosFace logits (B, K) with the margin at the labels;
  images alone -> the embedding (B, D)."""
  nn, F = torch.nn, torch.nn.functional

  class LoraLinear(nn.Linear):
    """x W^T + b + (x A^T) B^T / r (loralib.Linear with lora_alpha 1)."""

    def __init__(self, n_in, n_out):
      super().__init__(n_in, n_out)
      self.lora_A = nn.Parameter(torch.empty(rank, n_in))
      self.lora_B = nn.Parameter(torch.zeros(n_out, rank))
      nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
      return super().forward(x) + (x @ self.lora_A.T) @ self.lora_B.T / rank

  class Residual(nn.Module):
    def __init__(self, fn):
      super().__init__()
      self.fn = fn

    def forward(self, x):
      return x + self.fn(x)

  class PreNorm(nn.Module):
    def __init__(self, fn):
      super().__init__()
      self.norm, self.fn = nn.LayerNorm(width), fn

    def forward(self, x):
      return self.fn(self.norm(x))

  class Attention(nn.Module):
    def __init__(self):
      super().__init__()
      self.to_qkv = nn.Linear(width, 3 * width, bias=False)
      self.to_out = nn.Sequential(nn.Linear(width, width), nn.Dropout(dropout))

    def forward(self, x):
      b, n, _ = x.shape
      q, k, v = (t.reshape(b, n, heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, -1))
      a = (q @ k.transpose(-1, -2) * width ** -0.5).softmax(-1)
      return self.to_out((a @ v).transpose(1, 2).reshape(b, n, width))

  class FeedForward(nn.Module):
    def __init__(self):
      super().__init__()
      linear = LoraLinear if rank else nn.Linear
      self.net = nn.Sequential(linear(width, mlp), nn.GELU(), nn.Dropout(dropout),
                               linear(mlp, width), nn.Dropout(dropout))

    def forward(self, x):
      return self.net(x)

  class Transformer(nn.Module):
    def __init__(self):
      super().__init__()
      self.layers = nn.ModuleList(
          nn.ModuleList([Residual(PreNorm(Attention())), Residual(PreNorm(FeedForward()))])
          for _ in range(depth))

    def forward(self, x):
      for attn, ff in self.layers:
        x = ff(attn(x))
      return x

  class CosFace(nn.Module):
    def __init__(self):
      super().__init__()
      self.weight = nn.Parameter(torch.empty(classes, width), requires_grad=False)
      nn.init.xavier_uniform_(self.weight)

    def forward(self, emb, labels):
      cos = F.linear(F.normalize(emb), F.normalize(self.weight))
      return SCALE * (cos - MARGIN * F.one_hot(labels, classes))

  class ViTFace(nn.Module):
    def __init__(self):
      super().__init__()
      n = (image // patch) ** 2
      self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, width), requires_grad=False)
      self.patch_to_embedding = nn.Linear(3 * patch * patch, width).requires_grad_(False)
      self.cls_token = nn.Parameter(torch.randn(1, 1, width), requires_grad=False)
      self.dropout = nn.Dropout(dropout)
      self.transformer = Transformer()
      self.mlp_head = nn.Sequential(nn.LayerNorm(width))
      self.loss = CosFace()
      for name, p in self.transformer.named_parameters():  # only the LoRA factors train
        p.requires_grad_("lora_" in name)
      self.mlp_head.requires_grad_(False)

    def forward(self, img, labels=None):
      b, c, h, w = img.shape
      x = img.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
      x = self.patch_to_embedding(x.reshape(b, (h // patch) * (w // patch), patch * patch * c))
      x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1) + self.pos_embedding
      emb = self.mlp_head(self.transformer(self.dropout(x))[:, 0])
      return emb if labels is None else self.loss(emb, labels)

  return ViTFace()


def torch_loss(torch, model, images, labels, n: int):
  """The GS-LoRA loss of one forward pass over R (the first n) and F: a () tensor."""
  F = torch.nn.functional
  logits = model(images, labels)
  ce_r = F.cross_entropy(logits[:n], labels[:n])
  ce_f = F.cross_entropy(logits[n:], labels[n:])
  sparse = sum(torch.sqrt(sum((p * p).sum() for name, p in block.named_parameters()
                              if "lora_" in name) + 1e-12)
               for block in model.transformer.layers)
  w = step_speed.WEIGHTS
  return ce_r + w["beta"] * F.relu(w["bound"] - ce_f) + w["alpha"] * sparse


def lora_factors(model, grads: bool = False) -> dict[str, np.ndarray]:
  """The PyTorch model's LoRA factors (or their gradients) in our LoRA layout, flat by our
  paths: A (in, r), B (r, out)."""
  flat = {}
  for i, (_, ff) in enumerate(model.transformer.layers):
    for j, layer in ((0, ff.fn.fn.net[0]), (1, ff.fn.fn.net[3])):
      for name, p in (("A", layer.lora_A), ("B", layer.lora_B)):
        flat[f"Transformer/encoderblock_{i}/MlpBlock_0/Dense_{j}/{name}"] = (
            p.grad if grads else p.detach()).numpy().T
  return flat


def jax_workload(torch, model, workload: tuple, dropout: float, tmp: str,
                 settings: dict = FACE):
  """Our update of `workload` (a `step_speed.WORKLOADS` entry; model `settings`, default the
  face layout's) holding the PyTorch model's weights: (step, state, batches, loss_fn)."""
  step, state, batches, loss_fn = step_speed.setup(workload, "threefry2x32", "float32",
                                                   dropout, **settings)
  path = os.path.join(tmp, "face.pth")
  torch.save({k: v for k, v in model.state_dict().items() if "lora_" not in k}, path)
  params = torch_import.load_pretrained(path, state["params"])
  lora = trees.unflatten({k: jnp.asarray(v) for k, v in lora_factors(model).items()})
  shapes = jax.tree_util.tree_map(jnp.shape, state["trainable"]["lora"])
  if jax.tree_util.tree_map(jnp.shape, lora) != shapes:
    raise SystemExit(f"error: the LoRA layouts differ: ours {shapes}")
  state = {**state, "params": params, "trainable": {**state["trainable"], "lora": lora}}
  return step, state, batches, loss_fn


def torch_batch(torch, batches: dict):
  """Our uint8 NHWC retain + forget batches -> (normalised float32 NCHW images, labels)."""
  images = np.concatenate([batches[k]["images"] for k in ("retain", "forget")])
  labels = np.concatenate([batches[k]["labels"] for k in ("retain", "forget")])
  x = (images.astype(np.float32) / 255.0 - 0.5) / 0.5
  return (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
          torch.from_numpy(labels.astype(np.int64)))


def check(torch, size: str, tmp: str, settings: dict = FACE) -> dict:
  """Loss and LoRA gradients of both at `size` ("full" or "quick") with dropout 0 on one batch,
  with random nonzero LoRA factors (ours with model `settings`): the relative errors."""
  torch.manual_seed(1)
  model = face_vit(torch, dropout=0.0, **model_sizes(WORKLOAD[size]))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.02)
  _, state, batches, loss_fn = jax_workload(torch, model, WORKLOAD[size], 0.0, tmp, settings)
  images, labels = torch_batch(torch, batches)
  loss = torch_loss(torch, model, images, labels, WORKLOAD[size][-1])
  loss.backward()
  want = lora_factors(model, grads=True)

  def f(trainable):
    return loss_fn(trainable, state["params"], state["hparams"], batches, jax.random.key(0))[0]

  ours, grads = jax.value_and_grad(f)(state["trainable"])
  errors = {path: float(np.linalg.norm(np.asarray(g) - want[path]) /
                        max(np.linalg.norm(want[path]), 1e-30))
            for path, g in trees.flatten(grads["lora"]).items()}
  loss = loss.item()
  return {"loss_torch": loss, "loss_jax": float(ours),
          "loss_rel_error": abs(float(ours) - loss) / abs(loss),
          "grad_rel_error_max": max(errors.values()), "grad_leaves": len(errors)}


def torch_peak(torch, n: int, repeats: int) -> float:
  """Best-of-`repeats` GFLOP/s of a float32 (n, n) @ (n, n) matmul in PyTorch."""
  a, b = torch.randn(n, n), torch.randn(n, n)
  a @ b
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best / 1e9


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=0, help="0: 8 (--quick: 2)")
  p.add_argument("--block", type=int, default=3)
  p.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: its default)")
  p.add_argument("--tolerance", type=float, default=1e-3)
  p.add_argument("--matmul_n", type=int, default=2048)
  p.add_argument("--host_memory", default="retained", choices=("retained", "default"))
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", default="")
  args = p.parse_args()
  args.rounds = args.rounds or (2 if args.quick else 8)
  if args.block < 2 or args.rounds < 1:
    raise SystemExit("error: --block must be >= 2 and --rounds >= 1 (0: the default)")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit("error: this benchmark needs PyTorch; run: pip install -e '.[torch]'")
  if args.host_memory == "retained" and not host_memory.retain_freed_memory():
    raise SystemExit("error: --host_memory retained needs glibc (Linux); use --host_memory default")
  if args.threads:
    torch.set_num_threads(args.threads)
  size = "quick" if args.quick else "full"

  with tempfile.TemporaryDirectory() as tmp:
    agree = check(torch, size, tmp)
    print(f"check (dropout 0): loss {agree['loss_torch']:.6g} (PyTorch) vs "
          f"{agree['loss_jax']:.6g} (ours); LoRA gradients' largest relative error "
          f"{agree['grad_rel_error_max']:.2e}", flush=True)
    if max(agree["loss_rel_error"], agree["grad_rel_error_max"]) > args.tolerance:
      raise SystemExit(f"error: the two updates differ by more than --tolerance "
                       f"{args.tolerance}: {agree}; no timing")
    torch.manual_seed(0)
    model = face_vit(torch, dropout=0.1, **model_sizes(WORKLOAD[size])).train()
    step, state, batches, _ = jax_workload(torch, model, WORKLOAD[size], 0.1, tmp)
  images, labels = torch_batch(torch, batches)
  trained = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trained, lr=state["hparams"]["lr"].item(), betas=(0.9, 0.999),
                          eps=1e-8, weight_decay=state["hparams"]["weight_decay"].item())

  def torch_step():
    opt.zero_grad(set_to_none=True)
    loss = torch_loss(torch, model, images, labels, WORKLOAD[size][-1])
    loss.backward()
    opt.step()
    return loss

  mesh = sharding.make_mesh()
  compiled, state, compile_s = step_timing.compile_replicated(step, state, batches, mesh)
  flops = step_timing.step_flops(compiled)
  peak_before = step_speed.matmul_peak(args.matmul_n, jnp.float32, 5)

  def ours_step():
    nonlocal state
    state, metrics = compiled(state, batches)
    return jax.block_until_ready(metrics)["loss"]

  times = {"pytorch": [], "ours": []}
  for r in range(1 + args.rounds):
    for name, fn in (("pytorch", lambda: torch_step().item()), ("ours", ours_step)):
      for j in range(args.block):
        t = time.perf_counter()
        loss = float(fn())
        if not math.isfinite(loss):
          raise SystemExit(f"error: {name}: a non-finite loss in round {r}: {loss}")
        if r and j:
          times[name].append(1e3 * (time.perf_counter() - t))
  peak = max(peak_before, step_speed.matmul_peak(args.matmul_n, jnp.float32, 5))
  rows = []
  for name, ms in times.items():
    med, best = statistics.median(ms), min(ms)
    rows.append({"implementation": name, "step_ms": med, "step_ms_best": best,
                 "step_ms_all": ms, "gflops": flops / med / 1e6,
                 "mfu_%": 100 * flops / med / 1e6 / peak,
                 "mfu_best_%": 100 * flops / best / 1e6 / peak})
  result = {
      "backend": jax.default_backend(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
      "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
      "config": {**vars(args), "out": os.path.relpath(args.out) if args.out else ""},
      "sizes": model_sizes(WORKLOAD[size]), "check": agree, "gflop_per_step": flops / 1e9, "compile_s": compile_s,
      "peak_gflops": peak, "torch_peak_gflops": torch_peak(torch, args.matmul_n, 5),
      "rows": rows,
      "speedup_median": rows[0]["step_ms"] / rows[1]["step_ms"],
      "speedup_best": rows[0]["step_ms_best"] / rows[1]["step_ms_best"],
  }
  name = "quick" if args.quick else jax.default_backend()
  out = args.out or os.path.join(step_speed.RESULTS, f"step_speed_torch_{name}.json")
  workdir.write_json(out, result)
  print(table(rows, ["implementation", "step_ms", "step_ms_best", "gflops", "mfu_%",
                     "mfu_best_%"]))
  print(f"{flops / 1e9:.1f} GFLOP per step; matmul peak {peak:.0f} GFLOP/s (JAX), "
        f"{result['torch_peak_gflops']:.0f} (PyTorch); ours is {result['speedup_median']:.2f}x "
        f"faster at the median step ({result['speedup_best']:.2f}x at the best)")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
