"""The export report: sizes per component and per deployment, float and quantized; float
ONNX vs our JAX model; simulated-quantized vs float. Written as OUT/report.json and
OUT/report.md.

Sizes. "float" is what the ONNX weight files hold (float32, every tensor once). "quantized"
is what the phone stores at the encodings' bitwidths (or, without aimet-onnx, the planned
ones, `quantize.planned_precision`): per tensor ceil(elements * bits / 8) bytes plus one
float32 scale per quantization channel (symmetric weights: no offsets); biases at int32
(QNN's bias format); a tensor no encoding covers counts as float32.

Deployments (paper Table 9 compares the last two at paper scale: 1.77 vs 1.92 GB):

    text only        the base LLM: every `llm.*` tensor (a text request runs nothing else)
    base MLLM        + vision tower and projector (a BlueLM-V-style MLLM on the same base)
    GenieBlue        + the branch: replicated blocks (or CogVLM experts) and LoRA

The base and multimodal decoders share every `llm.*` tensor by name: on the phone one copy
serves both (QNN weight sharing between the graphs of one context binary), which is how
the deployment rows count them. With tied embeddings the LM head is a second (transposed)
copy of the embedding table (`llm.lm_head.kernel`), counted, and shown on its own line.
"""
from __future__ import annotations

import json
import math
import os

from genieblue_jax.export.qnn import quantize
from genieblue_jax.export.qnn.graphs import ModelGraphs
from genieblue_jax.export.qnn.onnx_export import tensor_role
from genieblue_jax.structure import MLLMConfig, abstract_mllm
from genieblue_jax.structure.report import storage_summary

DEPLOYMENTS = (("text only (base LLM)", ("llm",)),
               ("base MLLM (+ ViT + projector)", ("llm", "vision", "projector")),
               ("GenieBlue (+ replicated blocks + LoRA)", ("llm", "vision", "projector", "branch")))
PAPER_TABLE9_GB = {"base MLLM (+ ViT + projector)": 1.77, "GenieBlue (+ replicated blocks + LoRA)": 1.92}


def _channels(shape, role: str) -> int:
    if role in ("matmul", "lora"):
        return int(shape[-1])
    if role == "conv":
        return int(shape[0])
    return 1


def tensor_sizes(tensors: dict, bits_of) -> dict[str, dict]:
    """{name: {"elements", "float_bytes", "bits", "quantized_bytes", "component", "role"}} for
    `tensors` ({name: {"shape", "role", "component"}}); `bits_of(name, role)` gives a
    tensor's bitwidth and channel count (or None: float32).

        >>> t = {"llm.x.kernel": {"shape": [64, 32], "role": "matmul", "component": "llm"}}
        >>> tensor_sizes(t, lambda n, r: (4, 32))["llm.x.kernel"]["quantized_bytes"]   # 64*32/2 + 32 scales * 4
        1152
    """
    out = {}
    for name, t in tensors.items():
        n = math.prod(t["shape"])
        bits, channels = bits_of(name, t["role"]) or (32, 0)
        q = math.ceil(n * bits / 8) + (4 * channels if bits < 32 else 0)
        out[name] = {"elements": n, "float_bytes": 4 * n, "bits": bits, "quantized_bytes": q,
                     "component": t["component"], "role": t["role"]}
    return out


def _planned(tensors: dict, embedding: str):
    def bits_of(name, role):
        bits = quantize.planned_bits(name, role, embedding)
        return bits, (_channels(tensors[name]["shape"], role) if bits < 32 and role != "embedding" else 1)
    return bits_of


def _from_encodings(tensors: dict, encodings: list[dict]):
    def bits_of(name, role):
        for enc in encodings:
            for kind in ("param", "activation"):
                e = enc.get(kind, {}).get(name)
                if e is not None:
                    return int(e.get("bw", e.get("bitwidth"))), len(e.get("scale", [0]))
        return (32, 0) if role == "bias" else None
    return bits_of


