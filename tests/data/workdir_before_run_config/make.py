"""Makes tests/data/workdir_before_run_config with genieblue_jax as it was before the typed run
config (run from a checkout of commit 274858c: python make.py OUT): a tiny stage-2 workdir whose
frozen base comes from init checkpoints stored beside it (base/, named by relative paths in its
config.json, so the test loads it from that folder on any machine), and the same trained model
saved as a checkpoint (checkpoint/)."""
import json
import os
import shutil
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.getcwd())

import jax  # noqa: E402

import genieblue_jax  # noqa: E402
from genieblue_jax import checkpoint, models  # noqa: E402
from genieblue_jax.train import trainer  # noqa: E402
from tests.train.conftest import tiny_config  # noqa: E402

out = os.path.abspath(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
os.makedirs(out)
c = tiny_config(**{"train.steps": 2, "checkpoint.every_steps": 2})
llm, vit = models.get_preset(c.model.llm), models.get_preset(c.model.vit)
checkpoint.save(os.path.join(out, "base", "llm"), {"llm": llm}, {"llm": models.init_params(llm, jax.random.key(1))},
                tokenizer=c.data.tokenizer)
checkpoint.save(os.path.join(out, "base", "vision"), {"vision": vit},
                {"vision": models.init_params(vit, jax.random.key(2))})
c.init.llm_checkpoint, c.init.vit_checkpoint = os.path.join(out, "base", "llm"), os.path.join(out, "base", "vision")
run = os.path.join(out, "workdir")
trainer.train(c, run)
# Paths relative to the folder (the test runs there); the training data is not needed to load the model.
cfg = json.load(open(os.path.join(run, "config.json")))
cfg["init"].update(llm_checkpoint="base/llm", vit_checkpoint="base/vision")
cfg["data"].update(tokenizer="base/llm/hf_assets/tokenizer.model", sources="vqa=data/vqa")
json.dump(cfg, open(os.path.join(run, "config.json"), "w"), indent=2)
for name in ("tensorboard", ".lock"):
    p = os.path.join(run, name)
    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.path.exists(p) and os.remove(p)
os.chdir(out)
model = genieblue_jax.load("workdir")
model.save("checkpoint")
print(model)
