"""The QNN bridge (`genieblue_jax.export.qnn`, `tools.export_qnn`): every ONNX graph run in
onnxruntime against our JAX model, the AIMET encodings by tensor name, the report.

One tiny GenieBlue-Skip MLLM (4-layer Qwen2-style LLM: block 0 replicated, LoRA on 1-3;
2-layer SigLIP, 16 tokens per patch) with its branch and projector perturbed (LoRA B
non-zero, the replicated block different from the base), saved as a checkpoint and
exported once per module at context 64, prefill 16 tokens per call, on 3 + 3 calibration
requests of the demo data. Run with -s to see the measured numbers.
"""
import doctest
import json
import os
import subprocess
import sys

import jax
import numpy as np
import onnx
import pytest

import genieblue_jax
from genieblue_jax import checkpoint, models, structure
from genieblue_jax.export import qnn
from genieblue_jax.export.qnn import calibration, evaluate, graphs, onnx_export, quantize, report, runtime
from tests.structure.conftest import perturb

CONTEXT, PREFILL = 64, 16
TOL = 1e-3


def _mcfg(variant="genieblue", image_token_id=3):
    llm = models.get_preset("tiny-qwen2").replace(num_layers=4)
    vit = models.get_preset("tiny-siglip")
    return structure.MLLMConfig(llm, vit, models.ProjectorConfig.between(vit, llm),
                                structure.StructureConfig(variant=variant, placement="skip"),
                                image_token_id=image_token_id)


def _params(mcfg):
    params = structure.init_mllm(mcfg, jax.random.key(0))
    params["branch"] = perturb(params["branch"], seed=7)
    params["projector"] = perturb(params["projector"], seed=8)
    return params


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from data_pipelines.demo_data import write_demo_datasets
    return write_demo_datasets(str(tmp_path_factory.mktemp("qnn_demo")), splits={"train": 24}, seed=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo):
    """A saved tiny MLLM and export_qnn's output for it (the tool's whole path)."""
    from data_pipelines.tokenizer import IMAGE_PAD, load_tokenizer
    mcfg = _mcfg(image_token_id=load_tokenizer(demo["tokenizer"]).token_id(IMAGE_PAD))
    ckpt = str(tmp_path_factory.mktemp("qnn_ckpt") / "mllm")
    checkpoint.save_mllm(ckpt, mcfg, _params(mcfg), tokenizer=demo["tokenizer"],
                         preprocessing={"image_mode": "single", "max_patches": 1})
    model = genieblue_jax.load(ckpt)
    out = str(tmp_path_factory.mktemp("qnn_out"))
    train = demo["datasets"]["train"]
    rep = qnn.export_qnn(model, out, context=CONTEXT, prefill_len=PREFILL, calib=3, decode_steps=4,
                         data=[train["vqa"], train["text"]])
    onnx_dir = os.path.join(out, "onnx")
    manifest = qnn.read_manifest(onnx_dir)
    vision, base, mm = qnn.runners(manifest, qnn.sessions(onnx_dir, manifest, threads=1))
    return {"model": model, "out": out, "report": rep, "manifest": manifest, "vision": vision, "base": base,
            "mm": mm}


