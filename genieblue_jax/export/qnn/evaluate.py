"""Running the calibration requests through a set of graph sessions, and comparing runs.

`run_requests` is the one loop that calibration (AIMET observing the quantizers), the float
run and the simulated-quantized run share: every image sample's tiles through the vision
graph, its tokens teacher-forced through the multimodal decoder with those features; every
text sample through the base decoder. `compare` turns two runs into the report's numbers.
"""
from __future__ import annotations

import numpy as np

from genieblue_jax import structure
from genieblue_jax.export.qnn.onnx_export import runners
from genieblue_jax.export.qnn.runtime import place_image_features


def run_requests(manifest: dict, sessions: dict, data) -> dict:
    """{"vision": [features per image sample], "multimodal": [logits (n, vocab)],
    "text": [logits (n, vocab)]} of `data` (a `calibration.CalibrationData`) on `sessions`
    ({graph name: session}: onnxruntime, AIMET sims or a mix)."""
    vision, base, mm = runners(manifest, sessions)
    out: dict[str, list] = {"vision": [], "multimodal": [], "text": []}
    for s in data.multimodal:
        feats = vision.features(s.tiles)
        embeds, mask = place_image_features(s.tokens, manifest["image_token_id"], feats)
        out["vision"].append(feats)
        out["multimodal"].append(mm.score(s.tokens, split=s.split, image_embeds=embeds, image_mask=mask))
    for s in data.text:
        out["text"].append(base.score(s.tokens, split=s.split))
    return out


def compare_logits(reference: list, other: list) -> dict:
    """Logit error and next-token (argmax) agreement over every position of every sample.

        >>> compare_logits([np.array([[0.0, 1.0], [2.0, 0.0]])], [np.array([[0.0, 0.5], [0.0, 1.0]])])
        {'positions': 2, 'max_abs_diff': 2.0, 'mean_abs_diff': 0.875, 'relative_rms': 1.0247, 'top1_agreement': 0.5}
    """
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference samples, {len(other)} compared")
    if not reference:
        return {"positions": 0}
    ref = np.concatenate([np.asarray(r, np.float64) for r in reference])
    oth = np.concatenate([np.asarray(o, np.float64) for o in other])
    diff = oth - ref
    return {"positions": int(ref.shape[0]),
            "max_abs_diff": float(np.abs(diff).max()),
            "mean_abs_diff": float(np.abs(diff).mean()),
            "relative_rms": round(float(np.sqrt((diff ** 2).sum() / max((ref ** 2).sum(), 1e-30))), 4),
            "top1_agreement": float((ref.argmax(-1) == oth.argmax(-1)).mean())}


def compare_features(reference: list, other: list) -> dict:
    """Image-feature error of the vision graph (max |diff|, relative RMS)."""
    if not reference:
        return {"tokens": 0}
    ref = np.concatenate([np.asarray(r, np.float64) for r in reference])
    oth = np.concatenate([np.asarray(o, np.float64) for o in other])
    diff = oth - ref
    return {"tokens": int(ref.shape[0]), "max_abs_diff": float(np.abs(diff).max()),
            "relative_rms": round(float(np.sqrt((diff ** 2).sum() / max((ref ** 2).sum(), 1e-30))), 4)}


def compare_runs(reference: dict, other: dict) -> dict:
    """Agreement of two runs over the calibration set (e.g. ONNX vs JAX, quantized vs float):
    vision features (`compare_features`), multimodal and text logits (`compare_logits`)."""
    return {"vision": compare_features(reference["vision"], other["vision"]),
            "multimodal": compare_logits(reference["multimodal"], other["multimodal"]),
            "text": compare_logits(reference["text"], other["text"])}


def _padded_logits(model, tokens, **kw) -> np.ndarray:
    """`model.logits` of one request, right-padded to a power-of-two length (attention mask
    0 on the padding) so requests of similar length share one compiled program."""
    n = len(tokens)
    length = max(16, 1 << (n - 1).bit_length())
    ids = np.full((1, length), 1 if model.mcfg.image_token_id == 0 else 0, np.int32)
    ids[0, :n] = tokens
    mask = np.zeros((1, length), np.int32)
    mask[0, :n] = 1
    return model.logits(ids, attention_mask=mask, **kw)[0, :n]


def jax_reference(model, data) -> dict:
    """The same requests through our JAX model (`GenieBlue.logits`, whole sequences; the
    vision features from `structure.image_features`): what the float ONNX run must match."""
    import jax
    import jax.numpy as jnp

    features = jax.jit(structure.image_features, static_argnums=0)
    out: dict[str, list] = {"vision": [], "multimodal": [], "text": []}
    for s in data.multimodal:
        feats = np.asarray(features(model.mcfg, model.params, jnp.asarray(s.tiles)), np.float32)
        out["vision"].append(feats.reshape(-1, feats.shape[-1]))
        out["multimodal"].append(_padded_logits(model, s.tokens, images=s.tiles[None], mode="multimodal"))
    for s in data.text:
        out["text"].append(_padded_logits(model, s.tokens, mode="text"))
    return out
