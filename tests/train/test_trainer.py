"""The training engine's guarantees, on tiny models and the demo data."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_pipelines import images as images_lib
from genieblue_jax import models, structure
from genieblue_jax import workdir as workdir_lib
from genieblue_jax.train import trainer
from tests.train.conftest import losses, rows, tiny_config, with_demo_data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 6-step run on one device that several tests compare against
    (each `train()` call compiles its step: sharing the run keeps the suite short)."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    return trainer.train(tiny_config(**{"train.steps": 6}), workdir)


@pytest.mark.slow
def test_frozen_base_bitwise_and_optimizer_state_only_for_trainable(reference):
    c = tiny_config(**{"train.steps": 6})
    setup = trainer.resolve(c, reference["workdir"])
    _, fresh_frozen = structure.partition(workdir_lib.init_params(c, setup.mcfg, setup.mesh), "stage2")
    for name, leaf in models.flatten(reference["frozen"]).items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(models.flatten(fresh_frozen)[name]), err_msg=name)
    assert {n.split("/")[0] for n in models.flatten(reference["frozen"])} == {"llm", "vision"}  # base + unused head
    trainable = reference["state"]["trainable"]
    adam = reference["state"]["opt_state"][1]
    assert set(models.flatten(adam.mu)) == set(models.flatten(trainable)) == set(models.flatten(adam.nu))
    assert models.count_params(adam.mu) == models.count_params(trainable)
    assert not any(n.startswith("llm/") for n in models.flatten(trainable))
    assert int(reference["state"]["step"]) == 6


SCANNED_EIGHT = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "train.steps": 6, "model.scan_layers": True}


@pytest.fixture(scope="module")
def scanned_eight(tmp_path_factory):
    """6 steps on 8 devices (data x fsdp x tensor), the layers run as scan loops over weights and
    Adam moments in the step's stacked layout (`trainer.to_step_layout`)."""
    return trainer.train(tiny_config(**SCANNED_EIGHT), str(tmp_path_factory.mktemp("eight") / "run"))


@pytest.mark.slow
def test_eight_devices_and_scan_loops_give_the_losses_of_one(scanned_eight, reference):
    eight = scanned_eight
    assert len(losses(reference["workdir"])) == 6
    np.testing.assert_allclose(losses(eight["workdir"]), losses(reference["workdir"]), rtol=1e-5)
    # The base comes back in the named layout, bitwise (stacked once, unstacked at the end).
    want = models.flatten(reference["frozen"])
    got = models.flatten(eight["frozen"])
    assert set(got) == set(want)
    for name, leaf in got.items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want[name]), err_msg=name)
    # Adam's moments live where their parameters live (not replicated on every device).
    params, mu = models.flatten(eight["state"]["trainable"]), models.flatten(eight["state"]["opt_state"][1].mu)
    assert any(not leaf.sharding.is_fully_replicated for leaf in params.values())
    for name, leaf in params.items():
        assert mu[name].sharding.is_equivalent_to(leaf.sharding, leaf.ndim), name


@pytest.mark.slow
def test_a_scanned_run_checkpoints_named_weights_and_resumes_bitwise(tmp_path, capsys, scanned_eight):
    """Checkpoints hold the named layout (what export and `load_trained` read), and a run
    stopped at step 3 resumes into the stacked layout with the uninterrupted run's losses."""
    run = str(tmp_path / "interrupted")

    def sigterm_after_step_3(step, row):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    assert trainer.train(tiny_config(**SCANNED_EIGHT), run, step_hooks=[sigterm_after_step_3])["step"] == 3
    mngr = workdir_lib.checkpoint_manager(run, 2)
    named = workdir_lib.abstract_like(scanned_eight["state"]["trainable"])  # returned in the named layout
    saved = workdir_lib.restore_step(mngr, 3, state={"trainable": named}, partial=True)["state"]["trainable"]
    mngr.close()
    assert jax.tree.structure(saved) == jax.tree.structure(named)
    assert any(n.startswith("branch/layers_1/") for n in models.flatten(saved))
    second = trainer.train(tiny_config(**SCANNED_EIGHT), run)
    assert second["step"] == 6 and "resuming from step 3" in capsys.readouterr().out
    assert losses(run) == losses(scanned_eight["workdir"])  # bitwise