def summarize_sizes(sizes: dict[str, dict]) -> dict:
    """Per component and per deployment: elements, float bytes, quantized bytes, bytes per bitwidth."""
    components: dict[str, dict] = {}
    for s in sizes.values():
        c = components.setdefault(s["component"], {"elements": 0, "float_bytes": 0, "quantized_bytes": 0,
                                                   "elements_by_bits": {}})
        c["elements"] += s["elements"]
        c["float_bytes"] += s["float_bytes"]
        c["quantized_bytes"] += s["quantized_bytes"]
        key = f"int{s['bits']}" if s["bits"] < 32 else "32-bit"
        c["elements_by_bits"][key] = c["elements_by_bits"].get(key, 0) + s["elements"]
    deployments = {}
    for label, parts in DEPLOYMENTS:
        deployments[label] = {k: sum(components.get(p, {}).get(k, 0) for p in parts)
                              for k in ("elements", "float_bytes", "quantized_bytes")}
    head = sizes.get("llm.lm_head.kernel")
    return {"components": components, "deployments": deployments,
            "lm_head_bytes": (None if head is None
                              else {"float": head["float_bytes"], "quantized": head["quantized_bytes"]}),
            "unquantized": sorted(n for n, s in sizes.items() if s["bits"] == 32 and s["role"] != "bias")}


def io_bytes(entry: dict) -> dict[str, int]:
    """Bytes one call of a graph reads and writes (its manifest `entry`'s inputs / outputs at
    4 bytes per element: float32 and int32), e.g. a prefill call's logits, AR x vocab x 4.

        >>> io_bytes({"inputs": [{"shape": [1, 16], "dtype": "int32"}],
        ...           "outputs": [{"shape": [1, 16, 262144], "dtype": "float32"}]})
        {'inputs': 64, 'outputs': 16777216}
    """
    return {side: sum(4 * math.prod(v["shape"]) for v in entry[side]) for side in ("inputs", "outputs")}


def kv_cache_bytes(spec: dict) -> int:
    """Bytes of the host's float32 KV cache of one decoder (`runtime.Decoder`: keys and values
    of every layer, all `context` slots, sliding-window layers included)."""
    return 2 * 4 * spec["num_layers"] * spec["num_kv_heads"] * spec["head_dim"] * spec["context"]


PAPER_CONTEXT = 2048


def planned_sizes(mcfg: MLLMConfig, context: int, embedding: str = "int4") -> dict:
    """`summarize_sizes` of any MLLM config's exported tensors at the planned precisions, from
    shapes alone (the graphs are built on torch's meta device over `abstract_mllm`; nothing is
    allocated), e.g. a Gemma 3 1B deployment's 262k-row embedding and head copy.

        >>> mcfg = MLLMConfig.from_presets("gemma-3-1b", "siglip-so400m-384")
        >>> planned_sizes(mcfg, 2048)["lm_head_bytes"]   # int4, one float32 scale per vocabulary row
        {'float': 1207959552, 'quantized': 152043520}
    """
    graphs = ModelGraphs(mcfg, abstract_mllm(mcfg), context=context, meta=True)
    tensors = {n: {"shape": list(t.shape), "role": tensor_role(n, t.shape), "component": n.split(".", 1)[0]}
               for n, t in graphs.store.tensors.items()}
    return summarize_sizes(tensor_sizes(tensors, _planned(tensors, embedding)))


def paper_scale_estimate(context: int = PAPER_CONTEXT, embedding: str = "int4") -> dict:
    """The same accounting for Qwen2.5-3B + SigLIP-so400m GenieBlue-Skip (`planned_sizes`)."""
    summary = planned_sizes(MLLMConfig.from_presets("qwen2.5-3b", "siglip-so400m-384"), context, embedding)
    return {"model": "qwen2.5-3b + siglip-so400m-384, genieblue-skip (interval 4, LoRA rank 8)",
            "context": context, "deployments": summary["deployments"], "lm_head_bytes": summary["lm_head_bytes"],
            "structure_report_storage_bytes": storage_summary()}


