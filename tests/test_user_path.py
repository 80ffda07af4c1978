"""README's whole path ("The whole path, from Hugging Face weights to a phone"), read out of
README.md and run command for command at tiny scale:

HF weights (random `transformers` Qwen2 + SigLIP, with an HF `tokenizer.json`) -> tools.from_hf
-> a LLaVA-format JSON converted by data_pipelines.convert -> stage 1 -> stage 2 (experiments.run)
-> tools.chat -> tools.evaluate -> tools.to_torch -> tools.export_qnn. The only edits: the paths,
`:paper` dropped, size overrides appended (`SIZES`). Every step is the CLI a user types, run as a
subprocess; the test checks what each one leaves behind and the numbers the path promises
(text retention of the deployed model exactly 100%, exported files that load).
"""
import json
import os
import re
import shlex
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


README = os.path.join(REPO, "README.md")
BLOCK_TITLE = "### The whole path, from Hugging Face weights to a phone"


def readme_whole_path() -> tuple[str, list[list[str]]]:
    """README's whole-path block as written, and its commands (continuation lines joined,
    comments dropped) as argument lists, split as bash splits them."""
    text = open(README).read()
    head = text.index(BLOCK_TITLE)
    start = text.index("```bash\n", head) + len("```bash\n")
    block = text[start:text.index("```", start)]
    commands, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line[:-1] if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(shlex.split(current))
            current = ""
    assert not current, f"the block ends inside a continued command: {current!r}"
    return block, commands


def test_readme_whole_path_is_valid_bash():
    """Every line is bash as written: no placeholders, no comment after a line continuation (bash
    reads `\\ #...` as an escaped space, and the next line runs as a command of its own), each
    command one of ours."""
    block, commands = readme_whole_path()
    assert subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True).returncode == 0
    assert "..." not in block and not re.search(r"\\[ \t]+\S", block), block
    assert [c[:3] for c in commands] == [["python", "-m", m] for m in (
        "tools.from_hf", "tools.from_hf", "data_pipelines.convert", "experiments.run", "experiments.run",
        "tools.chat", "tools.chat", "tools.evaluate", "tools.to_torch", "tools.export_qnn")]


# The test's edits of README's commands: where each path lives here, and the size overrides.
RUN_SIZE = ["--config.data.seq_len=160", "--config.train.global_batch_size=4", "--config.train.steps=3",
            "--config.checkpoint.every_steps=3", "--config.demo.enabled=false"]
SIZES = {"experiments.run": RUN_SIZE, "tools.chat": ["--max_new_tokens=8"], "tools.evaluate": ["--max_new_tokens=4"],
         "tools.export_qnn": ["--context=96", "--prefill_len=32", "--calib=2", "--decode_steps=2"]}


def _edited(command: list[str], places: dict[str, str]) -> list[str]:
    """`command` with README's paths replaced by `places` (longest first), `:paper` dropped and
    the size overrides of its module appended."""
    out = []
    for arg in command[2:]:
        for readme_path in sorted(places, key=len, reverse=True):
            arg = arg.replace(readme_path, places[readme_path])
        out.append(arg.replace(":paper", "") if arg.startswith("--config=") else arg)
    return out + SIZES.get(command[2], [])


