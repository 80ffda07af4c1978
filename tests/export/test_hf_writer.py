"""Hugging Face export: configs are the importer's inverse, files are what readers read,
and transformers reloads our exports to the bit (tiny random models, no hub)."""
import dataclasses
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from safetensors import safe_open

import genieblue_jax
from genieblue_jax import models
from genieblue_jax.export import (
    hf_names,
    hf_tensors,
    hf_writer,
    llm_config_to_hf,
    save_llm,
    save_vision,
    vision_config_to_hf,
    write_safetensors,
)
from genieblue_jax.hf import UnsupportedConfigError, import_hf
from genieblue_jax.hf.configs import llm_config_from_hf, vision_config_from_hf
from genieblue_jax.hf.safetensors_io import SafetensorsCheckpoint
from genieblue_jax.models import get_preset
from tests import families
from tests.conftest import LLAMA_CONFIGS, QWEN2_CONFIGS, SIGLIP_CONFIG, build_hf_decoder, build_hf_siglip

RUNTIME_FIELDS = {"dtype", "param_dtype", "remat", "attention_chunk", "scan_layers"}


def _arch_fields(cfg, drop=()):
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS | set(drop)}


def _padded_batch(vocab, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(3, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, :4] = 0
    return ids, mask


def _torch_logits(model, ids, mask):
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     position_ids=torch.from_numpy(positions)).logits.float().numpy()


def _load_clean(cls, path):
    """from_pretrained that also asserts transformers found every tensor and nothing else."""
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    return model.eval()


def _assert_state_dicts_equal(want: dict, got: dict, cast=None):
    assert sorted(want) == sorted(got)
    for k, v in want.items():
        v = v if cast is None else v.to(cast)
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


# --- configs -------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-llama", "qwen2.5-3b", "tinyllama-1.1b"])
def test_llm_config_is_the_importers_inverse(preset, tmp_path):
    # Runtime fields set to non-defaults: they must not leak into (or be needed by) config.json.
    cfg = get_preset(preset).replace(remat=True, attention_chunk=64, scan_layers=True,
                                     dtype="bfloat16", param_dtype="bfloat16")
    hf = json.loads(json.dumps(llm_config_to_hf(cfg)))  # plain JSON
    assert hf["dtype"] == "bfloat16"
    assert _arch_fields(llm_config_from_hf(hf)) == _arch_fields(cfg)
    # transformers 5 reads it as the same architecture, and what it writes back imports again.
    (tmp_path / "config.json").write_text(json.dumps(hf))
    tcfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(tcfg).__name__ == {"qwen2": "Qwen2Config", "llama": "LlamaConfig"}[cfg.family]
    assert (tcfg.num_key_value_heads, tcfg.head_dim, tcfg.rope_parameters["rope_theta"]) == \
        (cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta)
    assert tcfg.dtype == torch.bfloat16
    assert _arch_fields(llm_config_from_hf(tcfg.to_dict())) == _arch_fields(cfg)


@pytest.mark.parametrize("preset", ["siglip-so400m-384", "tiny-siglip", "demo-siglip"])
@pytest.mark.parametrize("select_layer", [-1, -2, 0])
def test_vision_config_is_the_importers_inverse(preset, select_layer, tmp_path):
    cfg = get_preset(preset).replace(select_layer=select_layer, remat=True, scan_layers=True)
    hf = json.loads(json.dumps(vision_config_to_hf(cfg)))
    assert hf["vision_use_head"] is cfg.use_head and "select_layer" not in hf
    # the importer's strict policy accepts every key (no ignore_fields needed)
    back = vision_config_from_hf(hf, **hf_writer.vision_config_extras(cfg))
    assert _arch_fields(back) == _arch_fields(cfg)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    tcfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(tcfg).__name__ == "SiglipVisionConfig"
    assert _arch_fields(vision_config_from_hf(tcfg.to_dict(), select_layer=select_layer)) == _arch_fields(cfg)


def test_configs_the_architecture_cannot_express_are_refused():
    with pytest.raises(UnsupportedConfigError, match="out_bias=True"):
        llm_config_to_hf(get_preset("tiny-qwen2").replace(out_bias=True))
    with pytest.raises(UnsupportedConfigError, match="qkv_bias=False"):
        llm_config_to_hf(get_preset("tiny-qwen2").replace(qkv_bias=False))
    with pytest.raises(UnsupportedConfigError, match="attention_bias"):
        llm_config_to_hf(get_preset("tiny-llama").replace(qkv_bias=True))
    with pytest.raises(ValueError, match="dtype='int8'"):
        llm_config_to_hf(get_preset("tiny-llama"), dtype="int8")
    with pytest.raises(TypeError):
        llm_config_to_hf(get_preset("tiny-siglip"))


