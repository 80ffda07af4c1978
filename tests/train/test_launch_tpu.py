"""tools/launch_tpu.sh composes one gcloud command that runs the recipe on every worker.

The dry run prints that command shell-quoted; the test parses it as the shell would (shlex),
checks gcloud's exact argv, then parses the --command value as the worker's shell would and
checks the exact sequence of commands run there.
"""
import os
import shlex
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The set-up step each worker runs before training: the TPU extra (jax[tpu], libtpu) at the
# locked versions.
INSTALL = ["pip", "install", "-q", "-c", "requirements/lock-cpu.txt", "-e", ".[tpu]"]
LOG = ["tee", "-a", "~/genieblue_jax_logs/$(hostname).log"]  # each worker keeps its own log

# Training flags as a user gives them, one with a space, a colon and a comma: each must reach
# experiments.run as one argument, unchanged, through both levels of quoting (local shell,
# then the worker's shell running --command).
TRAIN_FLAGS = ["--config=stage2_skip:paper", "--workdir=/mnt/run",
               "--config.data.sources=vqa=/mnt/my data:2,text=gs://b/t"]


def dry_run(*args, env=None):
    run = subprocess.run(["bash", "tools/launch_tpu.sh", *args], cwd=REPO, capture_output=True, text=True,
                         env=None if env is None else {**os.environ, **env})
    assert run.returncode == 0, run.stderr
    return shlex.split(run.stdout)


def remote_commands(command: str) -> list[list[str]]:
    """The --command value as the worker's shell runs it: argv lists between `;`, `&&` and `|`
    (each separator kept as its own list)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";|")
    lexer.whitespace_split = True
    commands = [[]]
    for w in lexer:
        if w in (";", "&&", "|"):
            commands += [[w], []]
        else:
            commands[-1].append(w)
    return commands


def test_dry_run_prints_the_exact_gcloud_command():
    argv = dry_run("pod-1", "us-east5-a", "--project", "p1", "--dry_run", "--", *TRAIN_FLAGS)
    *gcloud, command = argv
    assert gcloud == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1", "--zone=us-east5-a", "--project=p1",
                      "--worker=all"]
    assert command.startswith("--command=")
    assert remote_commands(command.removeprefix("--command=")) == [
        ["set", "-o", "pipefail"], [";"],
        ["cd", "~/genieblue_jax"], ["&&"],
        ["mkdir", "-p", "~/genieblue_jax_logs"], ["&&"],
        INSTALL, ["&&"],
        ["python", "-m", "experiments.run", "--distributed", *TRAIN_FLAGS, "2>&1"], ["|"],
        LOG,
    ]


def test_no_project_and_another_repo_dir():
    argv = dry_run("pod-2", "europe-west4-b", "--dry_run", "--", "--config=stage1", env={"REPO_DIR": "/opt/genieblue"})
    assert argv[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-2", "--zone=europe-west4-b",
                         "--worker=all"]
    assert remote_commands(argv[-1].removeprefix("--command=")) == [
        ["set", "-o", "pipefail"], [";"], ["cd", "/opt/genieblue"], ["&&"], ["mkdir", "-p", "~/genieblue_jax_logs"],
        ["&&"], INSTALL, ["&&"], ["python", "-m", "experiments.run", "--distributed", "--config=stage1", "2>&1"],
        ["|"], LOG]


def test_missing_training_flags_is_an_error():
    run = subprocess.run(["bash", "tools/launch_tpu.sh", "pod-1", "zone", "--dry_run"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "no training flags after --" in run.stderr


def test_data_buckets_are_mounted_read_only_on_every_worker_before_training():
    """ArrayRecord shards are read by file path: each --data_bucket is mounted with gcsfuse
    (read-only, metadata cached, as Grain's and MaxText's setup_gcsfuse.sh do) before the
    install and the run, only if not mounted yet (a re-launch on the same workers)."""
    argv = dry_run("pod-1", "zone", "--data_bucket", "gs://my-data", "--data_bucket", "more", "--dry_run", "--",
                   "--config=stage2_skip:paper", "--config.data.sources=vqa=/tmp/gcsfuse/my-data/vqa:1",
                   env={"REPO_DIR": "/opt/g"})
    mount = []
    for bucket in ("my-data", "more"):
        mount += [["mkdir", "-p", f"/tmp/gcsfuse/{bucket}"], ["&&"],
                  ["{", "mountpoint", "-q", f"/tmp/gcsfuse/{bucket}", "||", "gcsfuse", "-o", "ro", "--implicit-dirs",
                   "--type-cache-max-size-mb=-1", "--stat-cache-max-size-mb=-1", "--kernel-list-cache-ttl-secs=-1",
                   "--metadata-cache-ttl-secs=-1", bucket, f"/tmp/gcsfuse/{bucket}"], [";"], ["}"], ["&&"]]
    assert remote_commands(argv[-1].removeprefix("--command=")) == [
        ["set", "-o", "pipefail"], [";"], *mount, ["cd", "/opt/g"], ["&&"], ["mkdir", "-p", "~/genieblue_jax_logs"],
        ["&&"], INSTALL, ["&&"], ["python", "-m", "experiments.run", "--distributed", "--config=stage2_skip:paper",
                                  "--config.data.sources=vqa=/tmp/gcsfuse/my-data/vqa:1", "2>&1"], ["|"], LOG]
    # Another mount root.
    argv = dry_run("pod-1", "zone", "--data_bucket", "b", "--dry_run", "--", "--config=stage1",
                   env={"DATA_MOUNT": "/mnt/gcs"})
    assert remote_commands(argv[-1].removeprefix("--command="))[2] == ["mkdir", "-p", "/mnt/gcs/b"]
