"""ONNX export of a model's graphs (torch.onnx, the torch.export-based "dynamo" exporter
of torch >= 2.9, which needs `onnxscript`), weights written once as external data.

    OUT/onnx/vision.onnx              pixel tiles -> image features (n = vision_batch)
    OUT/onnx/llm_base_prefill.onnx    the base LLM, AR = prefill_len   (text requests)
    OUT/onnx/llm_base_decode.onnx     the base LLM, AR = 1
    OUT/onnx/llm_mm_prefill.onnx      the multimodal LLM (replicated blocks + LoRA), AR = prefill_len
    OUT/onnx/llm_mm_decode.onnx       the multimodal LLM, AR = 1 (no image inputs)
    OUT/onnx/llm.weights              base LLM tensors (+ RoPE tables, the tied head's copy)
    OUT/onnx/branch.weights           replicated blocks / visual experts, LoRA
    OUT/onnx/vision.weights           vision tower + projector
    OUT/onnx/manifest.json            shapes, names, tensor index, settings, each LLM layer's
                                      attention (full / sliding window) and RoPE table (`read_manifest`)

Every graph stores its weights as ONNX external data pointing into the three `.weights`
files, and a tensor used by several graphs (a base block in all four decoder graphs) is
stored once: the files on disk are the deployment's unique float32 weights, per
component, and no protobuf ever holds a weight (so the 2 GB protobuf limit never applies:
paper scale exports like the tiny model). The graphs trace on torch's meta device
(`graphs.TensorStore(meta=True)`) and each tensor is converted to float32 only when
it is written, one at a time.

The exporter's own graph optimizer is not run: its initializer de-duplication merges
equal tensors under one name (a fresh branch's replicated blocks equal the base's, every
untrained LoRA B is zero), which would break the one-name-per-weight contract that the
encodings and the report rely on. The graphs are written as traced (static shapes, no
shape arithmetic left to fold).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from typing import Callable, Iterator

import numpy as np

from genieblue_jax.export.qnn.graphs import (
    MASK_VALUE,
    ROPE_TABLES,
    DecoderGraph,
    ModelGraphs,
    check_sizes,
    example_inputs,
    rope_table_keys,
)
from genieblue_jax.export.qnn.runtime import Decoder, DecoderSpec, Vision
from genieblue_jax.jsonfile import read_json

# 2: "tokens_per_tile" (was tokens_per_patch); 3: the decoders' "sliding_window" (their graphs'
# sliding_attention_mask input) and "layers" (each layer's attention and RoPE table). A /2 export
# reads as one without sliding layers.
FORMAT = "genieblue_jax.qnn/3"
READABLE = ("genieblue_jax.qnn/2", FORMAT)
MANIFEST = "manifest.json"
GRAPHS = ("vision", "llm_base_prefill", "llm_base_decode", "llm_mm_prefill", "llm_mm_decode")
WEIGHT_FILES = {"llm": "llm.weights", "branch": "branch.weights", "vision": "vision.weights",
                "projector": "vision.weights"}
_ALIGN_LARGE, _LARGE = 65536, 1 << 20  # tensors >= 1 MiB start on 64 KiB boundaries (ORT mmaps those)


def tensor_role(name: str, shape) -> str:
    """What a canonical tensor is, which decides its quantization (`quantize.planned_precision`).

        >>> tensor_role("branch.layers_3.mlp.up_proj.lora_b", (8, 128))
        'lora'
        >>> (tensor_role("llm.lm_head.kernel", (64, 512)),
        ...  tensor_role("vision.embeddings.patch_embedding.kernel", (48, 3, 8, 8)))
        ('matmul', 'conv')
        >>> tensor_role("llm.layers_0.input_layernorm.scale", (64,)), tensor_role("llm.rope_local.cos", (64, 16))
        ('norm', 'rope_table')
        >>> tensor_role("branch.layers_2.self_attn.q_norm.scale", (16,))   # Qwen3 / Gemma 3: not a MatMul weight
        'norm'
    """
    leaf = name.rsplit(".", 1)[-1]
    if name.rsplit(".", 1)[0] in {f"llm.{key}" for key in ROPE_TABLES}:
        return "rope_table"
    if leaf in ("lora_a", "lora_b"):
        return "lora"
    if leaf == "kernel":
        return "conv" if len(shape) == 4 else "matmul"
    if leaf == "embedding":
        return "embedding" if ".embed_tokens." in name else "position_embedding"
    if leaf == "bias":
        return "bias"
    if leaf == "scale":
        return "norm"
    raise ValueError(f"tensor {name!r}: no known role")


class WeightWriter:
    """Appends float32 tensors to the per-component `.weights` files, each name once."""

    def __init__(self, directory: str):
        self.directory = directory
        self.index: dict[str, dict] = {}
        self._files: dict[str, object] = {}

    def write(self, name: str, materialize: Callable[[], np.ndarray]) -> dict:
        """Appends tensor `name` (made by `materialize()` only on its first write) to its
        component's file; returns its index entry (file, offset, length, shape)."""
        if name in self.index:
            return self.index[name]
        component = name.split(".", 1)[0]
        filename = WEIGHT_FILES[component]
        f = self._files.get(filename)
        if f is None:
            f = self._files[filename] = open(os.path.join(self.directory, filename), "wb")
        array = materialize()
        data = memoryview(array).cast("B")
        align = _ALIGN_LARGE if len(data) >= _LARGE else 16
        offset = f.tell()
        if offset % align:
            f.write(b"\0" * (align - offset % align))
            offset = f.tell()
        f.write(data)
        entry = {"file": filename, "offset": offset, "length": len(data), "shape": list(array.shape),
                 "component": component, "role": tensor_role(name, array.shape)}
        self.index[name] = entry
        return entry

    def close(self) -> dict[str, int]:
        """Closes the files; returns {file name: size in bytes}."""
        for f in self._files.values():
            f.close()
        return {name: os.path.getsize(os.path.join(self.directory, name)) for name in sorted(self._files)}


