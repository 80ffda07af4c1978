"""The one config schema every recipe fills in (ml_collections), demo and paper scale.

A recipe file is a few lines: `get_config(arg)` calls `base_config(scale)` and changes what
makes it that recipe (stage, variant, placement). `arg` is the text after the colon in
`--config=experiments/configs/stage2_skip.py:paper` (or `--config=stage2_skip:paper`):
"" / "demo" (default) or "paper".

Demo scale: the `demo-small-qwen2` LLM + `demo-siglip` ViT, the project's synthetic demo data
(written into the workdir when `data.sources` is empty), CPU-sized batches. Paper scale:
Qwen2.5-3B + SigLIP-so400m-384 and the hyper-parameters of SPEC / the paper's Appendix D;
init checkpoints and data paths must be given.
"""
from __future__ import annotations

import ml_collections

SCALES = ("demo", "paper")


def parse_arg(arg: str | None) -> str:
    """The scale a recipe's `arg` names: "demo" for None or "" (spaces stripped), else "demo" or
    "paper"; ValueError for anything else.

        >>> parse_arg(None), parse_arg(" paper ")
        ('demo', 'paper')
    """
    scale = (arg or "demo").strip() or "demo"
    if scale not in SCALES:
        raise ValueError(f"config argument {arg!r}: choose a scale from {SCALES} (e.g. --config=stage2_skip:paper)")
    return scale