def build_report(*, model_desc: dict, manifest: dict, onnx_dir: str, export_seconds: float,
                 parity: dict | None, quant: dict | None, quant_status: str, calibration: str | None,
                 embedding: str, qnn_dir: str | None = None) -> dict:
    """The export's report.json content: model, settings, sizes per component and deployment
    (float and planned quantized bytes, and the paper-scale figures), parity and quantization."""
    tensors = {n: {"shape": t["shape"], "role": t["role"], "component": t["component"]}
               for n, t in manifest["tensors"].items()}
    if quant is not None:
        encodings = [quantize.read_encodings(os.path.join(qnn_dir, g["encodings"])) for g in quant["graphs"].values()]
        bits_of, source = _from_encodings(tensors, encodings), "the AIMET encodings"
    else:
        bits_of, source = _planned(tensors, embedding), "the planned precisions (no encodings)"
    sizes = summarize_sizes(tensor_sizes(tensors, bits_of))
    files = {name: os.path.getsize(os.path.join(onnx_dir, name)) for name in manifest["weight_files"]}
    files.update({g["file"]: g["bytes"] for g in manifest["graphs"].values()})
    return {
        "model": model_desc,
        "settings": {"context": manifest["context"], "prefill_len": manifest["prefill_len"],
                     "vision_batch": manifest["vision_batch"], "embedding_precision": embedding},
        "export_seconds": round(export_seconds, 2),
        "graphs": {n: {"file": g["file"], "graph_bytes": g["bytes"], "weight_tensors": len(g["tensors"]),
                       "seconds": g["seconds"], "io_bytes_per_call": io_bytes(g)}
                   for n, g in manifest["graphs"].items()},
        "host_kv_cache_bytes": {n: kv_cache_bytes(spec) for n, spec in manifest["decoders"].items()},
        "files": files,
        "sizes": {"quantized_bits_from": source, **sizes},
        "unused_parameters": manifest["unused"],
        "paper_scale": paper_scale_estimate(PAPER_CONTEXT, embedding),
        "calibration": calibration,
        "parity_onnx_vs_jax": parity,
        "quantization": {"status": quant_status, **(quant or {})},
    }