# --- safetensors files ---------------------------------------------------------------------

def _mixed_tensors():
    rng = np.random.default_rng(0)
    return {
        "w.f32": rng.standard_normal((5, 3)).astype(np.float32).T,  # non-contiguous input
        "w.f16": rng.standard_normal((7,)).astype(np.float16),
        "w.bf16": rng.standard_normal((3, 3)).astype(ml_dtypes.bfloat16),
        "ids.i64": rng.integers(-2**40, 2**40, size=(3,)),
        "ids.i32": rng.integers(-100, 100, size=(2, 2)).astype(np.int32),
        "scalar": np.array(1.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "layers.10.x": np.arange(3, dtype=np.float32),
        "layers.2.x": np.arange(5, dtype=np.float32),
    }


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).tobytes(), a.dtype, a.shape


def test_safetensors_files_read_bitwise_by_every_reader(tmp_path):
    tensors = _mixed_tensors()
    path = str(tmp_path / "model.safetensors")
    assert write_safetensors(path, tensors, {"format": "pt", "note": "x"}) == [path]

    # The layout, read from the bytes: u64 header length, JSON header, data.
    raw = open(path, "rb").read()
    header_size = int.from_bytes(raw[:8], "little")
    raw_header = raw[8:8 + header_size]
    assert header_size % 8 == 0 and raw_header.startswith(b"{")
    header = json.loads(raw_header)
    assert sorted(header) == ["__metadata__"] + sorted(tensors)
    del header["__metadata__"]
    spans = sorted(m["data_offsets"] for m in header.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no holes
    assert len(raw) == 8 + header_size + spans[-1][1]
    for name, meta in header.items():  # every tensor aligned to its element size
        assert meta["data_offsets"][0] % tensors[name].dtype.itemsize == 0, name

    for reader in (safetensors.numpy.load_file, lambda p: SafetensorsCheckpoint(os.path.dirname(p))):
        got = reader(path)
        for name, want in tensors.items():
            assert _bits(np.asarray(got[name] if isinstance(got, dict) else got.get(name))) == _bits(want), name
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    got = safetensors.torch.load_file(path)
    for name, want in tensors.items():
        t = got[name]
        if want.dtype == ml_dtypes.bfloat16:
            assert t.dtype == torch.bfloat16
            t = t.view(torch.int16)
            want = want.view(np.int16)
        np.testing.assert_array_equal(t.numpy(), want)


def test_sharded_files_and_index(tmp_path):
    tensors = {f"layers.{i}.w": np.full((10,), i, np.float32) for i in range(12)}  # 40 B each
    path = str(tmp_path / "model.safetensors")
    write_safetensors(path, {"old": np.zeros(3, np.float32)})  # replaced below, not mixed in
    files = write_safetensors(path, tensors, {"format": "pt"}, max_shard_bytes=100)
    shards = [f"model-0000{k}-of-00006.safetensors" for k in range(1, 7)]
    assert [os.path.basename(f) for f in files] == shards + ["model.safetensors.index.json"]
    assert sorted(os.listdir(tmp_path)) == sorted(shards + ["model.safetensors.index.json"])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 480, "total_parameters": 120}
    # natural order: layers 0-1 in shard 1, ..., 10-11 in shard 6
    assert index["weight_map"]["layers.10.w"] == index["weight_map"]["layers.11.w"] == shards[5]
    assert index["weight_map"]["layers.2.w"] == shards[1]
    ckpt = SafetensorsCheckpoint(str(tmp_path))
    assert ckpt.names() == sorted(tensors)
    for name, want in tensors.items():
        np.testing.assert_array_equal(ckpt.get(name), want)
        assert name in safetensors.numpy.load_file(str(tmp_path / index["weight_map"][name]))
    # a tensor over the limit gets a shard of its own; back to one file removes the shards
    files = write_safetensors(path, {"big": np.zeros(50, np.float32), "a": np.zeros(1, np.float32)},
                              max_shard_bytes=100)
    assert [os.path.basename(f) for f in files][:2] == ["model-00001-of-00002.safetensors",
                                                       "model-00002-of-00002.safetensors"]
    write_safetensors(path, tensors)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_writer_refuses_bad_input(tmp_path):
    path = str(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="str to str"):
        write_safetensors(path, {"a": np.zeros(1)}, {"format": 1})
    with pytest.raises(ValueError, match="'c'.*complex128"):
        write_safetensors(path, {"c": np.zeros(2, np.complex128)})
    with pytest.raises(ValueError, match="__metadata__"):
        write_safetensors(path, {"__metadata__": np.zeros(1)})
    with pytest.raises(ValueError, match="'big'.*NaN or Inf"):
        write_safetensors(path, {"big": np.array([1e5], np.float32)}, dtype="float16", check_finite=True)
    assert os.listdir(tmp_path) == []  # nothing half-written


