"""Runs a pipeline in a fresh process (for resume and multi-host tests).

    python -m tests.data_pipelines.pipeline_worker CONFIG.json ACTION OUT.json [ARGS...]

ACTION: "take K M"    take K batches, save the state, then fingerprint M more batches
        "resume M"    restore the state from CONFIG's "state" and fingerprint M batches
        "ids I N"     ids of one epoch of the first source, as process I of N
"""
import hashlib
import json
import multiprocessing
import os
import sys

import numpy as np

from data_pipelines.pipeline import PipelineConfig, SourceSpec, build_pipeline, source_dataset


def fingerprint(batch) -> str:
    h = hashlib.sha256()
    for k in sorted(batch):
        h.update(k.encode())
        h.update(np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()


def load_config(d: dict) -> PipelineConfig:
    d = dict(d)
    d["sources"] = tuple(SourceSpec(**s) for s in d["sources"])
    return PipelineConfig(**d)


def main(config_path, action, out_path, *args):
    with open(config_path) as f:
        spec = json.load(f)
    cfg = load_config(spec["config"])
    out = {}
    if action == "ids":
        index, count = int(args[0]), int(args[1])
        ds = source_dataset(cfg.sources[0], cfg.seed, 1, index, count)
        out["ids"] = [ex.id for ex in ds]
    else:
        it = iter(build_pipeline(cfg, process_index=0, process_count=1))
        if action == "take":
            k, m = int(args[0]), int(args[1])
            for _ in range(k):
                next(it)
            out["state"] = it.get_state()
            out["next"] = [fingerprint(next(it)) for _ in range(m)]
        elif action == "resume":
            it.set_state(spec["state"])
            out["next"] = [fingerprint(next(it)) for _ in range(int(args[0]))]
    with open(out_path, "w") as f:
        json.dump(out, f)
    # Grain's multiprocess iterator waits up to 25 s for its prefetch process when it is
    # closed (here: garbage-collected); the result is written, so stop the children and
    # leave at once.
    for child in multiprocessing.active_children():
        child.kill()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    from absl import flags
    flags.FLAGS.mark_as_parsed()  # outside absl.app: Grain's workers read their flags' defaults
    main(*sys.argv[1:])