def _num(v, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _groups(names) -> list[str]:
    """Smallest module prefixes covering `names` (for listing what was not exported).

        >>> _groups(["vision.head.probe", "vision.head.mlp.fc1.kernel", "vision.encoder.layers_3.mlp.fc1.bias"])
        ['vision.encoder.layers_3.mlp.fc1', 'vision.head']
    """
    parents = sorted({n.rsplit(".", 1)[0] for n in names}, key=len)
    out: list[str] = []
    for p in parents:
        if not any(p == q or p.startswith(q + ".") for q in out):
            out.append(p)
    return sorted(out)


def _mb(n: int | float) -> str:
    return f"{n / 1e6:,.2f} MB"


def _gb(n: int | float) -> str:
    return f"{n / 1e9:.2f} GB"


def to_markdown(r: dict) -> str:
    """report.md: the report's tables in Markdown."""
    m, s = r["model"], r["settings"]
    lines = [f"# QNN export report: {m.get('path') or 'model'}", "",
             f"{m.get('structure')}; LLM {m.get('llm')}, vision {m.get('vision')}. Context {s['context']} slots, "
             f"prefill {s['prefill_len']} tokens per call, vision {s['vision_batch']} tile(s) per call. "
             f"Export: {r['export_seconds']:.1f} s.", "",
             "## Graphs", "", "| graph | file | graph bytes | weight tensors | export s | inputs / outputs per call "
             "(float32) |", "|---|---|---|---|---|---|"]
    for n, g in r["graphs"].items():
        io = g.get("io_bytes_per_call") or {"inputs": 0, "outputs": 0}
        lines.append(f"| {n} | {g['file']} | {g['graph_bytes']:,} | {g['weight_tensors']} | {g['seconds']:.1f} | "
                     f"{_mb(io['inputs'])} / {_mb(io['outputs'])} |")
    if r.get("host_kv_cache_bytes"):
        lines += ["", "Host KV cache per decoder (float32, every layer all context slots, sliding-window layers "
                      "too): " + ", ".join(f"{n} {_mb(b)}" for n, b in r["host_kv_cache_bytes"].items()) + "."]
    sz = r["sizes"]
    lines += ["", f"## Sizes (quantized bits from {sz['quantized_bits_from']})", "",
              "| component | parameters | float32 (ONNX weights) | quantized | elements by precision |",
              "|---|---|---|---|---|"]
    for c, v in sz["components"].items():
        by = ", ".join(f"{k}: {n:,}" for k, n in sorted(v["elements_by_bits"].items()))
        lines.append(f"| {c} | {v['elements']:,} | {_mb(v['float_bytes'])} | {_mb(v['quantized_bytes'])} | {by} |")
    lines += ["", "| deployment | parameters | float32 | quantized (W4 LLM / W8 ViT, projector, LoRA) |",
              "|---|---|---|---|"]
    for label, v in sz["deployments"].items():
        lines.append(f"| {label} | {v['elements']:,} | {_mb(v['float_bytes'])} | {_mb(v['quantized_bytes'])} |")
    if sz["lm_head_bytes"]:
        lines += ["", f"The LM head (`llm.lm_head.kernel`) takes {_mb(sz['lm_head_bytes']['quantized'])} of that "
                      "(with tied embeddings a second copy of the table)."]
    if sz["unquantized"]:
        lines += ["", f"Tensors no encoding covers (counted as float32): {', '.join(sz['unquantized'][:10])}"
                      f"{' ...' if len(sz['unquantized']) > 10 else ''}"]
    if r["unused_parameters"]:
        total = sum(r["unused_parameters"].values())
        lines += ["", f"Not exported (no graph uses them): {len(r['unused_parameters'])} tensors, {total:,} parameters "
                      f"({', '.join(_groups(r['unused_parameters'])[:8])})."]
    ps = r["paper_scale"]
    lines += ["", f"### Paper scale ({ps['model']}, context {ps['context']}), same accounting from shapes", "",
              "| deployment | parameters | quantized | paper Table 9 (BlueLM-V-3B / GenieBlue) |", "|---|---|---|---|"]
    for label, v in ps["deployments"].items():
        ref = PAPER_TABLE9_GB.get(label)
        paper = f"{ref:.2f} GB" if ref else ""
        lines.append(f"| {label} | {v['elements']:,} | {_gb(v['quantized_bytes'])} | {paper} |")
    st = ps["structure_report_storage_bytes"]
    lines += ["", f"`structure.report.storage_summary` (all weights at W4/W8, no scales, no head copy): LLM "
                  f"{_gb(st['llm_only'])}, base MLLM {_gb(st['base_mllm'])}, GenieBlue {_gb(st['genieblue'])}. "
                  "The paper's LLM is BlueLM-3B (2.7B, untied); ours Qwen2.5-3B (3.09B, tied: the head copy adds "
                  f"{_gb(ps['lm_head_bytes']['quantized']) if ps['lm_head_bytes'] else 'nothing'})."]
    if r.get("parity_onnx_vs_jax"):
        p = r["parity_onnx_vs_jax"]
        lines += ["", "## Float ONNX (onnxruntime) vs our JAX model, calibration requests", "",
                  "| path | positions / tokens | max abs diff | top-1 agreement |", "|---|---|---|---|"]
        for k, v in p.items():
            lines.append(f"| {k} | {v.get('positions', v.get('tokens', 0))} | {_num(v.get('max_abs_diff'), '.2e')} | "
                         f"{_num(v.get('top1_agreement'), '.3f')} |")
    q = r["quantization"]
    lines += ["", "## Quantization (AIMET)", "", f"Status: {q['status']}"]
    if r.get("calibration"):
        lines += ["", f"Calibration: {r['calibration']}."]
    if "error" in q:
        lines += ["", f"aimet-onnx {q.get('aimet_onnx')}, config {q.get('config')}; seconds {q.get('seconds')}.", "",
                  "Simulated-quantized vs float ONNX:", "",
                  "| path | positions / tokens | max abs diff | mean abs diff | relative RMS | next-token agreement |",
                  "|---|---|---|---|---|---|"]
        for k, v in q["error"].items():
            lines.append(f"| {k} | {v.get('positions', v.get('tokens', 0))} | {_num(v.get('max_abs_diff'), '.4f')} | "
                         f"{_num(v.get('mean_abs_diff'), '.4f')} | {_num(v.get('relative_rms'), '.4f')} | "
                         f"{_num(v.get('top1_agreement'), '.3f')} |")
        lines += ["", "| graph | files | encodings |", "|---|---|---|"]
        for g, v in q["graphs"].items():
            counts = ", ".join(f"{k} x{n}" for k, n in v["counts"].items())
            lines.append(f"| {g} | qnn/{v['onnx']} + qnn/{v['encodings']} | {counts} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str) -> tuple[str, str]:
    """Writes report.json and report.md into `out_dir`; returns their paths."""
    json_path, md_path = os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    with open(md_path, "w") as f:
        f.write(to_markdown(report))
    return json_path, md_path