# --- names and parameter checks ------------------------------------------------------------

def _zeros(cfg):
    return {p: np.zeros(a.shape, a.dtype) for p, a in models.flatten(models.abstract_params(cfg)).items()}


def test_names_cover_each_parameter_once():
    for preset, arch in [("tiny-qwen2", "Qwen2ForCausalLM"), ("tiny-llama", "LlamaForCausalLM"),
                         ("tiny-siglip", "SiglipVisionModel"), ("demo-siglip", "SiglipVisionModel")]:
        cfg = get_preset(preset)
        names = hf_names(arch, cfg)
        assert set(names) == set(_zeros(cfg)) and len(set(names.values())) == len(names)
    assert "lm_head.weight" in hf_names("llama", get_preset("tiny-llama")).values()
    assert not any(n.startswith("vision_model.head") for n in hf_names("siglip", get_preset("demo-siglip")).values())
    with pytest.raises(ValueError, match="does not match the config"):
        hf_names("LlamaForCausalLM", get_preset("tiny-qwen2"))
    with pytest.raises(ValueError, match="cannot export as 'SiglipModel'"):
        hf_names("SiglipModel", get_preset("tiny-siglip"))
    with pytest.raises(ValueError, match="prefix 'model.'"):
        hf_names("siglip", get_preset("tiny-siglip"), prefix="model.")