@contextlib.contextmanager
def quiet(*loggers: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raises the named loggers to `level` and hides Python warnings for the block: the
    exporter, its optimizer and AIMET log every pass and node at INFO (thousands of lines
    for a small graph) and warn about optional packages the export never uses (torchvision)."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, old in saved:
            logger.setLevel(old)


EXPORT_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")


def _to_onnx(module, shapes, input_names, output_names):
    import torch
    args = example_inputs(shapes, next(module.parameters()).device.type)
    module.eval()
    with torch.no_grad(), quiet(*EXPORT_LOGGERS, level=logging.ERROR):
        program = torch.onnx.export(module, args, dynamo=True, optimize=False, verbose=False,
                                    input_names=input_names, output_names=output_names)
    return program.model


def _clean(model) -> None:
    """Folds the tracer's constant arithmetic (Casts of Slice bounds, ...), drops dead nodes
    and the per-node debug metadata (stack traces: most of a small graph's bytes). Weights
    are external by now and far above the folding size limit, so none is read or copied."""
    import onnx_ir as ir
    import onnxscript.optimizer
    with quiet(*EXPORT_LOGGERS):
        onnxscript.optimizer.fold_constants(model)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        ir.passes.common.ClearMetadataAndDocStringPass()(model)


def export_graph(graphs: ModelGraphs, module, shapes, output_shapes, path: str, writer: WeightWriter) -> dict:
    """Traces `module`, names its initializers canonically, points them at the shared
    weight files and saves `path`. Returns the manifest entry of the graph."""
    import onnx_ir as ir
    input_names = [n for n, _, _ in shapes]
    output_names = [n for n, _, _ in output_shapes]
    model = _to_onnx(module, shapes, input_names, output_names)
    names = graphs.store.names_in(module)
    directory = os.path.dirname(path)
    used = []
    for init_name, value in list(model.graph.initializers.items()):
        canonical = names.get(init_name)
        if canonical is None:
            size = int(np.prod(value.shape.numpy())) if value.shape is not None else 0
            if size * 4 > _LARGE:
                raise RuntimeError(f"{os.path.basename(path)}: initializer {init_name!r} ({size} elements) is not a "
                                   "model tensor (a folded copy of a weight?)")
            continue
        entry = writer.write(canonical, lambda c=canonical: graphs.store.materialize(c))
        value.name = canonical
        value.const_value = ir.ExternalTensor(entry["file"], entry["offset"], entry["length"], ir.DataType.FLOAT,
                                              shape=ir.Shape(entry["shape"]), name=canonical, base_dir=directory)
        used.append(canonical)
    got_in = [v.name for v in model.graph.inputs]
    got_out = [v.name for v in model.graph.outputs]
    if got_in != input_names or got_out != output_names:
        raise RuntimeError(f"{os.path.basename(path)}: exported inputs {got_in} / outputs {got_out}, expected "
                           f"{input_names} / {output_names}")
    _clean(model)
    model.producer_name = "genieblue_jax.export.qnn"
    ir.save(model, path)
    return {"file": os.path.basename(path),
            "inputs": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in shapes],
            "outputs": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in output_shapes],
            "tensors": sorted(used), "bytes": os.path.getsize(path)}