def base_config(scale: str) -> ml_collections.ConfigDict:
    """Every key of a recipe at `scale` ("demo" or "paper", see `parse_arg`), set to a stage-2
    GenieBlue-Skip run: what a recipe file starts from before it changes its own keys.

        >>> base_config("demo").model.llm, base_config("paper").model.llm
        ('demo-small-qwen2', 'qwen2.5-3b')
    """
    c = ml_collections.ConfigDict()
    c.scale = scale
    paper = scale == "paper"

    c.model = ml_collections.ConfigDict()
    c.model.llm = "qwen2.5-3b" if paper else "demo-small-qwen2"    # preset (shape) of the LLM
    c.model.vit = "siglip-so400m-384" if paper else "demo-siglip"  # preset (shape) of the ViT
    c.model.variant = "genieblue"
    c.model.placement = "skip"
    c.model.interval = 4
    c.model.lora_rank = 8
    c.model.lora_alpha = 16.0
    # The image placeholder: one of the base tokenizer's own special tokens inside the LLM's embedding
    # table (its vocabulary and weights stay as they are). "auto": Qwen's <|image_pad|> when present, else
    # the lowest <|reserved_special_token_N|> (Llama 3), else <unusedN> (Gemma); a workdir records the choice.
    c.model.image_token = "auto"
    c.model.compute_dtype = "bfloat16" if paper else "float32"
    c.model.base_param_dtype = "bfloat16" if paper else "float32"  # the frozen base
    c.model.remat = paper  # recompute block activations in the backward pass
    # Blocks as lax.scan loops (models/scan.py): remat that holds on every backend, compile time flat in
    # depth. The small demo model runs ~10% faster unrolled on CPU.
    c.model.scan_layers = paper
    c.model.attention_chunk = 512 if paper else 128  # LLM attention: queries per block (0: all at once)
    c.model.attention_impl = "auto"  # splash on TPU, cuDNN on GPU, XLA on CPU; "xla" forces XLA ops

    c.init = ml_collections.ConfigDict()
    c.init.llm_checkpoint = ml_collections.FieldReference(None, field_type=str)  # tools.from_hf output
    c.init.vit_checkpoint = ml_collections.FieldReference(None, field_type=str)
    c.init.stage1_workdir = ml_collections.FieldReference(None, field_type=str)  # projector from stage 1
    # Components that start from random weights, asked for by name ("llm,vision,projector"): without
    # a checkpoint for one that is not named here, a run is refused (RunConfig.required_checkpoints).
    c.init.from_scratch = ""

    c.data = ml_collections.ConfigDict()
    # "name=DIR:weight,name=DIR:weight,..." (workdir.parse_sources); empty at demo scale: experiments.run
    # trains on the demo datasets, written into WORKDIR/demo_data (experiments.demo_data.with_demo_sources).
    c.data.sources = ""
    c.data.tokenizer = ml_collections.FieldReference(None, field_type=str)
    # How conversations become tokens (data_pipelines.chat): "auto" renders the tokenizer directory's own chat
    # template (chat_template.jinja / tokenizer_config.json's chat_template / chat_template.json) and falls back
    # to ChatML for a tokenizer without one (the demo's SentencePiece); "tokenizer" requires the template;
    # "chatml" always renders ChatML. A workdir records what "auto" chose.
    c.data.chat_template = "auto"
    # The template's options, a JSON object, e.g. '{"enable_thinking": false}' (Qwen3, SmolLM3).
    c.data.chat_template_kwargs = "{}"
    # The date a template that reads one (strftime_now: Llama 3.2's and SmolLM3's default system turn) renders in
    # training, so records do not change from day to day; "YYYY-MM-DD", or "" for the day of rendering.
    c.data.chat_date = "2026-01-01"
    c.data.seq_len = 4096 if paper else 256
    c.data.image_mode = "dynamic"
    c.data.max_tiles = 16 if paper else 4
    c.data.max_tiles_per_row = 20 if paper else 10
    c.data.num_workers = 8 if paper else 0
    # Threads / examples of read-ahead per pipeline (data_pipelines.pipeline.PipelineConfig): a
    # small buffer, as Grain's 500 costs Python time per example; paper scale reads from remote
    # storage through its worker processes, so it keeps more threads in flight.
    c.data.read_threads = 16 if paper else 1
    c.data.read_buffer = 64 if paper else 16
    # Global batches prepared ahead (host assembly + copy to the devices) in a background thread
    # while the current step runs; 0: in the training loop, between steps. Results are the same.
    c.data.prefetch = 1
    # A source with this many samples in a row rejected stops the run naming it and the reasons
    # (data_pipelines.pipeline.RejectionStreakError), instead of looping on a dataset it cannot use.
    c.data.max_rejects_in_a_row = 1000
    c.data.demo_examples = 3000
    # The global batch is packed by this many independent streams (data_pipelines.pipeline.
    # StreamBatchIterator), a multiple of the process count; fixed, it makes the batches the same
    # on any number of hosts. 0: one stream per process (the batches then follow the host count).
    c.data.streams = 0

    c.train = ml_collections.ConfigDict()
    c.train.stage = "stage2"
    c.train.steps = 53000 if paper else 150
    # The batch: rows per device per micro-step x (mesh data x fsdp) x micro-steps (trainer.batch_plan).
    # Paper scale states it per device, so it fits any pod mesh: 1 row of 4096 tokens per chip and
    # the paper's 10 accumulation steps. The paper's 6800 samples per step are a number of packed rows
    # that depends on the data's sample lengths (README, "Pod sizes"). Demo scale states the global
    # batch. Set one of the two (0: from the other).
    c.train.rows_per_device = 1 if paper else 0
    c.train.global_batch_size = 0 if paper else 8
    c.train.micro_batches = 10 if paper else 1
    c.train.loss_chunk = 512 if paper else 128   # LM head + cross-entropy this many positions at a time
    c.train.seed = 0
    c.train.log_every = 10 if paper else 1   # metrics.jsonl / TensorBoard row every this many steps (+ the last)
    c.train.max_bad_steps = 5
    c.train.peak_flops_per_device = 0.0  # for MFU; 0: from the device kind (train.metrics.peak_flops_per_device)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4 if paper else 1e-3
    c.optim.warmup_steps = 530 if paper else 10
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.05
    c.optim.clip_norm = 1.0
    c.optim.vit_layer_decay = 0.9
    c.optim.vit_lr_scale = 1.0   # extra LR factor for the whole vision tower

    # Paper scale shards parameters and optimizer state over all devices (FSDP); demo: data parallel.
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1} if paper else
                                       {"data": -1, "fsdp": 1, "tensor": 1})

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000 if paper else 50
    c.checkpoint.keep = 3

    # The embedded demo (experiments/demo.py; demo scale only): data, a base LLM pretrained on
    # the text tasks and the stage-1 projector are made and cached under cache_dir, then the
    # recipe trains around them and is evaluated on held-out questions.
    c.demo = ml_collections.ConfigDict()
    c.demo.enabled = not paper
    c.demo.cache_dir = ""  # "": a `demo` folder beside the workdir (experiments.demo.with_cache_dir)
    c.demo.train_examples = 6000
    c.demo.eval_examples = 300
    c.demo.pretrain_examples = 20000   # text tasks only
    c.demo.scene = "single"            # experiments.demo_data.SCENES: what the images show
    c.demo.pretrain_steps = 300
    c.demo.vision_steps = 400
    c.demo.stage1_steps = 60
    c.demo.evaluate = True
    return c


def stage1(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Stage 1 (paper Appendix D): projector only, single 384 px tile."""
    paper = c.scale == "paper"
    c.train.stage = "stage1"
    c.data.image_mode = "single"
    c.train.steps = 3434 if paper else 60
    c.train.rows_per_device = 4 if paper else 0   # paper: 720 samples a step, single 384-px tile each
    c.train.global_batch_size = 0 if paper else 8
    c.train.micro_batches = 1
    c.optim.lr = 1e-3 if paper else 3e-3
    c.optim.warmup_steps = 34 if paper else 5
    return c
