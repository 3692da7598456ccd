"""Knowledge Swapping at paper scale: ViT-B/16 fine-tuned on ImageNet-100 (a .npz), forget the
last 5 of its classes, retain the other 95 (10% of their train images, seed 1337), learn 5 (or
10) classes of CUB-200-2011, Oxford-IIIT Pet or PlantVillage (labels 100 + k).

  kswap swap --config configs/swap_imagenet100.py:learn=cub \\
      --config.init.checkpoint=/path/vit_b16_imagenet100.npz --workdir runs/swap_in100_cub

Arguments: learn (cub | pets | plants), num_learn (5 | 10), order, seed, runlocal.
Needs the TFDS datasets prepared in data.data_dir (array_record reads without TensorFlow).
"""
import ml_collections

from kswap_jax import config_lib

LEARN = {  # dataset, train split, test split
    "cub": ("caltech_birds2011", "train", "test"),
    "pets": ("oxford_iiit_pet", "train", "test"),
    "plants": ("plant_village", "train[:80%]", "train[80%:]"),  # one split only: hold out 20%
}


JOB = "swap"  # the kswap job this config is for
# Its arguments (`--config FILE:key=value,flag`) and their defaults.
ARGS = {"runlocal": False, "learn": "cub", "num_learn": 5, "order": "lbf", "seed": 0}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **ARGS)
  c = ml_collections.ConfigDict()
  c.seed, c.order = a.seed, a.order
  c.data = config_lib.imagenet_data(224 if not a.runlocal else 32)
  # Every image resized straight to 224 x 224, no augmentation (exchange_fltf.py,
  # data_transform: Resize((224, 224))).
  c.data.update(resize=0, train_crop="none", flip=False)
  classes = list(config_lib.IMAGENET100)
  if a.runlocal:  # tiny shapes, few classes, same code path
    classes = classes[:10]
  # int(0.1 n) images drawn from each whole set (exchange_fltf.py lines 411-418); seed ours.
  imagenet = lambda cls, frac: ml_collections.ConfigDict(dict(  # noqa: E731
      dataset="imagenet2012", classes=",".join(cls), fraction=frac, fraction_of="set",
      per_class=0, seed=1337))
  dataset, train_split, test_split = LEARN[a.learn]
  # Which 5 classes are forgotten is the user's folder split in the authors' code; ours: the
  # last 5 of the list.
  c.sets = ml_collections.ConfigDict(dict(
      retain=imagenet(classes[:-5] if not a.runlocal else classes[:-2], 0.1),
      forget=imagenet(classes[-5:] if not a.runlocal else classes[-2:], 0.1),
      learn=ml_collections.ConfigDict(dict(
          dataset=dataset, classes=f"0-{a.num_learn - 1}", fraction=1.0, per_class=0, seed=0,
          train_split=train_split, test_split=test_split))))
  c.model = ml_collections.ConfigDict(dict(variant="B/16" if not a.runlocal else "Nano/8",
                                           dropout=0.1,  # dropout_rate 0.1 (exchange_fltf.py 93)
                                           dtype="float32", attention="einsum"))
  # The .npz's head has 100 rows in the order of init.classes (labels 0-99).
  c.init = ml_collections.ConfigDict(dict(checkpoint="", dataset="imagenet2012",
                                          classes=",".join(classes)))
  c.lora = config_lib.lora(rank=8, alpha=1.0, a_init="small")  # --lora_rank 8, FFN layers
  # Only the LoRA trains (exchange_fltf.py line 343: lora.mark_only_lora_as_trainable); the new
  # classes' head rows stay as initialised. head="train" (ours) also trains the head.
  c.head = "frozen"
  c.sparse_group = "block"
  # LBF's forget stage trains on R' = R + L in one loader (KnowledgeSwapping
  # semantic-segmentation/swapping_fltf.py:707); "paired" (ours): L as its own batch.
  c.learn_replay = "joined"
  # A study's ranking (methods.swap.Recipe.score): no retain condition (a metric in percent
  # never falls 100 points).
  c.select_retain_drop = 100.0
  # Loss weights (engine_cl.py: learn stage loss_learn + beta * loss_remain + alpha * S, line
  # 271; forget stage loss_remain + beta * loss_forget + alpha * S, line 86) and the script's
  # values (scripts/first_forget.sh: --beta 0.2 --alpha 0.005 --BND 105).
  c.weights = ml_collections.ConfigDict(dict(
      learn=1.0, retain_in_learn=0.2, retain=1.0, forget=0.2, bound=105.0, sparse=0.005))
  # first_forget.sh: -b 80, --lr 1e-2, --min-lr 1e-5, -e 5 per stage; AdamW, weight decay
  # 0.05, cosine (util/args.py defaults).
  c.train = ml_collections.ConfigDict(dict(
      batch_size=80 if not a.runlocal else 4, lr=1e-2, lr_end=1e-5, weight_decay=0.05,
      epochs=ml_collections.ConfigDict(dict(learn=5, forget=5, swap=5))))
  if a.runlocal:
    c.train.epochs.update(learn=1, forget=1, swap=1)
  return config_lib.common(c, a.runlocal, host_memory="retained")
