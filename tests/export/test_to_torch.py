"""PyTorch / Hugging Face export (`tools.to_torch`): transformers and PEFT reload our tiny
MLLM (tests/structure's 8-layer Qwen2 + SigLIP) and reproduce its logits, text path and
multimodal path, merged and unmerged, for GenieBlue-Skip / -Post and the LoRA variant.

Every parameter is random (numpy, seeded; norm scales around 1), so LoRA B is far from zero
and the replicated blocks differ from the base: a dropped adapter or an unswapped block
cannot pass (asserted below, not assumed). Parity is measured at the valid positions of
batches with left- and right-padded rows; `-s` prints the figures.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import genieblue_jax
from genieblue_jax import checkpoint, models, structure
from genieblue_jax.export import to_torch
from genieblue_jax.export.to_torch import UnsupportedVariantError, export_torch
from genieblue_jax.export.torch_modules import load_torch_mllm
from tests.structure.conftest import IMAGE_TOKEN, make_mcfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-4
PARTS = ["base_llm", "lora_adapter", "multimodal_llm", "projector", "vision_tower"]


def _random(tree, seed):
    rng = np.random.default_rng(seed)
    flat = models.flatten(tree)
    return models.unflatten({p: ((1.0 if p.endswith("/scale") else 0.0)
                                 + (0.1 if p.endswith("/scale") else 0.05) * rng.standard_normal(a.shape)
                                 ).astype(np.float32) for p, a in sorted(flat.items())})


def _model(variant, placement="skip"):
    """A GenieBlue MLLM in memory: one random base (LLM + ViT) for every variant, as in the
    paper; projector and branch random per structure."""
    mcfg = make_mcfg(variant, placement)
    abstract = structure.abstract_mllm(mcfg)
    params = {"llm": _random(abstract["llm"], 1), "vision": _random(abstract["vision"], 2),
              "projector": _random(abstract["projector"], 3),
              "branch": _random(abstract["branch"], 4 + structure.VARIANTS.index(variant))}
    configs = {"llm": mcfg.llm, "vision": mcfg.vision, "projector": mcfg.projector}
    return genieblue_jax.GenieBlue(configs, params, mcfg=mcfg)


def _text_batch():
    ids = np.random.default_rng(0).integers(0, 500, size=(3, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    return ids, mask


def _image_batch(mcfg):
    """Two rows of 48 tokens, two tiles each (2 x 16 image tokens); row 1 left-padded."""
    rng = np.random.default_rng(1)
    k = 2 * mcfg.tokens_per_tile
    ids = rng.integers(0, 500, size=(2, 48)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :6] = 0
    ids[0, 3:3 + k] = IMAGE_TOKEN
    ids[1, 9:9 + k] = IMAGE_TOKEN
    s = mcfg.vision.image_size
    return ids, mask, rng.uniform(-1, 1, size=(2, 2, s, s, 3)).astype(np.float32)


def _diff(ours, theirs, mask):
    theirs = theirs.float().numpy() if isinstance(theirs, torch.Tensor) else theirs
    return float(np.abs(ours - theirs)[mask.astype(bool)].max())


def _load_clean(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    return model.eval()


def _lora_layers(peft_model):
    """Layer indices that carry a PEFT LoRA module, per target."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            parts = name.split(".")
            out.setdefault(parts[-1], set()).add(int(parts[parts.index("layers") + 1]))
    return {k: sorted(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def skip(tmp_path_factory):
    """GenieBlue-Skip saved as a checkpoint (with a tokenizer) and exported by the CLI (the
    one subprocess of this file); its JAX reference logits."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    tmp = tmp_path_factory.mktemp("to_torch")
    tok = Tokenizer(tok_models.WordLevel({"<unk>": 0, "hello": 1, "world": 2, "<|im_end|>": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp / "tokenizer.json"))
    model = _model("genieblue")
    ckpt = checkpoint.save_mllm(str(tmp / "ckpt"), model.mcfg, model.params, tokenizer=str(tmp / "tokenizer.json"),
                                preprocessing={"image_mode": "dynamic", "max_tiles": 4})
    out = str(tmp / "out")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tools.to_torch", "--checkpoint", ckpt, "--out", out],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr[-3000:]
    text_ids, text_mask = _text_batch()
    ids, mask, images = _image_batch(model.mcfg)
    refs = {"text": model.logits(text_ids, text_mask, mode="text"),
            "multimodal": model.logits(ids, mask, images=images)}
    return {"model": model, "tmp": tmp, "ckpt": ckpt, "out": out, "stdout": proc.stdout, "seconds": seconds,
            "refs": refs}


@pytest.mark.slow
def test_cli_writes_every_part(skip):
    out = skip["out"]
    print(f"\nCLI export: {skip['seconds']:.1f} s (subprocess)\n{skip['stdout']}")
    for part in PARTS:
        assert f"{part}/" in skip["stdout"] and os.path.join(out, part) in skip["stdout"]
    assert sorted(os.listdir(out)) == sorted(PARTS + ["README.md", "genieblue_torch.json"])
    m = json.loads(open(os.path.join(out, "genieblue_torch.json")).read())
    assert m["parts"] == {p: p for p in to_torch.PARTS} and m["multimodal"] is True
    assert (m["variant"], m["structure"]["name"], m["replicated_layers"], m["lora_layers"]) == \
        ("genieblue", "genieblue-skip", [0, 4], [1, 2, 3, 5, 6, 7])
    assert (m["image_token_id"], m["tokens_per_tile"], m["select_layer"], m["vision_use_head"]) == (511, 16, -1, True)
    assert m["preprocessing"] == {"image_mode": "dynamic", "max_tiles": 4}
    assert (m["merge_lora"], m["dtype"], m["genieblue_jax_version"]) == (False, "float32", genieblue_jax.__version__)
    assert m["routing"]["text"] == "base_llm" and m["routing"]["images"] == "multimodal_llm + lora_adapter"
    assert m["source"]["path"] == skip["ckpt"]
    # the tokenizer travels with base_llm, byte for byte, and transformers reads it
    assert m["tokenizer"] == "base_llm/tokenizer.json"
    tok_file = os.path.join(out, "base_llm", "tokenizer.json")
    assert open(tok_file).read() == (skip["tmp"] / "tokenizer.json").read_text()
    assert transformers.PreTrainedTokenizerFast(tokenizer_file=tok_file)("hello world").input_ids == [1, 2]
    readme = open(os.path.join(out, "README.md")).read()
    for needle in ("PeftModel.from_pretrained", "load_torch_mllm", "without images** runs `base_llm`",
                   "layers [1, 2, 3, 5, 6, 7]", "id 511"):
        assert needle in readme, needle
    with open(os.path.join(out, "projector", "config.json")) as f:
        assert models.config_from_dict(json.load(f)) == skip["model"].mcfg.projector


def test_adapter_config_and_tensors_are_exact(skip):
    d = os.path.join(skip["out"], "lora_adapter")
    assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads(open(os.path.join(d, "adapter_config.json")).read()) == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "revision": None,
        "inference_mode": True, "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "layers_to_transform": [1, 2, 3, 5, 6, 7], "layers_pattern": "layers", "fan_in_fan_out": False,
        "modules_to_save": None, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}}
    tensors = safetensors.numpy.load_file(os.path.join(d, "adapter_model.safetensors"))
    branch = models.flatten(skip["model"].params["branch"])
    assert len(tensors) == 6 * 7 * 2
    for j in (1, 2, 3, 5, 6, 7):
        for target, group in [("q_proj", "self_attn"), ("o_proj", "self_attn"), ("down_proj", "mlp")]:
            ours = f"layers_{j}/{group}/{target}"
            theirs = f"base_model.model.model.layers.{j}.{group}.{target}"
            a, b = tensors[f"{theirs}.lora_A.weight"], tensors[f"{theirs}.lora_B.weight"]
            np.testing.assert_array_equal(a, branch[f"{ours}/lora_a"].T)  # (r, in)
            np.testing.assert_array_equal(b, branch[f"{ours}/lora_b"].T)  # (out, r)
            assert a.shape[0] == b.shape[1] == 8 and np.abs(b).min() > 0  # B far from its zero init


def test_base_llm_matches_the_text_mode(skip):
    ids, mask = _text_batch()
    base = _load_clean(os.path.join(skip["out"], "base_llm"))
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    with torch.no_grad():
        got = base(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   position_ids=torch.from_numpy(positions)).logits
    d = _diff(skip["refs"]["text"], got, mask)
    print(f"\nbase_llm (transformers) vs ours mode='text': max |diff| {d:.1e} "
          f"(logits up to {np.abs(skip['refs']['text']).max():.1f})")
    assert d <= TOL


def test_multimodal_matches_through_peft(skip):
    """The CLI's export, loaded as the README says: transformers + PEFT, unmerged and merged
    (merge_and_unload), against our multimodal logits on images + text; text via base_llm."""
    out, refs = skip["out"], skip["refs"]
    ids, mask, images = _image_batch(skip["model"].mcfg)
    text_ids, text_mask = _text_batch()
    unmerged = load_torch_mllm(out, merge_lora=False)
    assert _lora_layers(unmerged.multimodal_llm) == {t: [1, 2, 3, 5, 6, 7] for t in to_torch.adapter_config(
        skip["model"].mcfg)["target_modules"]}
    d_unmerged = _diff(refs["multimodal"], unmerged.logits(ids, mask, images=images), mask)
    with unmerged.multimodal_llm.disable_adapter():
        d_no_lora = _diff(refs["multimodal"], unmerged.logits(ids, mask, images=images), mask)
    merged = load_torch_mllm(out)  # PeftModel.from_pretrained(...).merge_and_unload()
    assert isinstance(merged.multimodal_llm, transformers.Qwen2ForCausalLM)
    d_merged = _diff(refs["multimodal"], merged.logits(ids, mask, images=images), mask)
    d_text = _diff(refs["text"], merged.logits(text_ids, text_mask), text_mask)
    d_text_path = _diff(refs["multimodal"], merged.logits(ids, mask, mode="text"), mask)
    print(f"\nmultimodal (PEFT unmerged) {d_unmerged:.1e}, (PEFT merge_and_unload) {d_merged:.1e}, "
          f"text via load_torch_mllm {d_text:.1e}; controls: adapter disabled {d_no_lora:.2f}, "
          f"base LLM on the image input {d_text_path:.2f}")
    assert d_unmerged <= TOL and d_merged <= TOL and d_text <= TOL
    assert d_no_lora > 100 * TOL and d_text_path > 100 * TOL  # LoRA and the swapped blocks both matter
    # the replicated blocks differ from the base's, every other tensor is the base's
    base, mm = merged.base_llm.state_dict(), _load_clean(os.path.join(out, "multimodal_llm")).state_dict()
    changed = sorted({int(k.split(".")[2]) for k in base if not torch.equal(base[k], mm[k])})
    assert changed == [0, 4]


def test_merge_lora_export(skip):
    model, refs = skip["model"], skip["refs"]
    result = export_torch(model, str(skip["tmp"] / "merged"), merge_lora=True)
    assert sorted(result.parts) == ["base_llm", "multimodal_llm", "projector", "vision_tower"]
    assert not os.path.exists(os.path.join(result.out_dir, "lora_adapter"))
    assert result.manifest["merge_lora"] is True and result.manifest["routing"]["images"] == "multimodal_llm"
    ids, mask, images = _image_batch(model.mcfg)
    loaded = load_torch_mllm(result.out_dir)
    d = _diff(refs["multimodal"], loaded.logits(ids, mask, images=images), mask)
    sizes = result.sizes()
    print(f"\n--merge_lora: multimodal max |diff| {d:.1e}; sizes (bytes) {sizes}")
    assert d <= TOL
    _load_clean(os.path.join(result.out_dir, "multimodal_llm"))
    # greedy generation (KV cache) agrees with our logits and with recomputing the sequence
    new = loaded.generate(ids[1:], mask[1:], images=images[1:], max_new_tokens=4)[0]
    assert new[0] == int(refs["multimodal"][1, -1].argmax())
    ids2 = np.concatenate([ids[1:], np.array([new[:-1]])], axis=1)
    mask2 = np.concatenate([mask[1:], np.ones((1, len(new) - 1), np.int64)], axis=1)
    again = loaded.logits(ids2, mask2, images=images[1:])[0, -len(new):].argmax(-1).tolist()
    assert again == new


@pytest.mark.parametrize("variant,placement,lora", [("genieblue", "post", [0, 1, 2, 3, 4, 5]),
                                                    ("lora", "skip", list(range(8)))])
def test_other_structures(variant, placement, lora, tmp_path):
    model = _model(variant, placement)
    result = export_torch(model, str(tmp_path / "out"))
    cfg = json.loads(open(os.path.join(result.out_dir, "lora_adapter", "adapter_config.json")).read())
    assert cfg["layers_to_transform"] == lora == result.manifest["lora_layers"]
    ids, mask, images = _image_batch(model.mcfg)
    ref = model.logits(ids, mask, images=images)
    unmerged = load_torch_mllm(result.out_dir, merge_lora=False)
    assert set(map(tuple, _lora_layers(unmerged.multimodal_llm).values())) == {tuple(lora)}
    d = _diff(ref, load_torch_mllm(result.out_dir).logits(ids, mask, images=images), mask)
    base = unmerged.base_llm.state_dict()
    mm = _load_clean(os.path.join(result.out_dir, "multimodal_llm")).state_dict()
    changed = sorted({int(k.split(".")[2]) for k in base if not torch.equal(base[k], mm[k])})
    print(f"\n{model.mcfg.structure.name}: layers_to_transform {lora}, multimodal (PEFT merged) max |diff| {d:.1e}")
    assert d <= TOL
    assert changed == ([6, 7] if variant == "genieblue" else [])  # lora: multimodal_llm is the base


def test_full_variant_in_bfloat16(tmp_path):
    model = _model("full")
    result = export_torch(model, str(tmp_path / "out"), dtype="bfloat16")
    assert sorted(result.parts) == ["base_llm", "multimodal_llm", "projector", "vision_tower"]
    assert result.manifest["lora_layers"] == [] and result.manifest["routing"]["images"] == "multimodal_llm"
    for part in ("base_llm", "multimodal_llm", "vision_tower"):
        cfg = json.loads(open(os.path.join(result.out_dir, part, "config.json")).read())
        assert cfg["dtype"] == "bfloat16", part
    with safetensors.safe_open(os.path.join(result.out_dir, "projector", "projector.safetensors"), "np") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    loaded = load_torch_mllm(result.out_dir, torch_dtype=torch.bfloat16)
    assert next(loaded.multimodal_llm.parameters()).dtype == torch.bfloat16
    ids, mask, images = _image_batch(model.mcfg)
    assert torch.isfinite(loaded.logits(ids, mask, images=images)).all()
    base, mm = loaded.base_llm.state_dict(), loaded.multimodal_llm.state_dict()
    assert all(torch.equal(base[k], mm[k]) for k in base)  # full: the trained LLM on both paths


def test_cogvlm_is_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UnsupportedVariantError, match=r"cogvlm-skip model: variant 'cogvlm'.*"
                                                      r"Supported variants: genieblue, lora, full"):
        export_torch(_model("cogvlm"), str(out))
    assert not out.exists() and os.listdir(tmp_path) == []


def test_bad_input_names_the_culprit(skip, tmp_path):
    from genieblue_jax.cli import to_torch as tool
    with pytest.raises(FileNotFoundError, match=f"--checkpoint {tmp_path}/missing: no such directory"):
        tool.run(str(tmp_path / "missing"), str(tmp_path / "o"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        tool.run(str(tmp_path / "file"), str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/empty is neither a training workdir"):
        tool.run(str(tmp_path / "empty"), str(tmp_path / "o"))
    with pytest.raises(FileExistsError, match=f"--out {skip['out']} already exists.*--overwrite"):
        tool.run(skip["ckpt"], skip["out"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_torch(skip["model"], skip["out"])

    # an LLM-only model exports base_llm alone, and says so; the assembled loader refuses it
    llm_only = genieblue_jax.GenieBlue({"llm": skip["model"].mcfg.llm}, {"llm": skip["model"].params["llm"]})
    out = tmp_path / "llm_only"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = export_torch(llm_only, str(out), overwrite=True)
    assert sorted(result.parts) == ["base_llm"] and result.manifest["multimodal"] is False
    assert sorted(os.listdir(out)) == ["README.md", "base_llm", "genieblue_torch.json", "notes.txt"]
    assert "not a multimodal model" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match=r"not multimodal \(parts \['base_llm'\]\).*AutoModelForCausalLM"):
        load_torch_mllm(str(out))
    # --overwrite replaces an earlier export's parts (here the MLLM's replace the LLM-only ones)
    result = export_torch(skip["model"], str(out), overwrite=True, merge_lora=True)
    assert sorted(os.listdir(out)) == sorted(["README.md", "genieblue_torch.json", "notes.txt"] + PARTS[:1] +
                                             PARTS[2:])
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))  # no staging directory left


def test_tokenizer_files_keep_the_names_their_loaders_look_for(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "spm.model").write_bytes(b"sentencepiece")  # hf_assets/ keeps the trained file's own name
    (src / "tokenizer_config.json").write_text("{}")
    copied = to_torch.copy_tokenizer(str(src), str(dst))
    assert sorted(os.path.basename(f) for f in copied) == ["tokenizer.model", "tokenizer_config.json"]
    assert (dst / "tokenizer.model").read_bytes() == b"sentencepiece"
    (src / "spm.model").unlink()
    with pytest.raises(FileNotFoundError, match=f"{src} holds no tokenizer.json / tokenizer.model"):
        to_torch.copy_tokenizer(str(src), str(dst))
    (src / "demo.model").write_bytes(b"x")  # a workdir's tokenizer is a file: it comes with what lies beside it
    assert to_torch.copy_tokenizer(str(src / "demo.model"), str(dst)) == [str(dst / "tokenizer.model"),
                                                                           str(dst / "tokenizer_config.json")]
    (src / "tokenizer_config.json").unlink()
    assert to_torch.copy_tokenizer(str(src / "demo.model"), str(dst)) == [str(dst / "tokenizer.model")]


@pytest.mark.parametrize("rendering", ["auto", "chatml"])
def test_every_llm_directory_chats_and_stops_as_the_model_does(tmp_path, rendering):
    """base_llm/ and multimodal_llm/ each get the tokenizer, the chat template the model renders
    with (Qwen2.5-Instruct's own; or ChatML's Jinja form for a model trained in ChatML), a
    generation_config.json whose eos ids are where genieblue_jax stops, and config.json's token
    ids: transformers loading either directory renders the model's prompt and stops there. The
    checkpoint in between carries the tokenizer's files (save_mllm) and how it renders chats."""
    from data_pipelines.chat import CHATML_JINJA
    from tests.conftest import build_hf_tokenizer, published_chat_template
    tok_dir = build_hf_tokenizer("qwen2.5", str(tmp_path / "tok"))
    ref = transformers.AutoTokenizer.from_pretrained(tok_dir)
    im_end, end_of_text = ref.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    base = _model("genieblue")
    mcfg = base.mcfg.replace(image_token_id=ref.convert_tokens_to_ids("<|image_pad|>"))
    model = genieblue_jax.GenieBlue(base.configs, base.params, mcfg=mcfg, tokenizer=tok_dir,
                                    chat={"template": rendering, "template_kwargs": {}, "date": "2026-01-01"})
    saved = genieblue_jax.load(model.save(str(tmp_path / "ckpt")))
    assert sorted(os.listdir(tmp_path / "ckpt" / "hf_assets")) == ["generation_config.json", "tokenizer.json",
                                                                   "tokenizer_config.json"]
    assert saved.chat == model.chat and saved.requests.template.kind == ("chatml" if rendering == "chatml"
                                                                         else "template")
    out = export_torch(saved, str(tmp_path / "torch"))
    assert out.manifest["chat"]["stop_token_ids"] == [im_end, end_of_text]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is the circle?"}]
    for part in ("base_llm", "multimodal_llm"):
        d = os.path.join(out.out_dir, part)
        assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= \
            set(os.listdir(d))
        template = open(os.path.join(d, "chat_template.jinja")).read()
        assert template == (published_chat_template("qwen2.5-instruct.jinja") if rendering == "auto" else CHATML_JINJA)
        assert "chat_template" not in json.load(open(os.path.join(d, "tokenizer_config.json")))  # one template
        tok = transformers.AutoTokenizer.from_pretrained(d)
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert prompt == saved.requests.encode(messages).tokens
        if rendering == "auto":
            assert prompt == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
        assert transformers.GenerationConfig.from_pretrained(d).eos_token_id == [im_end, end_of_text]
        config = json.load(open(os.path.join(d, "config.json")))
        assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == \
            ([im_end, end_of_text], end_of_text, end_of_text)
