"""W4A16 / W8A16 quantization of the exported graphs with AIMET (`aimet-onnx`), on the CPU.

Precisions (paper Sec. 4.2 on Qualcomm QNN; `planned_precision`):

    LLM weights: base blocks, replicated blocks, CogVLM visual experts,  int4, per output channel
      the LM head                                                       (symmetric)
    the token-embedding table                                          int4, one scale for the table
                                                                        (a Gather's data is an
                                                                        activation to AIMET / QNN:
                                                                        no per-channel scales)
    LoRA A / B, vision tower and projector weights (MatMul, Conv)       int8, per output channel
    activations, graph inputs / outputs (KV cache, both masks, image
      features), norm scales (every RMSNorm: Qwen3 / Gemma 3 q / k
      norms, Gemma 3's four per block), position embeddings, RoPE
      tables (both of Gemma 3)                                          int16
    biases                                                              not simulated; QNN
                                                                        quantizes them to int32

Calibration runs every graph's quantization simulation (`QuantizationSimModel`, config
"htp_v79": the Hexagon NPU of Snapdragon 8 Elite) at once over the calibration requests
(`evaluate.run_requests`); the export is AIMET's own (`sim.export`): per graph NAME
`OUT/qnn/NAME.onnx` + `NAME.encodings`, the pair `qnn-onnx-converter` takes as
`--input_network NAME.onnx --quantization_overrides NAME.encodings`.

aimet-onnx is an optional extra with its own install step (`INSTALL`): its wheel requires
`onnx2torch`, whose requirements replace the CPU torch wheel with a CUDA one, so it must
be installed with --no-deps and its few import-time requirements named explicitly.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from typing import Callable

from genieblue_jax import structure
from genieblue_jax.export.qnn import evaluate
from genieblue_jax.export.qnn.onnx_export import EXPORT_LOGGERS, quiet, sessions

AIMET_VERSION = "2.42.0"
# Verified in a fresh venv (Python 3.11, torch 2.13.0+cpu, numpy 2.4.6): the first line adds no torch
# and no CUDA, the second adds aimet-onnx alone; aimet then imports, simulates and exports on the CPU.
# bokeh, scikit-learn, jsonschema, psutil, tqdm are what `import aimet_onnx` needs (PyYAML, scipy and
# Jinja2 come with them or with torch); its other requirements (onnx2torch, hvplot, osqp, pandas,
# pybind11) serve features the export never uses, and pip's resolver lists them as missing: harmless.
INSTALL = ("pip install onnx==1.23.2 onnxruntime==1.32.0 onnxscript==0.7.2 onnx-ir==1.1.0 bokeh==3.9.2 "
           "scikit-learn==1.9.1 jsonschema==4.26.0 psutil==7.2.2 tqdm==4.70.1\n"
           f"pip install --no-deps aimet-onnx=={AIMET_VERSION}")
CONFIG = "htp_v79"   # Snapdragon 8 Elite (Hexagon V79), SPEC's deployment target


def aimet_available() -> bool:
    """True when AIMET (`aimet_onnx`) can be imported."""
    try:
        import aimet_onnx  # noqa: F401
    except ImportError:
        return False
    return True


def require_aimet():
    """Imports aimet_onnx or raises an ImportError that says how to install it."""
    try:
        import aimet_onnx
        from aimet_onnx.quantsim import QuantizationSimModel  # noqa: F401
    except ImportError as e:
        raise ImportError(f"aimet-onnx is not installed ({e}); the encodings need it. Install it on the CPU "
                          f"with exactly:\n{INSTALL}\n(never plain `pip install aimet-onnx`: its onnx2torch "
                          "requirement replaces the CPU torch wheel with a CUDA one)") from None
    return aimet_onnx


def planned_precision(name: str, role: str, embedding: str = "int4") -> str:
    """The quantized type of canonical tensor `name` with `role` (`onnx_export.tensor_role`).

        >>> planned_precision("llm.layers_1.mlp.up_proj.kernel", "matmul")
        'int4'
        >>> planned_precision("branch.layers_1.mlp.up_proj.lora_a", "lora")
        'int8'
        >>> planned_precision("projector.linear_1.kernel", "matmul"), planned_precision("llm.norm.scale", "norm")
        ('int8', 'int16')
        >>> planned_precision("branch.layers_3.self_attn.k_norm.scale", "norm")   # by role, never by name
        'int16'
    """
    component = name.split(".", 1)[0]
    if role == "embedding":
        return embedding
    if role == "matmul":
        return "int4" if component in structure.LLM_COMPONENTS else "int8"
    if role in ("lora", "conv"):
        return "int8"
    if role == "bias":
        return "int32"
    return "int16"


def planned_bits(name: str, role: str, embedding: str = "int4") -> int:
    """The bit width of `planned_precision` (e.g. 4 for "int4")."""
    return int(planned_precision(name, role, embedding)[3:])


def make_sims(onnx_dir: str, manifest: dict, workdir: str, *, embedding: str = "int4",
              log: Callable[[str], None] = print) -> dict:
    """{graph: QuantizationSimModel} with the planned precision on every weight tensor
    (int16 for every other parameter and activation)."""
    require_aimet()
    import onnx
    from aimet_onnx.quantsim import QuantizationSimModel
    sims = {}
    for graph, entry in manifest["graphs"].items():
        t0 = time.perf_counter()
        model = onnx.load(os.path.join(onnx_dir, entry["file"]))
        path = os.path.join(workdir, graph)
        os.makedirs(path, exist_ok=True)
        sim = QuantizationSimModel(model, param_type="int16", activation_type="int16", config_file=CONFIG,
                                   path=path)
        set_precisions(sim, manifest, embedding=embedding)
        sims[graph] = sim
        log(f"  {graph}: quantization sim, {len(sim.qc_quantize_op_dict)} quantizers, "
            f"{time.perf_counter() - t0:.1f} s")
    return sims


def set_precisions(sim, manifest: dict, *, embedding: str = "int4") -> dict[str, str]:
    """Applies `planned_precision` to every quantizer of a weight tensor; returns
    {tensor: precision} of the ones set. A weight tensor the sim does not quantize at all
    (other than a bias) is an error: it would silently stay float."""
    tensors = manifest["tensors"]
    quantizers = sim.qc_quantize_op_dict
    applied = {}
    for name, q in quantizers.items():
        if name in tensors:
            precision = planned_precision(name, tensors[name]["role"], embedding)
            if precision == "int32":
                continue  # biases: QNN's own int32
            q.set_precision(precision)
            applied[name] = precision
    initializers = {i.name for i in sim.model.model.graph.initializer}
    missing = sorted(n for n in initializers & set(tensors) if n not in quantizers and tensors[n]["role"] != "bias")
    if missing:
        raise RuntimeError(f"AIMET put no quantizer on {missing[:5]} ({len(missing)} weight tensors)")
    return applied


class SimSession:
    """A sim's onnxruntime session under the graph's own output names (AIMET renames each
    quantized graph output NAME to NAME_updated inside the sim; its export restores them)."""

    def __init__(self, sim):
        self.session = sim.session
        have = {o.name for o in self.session.get_outputs()}
        self._names = {}
        for o in sim.model.model.graph.output:
            original = o.name[: -len("_updated")] if o.name.endswith("_updated") else o.name
            self._names[original] = o.name if o.name in have else original

    def run(self, output_names, feeds):
        """onnxruntime's `run`, with the graph's own output names."""
        names = None if output_names is None else [self._names.get(n, n) for n in output_names]
        return self.session.run(names, feeds)


def quantize(onnx_dir: str, manifest: dict, data, out_dir: str, *, embedding: str = "int4",
             log: Callable[[str], None] = print, float_run: dict | None = None) -> dict:
    """Calibrates every graph on `data` (a `calibration.CalibrationData`), writes
    `out_dir/NAME.onnx` + `NAME.encodings`, and compares the simulated-quantized run with
    the float one. Returns {"graphs": {NAME: files and quantizer counts}, "error": ...,
    "seconds": ...}."""
    require_aimet()
    os.makedirs(out_dir, exist_ok=True)
    timings = {}
    work = tempfile.mkdtemp(prefix="aimet_", dir=out_dir)
    with quiet(*aimet_loggers(), *EXPORT_LOGGERS):
        return _quantize(onnx_dir, manifest, data, out_dir, work, timings, embedding, log, float_run)


def aimet_loggers() -> list[str]:
    """AIMET's logger names (its "areas": Quant, Utils, ...)."""
    from aimet_onnx.common.utils import AimetLogger
    return [a.value for a in AimetLogger.LogAreas]