def _request(mcfg, seed=0, n=44, image_at=5):
    """One image (16 tokens) early in a 44-token prompt: 3 prefill chunks of 16 + decode steps."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(10, 500, size=n).astype(np.int32)
    tokens[tokens == mcfg.image_token_id] = 10
    tokens[image_at:image_at + mcfg.tokens_per_patch] = mcfg.image_token_id
    s = mcfg.vision.image_size
    return tokens, rng.uniform(-1, 1, size=(1, s, s, 3)).astype(np.float32)


def test_vision_graph_matches_image_features(exported):
    model = exported["model"]
    _, patches = _request(model.mcfg)
    patches = np.concatenate([patches, -patches])  # two vision-graph calls
    ours = np.asarray(structure.image_features(model.mcfg, model.params, patches[None]))[0]
    got = exported["vision"].features(patches)
    diff = float(np.abs(got - ours).max())
    print(f"\nvision + projector ONNX vs ours: max |diff| {diff:.2e} over {got.shape}")
    assert got.shape == ours.shape == (2 * model.mcfg.tokens_per_patch, model.mcfg.llm.hidden_size)
    assert diff < TOL


def test_base_decoder_prefill_and_decode_match_text_mode(exported):
    model = exported["model"]
    tokens, _ = _request(model.mcfg)
    tokens[tokens == model.mcfg.image_token_id] = 7   # a text request
    ours = model.logits(tokens[None], mode="text")[0]
    split = 38                                        # prefill 16 + 16 + 6, then 6 decode steps
    got = exported["base"].score(tokens, split=split)
    diff = np.abs(got - ours).max(axis=-1)
    print(f"\nbase LLM ONNX vs ours (text mode): prefill max |diff| {diff[:split].max():.2e}, "
          f"decode max |diff| {diff[split:].max():.2e}, next-token agreement "
          f"{(got.argmax(-1) == ours.argmax(-1)).mean():.3f}")
    assert got.shape == ours.shape and diff.max() < TOL
    # greedy generation over the cache agrees with ours token for token
    gen = exported["base"].generate(tokens[:20], max_new_tokens=5)
    full = model.logits(np.concatenate([tokens[:20], gen[:-1]])[None], mode="text")[0]
    assert gen == full[19:].argmax(-1).tolist()


def test_multimodal_decoder_with_image_matches_multimodal_mode(exported):
    model = exported["model"]
    tokens, patches = _request(model.mcfg)
    ours = model.logits(tokens[None], images=patches[None], mode="multimodal")[0]
    text_mode = model.logits(np.where(tokens == model.mcfg.image_token_id, 7, tokens)[None], mode="text")[0]
    feats = exported["vision"].features(patches)
    embeds, mask = runtime.place_image_features(tokens, model.mcfg.image_token_id, feats)
    split = 38
    got = exported["mm"].score(tokens, split=split, image_embeds=embeds, image_mask=mask)
    diff = np.abs(got - ours).max(axis=-1)
    print(f"\nmultimodal LLM ONNX vs ours (multimodal mode, one image): prefill max |diff| {diff[:split].max():.2e}, "
          f"decode max |diff| {diff[split:].max():.2e}; the branch moves the logits by "
          f"{np.abs(ours - text_mode)[split:].max():.2f}")
    assert diff.max() < TOL
    assert np.abs(ours - text_mode)[split:].max() > 0.05   # the branch really is in the graph


def test_graph_files_and_manifest(exported):
    m, onnx_dir = exported["manifest"], os.path.join(exported["out"], "onnx")
    assert sorted(m["graphs"]) == sorted(qnn.GRAPHS)
    for name, g in m["graphs"].items():
        onnx.checker.check_model(os.path.join(onnx_dir, g["file"]))
        proto = onnx.load(os.path.join(onnx_dir, g["file"]), load_external_data=False)
        inits = {i.name: i for i in proto.graph.initializer}
        for t in g["tensors"]:   # every weight external, in its component's file, named canonically
            assert inits[t].data_location == onnx.TensorProto.EXTERNAL
            loc = {e.key: e.value for e in inits[t].external_data}["location"]
            assert loc == onnx_export.WEIGHT_FILES[t.split(".")[0]]
    prefill = {i["name"]: i["shape"] for i in m["graphs"]["llm_mm_prefill"]["inputs"]}
    assert prefill["past_key_0"] == [1, 2, 16, CONTEXT - PREFILL] and prefill["image_embeds"] == [1, PREFILL, 64]
    decode = {i["name"]: i["shape"] for i in m["graphs"]["llm_mm_decode"]["inputs"]}
    assert "image_embeds" not in decode and decode["attention_mask"] == [1, 1, 1, CONTEXT]
    # the base decoder holds no branch tensor; the multimodal one shares every base tensor it uses by name
    assert not [t for t in m["graphs"]["llm_base_prefill"]["tensors"] if not t.startswith("llm.")]
    mm = set(m["graphs"]["llm_mm_prefill"]["tensors"])
    assert "branch.layers_0.mlp.down_proj.kernel" in mm and "llm.layers_0.mlp.down_proj.kernel" not in mm
    assert {"llm.layers_1.mlp.down_proj.kernel", "branch.layers_1.mlp.down_proj.lora_b"} <= mm
    # weight files hold every tensor once: their sizes are the unique float32 weights
    size = {f: 0 for f in m["weight_files"]}
    for t in m["tensors"].values():
        size[t["file"]] = max(size[t["file"]], t["offset"] + t["length"])
    assert size == m["weight_files"]
    assert set(m["unused"]) == {n for n in m["unused"] if n.startswith("vision.head.")}  # the pooling head only


def test_encodings_bitwidths_by_tensor_name(exported):
    """W4 LLM (base, replicated blocks, embedding, head), W8 ViT / projector / LoRA, A16.
    Fails (does not skip) without aimet-onnx."""
    q = exported["report"]["quantization"]
    assert q["status"] == "done", q["status"]
    qdir = os.path.join(exported["out"], "qnn")
    m = exported["manifest"]
    expect = {"llm.layers_1.self_attn.q_proj.kernel": 4, "llm.layers_3.mlp.down_proj.kernel": 4,
              "branch.layers_0.self_attn.q_proj.kernel": 4, "branch.layers_0.mlp.gate_proj.kernel": 4,
              "llm.lm_head.kernel": 4, "llm.embed_tokens.embedding": 4,
              "branch.layers_1.self_attn.q_proj.lora_a": 8, "branch.layers_2.mlp.down_proj.lora_b": 8,
              "vision.embeddings.patch_embedding.kernel": 8, "vision.encoder.layers_1.mlp.fc1.kernel": 8,
              "projector.linear_1.kernel": 8, "projector.linear_2.kernel": 8}
    seen = {}
    for graph, g in q["graphs"].items():
        enc = quantize.read_encodings(os.path.join(qdir, g["encodings"]))
        model = onnx.load(os.path.join(qdir, g["onnx"]), load_external_data=False)
        names = {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
        assert set(enc["param"]) <= names, "encodings must name tensors of the ONNX next to them"
        for t in m["graphs"][graph]["tensors"]:
            role = m["tensors"][t]["role"]
            if role in ("matmul", "conv", "lora", "embedding"):
                bits = quantize.tensor_bits(enc, t)
                assert bits == quantize.planned_bits(t, role), (graph, t, bits)
                seen[t] = bits
                if role != "embedding":
                    e = enc["param"][t]
                    assert e["enc_type"] == "PER_CHANNEL" and e["is_sym"], (graph, t, e["enc_type"])
        acts = {n: e["bw"] for n, e in enc["activation"].items() if n not in m["tensors"]}
        assert acts and set(acts.values()) == {16}, (graph, {n: b for n, b in acts.items() if b != 16})
        for name in ("attention_mask", "past_key_0", "logits") if graph.startswith("llm") else ("pixel_values",):
            assert enc["activation"][name]["bw"] == 16
    assert {t: seen[t] for t in expect} == expect
    err = q["error"]
    print(f"\nquantized (W4/W8, A16) vs float: vision rel. RMS {err['vision']['relative_rms']}; "
          f"multimodal max |diff| {err['multimodal']['max_abs_diff']:.3f}, next-token agreement "
          f"{err['multimodal']['top1_agreement']:.3f}; text max |diff| {err['text']['max_abs_diff']:.3f}, "
          f"agreement {err['text']['top1_agreement']:.3f}; AIMET seconds {q['seconds']}")
    for path in ("multimodal", "text"):
        assert err[path]["positions"] > 0 and err[path]["relative_rms"] < 0.5


def test_report_parity_on_calibration_requests(exported):
    """export_qnn's own check: the float graphs vs ours on the calibration requests."""
    parity = exported["report"]["parity_onnx_vs_jax"]
    print("\nreport, float ONNX vs ours on the calibration requests: " +
          ", ".join(f"{k} max |diff| {v['max_abs_diff']:.2e}" for k, v in parity.items()))
    for path in ("vision", "multimodal", "text"):
        assert parity[path]["max_abs_diff"] < TOL
    for path in ("multimodal", "text"):
        assert parity[path]["positions"] > 0 and parity[path]["top1_agreement"] == 1.0


