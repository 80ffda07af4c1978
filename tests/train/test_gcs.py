"""A run whose workdir, init checkpoints and tokenizer live on Cloud Storage, against a local
GCS server (tests/gcs_server.py: gcp-storage-emulator in memory on 127.0.0.1): etils.epath / gcsfs
read STORAGE_EMULATOR_HOST, Orbax's tensorstore TENSORSTORE_GCS_HTTP_URL. The data stays on
a file system (ArrayRecord is read by path: on a pod, a gcsfuse mount).
"""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import genieblue_jax
from genieblue_jax import checkpoint, checksums, models, paths
from genieblue_jax.train import trainer
from tests.conftest import xla_flags
from tests.train.conftest import losses, tiny_config

pytestmark = pytest.mark.slow  # the integration tier (setup.cfg); `pytest -m "not slow"` skips it

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
    """A GCS server on 127.0.0.1 with bucket `bkt`; the environment pointing at it."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tests.gcs_server", str(port), "bkt"], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "the GCS emulator did not start"
                time.sleep(0.2)
        yield "gs://bkt"
    finally:
        # tensorboardX's GCS event writers upload their buffer again when garbage-collected, even
        # after close() (which uploaded it): once the server is gone that retries for 120 s per
        # writer at interpreter exit. Every writer was closed by the trainer; skip the re-upload.
        from tensorboardX import record_writer
        record_writer.GCSRecordWriter.__del__ = lambda self: None
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.kill()
        server.wait()


def _tree_has_colon_dir(root):
    return [d for d, dirs, _ in os.walk(root) for x in dirs if x.startswith("gs:")]


def test_unknown_schemes_are_errors_not_local_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in ("gs:/bkt/run", "foo://bkt/run"):
        with pytest.raises(ValueError, match=f"{bad}: not a path genieblue_jax can use"):
            trainer.train(tiny_config(), bad)
    assert os.listdir(tmp_path) == []


def test_a_gs_run_saves_resumes_and_loads_like_a_local_one(tmp_path, gcs, monkeypatch):
    from experiments.demo_data import MIXTURE, write_demo_datasets
    monkeypatch.chdir(tmp_path)
    data = write_demo_datasets(str(tmp_path / "data"), splits={"train": 200}, seed=0)
    # Init checkpoints and the tokenizer on gs://, written by the framework itself.
    base = tiny_config()
    mcfg = trainer.tokenized_model_config(base, data["tokenizer"])
    llm = models.init_params(mcfg.llm, jax.random.key(3))
    vit = models.init_params(mcfg.vision, jax.random.key(4))
    for root in (gcs, str(tmp_path / "local")):
        checkpoint.save(f"{root}/init/llm", {"llm": mcfg.llm}, {"llm": llm}, tokenizer=data["tokenizer"])
        checkpoint.save(f"{root}/init/vit", {"vision": mcfg.vision}, {"vision": vit})

    def config(root, steps=6):
        return tiny_config(**{"train.steps": steps, "init.llm_checkpoint": f"{root}/init/llm",
                              "init.vit_checkpoint": f"{root}/init/vit",
                              "data.tokenizer": f"{root}/init/llm/hf_assets/tokenizer.model",
                              "data.sources": ",".join(f"{s}={tmp_path}/data/train/{s}:{w}"
                                                       for s, w in MIXTURE.items())})

    local = trainer.train(config(str(tmp_path / "local")), str(tmp_path / "local" / "run"))
    # On gs://: stopped after step 3 (SIGTERM), then resumed by the same call.
    run = f"{gcs}/run"

    def sigterm_after_step_3(step, row):
        if step == 1:  # train() holds the gs:// workdir: another trainer is refused
            with pytest.raises(trainer.WorkdirInUseError,
                               match=f"{run} is in use by another trainer \\(pid {os.getpid()}"):
                trainer.WorkdirLock(run).__enter__()
        if step == 3:
            os.kill(os.getpid(), 15)

    first = trainer.train(config(gcs), run, step_hooks=[sigterm_after_step_3])
    assert first["step"] == 3
    assert sorted(int(p.name) for p in (paths.path(run) / "checkpoints").iterdir() if p.name.isdigit()) == [3]
    assert not (paths.path(run) / ".lock").exists()  # released (an object store has no empty directories)
    # The checksums on gs:// (written into the step before its commit_success.txt) match the files.
    recorded = __import__("json").loads((paths.path(run) / "checkpoints" / "3" / "checksums.json").read_text())
    assert "meta/metadata" in recorded["files"] and any(f.startswith("state/ocdbt") for f in recorded["files"])
    assert trainer.step_damage(run, 3) == []
    init_sums = checkpoint.read_metadata(f"{gcs}/init/llm")["checksums"]
    assert {"params/manifest.ocdbt", "hf_assets/tokenizer.model"} <= set(init_sums)
    assert checksums.damage(f"{gcs}/init/llm", init_sums) == []
    second = trainer.train(config(gcs), run)
    assert second["step"] == 6
    rows = [__import__("json").loads(line) for line in (paths.path(run) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == losses(local["workdir"])  # bitwise: same run, other storage

    # genieblue_jax.load from gs:// gives the local run's model.
    remote_model, local_model = genieblue_jax.load(run), genieblue_jax.load(local["workdir"])
    tokens = np.arange(10, 34, dtype=np.int32)[None]  # text tokens (the image token is id 3)
    np.testing.assert_array_equal(np.asarray(remote_model.logits(tokens, mode="multimodal")),
                                  np.asarray(local_model.logits(tokens, mode="multimodal")))
    assert (paths.path(run) / "tensorboard").is_dir() and (paths.path(run) / "config.json").is_file()

    # The tools.evaluate command on the gs:// run writes its report beside it, as it does beside
    # a local one; the predictions are the local run's.
    from genieblue_jax.cli import to_torch as to_torch_tool
    for workdir in (run, local["workdir"]):
        proc = subprocess.run([sys.executable, "-m", "tools.evaluate", f"--checkpoint={workdir}", "--mode=multimodal",
                               f"--data={tmp_path}/data/train/text", f"--data={tmp_path}/data/train/vqa", "--limit=3",
                               "--max_new_tokens=4"], cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and f"wrote {workdir}/eval/multimodal.json" in proc.stdout, proc.stderr[-3000:]
    remote_eval, local_eval = (__import__("json").loads((paths.path(w) / "eval" / "multimodal.json").read_text())
                               for w in (run, local["workdir"]))
    assert remote_eval["checkpoint"] == run and len(remote_eval["predictions"]) == 6
    assert remote_eval["predictions"] == local_eval["predictions"]
    from genieblue_jax.cli import evaluate as evaluate_tool  # the command without absl (main() prints the error)
    with pytest.raises(FileExistsError, match=f"^{run}/eval/multimodal.json holds an earlier evaluation; pass "
                                              f"--out=NEW.json to keep it, or --overwrite to replace it$"):
        evaluate_tool.run(run, [f"{tmp_path}/data/train/text"], mode="multimodal")
    assert __import__("json").loads((paths.path(run) / "eval" / "multimodal.json").read_text()) == remote_eval
    # tools.to_torch from the gs:// run, to local disk and to gs://: the same files, byte for byte.
    local_export = to_torch_tool.run(run, str(tmp_path / "torch"))
    remote = to_torch_tool.run(run, f"{gcs}/torch")
    local_files = sorted(str(p.relative_to(tmp_path / "torch")) for p in (tmp_path / "torch").rglob("*") if p.is_file())
    assert [f.removeprefix(f"{gcs}/torch/") for f in remote.files] == local_files
    assert "base_llm/config.json" in local_files and "lora_adapter/adapter_config.json" in local_files
    for f in local_files:
        assert (paths.path(gcs) / "torch" / f).read_bytes() == (tmp_path / "torch" / f).read_bytes(), f
    assert remote.sizes() == local_export.sizes() and remote.out_dir == f"{gcs}/torch"
    with pytest.raises(FileExistsError, match=f"{gcs}/torch already exists and is not empty"):
        to_torch_tool.run(run, f"{gcs}/torch")
    # The QNN export (ONNX / AIMET write local files) to gs://: made locally, then copied; the
    # graphs are the local export's, byte for byte.
    from genieblue_jax.export.qnn import export_qnn
    for out in (str(tmp_path / "qnn"), f"{gcs}/qnn"):
        export_qnn(remote_model, out, quantize="no", calib=0, context=64, prefill_len=16, log=lambda _: None)
    local_files = sorted(str(p.relative_to(tmp_path / "qnn")) for p in (tmp_path / "qnn").rglob("*") if p.is_file())
    assert "onnx/manifest.json" in local_files and "report.json" in local_files
    remote_qnn = paths.path(gcs) / "qnn"  # (no recursive glob on gs://: two levels)
    assert sorted(str(p.relative_to(remote_qnn)) for d in (remote_qnn, remote_qnn / "onnx") for p in d.iterdir()
                  if p.is_file()) == local_files
    for f in local_files:
        if f.endswith((".onnx", ".weights")):
            assert (remote_qnn / f).read_bytes() == (tmp_path / "qnn" / f).read_bytes(), f
    untimed = [json.loads(m) for m in ((remote_qnn / "onnx/manifest.json").read_text(),
                                       (tmp_path / "qnn/onnx/manifest.json").read_text())]
    for m in untimed:
        for g in m["graphs"].values():
            g.pop("seconds")  # the export's wall time
    assert untimed[0] == untimed[1]
    assert _tree_has_colon_dir(tmp_path) == [] and not os.path.exists(os.path.join(tmp_path, "gs:"))


def test_a_gs_workdir_is_leased_to_one_trainer(gcs):
    """gs:// has no advisory locks: the holder keeps a claim object renewed by a heartbeat
    (workdir_lock). A second trainer is refused naming the holder while the claim is renewed,
    also after longer than the lease; a dead run's unrenewed claim blocks the workdir until its
    lease expires and is then deleted by the next holder; two trainers that both write their
    claims before either lists both refuse."""
    from genieblue_jax.train.workdir_lock import WorkdirInUseError, WorkdirLock
    run, lease = f"{gcs}/leased", 3
    claims = paths.path(run) / ".lock"

    def claim_names():  # an object store has no empty directories
        return [p.name for p in claims.iterdir()] if claims.exists() else []

    with WorkdirLock(run, lease_s=lease):
        with pytest.raises(WorkdirInUseError, match=f"{run} is in use by another trainer \\(pid {os.getpid()} on .*"
                                                    f"lease renewed"):
            WorkdirLock(run, lease_s=lease).__enter__()
        time.sleep(lease + 1.5)  # the claim is older than the lease now: only the heartbeat keeps it live
        with pytest.raises(WorkdirInUseError, match=f"pid {os.getpid()} on "):
            WorkdirLock(run, lease_s=lease).__enter__()
        assert len(claim_names()) == 1  # the refused trainers deleted their claims
    assert claim_names() == []  # released

    dead = claims / "dead.json"  # a SIGKILLed run's claim: never renewed, never deleted by its owner
    dead.write_text('{"holder": "pid 1 on lost-vm, since 2026-11-30 09:00:00"}')
    with pytest.raises(WorkdirInUseError, match="pid 1 on lost-vm"):
        WorkdirLock(run, lease_s=lease).__enter__()
    time.sleep(lease + 1.5)
    with WorkdirLock(run, lease_s=lease):
        assert not dead.exists()

    a, b = WorkdirLock(run), WorkdirLock(run)  # interleaved: a writes, b writes, a lists, b lists
    a.write_claim()
    b.write_claim()
    assert len(a.live_claims()) == 1 and len(b.live_claims()) == 1  # each sees the other: both refuse
    a.__exit__(), b.__exit__()


def test_from_hf_writes_a_gs_checkpoint_with_the_hf_assets(tmp_path, gcs):
    """tools.from_hf (the command) with --out on gs://: the checkpoint and its hf_assets land
    there, and load the same parameters as an import to local disk."""
    import torch
    import transformers
    torch.manual_seed(0)
    hf = tmp_path / "hf"
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(hf, safe_serialization=True)
    (hf / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    for out in (f"{gcs}/imported", str(tmp_path / "imported")):
        proc = subprocess.run([sys.executable, "-m", "tools.from_hf", f"--hf_dir={hf}", f"--out={out}"], cwd=REPO,
                              env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (paths.path(gcs) / "imported" / "hf_assets" / "tokenizer_config.json").read_text() == \
        '{"model_max_length": 512}'
    _, remote, _ = checkpoint.restore(f"{gcs}/imported")
    _, local, _ = checkpoint.restore(str(tmp_path / "imported"))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), remote, local))