@pytest.mark.slow
def test_four_micro_batches_equal_one_big_batch(tmp_path, reference):
    micro = trainer.train(tiny_config(**{"train.micro_batches": 4, "train.steps": 6}), str(tmp_path / "micro"))
    np.testing.assert_allclose(losses(micro["workdir"]), losses(reference["workdir"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(micro["state"]["trainable"]), jax.tree.leaves(reference["state"]["trainable"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.slow
def test_sigterm_then_restart_resumes_bitwise(tmp_path, capsys, reference):
    def sigterm_after_step_3(step, row):  # a real SIGTERM, sent to ourselves from a step hook
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    run = str(tmp_path / "interrupted")
    first = trainer.train(tiny_config(**{"train.steps": 6}), run, step_hooks=[sigterm_after_step_3])
    assert first["step"] == 3 and "stopped by SIGTERM after step 3" in capsys.readouterr().out
    # What a run killed while saving step 4 leaves (Orbax writes a step under a temporary name,
    # then renames it): a reader leaves it alone (it may be a live run's save), the resume removes it.
    stale = os.path.join(run, "checkpoints", "4.orbax-checkpoint-tmp-1796000000000000")
    shutil.copytree(os.path.join(run, "checkpoints", "3"), stale)
    reader = workdir_lib.checkpoint_manager(run, 2)  # as load / chat / evaluate open it
    assert reader.latest_step() == 3
    reader.close()
    assert os.path.isdir(stale)
    # The data position was checkpointed by the in-process pipeline: Grain's worker processes could
    # not restore it, so that change is refused at the start, naming the setting.
    with pytest.raises(trainer.ConfigError, match=r"another config \(data.num_workers: 0 there, 2 now\)"):
        trainer.train(tiny_config(**{"train.steps": 6, "data.num_workers": 2}), run)
    second = trainer.train(tiny_config(**{"train.steps": 6}), run)
    assert second["step"] == 6 and "resuming from step 3" in capsys.readouterr().out
    assert not os.path.exists(stale) and not [n for n in os.listdir(os.path.join(run, "checkpoints")) if "tmp" in n]
    assert losses(run) == losses(reference["workdir"])  # bitwise: same data order, same state


def _sha256sum(path):
    """coreutils' SHA-256 of a file: the outside reference for the recorded checksums."""
    return subprocess.run(["sha256sum", path], capture_output=True, text=True, check=True).stdout.split()[0]


@pytest.mark.slow
def test_damaged_checkpoints_are_named_and_the_resume_falls_back_to_the_newest_intact_step(
        tmp_path, capsys, caplog, reference):
    """Checkpoints 1-4, then three kinds of damage: a flipped byte in a parameter / Adam file of
    step 4, a truncated metadata JSON in step 3, a deleted data-state file in step 2, and step
    1's checksums removed (as an older version wrote it). `genieblue_jax.load` refuses step 4 by
    file; the resumed run reports each damaged step by file, moves it aside, resumes from step 1
    (unverified, with a warning) and ends with the uninterrupted run's losses, bitwise."""
    import genieblue_jax
    from genieblue_jax import checksums
    run = tmp_path / "run"
    trainer.train(tiny_config(**{"train.steps": 4, "checkpoint.every_steps": 1, "checkpoint.keep": 4}), str(run))
    ckpts = run / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["1", "2", "3", "4"]
    recorded = json.loads((ckpts / "4" / "checksums.json").read_text())["files"]
    assert {"meta/metadata", "data/process_0-of-1.json"} <= set(recorded)
    assert len([f for f in recorded if f.startswith("state/")]) > 5
    for rel in ("meta/metadata", "state/manifest.ocdbt"):
        assert recorded[rel]["sha256"] == _sha256sum(ckpts / "4" / rel)
        assert recorded[rel]["size"] == os.path.getsize(ckpts / "4" / rel)

    state_files = [os.path.join(d, f) for d, _, fs in os.walk(ckpts / "4" / "state") for f in fs]
    flipped = max(state_files, key=os.path.getsize)
    with open(flipped, "r+b") as f:
        f.seek(os.path.getsize(flipped) // 2)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x10]))
    flipped = os.path.relpath(flipped, ckpts / "4")
    meta = ckpts / "3" / "meta" / "metadata"
    meta.write_bytes(meta.read_bytes()[:-7])
    os.remove(ckpts / "2" / "data" / "process_0-of-1.json")
    os.remove(ckpts / "1" / "checksums.json")

    with pytest.raises(checksums.CorruptCheckpointError,
                       match=re.escape(f"{ckpts / '4'}: damaged checkpoint: {flipped}: content differs")):
        genieblue_jax.load(str(run))

    capsys.readouterr()
    with caplog.at_level("WARNING"):
        trainer.train(tiny_config(**{"train.steps": 6, "checkpoint.every_steps": 1, "checkpoint.keep": 4}), str(run))
    out = capsys.readouterr().out
    damaged = run / "damaged_checkpoints"
    assert f"checkpoint step 4 is damaged ({flipped}: content differs from what was written (SHA-256)): " \
           f"moved to {damaged / '4'}; resuming from step 3" in out
    size = os.path.getsize(damaged / "3" / "meta" / "metadata")
    assert f"checkpoint step 3 is damaged (meta/metadata: {size} bytes, {size + 7} were written): " \
           f"moved to {damaged / '3'}; resuming from step 2" in out
    assert f"checkpoint step 2 is damaged (data/process_0-of-1.json: missing): moved to {damaged / '2'}; " \
           f"resuming from step 1" in out
    assert "resuming from step 1 (" in out
    assert f"{ckpts}/1 has no checksums.json (saved by an older version): not verified" in caplog.text
    assert sorted(os.listdir(damaged)) == ["2", "3", "4"]
    assert losses(run) == losses(reference["workdir"])  # nothing good lost: bitwise the uninterrupted run
    assert sorted(os.listdir(ckpts)) == ["3", "4", "5", "6"]
    assert genieblue_jax.load(str(run)).source["step"] == 6


def _tensorboard_events(logdir):
    """Every event of the TFRecord event files under `logdir` (length, crc, data, crc records)."""
    import glob
    import struct

    from tensorboardX.proto import event_pb2
    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        at = 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + n]))
            at += 12 + n + 4
    return events


@pytest.mark.slow
def test_rows_of_steps_lost_with_a_killed_run_are_dropped_on_resume(tmp_path, reference):
    """A run killed after logging steps 4-6 but before checkpoint 6 was committed (and mid-way
    through writing a row): the resumed run restarts at step 3, and metrics.jsonl holds each step
    once, equal to an uninterrupted run; TensorBoard hides the lost run's events from step 4."""
    run = str(tmp_path / "killed")
    trainer.train(tiny_config(**{"train.steps": 6, "checkpoint.every_steps": 3}), run)
    shutil.rmtree(os.path.join(run, "checkpoints", "6"))  # the kill: checkpoint 6 never committed
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 7, "lo')                         # ... in the middle of writing a row
    trainer.train(tiny_config(**{"train.steps": 6, "checkpoint.every_steps": 3}), run)
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4, 5, 6]
    assert losses(run) == losses(reference["workdir"])
    purges = [e.step for e in _tensorboard_events(os.path.join(run, "tensorboard"))
              if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert purges == [4]


@pytest.mark.slow
def test_metrics_rows_every_log_every_steps_and_the_last(tmp_path, reference, monkeypatch):
    """log_every 4 over 6 steps, without prefetching: rows of steps 4 and 6; the host fetched
    metrics from the device twice (the 4 steps so far, then 2); every step's loss is the
    reference run's (which prefetches a batch ahead), bitwise."""
    seen, fetches, device_get = [], [], jax.device_get

    def counting_device_get(x):
        if isinstance(x, list) and x and isinstance(x[0], dict) and "loss" in x[0]:  # the loop's metrics
            fetches.append(len(x))
        return device_get(x)

    monkeypatch.setattr(jax, "device_get", counting_device_get)
    run = trainer.train(tiny_config(**{"train.steps": 6, "train.log_every": 4, "data.prefetch": 0}),
                        str(tmp_path / "run"), step_hooks=[lambda step, row: seen.append((step, row))])
    assert fetches == [4, 2]
    assert [step for step, _ in seen] == [1, 2, 3, 4, 5, 6]           # hooks: every step, in order
    assert [row["step"] for _, row in seen] == [1, 2, 3, 4, 5, 6]
    assert [row["loss"] for _, row in seen] == losses(reference["workdir"])  # every step computed as before
    written = rows(run["workdir"])
    assert len(written) == 2 and [r["step"] for r in written] == [4, 6]  # 6 steps, log_every 4: step 4 + the last
    assert written == [seen[3][1], seen[5][1]]                         # exactly the rows of those steps
    assert run["step"] == 6 and run["loss"] == seen[5][1]["loss"]
    # Tokens counted in the step (where the global batch is) against the pipeline's own batches.
    from data_pipelines.pipeline import build_streams
    setup = trainer.resolve(tiny_config(**{"train.steps": 6}), run["workdir"])
    batches = build_streams(setup.pipeline, setup.streams, process_index=0, process_count=1)
    assert [row["seq_tokens"] for _, row in seen] == [int((next(batches)["segment_ids"] > 0).sum()) for _ in range(6)]


@pytest.mark.slow
def test_the_non_finite_check_runs_on_steps_that_are_not_logged(tmp_path):
    # lr = 1e30: steps 1-2 are finite (the warm-up) and make the weights huge, so step 3 is the
    # first non-finite step. With max_bad_steps 1 it must stop there, although rows are only
    # written every 5 steps.
    seen = []
    c = tiny_config(**{"train.steps": 6, "train.log_every": 5, "optim.lr": 1e30, "train.max_bad_steps": 1})
    with pytest.raises(FloatingPointError, match=r"^1 non-finite steps in a row at step 3;"):
        trainer.train(c, str(tmp_path / "run"), step_hooks=[lambda step, row: seen.append(step)])
    assert seen == [1, 2] and rows(str(tmp_path / "run")) == []


def test_log_every_must_be_positive(tmp_path):
    with pytest.raises(trainer.ConfigError, match=r"train.log_every=0: must be >= 1"):
        trainer.train(tiny_config(**{"train.log_every": 0}), str(tmp_path / "run"))


def test_parse_sources_weights_and_url_paths():
    assert trainer.parse_sources("vqa=gs://b/d:2") == {"vqa": {"path": "gs://b/d", "weight": 2.0}}
    assert trainer.parse_sources("vqa=gs://b/d") == {"vqa": {"path": "gs://b/d", "weight": 1.0}}
    assert trainer.parse_sources("vqa=/d:6.7, text=/t") == {"vqa": {"path": "/d", "weight": 6.7},
                                                           "text": {"path": "/t", "weight": 1.0}}


@pytest.mark.parametrize("spec,match", [
    ("vqa=/d:6O.7", r"source 'vqa' has weight '6O\.7', not a number"),       # letter O for a zero
    ("a=/x/y:", r"source 'a' has weight '', not a number"),
    ("text=/t,vqa=gs://b/d:x2", r"source 'vqa' has weight 'x2', not a number"),
    ("a=/data/a:b/c", r"source 'a' has weight 'b/c', not a number"),           # a colon in a local path
    ("a=:2", r"source 'a' has no DIR"),
    ("a=/x:0", r"source 'a' has weight 0.0; weights must be finite and > 0"),
    ("a=/x:inf", r"source 'a' has weight inf; weights must be finite and > 0"),
    ("a=/x,a=/y", r"source 'a' given twice"),
    ("a/x", r"'a/x' is not name=DIR\[:weight\]"),
])
def test_parse_sources_rejects_bad_specs(spec, match):
    with pytest.raises(trainer.ConfigError, match=match):
        trainer.parse_sources(spec)


@pytest.mark.slow
def test_resume_refuses_another_base(tmp_path, reference):
    run = str(tmp_path / "run")
    shutil.copytree(reference["workdir"], run)
    # The same config (more steps) over a base that changed under it: the fingerprint refuses.
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["train"]["seed"] = 1
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(trainer.ConfigError, match="trained on another frozen base"):
        trainer.train(tiny_config(**{"train.seed": 1, "train.steps": 8}), run)


def test_a_second_trainer_with_another_config_is_refused_by_key(tmp_path, reference):
    """Resuming a workdir's checkpoints with a config that differs in more than the resumable
    fields (e.g. another learning rate: a second trainer started on the same workdir) names the
    keys and leaves config.json as it was; more steps and another log interval resume."""
    run = str(tmp_path / "run")
    shutil.copytree(reference["workdir"], run)
    saved = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(trainer.ConfigError, match=r"holds checkpoints trained with another config \(optim.lr: "
                                                  r"0.001 there, 0.0003 now; train.seed: 0 there, 5 now\)"):
        trainer.train(tiny_config(**{"optim.lr": 3e-4, "train.seed": 5, "train.steps": 8}), run)
    assert (tmp_path / "run" / "config.json").read_text() == saved
    trainer.check_resumable(tiny_config(**{"train.steps": 8, "train.log_every": 3, "checkpoint.keep": 2}), run)


@pytest.mark.parametrize("override,match", [
    ({"train.global_batch_size": 6, "mesh.data": 4}, r"global_batch_size=6 .* data x fsdp = 4"),
    ({"train.stage": "stage3"}, r"train.stage='stage3'"),
    ({"train.stage": "full"}, r"stages \('full', 'pretrain'\) \(which train the LLM itself\) go with variant 'full'"),
    ({"model.llm": "gpt5"}, r"model.llm='gpt5': no such preset; known: \['demo-qwen2'"),
    ({"model.image_token": "<img>"}, r"model.image_token: .*<img>"),
    ({"data.chat_template": "jinja"}, r"data.chat_template='jinja': choose one of \('auto', 'tokenizer', 'chatml'\)"),
    ({"data.chat_template_kwargs": "enable_thinking=false"}, r"data.chat_template_kwargs='enable_thinking=false': "
                                                              r".*give a JSON object"),
    ({"data.chat_template_kwargs": '{"messages": 1}'}, r"data.chat_template_kwargs=.*\['messages'\] are not options"),
    ({"data.chat_date": "yesterday"}, r"data.chat_date: date 'yesterday' is not YYYY-MM-DD"),
    ({"data.chat_template": "tokenizer"}, r"data.chat_template='tokenizer' with data.tokenizer=.*tokenizer.model: "
                                          r"chat_template='tokenizer' but .* has no chat template"),
])
def test_inconsistent_settings_name_the_key(tmp_path, override, match):
    with pytest.raises(trainer.ConfigError, match=match):
        trainer.resolve(tiny_config(**override), str(tmp_path))


# The values the fault-injection issue found accepted (or crashing with StopIteration /
# ZeroDivisionError), plus the other fields' edges: each is an error naming the key, before any work.
@pytest.mark.parametrize("key,value,rule", [
    ("train.steps", -1, ">= 1"), ("train.steps", 0, ">= 1"), ("checkpoint.keep", 0, ">= 1"),
    ("checkpoint.every_steps", 0, ">= 1"), ("optim.lr", -1.0, ">= 0"), ("data.seq_len", 0, ">= 1"),
    ("train.log_every", 0, ">= 1"), ("optim.b2", 1.0, ">= 0 and < 1"), ("optim.eps", 0.0, "> 0"),
    ("optim.vit_layer_decay", 1.5, "> 0 and <= 1"), ("data.read_buffer", -1, ">= 0"),
])
def test_out_of_range_values_name_the_key_before_any_work(tmp_path, key, value, rule):
    with pytest.raises(trainer.ConfigError, match=f"^{re.escape(f'{key}={value!r}: must be {rule}')}$"):
        trainer.train(tiny_config(**{key: value}), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_every_recipe_is_a_valid_run_config():
    """Every shipped recipe, at both scales, types and validates (every RANGES / CHOICES key is a
    field of the tree and the shipped values pass), and the typed tree round-trips through its
    dict (a workdir's config.json) unchanged."""
    from experiments import configs
    from genieblue_jax import run_config
    recipes = configs.recipes()
    assert len(recipes) >= 10
    for name in recipes:
        for scale in ("demo", "paper"):
            if (name, scale) == ("pretrain", "paper"):  # pretrain is demo scale only
                continue
            run = configs.load(name, scale)
            assert run_config.RunConfig.from_dict(run.to_dict()) == run
    keys = {f"{s}.{k}" for s, sec in run.to_dict().items() if isinstance(sec, dict) for k in sec}
    assert set(run_config.RANGES) | set(run_config.CHOICES) <= keys


def test_paper_scale_requires_init_checkpoints(tmp_path):
    from experiments.configs import load
    with pytest.raises(trainer.ConfigError,
                       match="init.llm_checkpoint is not set: stage 'stage2' starts from a pretrained LLM"):
        trainer.resolve(load("stage2_skip", "paper"), str(tmp_path))


def test_init_checkpoints_of_the_wrong_part_or_shape_are_named(tmp_path):
    """A ViT checkpoint given as the LLM, and a stage-1 workdir whose projector was trained into
    another LLM, are one ConfigError each naming the key and what the path holds, before any
    weight is read."""
    from genieblue_jax import checkpoint
    vit_cfg = models.get_preset("tiny-siglip")
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), models.abstract_params(vit_cfg))
    vit = checkpoint.save(str(tmp_path / "vit"), {"vision": vit_cfg}, {"vision": zeros})
    with pytest.raises(trainer.ConfigError) as e:
        trainer.resolve(tiny_config(**{"init.llm_checkpoint": vit}), str(tmp_path / "run"))
    assert str(e.value) == (f"init.llm_checkpoint={vit} holds vision (VisionConfig), not an LLM: is it the "
                            f"checkpoint for init.vit_checkpoint?")
    with pytest.raises(trainer.ConfigError, match=r"init.llm_checkpoint=.*nowhere: .*not a genieblue_jax checkpoint"):
        trainer.resolve(tiny_config(**{"init.llm_checkpoint": str(tmp_path / "nowhere")}), str(tmp_path / "run"))
    # A stage-1 workdir of the demo LLM (width 128; its config.json's model config), for a tiny-qwen2 run (64).
    other = tiny_config(**{"model.llm": "demo-small-qwen2", "train.stage": "stage1"})
    stage1 = str(tmp_path / "stage1")
    os.makedirs(stage1)
    workdir_lib.write_config(stage1, other, trainer.resolve(other, stage1).mcfg)
    c = tiny_config(**{"init.stage1_workdir": stage1})
    setup = trainer.resolve(c, str(tmp_path / "run"))
    with pytest.raises(trainer.ConfigError) as e:
        workdir_lib.init_params(c, setup.mcfg, setup.mesh)
    assert str(e.value).startswith(f"init.stage1_workdir={stage1} trained the projector of another model: projector/")
    assert "(its LLM qwen2 hidden size 128, its ViT width 48); run stage 1 with this run's init.llm_checkpoint" in \
        str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_cli_rejects_unknown_keys_and_bad_types(tmp_path):
    """The entry point types the recipe first: a misspelled or out-of-range key is one line naming
    it, before any data, model or compile work (no workdir, no demo cache beside it, no compiled
    program in a fresh compilation cache)."""
    compile_cache = tmp_path / "xla_cache"
    compile_cache.mkdir()

    def run(*args):
        return subprocess.run([sys.executable, "-m", "experiments.run", f"--workdir={tmp_path / 'run'}", *args],
                              cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "JAX_COMPILATION_CACHE_DIR": str(compile_cache)})
    bad_key = run("--config=stage2_skip", "--config.train.stepz=3")
    assert bad_key.returncode != 0 and bad_key.stderr.strip().splitlines()[-1] == (
        "config error: --config.train.stepz: the recipe has no key train.stepz (did you mean --config.train.steps?)")
    assert "Traceback" not in bad_key.stderr
    out_of_range = run("--config=stage2_skip", "--config.optim.b1=1.5")
    assert out_of_range.returncode != 0 and out_of_range.stderr.strip().splitlines()[-1] == (
        "config error: optim.b1=1.5: must be >= 0 and < 1")
    bad_choice = run("--config=stage2_skip", "--config.model.placement=middle")
    assert bad_choice.returncode != 0 and "model.placement='middle': choose one of ('skip', 'pre', 'post')" in \
        bad_choice.stderr
    # Outside the demo a forgotten base is refused, never trained at random: named, with both fixes.
    no_base = run("--config=stage2_skip", "--config.demo.enabled=false")
    assert no_base.returncode != 0 and "Traceback" not in no_base.stderr
    assert no_base.stderr.strip().splitlines()[-1] == (
        "config error: init.llm_checkpoint is not set: stage 'stage2' starts from a pretrained LLM (the output of "
        "tools.from_hf); set --config.init.llm_checkpoint=PATH, or ask for random weights by name: "
        "--config.init.from_scratch=llm")
    from experiments.configs import load  # two more, in-process (the entry point's path is shown above)
    c = load("stage2_skip")
    c.demo.enabled, c.init.llm_checkpoint, c.init.vit_checkpoint = False, "/ckpt/llm", "/ckpt/vit"
    with pytest.raises(trainer.ConfigError, match=r"^init.stage1_workdir is not set: .*from_scratch=projector$"):
        c.required_checkpoints()
    c.init.from_scratch = "llm,adapter"
    with pytest.raises(trainer.ConfigError, match=r"init.from_scratch='llm,adapter': 'adapter' is not a component"):
        c.validate()
    raw = tmp_path / "xla_cache" / "llava.json"  # (inside the folder the last assertion expects)
    raw.write_text("[]")
    scratch = ["--config=stage2_skip", "--config.demo.enabled=false", "--config.init.from_scratch=llm,vision,projector"]
    no_data = run(*scratch, f"--config.data.sources=vqa={tmp_path / 'nowhere'}")
    assert no_data.returncode != 0 and no_data.stderr.strip().splitlines()[-1] == (
        f"config error: data.sources: vqa={tmp_path / 'nowhere'}: {tmp_path / 'nowhere'}: no such dataset directory "
        f"(a dataset is what python -m data_pipelines.convert --format=llava --json FILE --out DIR writes)")
    raw_json = run(*scratch, f"--config.data.sources=vqa={raw}")
    assert raw_json.returncode != 0 and raw_json.stderr.strip().splitlines()[-1] == (
        f"config error: data.sources: vqa={raw}: {raw} is a file, not a converted dataset: convert it first "
        f"(python -m data_pipelines.convert --format=llava --json {raw} --out DIR) and give DIR")
    raw.unlink()
    assert sorted(os.listdir(tmp_path)) == ["xla_cache"] and not os.listdir(compile_cache)  # nothing started
    bad_type = run("--config=stage2_skip", "--config.train.steps=many")
    assert bad_type.returncode != 0 and "train.steps" in bad_type.stderr
    bad_recipe = run("--config=stage9")
    assert bad_recipe.returncode != 0 and "no such recipe" in bad_recipe.stderr
    bad_scale = run("--config=stage2_skip:huge")
    assert bad_scale.returncode != 0 and "huge" in bad_scale.stderr
    bad_value = run("--config=stage2_skip", "--config.checkpoint.keep=0")
    assert bad_value.returncode != 0 and "checkpoint.keep=0: must be >= 1" in bad_value.stderr
    renamed = run("--config=stage2_skip", "--config.data.max_patches=2")
    assert renamed.returncode != 0 and "--config.data.max_patches was renamed --config.data.max_tiles" in renamed.stderr
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


@pytest.mark.slow
def test_stage2_starts_from_the_stage1_projector(tmp_path):
    from experiments.configs import load
    c1 = load("stage1")
    c1.model.llm, c1.model.vit, c1.train.steps, c1.data.seq_len = "tiny-qwen2", "tiny-siglip", 2, 96
    c1.data.max_tiles_per_row, c1.data.demo_examples, c1.mesh.data = 4, 200, 1
    c1.init.from_scratch = "llm,vision"
    first = trainer.train(with_demo_data(c1), str(tmp_path / "stage1"))
    trained = models.flatten(first["state"]["trainable"])
    assert {n.split("/")[0] for n in trained} == {"projector"}  # stage 1 trains the projector only
    c2 = tiny_config(**{"init.stage1_workdir": str(tmp_path / "stage1")})
    setup = trainer.resolve(c2, str(tmp_path / "stage2"))
    params = models.flatten(workdir_lib.init_params(c2, setup.mcfg, setup.mesh))
    for name, value in trained.items():
        np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(value), err_msg=name)


