"""`genieblue_jax.load(path)`: the one public entry point to a model.

`path` may be a training workdir (or one of its `checkpoints/<step>` folders), a
genieblue_jax checkpoint (`tools.from_hf` output or a saved MLLM), or a Hugging Face model
directory (imported on the fly).

    >>> import genieblue_jax
    >>> model = genieblue_jax.load("workdirs/stage2_skip")               # doctest: +SKIP
    >>> model.generate("What is 12 plus 7?")                              # text: the base LLM
    >>> model.generate("How many circles are there?", images=["scene.png"])  # the multimodal path
    >>> model.logits(ids, images=tiles, mode="multimodal")              # (b, t, vocab) float32

Routing (GenieBlue's non-shared base, paper Sec. 3.3): a request without images runs the
untouched base LLM (`mode="text"`, bitwise the base model); a request with images runs the
LLM with the replicated blocks swapped in and LoRA added (`mode="multimodal"`).
`mode="shared"` forces the multimodal weights on text too (the paper's ablation).

Inputs are numpy (or lists); outputs are float32 numpy. Padding is given HF-style with an
`attention_mask` (1 = token, 0 = pad, left or right); packed rows with `segment_ids`.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.tokenizer import load_tokenizer
from genieblue_jax import checkpoint, inference, models, paths, structure, workdir
from genieblue_jax.hf import import_hf
from genieblue_jax.inference.requests import RequestEncoder, stack_tiles
from genieblue_jax.models.masks import positions_from_segments
from genieblue_jax.structure import MODES


class GenieBlue:
    """A loaded model: configs and parameters of its components ("llm", "vision", ...);
    for a whole multimodal model also `mcfg` (its `structure.MLLMConfig`), the tokenizer and
    the image preprocessing it was trained with.

    `chat`: how conversations are rendered, as the model was trained ({"template": "auto" |
    "tokenizer" | "chatml", "template_kwargs": {...}, "date": the training's pinned date or
    None}; `data_pipelines.chat`). Default "auto": the tokenizer directory's own chat template,
    ChatML for a tokenizer without one. Prompts render today's date (as transformers does)."""

    def __init__(self, configs: dict, params: dict, *, path: str | None = None, mesh=None, mcfg=None,
                 tokenizer: str | None = None, preprocessing: dict | None = None, source: dict | None = None,
                 chat: dict | None = None):
        self.configs = dict(configs)
        self.params = dict(params)
        self.path = path
        self.mesh = mesh
        self.mcfg = mcfg
        self.tokenizer_path = tokenizer
        self.preprocessing = {"image_mode": "dynamic", "max_tiles": 16, **(preprocessing or {})}
        self.source = dict(source or {})
        self.chat = {"template": "auto", "template_kwargs": {}, "date": None, **(chat or {})}

    def __repr__(self):
        parts = ", ".join(f"{n}: {models.count_params(p) / 1e6:.2f}M params" for n, p in self.params.items())
        kind = f"{self.mcfg.structure.name} MLLM; " if self.mcfg is not None else ""
        return f"GenieBlue({self.path or 'in memory'}; {kind}{parts})"

    @property
    def is_mllm(self) -> bool:
        """True for a whole multimodal model (else a single component: an LLM or a ViT)."""
        return self.mcfg is not None

    def _component(self, name: str):
        if name not in self.configs:
            raise ValueError(f"this model ({self.path or 'in memory'}) has no {name!r} component; "
                             f"it has {sorted(self.configs)}")
        return self.configs[name], self.params[name]

    def _mode(self, mode: str | None, has_images: bool) -> str:
        mode = mode or ("multimodal" if has_images else "text")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; choose one of {MODES}")
        if mode != "text" and not self.is_mllm:
            raise ValueError(f"mode={mode!r} needs a multimodal model; {self.path or 'this model'} holds only "
                             f"{sorted(self.configs)} (text mode runs the LLM alone)")
        if mode == "text" and has_images:
            raise ValueError("mode='text' runs the base LLM alone and takes no images; use mode='multimodal'")
        return mode

    # --- tokenizer and requests ---------------------------------------------------------------

    @functools.cached_property
    def tokenizer(self):
        """The model's tokenizer (`data_pipelines.tokenizer`), or an error saying none is known."""
        if not self.tokenizer_path:
            raise ValueError(f"{self.path or 'this model'} has no tokenizer (no hf_assets/ with tokenizer.json "
                             "or tokenizer.model); pass token ids, or load a checkpoint that carries one")
        return load_tokenizer(self.tokenizer_path)

    @functools.cached_property
    def requests(self):
        """`inference.requests.RequestEncoder` with this model's tokenizer, chat rendering (`chat`),
        image token and image preprocessing."""
        vision = self.configs.get("vision")
        tpp = self.mcfg.tokens_per_tile if self.is_mllm else 0
        return RequestEncoder(self.tokenizer, tile_size=vision.image_size if vision else 1, tokens_per_tile=tpp,
                              image_mode=self.preprocessing["image_mode"],
                              max_tiles=int(self.preprocessing["max_tiles"]),
                              image_token_id=self.mcfg.image_token_id if self.is_mllm else None,
                              chat_template=self.chat["template"], template_kwargs=self.chat["template_kwargs"])

    # --- forward passes -------------------------------------------------------------------------

    @functools.cached_property
    def _llm_forward(self):
        cfg, _ = self._component("llm")
        return jax.jit(models.build(cfg).apply)

    @functools.cached_property
    def _vision_forward(self):
        cfg, _ = self._component("vision")
        return jax.jit(models.build(cfg).apply, static_argnames="with_pooled")

    @functools.cached_property
    def _mllm_forward(self):
        return jax.jit(structure.forward, static_argnums=0, static_argnames="mode")

    def logits(self, input_ids, attention_mask=None, *, images=None, mode: str | None = None, segment_ids=None,
               positions=None) -> np.ndarray:
        """Next-token logits (batch, seq, vocab), float32 numpy.

        `attention_mask` (1 = token, 0 = padding) or `segment_ids` (packed samples 1, 2, ...;
        padding 0) say which tokens belong together; positions restart in every segment
        unless given. Logits at padding positions are meaningless.

        `images`: (batch, P, S, S, 3) tiles, uint8 (normalised on device) or normalised
        float (HF `pixel_values`), each row's in the order of its image tokens
        (`model.requests.encode` makes them from files). `mode` defaults to "multimodal" with
        images and "text" (the base LLM alone) without.
        """
        mode = self._mode(mode, images is not None)
        _, params = self._component("llm")
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integer (batch, seq), got {ids.dtype} {ids.shape}")
        vocab = self.configs["llm"].vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"input_ids outside [0, {vocab}): min {ids.min()}, max {ids.max()}")
        if segment_ids is None:
            segment_ids = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        elif attention_mask is not None:
            raise ValueError("give attention_mask or segment_ids, not both")
        segment_ids = np.asarray(segment_ids, np.int32).reshape(ids.shape)
        positions = (positions_from_segments(segment_ids) if positions is None
                     else np.asarray(positions, np.int32).reshape(ids.shape))
        if not self.is_mllm:
            out = self._llm_forward({"params": params}, jnp.asarray(ids, jnp.int32),
                                    jnp.asarray(positions), jnp.asarray(segment_ids))
            return np.asarray(out, np.float32)
        if images is not None:
            images = inference.checked_tiles(images)
            size = self.mcfg.vision.image_size
            if images.ndim != 5 or images.shape[0] != ids.shape[0] or images.shape[2:] != (size, size, 3):
                raise ValueError(f"images must be (batch={ids.shape[0]}, P, {size}, {size}, 3) tiles, "
                                 f"got shape {images.shape}")
            structure.check_image_tokens(ids * (segment_ids > 0), self.mcfg.image_token_id,
                                         np.ones(images.shape[:2], bool), self.mcfg.tokens_per_tile)
        elif mode != "text" and (ids == self.mcfg.image_token_id).any():
            raise ValueError(f"input_ids hold image tokens (id {self.mcfg.image_token_id}) but no images were given")
        out = self._mllm_forward(self.mcfg, self.params, jnp.asarray(ids, jnp.int32), jnp.asarray(positions),
                                 jnp.asarray(segment_ids), None if images is None else jnp.asarray(images),
                                 mode=mode)
        return np.asarray(out, np.float32)

    def vision_features(self, pixel_values, *, with_pooled: bool = False):
        """SigLIP features of NHWC images, uint8 or normalised to [-1, 1] float: {"tokens",
        "pooled"} numpy."""
        _, params = self._component("vision")
        pixels = inference.checked_tiles(pixel_values, "pixel_values")
        out = self._vision_forward({"params": params}, jnp.asarray(pixels),
                                   with_pooled=with_pooled)
        return {k: None if v is None else np.asarray(v, np.float32) for k, v in out.items()}

    # --- generation -----------------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        """Longest prompt + answer a request may have: the LLM's `max_position_embeddings`."""
        return int(self.configs["llm"].max_position_embeddings)

    def generate(self, prompt, images=None, *, mode: str | None = None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] | None = None,
                 chat: bool = True, return_tokens: bool = False,
                 on_token: Callable[[int, int], bool | None] | None = None,
                 chat_template_kwargs: dict | None = None):
        """Generates the answer to `prompt` (a string, chat turns, or token ids); a list of
        prompts is a batch (then `images` is a list with one entry per prompt: None or a
        list of images). Returns the decoded text (a list for a batch); with
        `return_tokens`, also the `inference.GenerationResult`s, one per mode group.

        Each request is routed by its own content: without images it runs the base LLM
        ("text"), with images the multimodal path, unless `mode` forces one for all. Text
        requests of a batch and image requests run as two sub-batches. Prompts are rendered by
        the model's chat template (`requests`; `chat_template_kwargs`, e.g. {"enable_thinking":
        False}, over the trained options, for every prompt of the call); `chat=False` tokenizes
        text as it is, BOS added where the tokenizer adds one. Stops at every token of
        `requests.stop_tokens` (generation_config.json's eos ids, the tokenizer's eos token, the
        template's end of turn; or `stop_tokens`), at `max_new_tokens`, or at the context limit
        (`max_context`, checked up front).

        `on_token(i, token)` (streaming): called with each answer token of request i as it
        is decoded (never its stop token, nothing after it). Returning True says request i
        needs no more tokens; a sub-batch ends once each of its requests has stopped or
        said so (the texts returned hold every token generated until then).
        """
        batch = (isinstance(prompt, (list, tuple)) and len(prompt) > 0
                 and not isinstance(prompt[0], (int, np.integer, dict)))
        prompts = list(prompt) if batch else [prompt]
        if batch:
            image_lists = [None] * len(prompts) if images is None else list(images)
            if len(image_lists) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(image_lists)} image lists (one per prompt)")
        else:
            image_lists = [images]
        requests = []
        for i, (p, ims) in enumerate(zip(prompts, image_lists)):
            where = f"prompt {i}"
            token_list = isinstance(p, (list, tuple)) and p and isinstance(p[0], (int, np.integer))
            if isinstance(p, np.ndarray) or token_list:
                if ims:
                    raise ValueError(f"{where}: token-id prompts take no images; give text (the template places them)")
                requests.append((list(map(int, p)), None))
                continue
            req = self.requests.encode(p, ims or (), chat=chat, where=where, template_kwargs=chat_template_kwargs)
            requests.append((req.tokens, req.tiles if len(req.tiles) else None))
        for i, (tokens, _) in enumerate(requests):
            if len(tokens) + max_new_tokens > self.max_context:
                raise ValueError(f"prompt {i}: {len(tokens)} tokens + max_new_tokens={max_new_tokens} exceed the "
                                 f"model's context of {self.max_context} tokens (max_position_embeddings)")
        modes = [self._mode(mode, tiles is not None) for _, tiles in requests]
        if stop_tokens is None:
            stop_tokens = self.requests.stop_tokens if self.tokenizer_path else ()
        key = jax.random.key(seed)
        texts: list[Any] = [None] * len(requests)
        results = []
        for group_mode in dict.fromkeys(modes):
            rows = [i for i, m in enumerate(modes) if m == group_mode]
            tiles = stack_tiles([requests[i][1] if requests[i][1] is not None else
                                     np.zeros((0, 1, 1, 3), np.float32) for i in rows])
            mcfg = self.mcfg if self.is_mllm else self.configs["llm"]
            result = inference.generate(mcfg, self.params, [requests[i][0] for i in rows], mode=group_mode,
                                        images=tiles, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_p=top_p, key=key, stop_tokens=tuple(stop_tokens),
                                        on_step=None if on_token is None else
                                        _token_callback(on_token, rows, stop_tokens))
            results.append(result)
            for j, i in enumerate(rows):
                row = result.row(j)
                if result.finished[j]:
                    row = row[:-1]  # the stop token
                texts[i] = self.tokenizer.decode(row.tolist()) if self.tokenizer_path else row
        if return_tokens:
            return (texts if batch else texts[0]), results
        return texts if batch else texts[0]

    # --- saving ---------------------------------------------------------------------------------

    def save(self, path: str, *, overwrite: bool = False) -> str:
        """Writes this model as a standalone genieblue_jax checkpoint (e.g. a workdir's model,
        so it no longer needs the workdir, its init checkpoints or its data): its tokenizer with
        the files beside it (tokenizer_config.json, the chat template, generation_config.json)
        and how it renders chats (`chat`)."""
        if self.is_mllm:
            return checkpoint.save_mllm(path, self.mcfg, self.params, tokenizer=self.tokenizer_path,
                                        preprocessing=self.preprocessing, source=self.source, chat=self.chat,
                                        overwrite=overwrite)
        return checkpoint.save(path, self.configs, self.params, tokenizer=self.tokenizer_path, source=self.source,
                               chat=self.chat, overwrite=overwrite)


