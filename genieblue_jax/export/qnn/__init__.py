"""The QNN bridge: a GenieBlue model -> ONNX graphs + AIMET encodings for Qualcomm's
converter (`qnn-onnx-converter --input_network X.onnx --quantization_overrides X.encodings`).

    >>> import genieblue_jax
    >>> from genieblue_jax.export import qnn
    >>> model = genieblue_jax.load("workdirs/stage2_skip")                     # doctest: +SKIP
    >>> report = qnn.export_qnn(model, "/export/qnn", context=2048, calib=16)  # doctest: +SKIP

or `python -m tools.export_qnn --checkpoint DIR --out OUT`. What OUT holds:

    onnx/     five float32 graphs sharing three weight files (`onnx_export`): vision tower +
              projector, base LLM prefill / decode, multimodal LLM prefill / decode; manifest.json
    qnn/      per graph NAME.onnx + NAME.encodings from AIMET (`quantize`): LLM weights int4,
              ViT / projector / LoRA int8, activations int16 (needs the aimet-onnx extra)
    report.md, report.json   sizes (float and quantized, per component, text-only vs GenieBlue
              deployment, the paper-scale estimate), float ONNX vs our JAX model, quantized vs
              float logit error and next-token agreement (`report`)

Pieces: `graphs` (the PyTorch graphs: KV-cache layout, names), `runtime` (the host loop:
prefill + decode over onnxruntime), `calibration` (requests from the data pipeline),
`evaluate`, `quantize`, `report`.

Families: every one of `models.configs.FAMILIES` (Qwen2, Llama 3 with llama3 RoPE, Qwen3,
Gemma 3, SmolLM3); the decoder graphs compute the family's block as `models.llm` does, with
a second mask input for sliding-window layers and a second RoPE table for Gemma 3's local
layers (`graphs`). Every layer keeps a full-context KV cache, sliding ones included.

Variants: genieblue (replicated blocks swapped in, LoRA as its own int8 MatMuls), lora,
full, and cogvlm (visual experts routed per token by the image mask in the prefill graph;
decode runs text weights only, as generated tokens are text).
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Callable, Sequence

from genieblue_jax import paths
from genieblue_jax.export.qnn import calibration, evaluate, report
from genieblue_jax.export.qnn import quantize as quantize_lib
from genieblue_jax.export.qnn.graphs import MASK_VALUE, ModelGraphs, check_sizes
from genieblue_jax.export.qnn.onnx_export import GRAPHS, export_onnx, read_manifest, runners, sessions
from genieblue_jax.export.qnn.quantize import INSTALL, aimet_available, require_aimet
from genieblue_jax.export.qnn.runtime import Decoder, DecoderSpec, Vision, attention_mask, place_image_features

__all__ = ["export_qnn", "export_onnx", "read_manifest", "sessions", "runners", "ModelGraphs", "Decoder",
           "DecoderSpec", "Vision", "attention_mask", "place_image_features", "MASK_VALUE", "GRAPHS", "INSTALL",
           "aimet_available", "require_aimet", "check_sizes"]

EMBEDDING_PRECISIONS = ("int4", "int8", "int16")


def _describe(model) -> dict:
    m = model.mcfg
    llm, vit = m.llm, m.vision
    return {"path": model.path, "structure": m.structure.name,
            "llm": f"{llm.family}, {llm.num_layers} layers, hidden {llm.hidden_size}, vocab {llm.vocab_size}",
            "vision": f"SigLIP {vit.num_layers} layers, hidden {vit.hidden_size}, {vit.image_size} px, "
                      f"{m.tokens_per_tile} tokens per tile",
            "layer_kinds": list(m.layer_kinds)}


def export_qnn(model, out_dir: str, *, context: int = 2048, prefill_len: int = 128, vision_batch: int = 1,
               calib: int = 16, decode_steps: int = 8, data: Sequence[str] = (), tokenizer: str | None = None,
               quantize: str = "yes", embedding: str = "int4", parity: bool = True, overwrite: bool = False,
               log: Callable[[str], None] = print) -> dict:
    """The whole bridge (module docstring). `model`: a loaded multimodal `GenieBlue`.

    `calib` requests of each kind (with images / text-only) calibrate and evaluate; 0 skips
    calibration, parity and quantization (graphs and sizes only; needs quantize="no").
    `quantize`: "yes" (the default: AIMET encodings; without aimet-onnx an ImportError naming
    the install command, raised before any data is read or file written) or "no" (the float
    graphs and report only, asked for explicitly). Returns the report."""
    if not getattr(model, "is_mllm", False):
        raise ValueError(f"{getattr(model, 'path', None) or 'the model'} is not a multimodal model (it holds only "
                         f"{sorted(getattr(model, 'configs', {}))}); the QNN export needs a whole GenieBlue MLLM "
                         "(a training workdir or a checkpoint from save_mllm)")
    if quantize not in ("yes", "no"):
        raise ValueError(f"quantize={quantize!r}; choose 'yes' (AIMET encodings, needs aimet-onnx) or 'no' "
                         "(float graphs only)")
    if embedding not in EMBEDDING_PRECISIONS:
        raise ValueError(f"embedding precision {embedding!r}; choose one of {EMBEDDING_PRECISIONS}")
    if calib < 0 or decode_steps < 0:
        raise ValueError(f"calib={calib} and decode_steps={decode_steps} must be >= 0")
    check_sizes(model.mcfg, context, prefill_len)
    if quantize == "yes":
        try:
            require_aimet()
        except ImportError as e:
            raise ImportError(f"{e}\nor pass quantize='no' for the float ONNX graphs and report only (no encodings)"
                              ) from None
        if calib == 0:
            raise ValueError("quantize='yes' needs calibration data: calib must be >= 1 (or quantize='no' for the "
                             "float graphs only)")
    if paths.is_remote(out_dir):  # ONNX / AIMET write local files: made here, then copied
        with paths.written_locally(out_dir, replace=("onnx", "qnn", "report.json", "report.md"), overwrite=overwrite,
                                   prefix="genieblue_qnn_") as local:
            return export_qnn(model, local, context=context, prefill_len=prefill_len, vision_batch=vision_batch,
                              calib=calib, decode_steps=decode_steps, data=data, tokenizer=tokenizer,
                              quantize=quantize, embedding=embedding, parity=parity, log=log)
    out_dir = paths.local_dir(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite / --overwrite to replace it)")
        for sub in ("onnx", "qnn"):
            shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    samples = description = None
    if calib:  # data problems fail here, before the slow part
        sources, tok, where = calibration.data_sources(model, data, tokenizer)
        samples = calibration.load_samples(
            model.mcfg, sources, tok, count=calib, context=context, prefill_len=prefill_len,
            decode_steps=decode_steps, image_mode=model.preprocessing["image_mode"],
            max_tiles=int(model.preprocessing["max_tiles"]), chat=model.chat)
        description = f"from {where}: {samples.description}"
        log(f"calibration data: {description}")
    onnx_dir = os.path.join(out_dir, "onnx")
    log(f"exporting ONNX graphs to {onnx_dir}")
    t0 = time.perf_counter()
    manifest = export_onnx(model, onnx_dir, context=context, prefill_len=prefill_len, vision_batch=vision_batch,
                           log=log)
    export_seconds = time.perf_counter() - t0
    parity_result = quant = None
    if samples is None:
        status = "skipped: calib=0 (no calibration data)"
    else:
        float_run = evaluate.run_requests(manifest, sessions(onnx_dir, manifest), samples)
        if parity:
            parity_result = evaluate.compare_runs(evaluate.jax_reference(model, samples), float_run)
            log("float ONNX vs JAX: " + ", ".join(f"{k} max |diff| {v.get('max_abs_diff', 0):.2e}"
                                                    for k, v in parity_result.items()))
        if quantize == "no":
            status = "skipped: quantize='no'"
        else:
            log("quantizing with AIMET")
            quant = quantize_lib.quantize(onnx_dir, manifest, samples, os.path.join(out_dir, "qnn"),
                                          embedding=embedding, log=log, float_run=float_run)
            status = "done"
    rep = report.build_report(model_desc=_describe(model), manifest=manifest, onnx_dir=onnx_dir,
                              export_seconds=export_seconds, parity=parity_result, quant=quant, quant_status=status,
                              calibration=description, embedding=embedding, qnn_dir=os.path.join(out_dir, "qnn"))
    report_files = report.write_report(rep, out_dir)
    log(f"wrote {report_files[1]} and {report_files[0]}")
    return rep