def test_a_component_the_stage_did_not_train_is_refused_not_left_unread(reference):
    """Orbax's partial restore returns a placeholder (ShapeDtypeStruct) for a leaf the checkpoint
    lacks; reading a component the run never trained (stage 2 trains no LLM base) must be an
    error naming it, not an array-shaped hole in the model."""
    with pytest.raises(trainer.ConfigError, match=r"\(stage stage2\) has no trained llm of these shapes: "
                                                  r"checkpoint step 6 holds no trainable/llm/"):
        workdir_lib.restore_trained_part(reference["workdir"], "llm", reference["frozen"]["llm"])


@pytest.mark.slow
def test_a_non_finite_step_is_skipped(tmp_path):
    c = tiny_config()
    setup = trainer.resolve(c, str(tmp_path))
    trainable, frozen = structure.partition(workdir_lib.init_params(c, setup.mcfg, setup.mesh), "stage2")
    tx = trainer.build_optimizer(c, setup.mcfg, trainable)
    state = {"trainable": trainable, "opt_state": tx.init(trainable), "step": jax.numpy.zeros((), "int32"),
             "bad_steps": jax.numpy.zeros((), "int32")}
    from data_pipelines.pipeline import build_pipeline
    batch = next(iter(build_pipeline(setup.pipeline, process_index=0, process_count=1)))
    step = jax.jit(trainer.make_train_step(setup.mcfg, tx, 4, 1))
    # Normalised float tiles (the step also takes them, e.g. a user's own preprocessing) in every
    # call, so the step compiles once; NaN pixels are then a batch of the same dtype.
    batch = {k: batch[k] for k in trainer.BATCH_KEYS}
    batch["images"] = images_lib.normalize(batch["images"])
    good, m = step(state, frozen, batch)
    assert bool(m["ok"]) and int(good["bad_steps"]) == 0
    poisoned = dict(batch, images=np.full(batch["images"].shape, np.nan, np.float32))
    after, m = step(good, frozen, poisoned)
    assert not bool(m["ok"]) and int(after["bad_steps"]) == 1 and int(after["step"]) == 2
    for a, b in zip(jax.tree.leaves(after["trainable"]), jax.tree.leaves(good["trainable"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the update was skipped
    # A damaged Adam moment (a negative second moment: its square root is NaN) with a finite loss
    # and gradient: the update would write NaN weights; the step is refused and nothing moves.
    adam = good["opt_state"][1]
    nu = dict(adam.nu, projector=jax.tree.map(lambda x: jax.numpy.full_like(x, -1.0), adam.nu["projector"]))
    damaged = dict(good, opt_state=(good["opt_state"][0], adam._replace(nu=nu), *good["opt_state"][2:]))
    after, m = step(damaged, frozen, batch)
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert not bool(m["ok"]) and int(after["bad_steps"]) == 1
    for a, b in zip(jax.tree.leaves((after["trainable"], after["opt_state"])),
                    jax.tree.leaves((damaged["trainable"], damaged["opt_state"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A batch with no trained token: loss 0 and finite, yet nothing may move (weight decay and
    # Adam's moments would), and it is not a bad step.
    empty = dict(batch, loss_mask=np.zeros_like(batch["loss_mask"]))
    same, m = step(good, frozen, empty)
    assert not bool(m["ok"]) and int(m["trained_tokens"]) == 0 and int(same["bad_steps"]) == 0
    for a, b in zip(jax.tree.leaves((same["trainable"], same["opt_state"])),
                    jax.tree.leaves((good["trainable"], good["opt_state"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_non_finite_steps_write_no_checkpoint_and_a_nan_init_weight_is_named(tmp_path):
    """A diverging run (lr = 1e30, after the warm-up's first steps: huge but finite weights at
    step 2, a non-finite loss from step 3): with a checkpoint every step and keep=1, the
    checkpoint of step 2 (the last step the guard accepted) survives the bad steps (none is written for them), and the
    stop message names it. lr = NaN: no step is finite (the update is NaN), nothing is saved
    and the message says so. A NaN in an init checkpoint is an error naming the tensor."""
    c = tiny_config(**{"train.steps": 6, "optim.lr": 1e30, "train.max_bad_steps": 3,
                       "checkpoint.every_steps": 1, "checkpoint.keep": 1})
    with pytest.raises(FloatingPointError, match=r"^3 non-finite steps in a row at step 5; stopping. The last good "
                                                 r"checkpoint is step 2 in "):
        trainer.train(c, str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
    c = tiny_config(**{"train.steps": 6, "optim.lr": float("nan"), "train.max_bad_steps": 2})
    with pytest.raises(FloatingPointError, match=r"^2 non-finite steps in a row at step 2; stopping. No checkpoint"):
        trainer.train(c, str(tmp_path / "nan_run"))
    assert not os.listdir(tmp_path / "nan_run" / "checkpoints")
    from genieblue_jax import checkpoint
    mcfg = trainer.resolve(tiny_config(), str(tmp_path / "x")).mcfg
    llm = models.init_params(mcfg.llm, jax.random.key(0))
    llm["layers_1"]["mlp"]["up_proj"]["kernel"] = llm["layers_1"]["mlp"]["up_proj"]["kernel"].at[0, 0].set(np.nan)
    checkpoint.save(str(tmp_path / "nan_llm"), {"llm": mcfg.llm}, {"llm": llm})
    with pytest.raises(trainer.ConfigError, match=r"nan_llm: tensor llm/layers_1/mlp/up_proj/kernel contains NaN"):
        trainer.train(tiny_config(**{"init.llm_checkpoint": str(tmp_path / "nan_llm")}), str(tmp_path / "run2"))


@pytest.mark.slow
def test_a_source_whose_every_sample_is_rejected_stops_the_run_by_name(tmp_path):
    """Rows of 24 tokens hold no image sample (short text ones still fit): the image sources'
    samples are all rejected, and after data.max_rejects_in_a_row of one source in a row the run
    stops naming it and the reasons (a dataset that is all rejected used to loop forever, writing
    a warning per sample)."""
    from data_pipelines.pipeline import RejectionStreakError
    c = tiny_config(**{"data.seq_len": 24, "data.max_rejects_in_a_row": 40, "train.steps": 1000})
    with pytest.raises(RejectionStreakError, match=r"data source '(vqa|caption|ocr)': 40 samples in a row rejected "
                                                   r"\(data.max_rejects_in_a_row\), by reason \{'no trained token "
                                                   r"within seq_len=24': 40\}"):
        trainer.train(c, str(tmp_path / "run"))


@pytest.mark.slow
def test_a_second_sigterm_stops_at_once(tmp_path):
    """The first SIGTERM asks for a checkpoint after the current step; a second one before that
    (a step or a data read that does not end) stops train() at once, and the process's own
    SIGTERM handler is back."""
    before = signal.getsignal(signal.SIGTERM)

    def two_sigterms(step, row):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt, match="a second SIGTERM"):
        trainer.train(tiny_config(), str(tmp_path / "run"), step_hooks=[two_sigterms])
    assert signal.getsignal(signal.SIGTERM) is before
    assert not os.path.isdir(tmp_path / "run" / "checkpoints" / "1")


@pytest.mark.slow
def test_a_second_trainer_on_a_running_workdir_is_refused(tmp_path):
    """While one trainer runs (here: inside its first step hook), another train() on the same
    workdir is a WorkdirInUseError naming the holder's pid; the lock is released when the run ends,
    and a process killed while holding it (SIGKILL) leaves no stale lock."""
    run = str(tmp_path / "run")
    errors = []

    def second_trainer(step, row):
        if step == 1:
            try:
                trainer.train(tiny_config(), run)
            except trainer.WorkdirInUseError as e:
                errors.append(str(e))

    trainer.train(tiny_config(**{"train.steps": 1}), run, step_hooks=[second_trainer])
    assert len(errors) == 1 and f"is in use by another trainer (pid {os.getpid()} on " in errors[0]
    with trainer.WorkdirLock(run):  # released after the run
        pass
    import subprocess
    import sys
    holder = subprocess.Popen([sys.executable, "-c", "import time; from genieblue_jax.train import trainer; "
                               f"trainer.WorkdirLock({run!r}).__enter__(); print('locked', flush=True); "
                               "time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(trainer.WorkdirInUseError, match=f"in use by another trainer \\(pid {holder.pid} on "):
        trainer.WorkdirLock(run).__enter__()
    holder.kill()
    holder.wait()
    with trainer.WorkdirLock(run):  # the killed holder left no stale lock
        pass