def _token_callback(on_token, rows: list[int], stop_tokens) -> Callable[[int, np.ndarray], bool]:
    """`inference.generate`'s on_step over a sub-batch -> `on_token(request, token)` per
    live row; True (end the loop) once every row has stopped or declined more tokens."""
    stops, done = set(map(int, stop_tokens)), [False] * len(rows)

    def on_step(_, tokens: np.ndarray) -> bool:
        for j, i in enumerate(rows):
            if not done[j]:
                token = int(tokens[j])
                done[j] = token in stops or bool(on_token(i, token))
        return all(done)

    return on_step


def _find_tokenizer(directory: str | None) -> str | None:
    if directory and any((paths.path(directory) / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        return directory
    return None


def load(path: str, *, mesh=None, step: int | None = None) -> GenieBlue:
    """Loads a training workdir, a genieblue_jax checkpoint, or an HF model directory.

    A workdir gives its latest checkpoint (or `step`); `WORKDIR/checkpoints/<step>` names
    a step directly. Errors name the path and what is missing."""
    path = os.fspath(paths.path(path))  # local paths made absolute; gs:// as it is
    if not paths.path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    parent = paths.path(path).parent
    if (parent.name == "checkpoints" and paths.path(path).name.isdigit()
            and workdir.is_workdir(os.fspath(parent.parent))):
        return load(os.fspath(parent.parent), mesh=mesh, step=int(paths.path(path).name))
    if checkpoint.is_checkpoint(path):
        configs, params, meta = checkpoint.restore(path, mesh=mesh)
        mllm = meta.get("mllm")
        return GenieBlue(configs, params, path=path, mesh=mesh, mcfg=meta.get("mllm_config"),
                         tokenizer=_find_tokenizer(checkpoint.assets_dir(path)),
                         preprocessing=mllm.get("preprocessing") if mllm else None, source=meta.get("source"),
                         chat=meta.get("chat"))
    if workdir.is_workdir(path):
        t = workdir.load_trained(path, step=step, mesh=mesh)
        configs = {"llm": t.mcfg.llm, "vision": t.mcfg.vision, "projector": t.mcfg.projector}
        return GenieBlue(configs, t.params, path=path, mesh=mesh, mcfg=t.mcfg, tokenizer=t.tokenizer,
                         preprocessing=workdir.preprocessing(t.config),
                         source={"workdir": path, "step": t.step, **t.meta}, chat=t.config.chat())
    if (paths.path(path) / "config.json").is_file():
        name, cfg, params = import_hf(path, mesh=mesh)
        return GenieBlue({name: cfg}, {name: params}, path=path, mesh=mesh, tokenizer=_find_tokenizer(path),
                         source={"hf_dir": path})
    raise FileNotFoundError(f"{path} is neither a training workdir (config.json + checkpoints/), a genieblue_jax "
                            f"checkpoint ({checkpoint.META_FILE}) nor a Hugging Face model directory (config.json)")
