"""The embedded demo's vision tower: `demo-siglip` pretrained on the demo's scenes.

GenieBlue starts from a pretrained SigLIP; the demo has none, and a random tower's features
do not separate the scenes' objects well enough for a tiny MLLM to learn grounding in a few
hundred CPU steps. So, as the demo pretrains its base LLM, it pretrains its ViT: dense
supervision, a linear head on every output token predicting the object kind under its
patch (`experiments.demo_data.patch_kinds`: background or one of 15 shape x colour
kinds), on square scenes of a split of its own ("vision"), never the train / eval splits.
The head is thrown away; the tower is saved as a genieblue_jax checkpoint ("vision"
component) that `init.vit_checkpoint` reads. About 30 s on a 2-core CPU for 400 steps.

    python -m experiments.demo_vision --out /tmp/vit --steps 400     # or via experiments.demo
"""
from __future__ import annotations

import time

import numpy as np


def scenes(n: int, seed: int, image_size: int, patch: int, scene: str = "grid"):
    """(pixels float32 (m, S, S, 3) normalised, labels int32 (m, S/patch * S/patch)) for the
    square scenes among the first n of split "vision" in style `scene` (demo_data.SCENES)."""
    from data_pipelines.images import decode_image, normalize
    from experiments.demo_data import demo_items, patch_kinds
    pixels, labels = [], []
    for ex, meta in demo_items("vision", n, seed, image_size=image_size, mixture={"caption": 1},
                                  scene=scene):
        if meta["size"] != (image_size, image_size):
            continue
        image = decode_image(ex.images[0])
        pixels.append(normalize(image))
        labels.append(patch_kinds(image, meta, patch).reshape(-1))
    return np.stack(pixels), np.stack(labels)


def pretrain(out: str, *, preset: str = "demo-siglip", steps: int = 400, examples: int = 4000,
             batch_size: int = 32, lr: float = 3e-3, seed: int = 0, log_every: int = 100,
             scene: str = "grid") -> dict:
    """Trains the tower (module docstring), saves it to `out`; returns {"path", "patch_accuracy",
    "object_patch_accuracy", "seconds"} measured on 400 held-out scenes."""
    import flax.linen as nn
    import jax
    import optax

    from experiments.demo_data import KINDS
    from genieblue_jax import checkpoint, models
    from genieblue_jax.models.siglip import SiglipVisionTower
    t0 = time.perf_counter()
    cfg = models.get_preset(preset)
    x_train, y_train = scenes(examples, seed, cfg.image_size, cfg.patch_size, scene)
    x_test, y_test = scenes(400, seed + 1, cfg.image_size, cfg.patch_size, scene)

    class Tagger(nn.Module):
        @nn.compact
        def __call__(self, pixels):
            tokens = SiglipVisionTower(cfg, name="vision")(pixels)["tokens"]
            return nn.Dense(len(KINDS) + 1, name="head")(tokens)

    model = Tagger()
    params = model.init(jax.random.key(seed), x_train[:1])["params"]
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(20, steps - 1), steps), weight_decay=1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for i in range(1, steps + 1):
        idx = rng.integers(0, len(x_train), batch_size)
        params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])
        if log_every and (i % log_every == 0 or i == steps):
            print(f"vision tower step {i}/{steps}: loss {float(loss):.3f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    pred = np.asarray(jax.jit(model.apply)({"params": params}, x_test)).argmax(-1)
    objects = y_test > 0
    result = {"patch_accuracy": float((pred == y_test).mean()),
              "object_patch_accuracy": float((pred[objects] == y_test[objects]).mean())}
    checkpoint.save(out, {"vision": cfg}, {"vision": params["vision"]},
                    source={"pretrained": "experiments.demo_vision", "steps": steps, "scene": scene, **result},
                    overwrite=True)
    return {"path": out, **result, "seconds": round(time.perf_counter() - t0, 1)}


if __name__ == "__main__":
    import argparse
    import json
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scene", default="grid", help="scene style: grid | single")
    args = parser.parse_args()
    print(json.dumps(pretrain(args.out, steps=args.steps, seed=args.seed, scene=args.scene), indent=1))
