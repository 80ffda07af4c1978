"""tools/launch_tpu.sh composes one gcloud command that runs the recipe on every worker."""
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_dry_run_prints_the_gcloud_command():
    run = subprocess.run(["bash", "tools/launch_tpu.sh", "pod-1", "us-east5-a", "--project", "p1", "--dry_run", "--",
                          "--config=stage2_skip:paper", "--workdir=/mnt/run"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for part in ("gcloud compute tpus tpu-vm ssh pod-1", "--zone=us-east5-a", "--project=p1", "--worker=all",
                 r"python\ -m\ experiments.run\ --distributed\ --config=stage2_skip:paper\ --workdir=/mnt/run"):
        assert part in out, (part, out)


def test_missing_training_flags_is_an_error():
    run = subprocess.run(["bash", "tools/launch_tpu.sh", "pod-1", "zone", "--dry_run"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode != 0 and "no training flags" in run.stderr