def test_bad_parameter_trees_name_the_tensor(tmp_path):
    cfg = get_preset("tiny-llama")
    extra = {**_zeros(cfg), "layers_0/mlp/extra_proj/kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match=r"unexpected parameter 'layers_0/mlp/extra_proj/kernel' \(no HF name"):
        hf_tensors("llama", cfg, extra)
    missing = _zeros(cfg)
    del missing["layers_1/mlp/up_proj/kernel"]
    with pytest.raises(ValueError, match=r"missing parameter 'layers_1/mlp/up_proj/kernel' "
                                         r"\(HF tensor 'model.layers.1.mlp.up_proj.weight'\)"):
        save_llm(str(tmp_path / "out"), cfg, models.unflatten(missing))
    assert not os.path.exists(tmp_path / "out")  # checked before anything is written
    wrong = {**_zeros(cfg), "norm/scale": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"'norm/scale' \(HF tensor 'model.norm.weight'\) has shape \(3,\)"):
        hf_tensors("llama", cfg, wrong)
    # a known name that this config does not have: the tied model's lm_head, a head-less tower's head
    qwen = get_preset("tiny-qwen2")
    with pytest.raises(ValueError, match=r"'lm_head/kernel' \(would be 'lm_head.weight'\); .*tie_embeddings=True"):
        hf_tensors("qwen2", qwen, {**_zeros(qwen), "lm_head/kernel": np.zeros((64, 512), np.float32)})
    vit = get_preset("demo-siglip")
    with_head = _zeros(get_preset("demo-siglip").replace(use_head=True))
    with pytest.raises(ValueError, match=r"'head/probe' \(would be 'vision_model.head.probe'\); .*use_head=False"):
        save_vision(str(tmp_path / "vit"), vit, with_head)


def test_existing_export_is_not_overwritten_silently(tmp_path):
    cfg = get_preset("tiny-qwen2")
    params = _zeros(cfg)
    params["norm/scale"] = np.ones_like(params["norm/scale"])
    save_llm(str(tmp_path), cfg, params, max_shard_bytes=10**5)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_llm(str(tmp_path), cfg, params)
    save_llm(str(tmp_path), cfg, params, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "genieblue_export.json", "model.safetensors",
                                            "tokenizer.json"]


# --- round trips through transformers ------------------------------------------------------

# What may differ between transformers' own config.json and ours: paths; Qwen2's head_dim (transformers
# 5 leaves it implicit, we write it); the token ids, which are the tokenizer's, not the model's: save_llm
# writes null and tools.to_torch the tokenizer's ids (tests/export/test_to_torch.py).
CONFIG_MAY_DIFFER = {"_name_or_path", "head_dim", "bos_token_id", "eos_token_id", "pad_token_id"}


def _assert_same_config(theirs_dir, ours_dir) -> dict:
    """config.json as transformers reads it equals the one it wrote itself (CONFIG_MAY_DIFFER
    aside; our token ids null); returns ours as transformers reads it."""
    theirs = transformers.AutoConfig.from_pretrained(theirs_dir).to_dict()
    ours = transformers.AutoConfig.from_pretrained(ours_dir).to_dict()
    diff = {k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)}
    assert diff <= CONFIG_MAY_DIFFER, {k: (theirs.get(k), ours.get(k)) for k in diff - CONFIG_MAY_DIFFER}
    for k in diff & {"bos_token_id", "eos_token_id", "pad_token_id"}:
        assert ours.get(k) is None, (k, ours.get(k))
    return ours


@pytest.mark.parametrize("name", sorted(QWEN2_CONFIGS) + sorted(LLAMA_CONFIGS))
def test_llm_round_trip_through_transformers(name, hf_decoder_dir, tmp_path):
    src = hf_decoder_dir(name)
    _, cfg, params = import_hf(src)  # jax arrays
    out = save_llm(str(tmp_path / "out"), cfg, params)
    assert [os.path.basename(f) for f in out.files] == ["model.safetensors", "genieblue_export.json",
                                                         "config.json"]
    original = build_hf_decoder(name)
    reloaded = _load_clean(transformers.AutoModelForCausalLM, out.out_dir)
    assert type(reloaded) is type(original)
    _assert_state_dicts_equal(original.state_dict(), reloaded.state_dict())
    assert ("lm_head.weight" in SafetensorsCheckpoint(out.out_dir)) == (not cfg.tie_embeddings)
    ours = _assert_same_config(src, out.out_dir)
    assert ours["head_dim"] == cfg.head_dim

    ids, mask = _padded_batch(cfg.vocab_size)
    valid = mask.astype(bool)
    ref = _torch_logits(original, ids, mask)
    got = _torch_logits(reloaded, ids, mask)
    ours_jax = genieblue_jax.load(out.out_dir).logits(ids, attention_mask=mask)
    d_torch = np.abs(got - ref)[valid].max()
    d_jax = np.abs(ours_jax - got)[valid].max()
    print(f"{name}: reloaded vs original {d_torch:.1e}, ours (JAX) vs reloaded {d_jax:.1e}")
    assert d_torch <= 1e-5 and d_jax <= 1e-4


@pytest.mark.parametrize("name", [n for n in families.NAMES if n != "gemma3-vlm"])
def test_family_round_trip_through_transformers(name, tmp_path):
    """Llama 3 (llama3 RoPE, both spellings in), Qwen3, Gemma 3, SmolLM3: the same tensors, and
    the config transformers reads back is the one it wrote (RoPE, layer types, NoPE layers)."""
    src = families.save(name, str(tmp_path / "src"))
    _, cfg, params = import_hf(src)
    out = save_llm(str(tmp_path / "out"), cfg, params)
    original = families.build(name)
    reloaded = _load_clean(transformers.AutoModelForCausalLM, out.out_dir)
    assert type(reloaded) is type(original)
    _assert_state_dicts_equal(original.state_dict(), reloaded.state_dict())
    if name == "llama3-hub":  # written in transformers 5's spelling: compare with the model's own config
        original.save_pretrained(str(tmp_path / "t5"))
        src = str(tmp_path / "t5")
    _assert_same_config(src, out.out_dir)
    assert import_hf(out.out_dir)[1] == cfg


@pytest.mark.parametrize("use_head,prefix", [(True, None), (False, None), (True, "")])
def test_siglip_round_trip_through_transformers(use_head, prefix, hf_siglip_dir, tmp_path):
    _, cfg, params = import_hf(hf_siglip_dir(use_head=use_head), select_layer=-2)
    out = save_vision(str(tmp_path / "out"), cfg, params, prefix=prefix)
    names = SafetensorsCheckpoint(out.out_dir).names()
    assert all(n.startswith("vision_model.") for n in names) == (prefix is None)
    assert any(".head." in "." + n for n in names) == use_head
    original = build_hf_siglip(use_head=use_head)
    reloaded = _load_clean(transformers.SiglipVisionModel, out.out_dir)
    _assert_state_dicts_equal(original.state_dict(), reloaded.state_dict())

    size = SIGLIP_CONFIG["image_size"]
    pixels = np.random.default_rng(0).uniform(-1, 1, size=(2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        x = torch.from_numpy(pixels.transpose(0, 3, 1, 2))
        ref, got = original(pixel_values=x), reloaded(pixel_values=x, output_hidden_states=True)
    d = np.abs(got.last_hidden_state.numpy() - ref.last_hidden_state.numpy()).max()
    assert d <= 1e-5
    if use_head:
        assert np.abs(got.pooler_output.numpy() - ref.pooler_output.numpy()).max() <= 1e-5

    # select_layer travels outside config.json and comes back through import_hf
    assert out.extras == {"select_layer": -2} == hf_writer.read_export_extras(out.out_dir)
    _, back, back_params = import_hf(out.out_dir, **out.extras)
    assert back == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, back_params)
    tower = genieblue_jax.GenieBlue({"vision": back}, {"vision": back_params})
    d_jax = np.abs(tower.vision_features(pixels)["tokens"] - got.hidden_states[-2].numpy()).max()
    print(f"siglip head={use_head} prefix={prefix!r}: reloaded vs original {d:.1e}, "
          f"ours (JAX, layer -2) vs reloaded {d_jax:.1e}")
    assert d_jax <= 1e-4


@pytest.mark.parametrize("name", ["qwen2-a", "llama-a"])
def test_bfloat16_export_is_bitwise_after_the_cast(name, hf_decoder_dir, tmp_path):
    _, cfg, params = import_hf(hf_decoder_dir(name))
    out = save_llm(str(tmp_path / "bf16"), cfg, params, dtype="bfloat16", max_shard_bytes=60_000)
    assert len([f for f in out.files if f.endswith(".safetensors")]) > 1  # sharded as well
    ckpt = SafetensorsCheckpoint(out.out_dir)
    assert {ckpt.slice(n).get_dtype() for n in ckpt.names()} == {"BF16"}
    assert json.loads(open(os.path.join(out.out_dir, "config.json")).read())["dtype"] == "bfloat16"
    reloaded = _load_clean(transformers.AutoModelForCausalLM, out.out_dir)
    assert reloaded.dtype == torch.bfloat16
    _assert_state_dicts_equal(build_hf_decoder(name).state_dict(), reloaded.state_dict(), cast=torch.bfloat16)
    # and our importer reads the same bits back
    _, _, back = import_hf(out.out_dir, param_dtype="bfloat16")
    for path, leaf in models.flatten(back).items():
        want = np.asarray(models.flatten(params)[path]).astype(ml_dtypes.bfloat16)
        assert np.asarray(leaf).dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(np.asarray(leaf).view(np.int16), want.view(np.int16), err_msg=path)


@pytest.mark.parametrize("variant", ["llama-biases", "qwen2-wide-heads"])
def test_our_own_models_export_to_transformers(variant, tmp_path):
    """Configs the conftest models do not cover: Llama with attention and MLP biases, Qwen2
    with head_dim != hidden / heads; parameters from our init, perturbed so nothing is 0 / 1."""
    if variant == "llama-biases":
        cfg = get_preset("tiny-llama").replace(num_layers=2, qkv_bias=True, out_bias=True, mlp_bias=True)
    else:
        cfg = get_preset("tiny-qwen2").replace(num_layers=2, head_dim=32)
    flat = models.flatten(models.init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    flat = {k: np.asarray(v) + rng.normal(0, 0.02, v.shape).astype(np.float32) for k, v in flat.items()}
    out = save_llm(str(tmp_path), cfg, flat)  # a flat {"a/b/c": array} tree works too
    reloaded = _load_clean(transformers.AutoModelForCausalLM, out.out_dir)
    sd = reloaded.state_dict()
    for path, name in hf_names(cfg.family, cfg).items():  # each tensor is the transformed parameter
        np.testing.assert_array_equal(sd[name].numpy(), flat[path].T if flat[path].ndim == 2
                                      and not path.startswith("embed") else flat[path], err_msg=path)
    ids, mask = _padded_batch(cfg.vocab_size, seed=2)
    model = genieblue_jax.GenieBlue({"llm": cfg}, {"llm": models.unflatten(flat)})
    d = np.abs(model.logits(ids, attention_mask=mask) - _torch_logits(reloaded, ids, mask))[mask.astype(bool)].max()
    print(f"{variant}: ours (JAX) vs transformers {d:.1e}")
    assert d <= 1e-4
