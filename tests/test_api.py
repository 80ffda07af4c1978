"""`genieblue_jax.load` on a trained tiny model: routing (non-shared base), workdir and
checkpoint loading, and the errors bad input gets.

The model is trained by the real engine (3 stage-2 steps on the demo data) around a base
LLM imported from a random `transformers` Qwen2 model, so "the base model" is an artifact
of its own that the trained MLLM's text path must reproduce exactly.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import genieblue_jax
from data_pipelines.images import num_tiles
from genieblue_jax import checkpoint, inference, models, structure
from genieblue_jax.hf import import_hf
from genieblue_jax.train import trainer
from tests.train.conftest import tiny_config

pytestmark = pytest.mark.slow  # the integration tier (setup.cfg); `pytest -m "not slow"` skips it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=512))
    with torch.no_grad():  # weights of a "pretrained" scale, so greedy decoding does not repeat one token
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(root / "hf_llm", safe_serialization=True)
    import_hf(str(root / "hf_llm"), out=str(root / "llm_ckpt"))
    workdir = str(root / "run")
    trainer.train(tiny_config(**{"train.steps": 3, "init.llm_checkpoint": str(root / "llm_ckpt")}), workdir)
    image = root / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 120, 3), dtype=np.uint8)).save(image)
    return {"root": root, "hf": str(root / "hf_llm"), "workdir": workdir, "image": str(image),
            "model": genieblue_jax.load(workdir)}


def test_a_workdir_records_the_package_versions_it_trained_with(trained):
    from tests.test_versions import module_versions
    assert trained["model"].source["packages"] == module_versions()  # the checkpoint's meta


def test_text_requests_run_the_base_model_exactly(trained):
    model, base = trained["model"], genieblue_jax.load(trained["hf"])
    assert model.is_mllm and not base.is_mllm and model.mcfg.structure.name == "genieblue-skip"
    for name, leaf in structure.merge_trees({}, model.params["llm"]).items():  # frozen means frozen
        jax.tree.map(np.testing.assert_array_equal, leaf, base.params["llm"][name])
    ids = model.requests.encode("What is 3 plus 4?").tokens
    np.testing.assert_array_equal(model.logits([ids]), base.logits([ids]))
    text, (result,) = model.generate("What is 3 plus 4?", max_new_tokens=16, stop_tokens=(), return_tokens=True)
    _, (base_result,) = base.generate([ids], max_new_tokens=16, return_tokens=True)
    np.testing.assert_array_equal(result.tokens, base_result.tokens)
    assert len(set(result.tokens[0].tolist())) > 3, result.tokens  # a real continuation
    assert text == model.tokenizer.decode(result.tokens[0].tolist())
    # shared mode runs the trained branch on text: another model
    shared = model.logits([ids], mode="shared")
    assert np.abs(shared - model.logits([ids])).max() > 1e-4


def test_image_requests_run_the_multimodal_path(trained):
    model = trained["model"]
    req = model.requests.encode("Describe the image.", [trained["image"]])
    # the recipe's dynamic resolution (at most 4 tiles of 56 px) + the thumbnail
    assert len(req.tiles) == num_tiles(120, 70, tile=56, mode="dynamic", max_tiles=4) > 1
    ids, images = np.asarray([req.tokens]), req.tiles[None]
    first_image = int(np.argmax(ids[0] == model.mcfg.image_token_id))
    multimodal = model.logits(ids, images=images)  # routed: images -> multimodal
    # The same request through the multimodal model assembled another way: LoRA folded into
    # the kernels (W + A B alpha / r) and the replicated blocks swapped in, run as a plain
    # dense decoder (structure.fold_lora + structure.decode, the deployment path), not the
    # runtime-LoRA branch `forward` runs. float32; logits are of order 10 here.
    folded, kinds = structure.fold_lora(model.mcfg, model.params["llm"], model.params["branch"])
    assert set(kinds) == {"base"}
    assembled = np.asarray(structure.decode(
        model.mcfg, models.DecoderLM(model.mcfg.llm, kinds), folded, model.params, jnp.asarray(ids, jnp.int32),
        jnp.arange(ids.shape[1])[None], jnp.ones(ids.shape, jnp.int32), jnp.asarray(images)))
    diff_folded = np.abs(multimodal - assembled).max()
    prefix = ids[:, :first_image]
    # before the image, the multimodal path is the branch on text (= shared), not the base
    diff_shared = np.abs(multimodal[:, :first_image] - model.logits(prefix, mode="shared")).max()
    diff_base = np.abs(multimodal[:, :first_image] - model.logits(prefix, mode="text")).max()
    print(f"image request: vs LoRA folded {diff_folded:.1e}; text before the image: vs shared {diff_shared:.1e}, "
          f"vs base {diff_base:.1e}")
    assert diff_folded <= 1e-4 and diff_shared <= 1e-4 and diff_base > 1e-2
    # generation with the image = greedy decoding of the multimodal path
    _, (result,) = model.generate("Describe the image.", images=[trained["image"]], max_new_tokens=8, stop_tokens=(),
                                  return_tokens=True)
    want = inference.generate(model.mcfg, model.params, [req.tokens], mode="multimodal", images=images,
                              max_new_tokens=8)
    np.testing.assert_array_equal(result.tokens, want.tokens)


def test_a_mixed_batch_routes_each_request(trained):
    model = trained["model"]
    prompts = ["What is 3 plus 4?", "Describe the image.", "What is 5 plus 1?"]
    texts, results = model.generate(prompts, images=[None, [trained["image"]], None], max_new_tokens=6,
                                    return_tokens=True)
    assert len(texts) == 3 and len(results) == 2  # one text sub-batch (rows 0, 2), one multimodal
    assert texts[0] == model.generate(prompts[0], max_new_tokens=6)
    assert texts[1] == model.generate(prompts[1], images=[trained["image"]], max_new_tokens=6)


def test_workdir_checkpoint_and_step_directory_load_the_same_model(trained, tmp_path):
    model = trained["model"]
    path = model.save(str(tmp_path / "mllm"))
    again = genieblue_jax.load(path)
    assert again.mcfg == model.mcfg and again.preprocessing == model.preprocessing == {"image_mode": "dynamic",
                                                                                        "max_tiles": 4}
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert again.requests.encode("hi").tokens == model.requests.encode("hi").tokens  # tokenizer travelled
    step = genieblue_jax.load(os.path.join(trained["workdir"], "checkpoints", "3"))
    np.testing.assert_array_equal(np.asarray(step.params["branch"]["layers_0"]["mlp"]["up_proj"]["kernel"]),
                                  np.asarray(model.params["branch"]["layers_0"]["mlp"]["up_proj"]["kernel"]))
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        model.save(path)

    # Written before a 384-px crop became a tile: genieblue.json's preprocessing and a workdir's
    # config.json said max_patches; both load, under the new names.
    meta_file = os.path.join(path, "genieblue.json")
    meta = json.load(open(meta_file))
    meta["mllm"]["preprocessing"] = {"image_mode": "dynamic", "max_patches": 4}
    json.dump(meta, open(meta_file, "w"))
    assert genieblue_jax.load(path).preprocessing == {"image_mode": "dynamic", "max_tiles": 4}
    old = shutil.copytree(trained["workdir"], tmp_path / "old_workdir")
    config = json.load(open(old / "config.json"))
    config["data"]["max_patches"], config["data"]["max_patches_per_row"] = (config["data"].pop("max_tiles"),
                                                                            config["data"].pop("max_tiles_per_row"))
    json.dump(config, open(old / "config.json", "w"))
    assert genieblue_jax.load(str(old)).preprocessing == {"image_mode": "dynamic", "max_tiles": 4}


def test_bad_input_names_the_culprit(trained, tmp_path):
    model, workdir = trained["model"], trained["workdir"]
    with pytest.raises(FileNotFoundError, match="no-such-dir: no such directory"):
        genieblue_jax.load(str(tmp_path / "no-such-dir"))
    with pytest.raises(FileNotFoundError, match="neither a training workdir"):
        genieblue_jax.load(str(tmp_path))
    # a workdir whose config.json says another variant than its checkpoints hold
    other = str(tmp_path / "other")
    shutil.copytree(workdir, other)
    with open(os.path.join(other, "config.json")) as f:
        cfg = json.load(f)
    cfg["model"]["variant"] = "lora"
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="step 3 is stage2 / genieblue-skip, but config.json says stage2 / lora"):
        genieblue_jax.load(other)
    with pytest.raises(FileNotFoundError, match="no step 7; saved steps"):
        genieblue_jax.load(workdir, step=7)
    # a checkpoint missing its parameters
    broken = str(tmp_path / "broken")
    model.save(broken)
    shutil.rmtree(os.path.join(broken, checkpoint.PARAMS_DIR))
    with pytest.raises(FileNotFoundError, match="params/ is missing"):
        genieblue_jax.load(broken)
    # a checkpoint whose metadata names another variant than its parameters
    other_variant = str(tmp_path / "other_variant")
    model.save(other_variant)
    with open(os.path.join(other_variant, checkpoint.META_FILE)) as f:
        meta = json.load(f)
    meta["mllm"]["structure"]["variant"] = "cogvlm"
    with open(os.path.join(other_variant, checkpoint.META_FILE), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError,
                       match=r"params: the stored parameters do not match genieblue.json \(a cogvlm-skip MLLM\)"):
        genieblue_jax.load(other_variant)
    # requests
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=f"prompt 0, image 0: {bad} is not a readable image"):
        model.generate("What is this?", images=[str(bad)])
    with pytest.raises(FileNotFoundError, match="missing.png not found"):
        model.generate("What is this?", images=[str(tmp_path / "missing.png")])
    n = len(model.requests.encode("What is 3 plus 4?").tokens)  # context = the LLM's 512 positions
    with pytest.raises(ValueError, match=rf"prompt 0: {n} tokens \+ max_new_tokens={513 - n} exceed the model's "
                                         "context of 512 tokens"):
        model.generate("What is 3 plus 4?", max_new_tokens=513 - n)
    with pytest.raises(ValueError, match=r"2 <image> tag\(s\) in the prompt but 1 image"):
        model.generate("<image> and <image>?", images=[trained["image"]])
    with pytest.raises(ValueError, match="mode='text' runs the base LLM alone and takes no images"):
        model.generate("Describe.", images=[trained["image"]], mode="text")
    ids = model.requests.encode("Describe.", [trained["image"]]).tokens
    with pytest.raises(ValueError, match="image tokens .* but no images"):
        model.logits([ids], mode="multimodal")
    with pytest.raises(ValueError, match="needs a multimodal model"):
        genieblue_jax.load(trained["hf"]).logits([[1, 2]], mode="multimodal")


def test_chat_tool(trained):
    from genieblue_jax.cli.chat import Conversation, interactive
    model = trained["model"]
    lines = iter(["What is 3 plus 4?", f"/image {trained['image']}", "/image nope.png", "Describe it.", "/mode text",
                  "And now?", "/reset", "/mode auto", "Hello"])
    out = []

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    interactive(Conversation(model, None, max_new_tokens=4), read=read, write=out.append)
    statuses = [line for line in out if line.startswith("[")]
    assert [s.split(";")[0] for s in statuses] == [
        "[base LLM (non-shared)", "[multimodal path (replicated blocks + LoRA)", "[base LLM (non-shared)"], out
    assert any("nope.png not found" in line for line in out)
    assert any("mode='text' runs the base LLM alone" in line for line in out)  # the image is still in the chat
    run = subprocess.run([sys.executable, "-m", "tools.chat", "--checkpoint", trained["workdir"], "--prompt",
                          "What is 3 plus 4?", "--max_new_tokens", "4"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "[base LLM (non-shared); " in run.stderr
    assert run.stdout.rstrip("\n") == model.generate("What is 3 plus 4?", max_new_tokens=4).rstrip("\n")


def test_a_workdir_from_before_the_typed_run_config_loads_bitwise(tmp_path, monkeypatch):
    """tests/data/workdir_before_run_config (made by its make.py at commit 274858c): a stage-2
    workdir written before the typed run config (its config.json records no model config; its
    base's init checkpoints beside it, named relative to that folder), and the same model saved
    then as a checkpoint (`GenieBlue.save`). Loaded now, the workdir (the model derived from its
    recipe, the base read from the init checkpoints and checked against its fingerprint, the
    trained parts from Orbax) and the checkpoint (every weight read back) give the same logits,
    bit for bit, on the text path and on an image request."""
    shutil.copytree(os.path.join(REPO, "tests", "data", "workdir_before_run_config"), tmp_path / "old")
    monkeypatch.chdir(tmp_path / "old")
    with open("workdir/config.json") as f:
        assert "mllm_config" not in json.load(f)
    from_workdir = genieblue_jax.load("workdir")
    from_checkpoint = genieblue_jax.load("checkpoint")
    assert from_workdir.mcfg == from_checkpoint.mcfg and from_workdir.source["step"] == 2
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    req = from_workdir.requests.encode("What colour is the circle?", [image])
    text = from_workdir.requests.encode("What is 3 plus 4?").tokens
    for model in (from_workdir, from_checkpoint):
        assert model.requests.encode("What colour is the circle?", [image]).tokens == req.tokens
    np.testing.assert_array_equal(from_workdir.logits([text]), from_checkpoint.logits([text]))
    np.testing.assert_array_equal(from_workdir.logits([req.tokens], images=req.tiles[None]),
                                  from_checkpoint.logits([req.tokens], images=req.tiles[None]))


def test_a_workdir_records_the_model_config_its_init_checkpoint_gave(trained):
    """The recipe names the tiny-qwen2 preset, but the base came from an imported checkpoint of
    other shapes (max_position_embeddings 512): config.json records the model as trained, every
    shape, and the workdir's model is read from that record, not re-derived from the preset."""
    from genieblue_jax import workdir
    with open(os.path.join(trained["workdir"], "config.json")) as f:
        recorded = json.load(f)
    imported = genieblue_jax.load(trained["hf"]).configs["llm"]
    assert recorded["model"]["llm"] == "tiny-qwen2" != imported
    llm = recorded["mllm_config"]["llm"]
    assert llm["max_position_embeddings"] == imported.max_position_embeddings == 512
    assert models.get_preset("tiny-qwen2").max_position_embeddings == 2048
    assert {k: llm[k] for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                "intermediate_size", "rope_theta", "tie_embeddings")} == \
        {k: getattr(imported, k) for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                           "head_dim", "intermediate_size", "rope_theta", "tie_embeddings")}
    record, loaded = workdir.read_model_config(trained["workdir"]), trained["model"].mcfg
    assert record.llm.replace(remat=False) == loaded.llm and (record.vision, record.projector, record.structure,
                                                              record.image_token_id) == (
        loaded.vision, loaded.projector, loaded.structure, loaded.image_token_id)