def test_report_sizes(exported):
    rep, m = exported["report"], exported["manifest"]
    sizes = rep["sizes"]
    comps = sizes["components"]
    assert set(comps) == {"llm", "branch", "vision", "projector"}
    # float sizes are the weight files
    assert comps["llm"]["float_bytes"] == sum(4 * np.prod(t["shape"]) for t in m["tensors"].values()
                                              if t["component"] == "llm")
    d = sizes["deployments"]
    text, base, genie = (d[label]["quantized_bytes"] for label, _ in report.DEPLOYMENTS)
    assert text < base < genie
    # W4 LLM blocks: about an eighth of float32 plus scales
    llm = comps["llm"]
    assert llm["quantized_bytes"] < llm["float_bytes"] / 5
    with open(os.path.join(exported["out"], "report.json")) as f:
        assert json.load(f)["sizes"]["deployments"] == d
    md = open(os.path.join(exported["out"], "report.md")).read()
    assert "GenieBlue (+ replicated blocks + LoRA)" in md and "1.92 GB" in md
    ps = rep["paper_scale"]["deployments"]
    print("\n" + "\n".join(f"{k}: tiny {d[k]['quantized_bytes'] / 1e3:.1f} kB quantized / {d[k]['float_bytes'] / 1e3:.1f} "
                           f"kB float; paper scale {ps[k]['quantized_bytes'] / 1e9:.2f} GB" for k in d))
    assert 1.5e9 < ps["GenieBlue (+ replicated blocks + LoRA)"]["quantized_bytes"] < 3e9