def export_onnx(model, out_dir: str, *, context: int = 2048, prefill_len: int = 128, vision_batch: int = 1,
                log: Callable[[str], None] = print) -> dict:
    """Writes the five graphs, the weight files and the manifest of `model` (a loaded
    multimodal `GenieBlue`, or any object with `.mcfg` / `.params`) to `out_dir`.
    Returns the manifest (also written as `out_dir/manifest.json`)."""
    mcfg, params = model.mcfg, model.params
    check_sizes(mcfg, context, prefill_len)
    if vision_batch < 1:
        raise ValueError(f"vision_batch={vision_batch} must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    graphs = ModelGraphs(mcfg, params, context=context, meta=True)
    writer = WeightWriter(out_dir)
    plan: dict[str, tuple] = {
        "vision": (graphs.vision, vision_batch),
        "llm_base_prefill": (graphs.base, prefill_len),
        "llm_base_decode": (graphs.base, 1),
        "llm_mm_prefill": (graphs.multimodal(True), prefill_len),
        "llm_mm_decode": (graphs.multimodal(False), 1),
    }
    entries = {}
    try:
        for name, (module, n) in plan.items():
            t0 = time.perf_counter()
            entry = export_graph(graphs, module, module.input_shapes(n), module.output_shapes(n),
                                 os.path.join(out_dir, f"{name}.onnx"), writer)
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            entry["tokens_per_call" if isinstance(module, DecoderGraph) else "tiles_per_call"] = n
            entries[name] = entry
            log(f"  {name}.onnx: {len(entry['tensors'])} weight tensors, {entry['seconds']:.1f} s")
    finally:
        sizes = writer.close()
    llm = mcfg.llm
    manifest = {
        "format": FORMAT,
        "context": context, "prefill_len": prefill_len, "vision_batch": vision_batch,
        "mask_value": MASK_VALUE, "image_token_id": int(mcfg.image_token_id),
        "tokens_per_tile": int(mcfg.tokens_per_tile), "image_size": int(mcfg.vision.image_size),
        "structure": mcfg.structure.to_dict(), "layer_kinds": list(mcfg.layer_kinds),
        "tie_embeddings": bool(llm.tie_embeddings), "family": llm.family,
        # what the host and a reader of the graphs need per layer: which mask, which RoPE table
        "layers": [{"attention": llm.layer_type(i), "window": llm.window(i),
                    "rope": None if key is None else f"llm.{key}"} for i, key in enumerate(rope_table_keys(llm))],
        "decoders": {
            "base": DecoderSpec.from_config(llm, context=context, prefill_len=prefill_len, multimodal=False).to_dict(),
            "multimodal": DecoderSpec.from_config(llm, context=context, prefill_len=prefill_len,
                                                  multimodal=True).to_dict()},
        "graphs": entries,
        "weight_files": sizes,
        "tensors": writer.index,
        "unused": graphs.unused(),
    }
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def read_manifest(onnx_dir: str) -> dict:
    """An ONNX export's manifest (graphs, tensors, weight files); ValueError naming the file for
    another format or version."""
    path = os.path.join(onnx_dir, MANIFEST)
    manifest = read_json(onnx_dir, MANIFEST, "not an export_onnx output directory")
    if manifest.get("format") not in READABLE:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, this code reads {' or '.join(READABLE)}")
    return manifest


def sessions(onnx_dir: str, manifest: dict, *, threads: int | None = None) -> dict:
    """{graph name: onnxruntime.InferenceSession} on the CPU."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return {name: ort.InferenceSession(os.path.join(onnx_dir, entry["file"]), options,
                                       providers=["CPUExecutionProvider"])
            for name, entry in manifest["graphs"].items()}


def runners(manifest: dict, sessions_by_graph: dict):
    """(Vision, base Decoder, multimodal Decoder) over the given sessions."""
    specs = {k: DecoderSpec(**v) for k, v in manifest["decoders"].items()}
    s = sessions_by_graph
    return (Vision(s["vision"], manifest["vision_batch"], manifest["image_size"]),
            Decoder(specs["base"], s["llm_base_prefill"], s["llm_base_decode"]),
            Decoder(specs["multimodal"], s["llm_mm_prefill"], s["llm_mm_decode"]))
