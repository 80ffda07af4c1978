"""Hugging Face import: file layouts, dtypes, the CLI, and every bad-input error."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import genieblue_jax
from genieblue_jax import checkpoint
from genieblue_jax.hf import UnsupportedConfigError, import_hf
from tests.conftest import build_hf_decoder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IDS = np.random.default_rng(0).integers(0, 300, size=(2, 9))


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_config(hf_dir, **changes):
    path = os.path.join(hf_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(path, "w") as f:
        json.dump(cfg, f)


def _edit_tensors(hf_dir, fn):
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# --- file layouts and dtypes ---------------------------------------------------------------

def test_sharded_safetensors_with_index(tmp_path):
    model = build_hf_decoder("llama-a")
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.exists(tmp_path / "model.safetensors.index.json")
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(IDS)).logits.numpy()
    assert np.abs(genieblue_jax.load(str(tmp_path)).logits(IDS) - ref).max() <= 1e-4


def test_bfloat16_files_load_exactly(tmp_path):
    model = build_hf_decoder("qwen2-a").to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    _, cfg, params = import_hf(str(tmp_path))
    want = model.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(params["layers_1"]["mlp"]["down_proj"]["kernel"]), want)
    _, cfg16, params16 = import_hf(str(tmp_path), param_dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16"
    assert params16["embed_tokens"]["embedding"].dtype == np.dtype("bfloat16")


def test_siglip_vision_model_with_vision_model_prefix(hf_siglip_dir, tmp_path):
    """transformers 4.x and hub files name SiglipVisionModel tensors `vision_model.*`."""
    hf_dir = _copy(hf_siglip_dir(), tmp_path)
    _edit_tensors(hf_dir, lambda t: t.update({f"vision_model.{k}": t.pop(k) for k in list(t)}))
    _, _, prefixed = import_hf(str(hf_dir))
    _, _, bare = import_hf(hf_siglip_dir())
    for a, b in zip(*(sorted(genieblue_jax.models.flatten(p).items()) for p in (prefixed, bare))):
        assert a[0] == b[0]
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_hub_style_minimal_config(hf_decoder_dir, tmp_path):
    """Old config.json files omit fields equal to HF defaults and use top-level rope_theta."""
    hf_dir = _copy(hf_decoder_dir("qwen2-a"), tmp_path)
    _edit_config(hf_dir, rope_parameters=None, layer_types=None, use_sliding_window=None,
                 rope_theta=1e6, rope_scaling=None, torch_dtype="bfloat16")
    model = genieblue_jax.load(str(hf_dir))
    assert model.configs["llm"].rope_theta == 1e6
    np.testing.assert_array_equal(model.logits(IDS), genieblue_jax.load(hf_decoder_dir("qwen2-a")).logits(IDS))


# --- the CLI -------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_writes_a_loadable_checkpoint(hf_decoder_dir, tmp_path):
    hf_dir = hf_decoder_dir("qwen2-b")
    out = tmp_path / "ckpt"
    run = subprocess.run([sys.executable, "-m", "tools.from_hf", f"--hf_dir={hf_dir}", f"--out={out}"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "component 'llm'" in run.stdout
    assert checkpoint.is_checkpoint(str(out))
    ids = np.random.default_rng(0).integers(0, 257, size=(2, 9))
    np.testing.assert_array_equal(genieblue_jax.load(str(out)).logits(ids),
                                  genieblue_jax.load(hf_dir).logits(ids))
    # Refuses to overwrite, and says so.
    again = subprocess.run([sys.executable, "-m", "tools.from_hf", f"--hf_dir={hf_dir}", f"--out={out}"],
                           cwd=REPO, capture_output=True, text=True)
    assert again.returncode != 0 and "overwrite" in again.stderr


def test_cli_reports_bad_input(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    run = subprocess.run([sys.executable, "-m", "tools.from_hf", f"--hf_dir={tmp_path}",
                          f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode != 0 and "GPT2LMHeadModel" in run.stderr
    assert not (tmp_path / "out").exists()


# --- bad input -----------------------------------------------------------------------------

def test_an_fp8_checkpoint_is_refused_naming_file_tensor_and_dtype(hf_decoder_dir, tmp_path):
    """An FP8 release (F8_E4M3 weights with block scales, as Qwen3-*-FP8 ships) is refused before
    any data is read, in one line naming the file, a tensor and its dtype, and the fix."""
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch
    hf_dir = _copy(hf_decoder_dir("qwen2-b"), tmp_path)
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_torch(path)
    for name in [n for n in tensors if n.endswith("proj.weight")]:
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = torch.ones(1, 1)
    save_torch(tensors, path, metadata={"format": "pt"})
    _edit_config(hf_dir, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    run = subprocess.run([sys.executable, "-m", "tools.from_hf", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'out'}"],
                         cwd=REPO, capture_output=True, text=True)
    lines = run.stderr.strip().splitlines()
    assert run.returncode != 0 and "Traceback" not in run.stderr and len(lines) == 1, run.stderr
    assert f"{path}: tensor 'model.layers.0." in lines[0] and "is F8_E4M3" in lines[0], lines[0]
    assert "FineGrainedFP8Config(dequantize=True)" in lines[0] and not (tmp_path / "out").exists()



def test_missing_tensor_is_named(hf_decoder_dir, tmp_path):
    hf_dir = _copy(hf_decoder_dir("llama-a"), tmp_path)
    _edit_tensors(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        import_hf(str(hf_dir))


def test_shape_mismatch_is_named(hf_decoder_dir, tmp_path):
    hf_dir = _copy(hf_decoder_dir("llama-a"), tmp_path)
    _edit_config(hf_dir, intermediate_size=200)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(176, 64\)"):
        import_hf(str(hf_dir))


def test_unused_tensor_is_an_error(hf_decoder_dir, tmp_path):
    hf_dir = _copy(hf_decoder_dir("llama-a"), tmp_path)
    _edit_tensors(hf_dir, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}))
    with pytest.raises(ValueError, match=r"does not use: \['model\.layers\.0\.self_attn\.q_norm\.weight'\]"):
        import_hf(str(hf_dir))


def test_non_finite_tensor_is_named(hf_decoder_dir, tmp_path):
    hf_dir = _copy(hf_decoder_dir("llama-a"), tmp_path)

    def poison(t):
        t["model.norm.weight"][3] = np.nan
    _edit_tensors(hf_dir, poison)
    with pytest.raises(ValueError, match=r"'model\.norm\.weight'.*NaN"):
        import_hf(str(hf_dir))


def test_unknown_architecture(hf_decoder_dir, tmp_path):
    hf_dir = _copy(hf_decoder_dir("qwen2-a"), tmp_path)
    _edit_config(hf_dir, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(UnsupportedConfigError, match="MistralForCausalLM"):
        import_hf(str(hf_dir))


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("hidden_act", "gelu"),
    ("partial_rotary_factor", 0.5),
    ("layer_types", ["full_attention", "sliding_attention"]),  # sliding layers without use_sliding_window
    ("quantization_config", {"quant_method": "gptq"}),
])
def test_unsupported_config_field_is_named(field, value, hf_decoder_dir, tmp_path):
    hf_dir = _copy(hf_decoder_dir("qwen2-a"), tmp_path)
    _edit_config(hf_dir, **{field: value})
    with pytest.raises(UnsupportedConfigError, match=field):
        import_hf(str(hf_dir))


def test_unknown_field_can_be_waived(hf_decoder_dir, tmp_path):
    hf_dir = _copy(hf_decoder_dir("qwen2-a"), tmp_path)
    _edit_config(hf_dir, my_custom_flag=True)
    with pytest.raises(UnsupportedConfigError, match="my_custom_flag"):
        import_hf(str(hf_dir))
    _, cfg, _ = import_hf(str(hf_dir), ignore_fields=["my_custom_flag"])
    assert cfg.family == "qwen2"


def test_pickle_checkpoints_are_refused(tmp_path):
    model = build_hf_decoder("llama-a")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        import_hf(str(tmp_path))


def test_missing_shard_in_index(tmp_path):
    build_hf_decoder("llama-a").save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    victim = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / victim)
    with pytest.raises(FileNotFoundError, match=victim):
        import_hf(str(tmp_path))


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a training workdir .*, a genieblue_jax checkpoint"):
        genieblue_jax.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        genieblue_jax.load(str(tmp_path / "nope"))


def test_vision_checkpoint_has_no_logits(hf_siglip_dir):
    model = genieblue_jax.load(hf_siglip_dir())
    with pytest.raises(ValueError, match="no 'llm' component"):
        model.logits(IDS)


def test_out_of_vocab_ids_are_rejected(hf_decoder_dir):
    model = genieblue_jax.load(hf_decoder_dir("qwen2-a"))
    with pytest.raises(ValueError, match=r"outside \[0, 300\)"):
        model.logits(np.array([[1, 2, 300]]))


def test_a_stored_head_that_a_tied_config_contradicts_is_imported_as_transformers_loads_it(tmp_path, caplog):
    """config.json ties the embeddings, the safetensors also hold an lm_head.weight: a different
    one is imported untied (transformers warns and keeps both stored tensors: logits compared
    with it), an identical one is proven redundant and the model stays tied."""
    import transformers
    model = build_hf_decoder("qwen2-a")  # tie_word_embeddings=True
    model.save_pretrained(tmp_path / "tied", safe_serialization=True)
    head = np.random.default_rng(1).normal(0, 0.05, (300, 64)).astype(np.float32)

    different = _copy(tmp_path / "tied", tmp_path, "different")
    _edit_tensors(different, lambda t: t.__setitem__("lm_head.weight", head))
    reference = transformers.Qwen2ForCausalLM.from_pretrained(different).eval()
    np.testing.assert_array_equal(reference.lm_head.weight.detach().numpy(), head)  # what transformers does
    with torch.no_grad():
        want = reference(input_ids=torch.from_numpy(IDS)).logits.numpy()
    with caplog.at_level("WARNING", logger="genieblue_jax.hf.importer"):
        _, cfg, params = import_hf(str(different))
    assert not cfg.tie_embeddings and "'lm_head.weight' holds values other than 'model.embed_tokens.weight'" in \
        caplog.text
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]), head.T)
    assert np.abs(genieblue_jax.load(str(different)).logits(IDS) - want).max() <= 1e-4

    same = _copy(tmp_path / "tied", tmp_path, "same")
    _edit_tensors(same, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy()))
    from genieblue_jax.hf import importer
    before = importer.head_verdict.cache_info()
    _, cfg, params = import_hf(str(same))
    assert cfg.tie_embeddings and "lm_head" not in params
    after = importer.head_verdict.cache_info()  # config and plan both ask; the data is read once
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(IDS)).logits.numpy()
    assert np.abs(genieblue_jax.load(str(same)).logits(IDS) - want).max() <= 1e-4
    _edit_tensors(same, lambda t: t.__setitem__("lm_head.weight", head))  # rewritten: compared again
    _, cfg, params = import_hf(str(same))
    assert not cfg.tie_embeddings
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]), head.T)


def test_truncated_and_damaged_safetensors_name_the_file(hf_decoder_dir, tmp_path):
    """A safetensors file cut short, or whose header is not JSON, is a ValueError naming the
    file and saying why (they were a reshape error and a bare JSONDecodeError)."""
    cut = _copy(hf_decoder_dir("qwen2-a"), tmp_path, "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) - 1000])
    with pytest.raises(ValueError, match=r"cut/model.safetensors: not a readable safetensors file, truncated or "
                                         r"damaged \(.*not fully covered"):
        import_hf(str(cut))
    bad = _copy(hf_decoder_dir("qwen2-a"), tmp_path, "bad")
    (bad / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ValueError, match=r"bad/model.safetensors: not a readable safetensors file.*invalid JSON"):
        import_hf(str(bad))