def _quantize(onnx_dir, manifest, data, out_dir, work, timings, embedding, log, float_run):
    from aimet_onnx.quantsim import compute_encodings

    try:
        t0 = time.perf_counter()
        sims = make_sims(onnx_dir, manifest, work, embedding=embedding, log=log)
        timings["sims"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sim_sessions = {g: SimSession(s) for g, s in sims.items()}
        with contextlib.ExitStack() as stack:
            for sim in sims.values():
                stack.enter_context(compute_encodings(sim))
            evaluate.run_requests(manifest, sim_sessions, data)
        timings["calibration"] = time.perf_counter() - t0
        log(f"  calibrated on {data.description} in {timings['calibration']:.1f} s")
        t0 = time.perf_counter()
        graphs = {}
        for graph, sim in sims.items():
            sim.export(out_dir, graph)
            graphs[graph] = summarize_encodings(os.path.join(out_dir, f"{graph}.encodings"))
            graphs[graph]["onnx"] = f"{graph}.onnx"
        timings["export"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if float_run is None:
            float_run = evaluate.run_requests(manifest, sessions(onnx_dir, manifest), data)
        quant_run = evaluate.run_requests(manifest, sim_sessions, data)
        timings["evaluation"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"graphs": graphs, "error": evaluate.compare_runs(float_run, quant_run),
            "seconds": {k: round(v, 2) for k, v in timings.items()}, "config": CONFIG,
            "aimet_onnx": _aimet_version()}


def _aimet_version() -> str:
    try:
        from importlib.metadata import version
        return version("aimet-onnx")
    except Exception:  # noqa: BLE001 - metadata missing: report it as unknown, never fail the export
        return "unknown"


def read_encodings(path: str) -> dict[str, dict[str, dict]]:
    """{"param": {tensor: entry}, "activation": {tensor: entry}} of an AIMET encodings file
    (format 1.0.0: lists of entries with "name", "bw", "enc_type", ...; 0.6.1: dicts of
    lists, read as their first entry)."""
    with open(path) as f:
        raw = json.load(f)
    out = {}
    for kind in ("param", "activation"):
        entries = raw.get(f"{kind}_encodings", {})
        if isinstance(entries, list):
            out[kind] = {e["name"]: e for e in entries}
        else:
            out[kind] = {n: (e[0] if isinstance(e, list) else e) for n, e in entries.items()}
    return out


def summarize_encodings(path: str) -> dict:
    """Counts of an AIMET encodings file's entries per kind and bit width."""
    enc = read_encodings(path)
    counts: dict[str, int] = {}
    for kind, entries in enc.items():
        for e in entries.values():
            key = f"{kind}:int{e.get('bw', e.get('bitwidth'))}"
            counts[key] = counts.get(key, 0) + 1
    return {"encodings": os.path.basename(path), "counts": dict(sorted(counts.items()))}


def tensor_bits(encodings: dict[str, dict[str, dict]], name: str) -> int | None:
    """Bitwidth the encodings give tensor `name` (as parameter or, for an embedding
    table that a Gather reads, as activation), or None."""
    for kind in ("param", "activation"):
        e = encodings.get(kind, {}).get(name)
        if e is not None:
            return int(e.get("bw", e.get("bitwidth")))
    return None
