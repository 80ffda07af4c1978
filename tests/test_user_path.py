"""The README's user path, command for command, at tiny scale:

HF weights (random `transformers` Qwen2 + SigLIP, with an HF `tokenizer.json`) -> tools.from_hf
-> LLaVA-format JSON converted by data_pipelines.convert -> stage 1 -> stage 2 (both through
experiments.run with the README's overrides) -> tools.evaluate -> tools.to_torch ->
tools.export_qnn. Every step is the CLI a user types, run as a subprocess; the test checks
what each one leaves behind and the numbers the path promises (text retention of the
deployed model exactly 100%, exported files that load).
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from experiments.demo_data import demo_examples
from tests.conftest import xla_flags

pytestmark = pytest.mark.slow  # the integration tier (setup.cfg); `pytest -m "not slow"` skips it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"]


def _cli(*args, timeout=600, log=None):
    """Runs `python -m ARGS`; returns its stdout, or with `log` (a path) stdout and stderr as
    `> log 2>&1` leaves them in that file."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"}
    if log is not None:
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=timeout)
        out = err = open(log, newline="").read()  # newline="": a carriage return stays visible
    else:
        proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, f"{' '.join(args[:1])} failed:\n{out[-3000:]}\n{err[-3000:]}"
    return out


def _hf_tokenizer(texts, path):
    """A small byte-level BPE `tokenizer.json` with Qwen's chat specials, as an HF repo ships."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return tok.get_vocab_size()


def _llava(tmp_path, split, n):
    """A LLaVA JSON (+ PNG files) of demo scenes and text tasks, as a user's data would come."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    records = []
    for ex in demo_examples(split, n, seed=3):
        rec = {"id": ex.id, "conversations": [{"from": "human" if t["role"] == "user" else "gpt",
                                               "value": t["content"]} for t in ex.turns]}
        if ex.images:
            (images / f"{ex.id}.png").write_bytes(ex.images[0])
            rec["image"] = f"{ex.id}.png"
        records.append(rec)
    path = tmp_path / f"{split}.json"
    path.write_text(json.dumps(records))
    return str(path), records


def _assert_converted_all(out: str, input_json: str, data, ids: list, source: str):
    """data_pipelines.convert wrote every record of `input_json` (ids in order) and rejected none:
    its printed summary exactly, its manifest, an empty rejects log, and the records read back."""
    from data_pipelines.records import ArrayRecordExampleSource, read_manifest
    n = len(ids)
    assert out.splitlines() == [f"converted {input_json} -> {data}", f"  total     {n}", f"  written   {n}",
                                "  rejected  0 (0.0%)", f"  rejects log: {data / 'rejects.jsonl'}"], out
    assert (data / "rejects.jsonl").read_text() == ""
    manifest = read_manifest(str(data))
    assert (manifest["num_records"], manifest["sources"]) == (n, {source: n})
    written = ArrayRecordExampleSource(str(data))
    assert [written[i].id for i in range(len(written))] == ids