def test_cogvlm_routes_image_tokens_to_experts():
    """CogVLM is supported: the prefill graph routes by the image mask (PyTorch graphs vs ours;
    the ONNX path is the same code)."""
    mcfg = _mcfg("cogvlm", image_token_id=511)
    params = _params(mcfg)
    g = graphs.ModelGraphs(mcfg, params, context=CONTEXT, meta=False)
    tokens, patches = _request(mcfg, seed=1, n=30)
    model = genieblue_jax.api.GenieBlue({"llm": mcfg.llm, "vision": mcfg.vision, "projector": mcfg.projector},
                                        params, mcfg=mcfg)
    ours = model.logits(tokens[None], images=patches[None], mode="multimodal")[0]
    sess = lambda mod: runtime.TorchSession(mod, mod.input_names(), mod.output_names())  # noqa: E731
    spec = runtime.DecoderSpec.from_config(mcfg.llm, context=CONTEXT, prefill_len=PREFILL, multimodal=True)
    dec = runtime.Decoder(spec, sess(g.multimodal(True)), sess(g.multimodal(False)))
    feats = runtime.Vision(sess(g.vision), 1, mcfg.vision.image_size).features(patches)
    embeds, mask = runtime.place_image_features(tokens, mcfg.image_token_id, feats)
    got = dec.score(tokens, split=26, image_embeds=embeds, image_mask=mask)
    print(f"\ncogvlm-skip graphs vs ours: max |diff| {np.abs(got - ours).max():.2e}")
    assert np.abs(got - ours).max() < TOL


def test_errors_name_the_culprit(exported, tmp_path):
    model = exported["model"]
    with pytest.raises(ValueError, match="context=16 must be longer than prefill_len=16"):
        qnn.export_qnn(model, str(tmp_path / "a"), context=16, prefill_len=16)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        qnn.export_qnn(model, str(tmp_path / "b"), context=10**6)
    with pytest.raises(ValueError, match="no calibration data.*--data"):
        qnn.export_qnn(model, str(tmp_path / "c"), context=CONTEXT, prefill_len=PREFILL)
    with pytest.raises(FileNotFoundError, match="--data /no/such/dir"):
        qnn.export_qnn(model, str(tmp_path / "d"), context=CONTEXT, prefill_len=PREFILL, data=["/no/such/dir"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty/manifest.json not found: not a dataset"):
        qnn.export_qnn(model, str(tmp_path / "d2"), context=CONTEXT, prefill_len=PREFILL, data=[str(tmp_path / "empty")])
    with pytest.raises(FileExistsError, match="not empty"):
        qnn.export_qnn(model, exported["out"], context=CONTEXT, prefill_len=PREFILL)
    llm_only = genieblue_jax.api.GenieBlue({"llm": model.mcfg.llm}, {"llm": model.params["llm"]}, path="/ckpt/llm")
    with pytest.raises(ValueError, match="/ckpt/llm is not a multimodal model"):
        qnn.export_qnn(llm_only, str(tmp_path / "e"))
    with pytest.raises(ValueError, match="image tokens after split"):
        exported["mm"].score(np.array([1, 2, 3]), split=1, image_embeds=np.zeros((3, 64), np.float32),
                             image_mask=np.array([0, 0, 1], np.float32))
    with pytest.raises(ValueError, match="context full"):
        exported["base"].score(np.ones(CONTEXT + 1, np.int32), split=CONTEXT)


def test_cli_missing_checkpoint_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.export_qnn", "--checkpoint", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode != 0 and f"{tmp_path / 'nope'}: no such directory" in proc.stderr


def test_install_hint_without_aimet(monkeypatch):
    monkeypatch.setitem(sys.modules, "aimet_onnx", None)   # import fails as if not installed
    assert not quantize.aimet_available()
    with pytest.raises(ImportError, match="pip install --no-deps aimet-onnx=="):
        quantize.require_aimet()


@pytest.mark.parametrize("module", [graphs, runtime, calibration, onnx_export, quantize, evaluate, report])
def test_docstring_examples(module):
    result = doctest.testmod(module, verbose=False)
    assert result.failed == 0