def test_hf_weights_to_phone(tmp_path):
    # --- Hugging Face weights and a user's data ------------------------------------------------
    llava = tmp_path / "llava"
    llava.mkdir()
    train_json, train_records = _llava(llava, "train", 64)
    eval_json, eval_records = _llava(llava, "eval", 24)
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
    scene = next(r for r in eval_records if "image" in r)
    (llava / "images" / "scene.png").write_bytes((llava / "images" / scene["image"]).read_bytes())

    # --- README's block, command for command ----------------------------------------------------
    ckpt, data, runs = tmp_path / "ckpt", tmp_path / "data" / "vqa", tmp_path / "runs"
    places = {"/models/Qwen2.5-3B": str(tmp_path / "hf_llm"),
              "/models/siglip-so400m-patch14-384": str(tmp_path / "hf_vit"),
              "/ckpt/qwen2.5-3b": str(ckpt / "llm"), "/ckpt/siglip": str(ckpt / "vit"),
              "/data/llava/train.json": train_json, "/data/llava/heldout.json": eval_json,
              "/data/llava/images": str(llava / "images"), "/data/vqa": str(data), "/runs": str(runs),
              "/export": str(tmp_path / "export")}
    _, commands = readme_whole_path()
    outputs = []
    for i, command in enumerate(commands):
        log = tmp_path / f"step{i}.log" if command[2] in ("experiments.run", "tools.chat") else None
        outputs.append(_cli(*_edited(command, places), log=log))
    (_, _, out_convert, _, log, chat_image, chat_text, _, _, _) = outputs

    assert os.path.isfile(ckpt / "llm" / "hf_assets" / "tokenizer.json")
    # The converter's default source label ("llava") is not the mixture key (vqa): the key names it.
    _assert_converted_all(out_convert, train_json, data, [r["id"] for r in train_records], source="llava")
    assert sorted(os.listdir(runs / "s2" / "checkpoints")) == ["3"]
    assert "loss/vqa" in open(runs / "s2" / "metrics.jsonl").readline()
    # tools.chat's answers, against the library's own (genieblue_jax.load + generate): the text
    # question is answered by the imported LLM itself, the image question on the multimodal path.
    import genieblue_jax
    prompt = commands[6][commands[6].index("--prompt") + 1]
    base_answer = genieblue_jax.load(str(ckpt / "llm")).generate(prompt, max_new_tokens=8)
    assert chat_text.startswith(f"{base_answer}\n[base LLM (non-shared); "), chat_text
    assert "\n[multimodal path (replicated blocks + LoRA); " in chat_image, chat_image
    # Output redirected to a file (`> log 2>&1`): no progress bar's carriage returns, one plain
    # line per log interval, with the metrics.jsonl row's step and loss.
    assert "\r" not in log
    rows = [json.loads(line) for line in open(runs / "s2" / "metrics.jsonl")]
    logged = re.findall(r"^\[process 0/1\] \S+ \S+ step (\d+)/3 loss (\S+) tokens/s \d+ ETA \S+$", log, re.MULTILINE)
    assert rows and rows[-1]["step"] == 3
    assert logged == [(str(r["step"]), f"{r['loss']:.4f}") for r in rows], log[-3000:]

    result = json.loads((runs / "s2" / "eval" / "multimodal.json").read_text())  # README's step 6
    n_text = sum("image" not in r for r in eval_records)
    assert result["counts"] == {"examples": 24, "answered": 24, "skipped": 0} and 0 < n_text < 24
    # The test's own reference: the imported LLM alone (mode text) on the same questions.
    base_report = tmp_path / "report_text.json"
    _cli("tools.evaluate", f"--checkpoint={ckpt / 'llm'}", f"--data={eval_json}", f"--image_root={llava / 'images'}",
         "--mode=text", f"--out={base_report}", "--max_new_tokens=4")
    base = json.loads(base_report.read_text())
    assert base["counts"] == {"examples": 24, "answered": n_text, "skipped": 24 - n_text}
    # The deployed model answers text requests with the imported LLM itself: the same text.
    deployed_text = {p["id"]: p["prediction"] for p in result["predictions"] if not p["images"]}
    assert deployed_text == {p["id"]: p["prediction"] for p in base["predictions"]}
    assert result["scores"]["text"] == base["scores"]["text"]

    export = tmp_path / "export"
    base = transformers.AutoModelForCausalLM.from_pretrained(export / "torch" / "base_llm")  # README's step 7
    ids = torch.tensor([[5, 17, 300, 42]])
    with torch.no_grad():
        np.testing.assert_allclose(base(ids).logits.numpy(), llm(ids).logits.numpy(), atol=1e-4)
    assert os.path.isfile(export / "torch" / "lora_adapter" / "adapter_config.json")

    qnn = json.loads((export / "qnn" / "report.json").read_text())  # README's step 8
    files = set(os.listdir(export / "qnn" / "qnn"))
    for component in ("vision", "llm_base_prefill", "llm_base_decode", "llm_mm_prefill", "llm_mm_decode"):
        assert any(f.startswith(component) and f.endswith(".onnx") for f in files), (component, files)
        assert any(f.startswith(component) and f.endswith(".encodings") for f in files), (component, files)
    assert qnn["sizes"] and qnn["quantization"]["status"] == "done"
    assert max(v["max_abs_diff"] for v in qnn["parity_onnx_vs_jax"].values()) < 1e-3