def test_hf_weights_to_phone(tmp_path):
    # --- Hugging Face weights --------------------------------------------------------------
    train_json, train_records = _llava(tmp_path, "train", 64)
    eval_json, eval_records = _llava(tmp_path, "eval", 24)
    texts = [c["value"] for r in train_records for c in r["conversations"]] + ["system user assistant"]
    torch.manual_seed(0)
    llm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=448, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=512))
    llm.save_pretrained(tmp_path / "hf_llm", safe_serialization=True)
    assert _hf_tokenizer(texts, tmp_path / "hf_llm" / "tokenizer.json") <= 448
    vit = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, vision_use_head=False))
    vit.save_pretrained(tmp_path / "hf_vit", safe_serialization=True)

    # --- the README's commands ---------------------------------------------------------------
    ckpt = tmp_path / "ckpt"
    _cli("tools.from_hf", f"--hf_dir={tmp_path / 'hf_llm'}", f"--out={ckpt / 'llm'}")
    _cli("tools.from_hf", f"--hf_dir={tmp_path / 'hf_vit'}", f"--out={ckpt / 'vit'}")
    assert os.path.isfile(ckpt / "llm" / "hf_assets" / "tokenizer.json")
    data = tmp_path / "data" / "mine"
    out = _cli("data_pipelines.convert", "--format=llava", f"--json={train_json}",
               f"--image_root={tmp_path / 'images'}", f"--out={data}", "--source=mine")
    _assert_converted_all(out, train_json, data, [r["id"] for r in train_records], source="mine")

    common = [f"--config.init.llm_checkpoint={ckpt / 'llm'}", f"--config.init.vit_checkpoint={ckpt / 'vit'}",
              f"--config.data.tokenizer={ckpt / 'llm' / 'hf_assets'}",
              f"--config.data.sources=mine={tmp_path / 'data' / 'mine'}:1",
              "--config.data.seq_len=160", "--config.train.global_batch_size=4", "--config.train.steps=3",
              "--config.checkpoint.every_steps=3", "--config.demo.enabled=false"]
    runs = tmp_path / "runs"
    _cli("experiments.run", "--config=stage1", f"--workdir={runs / 'stage1'}", *common)
    log = _cli("experiments.run", "--config=stage2_skip", f"--workdir={runs / 'stage2'}",
               f"--config.init.stage1_workdir={runs / 'stage1'}", "--config.train.log_every=2", *common,
               log=tmp_path / "stage2.log")
    assert sorted(os.listdir(runs / "stage2" / "checkpoints")) == ["3"]
    # Output redirected to a file (`> log 2>&1`): no progress bar's carriage returns, one plain
    # line per log interval (every 2 steps, and the last), with the metrics.jsonl row's step and loss.
    assert "\r" not in log
    rows = [json.loads(line) for line in open(runs / "stage2" / "metrics.jsonl")]
    logged = re.findall(r"^\[process 0/1\] \S+ \S+ step (\d+)/3 loss (\S+) tokens/s \d+ ETA \S+$", log, re.MULTILINE)
    assert [r["step"] for r in rows] == [2, 3], rows
    assert logged == [(str(r["step"]), f"{r['loss']:.4f}") for r in rows], log[-3000:]

    report = tmp_path / "report_multimodal.json"
    out = _cli("tools.evaluate", f"--checkpoint={runs / 'stage2'}", f"--data={eval_json}",
               f"--image_root={tmp_path / 'images'}", "--mode=multimodal", f"--out={report}", "--max_new_tokens=4")
    result = json.loads(report.read_text())
    n_text = sum("image" not in r for r in eval_records)
    assert result["counts"] == {"examples": 24, "answered": 24, "skipped": 0} and 0 < n_text < 24
    base_report = tmp_path / "report_text.json"
    _cli("tools.evaluate", f"--checkpoint={ckpt / 'llm'}", f"--data={eval_json}", f"--image_root={tmp_path / 'images'}",
         "--mode=text", f"--out={base_report}", "--max_new_tokens=4")
    base = json.loads(base_report.read_text())
    assert base["counts"] == {"examples": 24, "answered": n_text, "skipped": 24 - n_text}
    # The deployed model answers text requests with the imported LLM itself: the same text.
    deployed_text = {p["id"]: p["prediction"] for p in result["predictions"] if not p["images"]}
    assert deployed_text == {p["id"]: p["prediction"] for p in base["predictions"]}
    assert result["scores"]["text"] == base["scores"]["text"]

    _cli("tools.to_torch", f"--checkpoint={runs / 'stage2'}", f"--out={tmp_path / 'torch'}")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "torch" / "base_llm")
    ids = torch.tensor([[5, 17, 300, 42]])
    with torch.no_grad():
        np.testing.assert_allclose(base(ids).logits.numpy(), llm(ids).logits.numpy(), atol=1e-4)
    assert os.path.isfile(tmp_path / "torch" / "lora_adapter" / "adapter_config.json")

    _cli("tools.export_qnn", f"--checkpoint={runs / 'stage2'}", f"--out={tmp_path / 'qnn'}", "--context=96",
         "--prefill_len=32", "--calib=2", "--decode_steps=2")
    qnn = json.loads((tmp_path / "qnn" / "report.json").read_text())
    files = set(os.listdir(tmp_path / "qnn" / "qnn"))
    for component in ("vision", "llm_base_prefill", "llm_base_decode", "llm_mm_prefill", "llm_mm_decode"):
        assert any(f.startswith(component) and f.endswith(".onnx") for f in files), (component, files)
        assert any(f.startswith(component) and f.endswith(".encodings") for f in files), (component, files)
    assert qnn["sizes"] and qnn["quantization"]["status"] == "done"
    assert max(v["max_abs_diff"] for v in qnn["parity_onnx_vs_jax"].values()) < 1e-3
