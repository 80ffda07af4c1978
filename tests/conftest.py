"""Shared test set-up: 8 virtual CPU devices, float32 everywhere, tiny random HF models.

Every reference model is a randomly initialised `transformers` model built here and saved
with `save_pretrained` (safetensors): no hub access, no downloaded weights.
"""
import os

# Tests compile far more than they run: XLA:CPU compilation is ~3/4 of a typical test's time
# (tests/structure + tests/inference on 2 cores: 430 of 591 s). LLVM at -O0 compiles a third
# faster and its code runs ~2x slower, the right trade for tiny models (those tests: 591 -> 447 s,
# same results within their tolerances). Every test process and subprocess gets it (xla_flags());
# the reduced demo, minutes of running whose measured bounds depend on the default code
# generation, runs as a subprocess without it (tests/test_demo.py).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a test's subprocess: `devices` virtual CPU devices, compiled at -O0."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


# Must be set before jax is imported anywhere: lets sharding tests build real meshes on CPU,
# and compiles with the demo's numerics flags (experiments.demo.pin_cpu_numerics: the reduced
# demo's measured bounds were made with them).
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
from experiments.demo import pin_cpu_numerics  # noqa: E402  (imports no jax)

pin_cpu_numerics()
# CPU only: parity tolerances assume exact float32 matmuls (no TF32 on a lent GPU).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One XLA compilation cache per test run, made by the pytest process that starts the run and
# inherited by both xdist workers and every subprocess the tests start (CLIs, multi-process
# workers). The suite compiles the same small programs many times over (every train() call,
# every init of the same tiny model), and XLA:CPU compilation, not running, is most of its
# time: the cache cut the structure tests from 240 s to 158 s. It starts empty every run
# (nothing carries over between runs) and is removed at the end (pytest_unconfigure).
_XLA_CACHE_OWNED = "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _XLA_CACHE_OWNED:
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="genieblue_jax_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402

# The test extra (pip install -e .[test]) is required; a missing one fails, it never skips.
import torch  # noqa: E402
import transformers  # noqa: E402

# Tiny decoder configs covering both families; layers, heads, KV heads and rope theta vary.
QWEN2_CONFIGS = {
    "qwen2-a": dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                    tie_word_embeddings=True, max_position_embeddings=256),
    "qwen2-b": dict(vocab_size=257, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
                    num_attention_heads=6, num_key_value_heads=1, rope_theta=10000.0,
                    tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=256),
}
LLAMA_CONFIGS = {
    "llama-a": dict(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, rope_theta=10000.0,
                    tie_word_embeddings=False, max_position_embeddings=256),
    "llama-b": dict(vocab_size=321, hidden_size=80, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=5, num_key_value_heads=5, rope_theta=500000.0,
                    tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=256),
}
SIGLIP_CONFIG = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     num_channels=3, image_size=30, patch_size=6)  # 5 x 5 grid, odd like 27 x 27


def build_hf_decoder(name: str, seed: int = 0):
    torch.manual_seed(seed)
    if name in QWEN2_CONFIGS:
        cfg = transformers.Qwen2Config(**QWEN2_CONFIGS[name])
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**LLAMA_CONFIGS[name])
        model = transformers.LlamaForCausalLM(cfg)
    # Random init leaves norms at 1 and biases at 0; perturb every tensor so that a swapped
    # or transposed weight cannot hide.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def build_hf_siglip(use_head: bool = True, full_model: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    vision = transformers.SiglipVisionConfig(vision_use_head=use_head, **SIGLIP_CONFIG)
    if full_model:
        text = transformers.SiglipTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                                             num_hidden_layers=1, num_attention_heads=4,
                                             max_position_embeddings=16)
        model = transformers.SiglipModel(transformers.SiglipConfig(
            text_config=text.to_dict(), vision_config=vision.to_dict()))
    else:
        model = transformers.SiglipVisionModel(vision)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(scope="session")
def hf_decoder_dir(tmp_path_factory):
    """Factory: saved HF decoder directory for a config name (cached per session)."""
    cache = {}

    def make(name: str):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            build_hf_decoder(name).save_pretrained(path, safe_serialization=True)
            cache[name] = str(path)
        return cache[name]

    return make


@pytest.fixture(scope="session")
def hf_siglip_dir(tmp_path_factory):
    cache = {}

    def make(use_head: bool = True, full_model: bool = False):
        key = (use_head, full_model)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"siglip_{int(use_head)}{int(full_model)}")
            build_hf_siglip(use_head, full_model).save_pretrained(path, safe_serialization=True)
            cache[key] = str(path)
        return cache[key]

    return make


# The longest modules (minutes each on 2 cores), longest first: with `--dist loadscope`
# (setup.cfg) each goes to one worker, and starting them first keeps them off the tail, where
# one worker would run a long module while the other has nothing left.
SLOW_MODULES = ("tests/test_demo.py", "tests/test_user_path.py", "tests/train/test_trainer.py",
                "tests/structure/test_scan_layers.py", "tests/export/test_qnn_families.py",
                "tests/train/test_multihost.py", "tests/test_families_end_to_end.py", "tests/train/test_gcs.py")


def pytest_collection_modifyitems(config, items):
    rank = {m: i for i, m in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


def pytest_unconfigure(config):
    if _XLA_CACHE_OWNED:
        import shutil
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# --- tokenizers of the chat-template families ------------------------------------------------
# Small BPE tokenizers built with the `tokenizers` library in each family's layout (its special
# tokens, pre-tokenizer and post-processor, tokenizer_config.json as its hub repo writes it, its
# published chat template from tests/chat_templates/), for chat-template tests: transformers'
# AutoTokenizer loaded from the directory is the reference. No hub access.

CHAT_TEMPLATES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_templates")
QWEN_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                    r"\s*[\r\n]+|\s+(?!\S)|\s+")  # transformers' Qwen2Tokenizer
LLAMA3_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                      r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
_LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                    *[f"<|reserved_special_token_{n}|>" for n in range(3, 8)]]
# SmolLM3 renamed Llama 3's reserved tokens 0, 1, 3..10 to its think / chat / tool tokens.
_SMOLLM3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", ("<think>", False), ("</think>", False),
                     "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
                     "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|im_start|>", "<|im_end|>",
                     ("<tool_response>", False), ("</tool_response>", False), ("<tool_call>", False),
                     ("</tool_call>", False), ("<code>", False), ("</code>", False),
                     *[f"<|reserved_special_token_{n}|>" for n in range(11, 14)]]
# Gemma 3: its leading specials, a few of its (non-special) <unusedN>, the turn tokens, the image tokens last
# (`<image_soft_token>` is one past gemma-3-1b's embedding table).
_GEMMA3_LEADING = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]"]
_GEMMA3_TRAILING = [*[(f"<unused{n}>", False) for n in range(4)], "<start_of_turn>", "<end_of_turn>",
                    "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
TOKENIZER_FAMILIES = {
    # family: template file, tokenizer_config.json entries as the hub repo has them, generation_config eos names
    "qwen2.5": dict(template="qwen2.5-instruct.jinja", layout="qwen", specials=_QWEN_SPECIALS + [
        ("<tool_call>", False), ("</tool_call>", False)],
        config={"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "errors": "replace"},
        generation={"bos": "<|endoftext|>", "pad": "<|endoftext|>", "eos": ["<|im_end|>", "<|endoftext|>"]}),
    "qwen3": dict(template="qwen3.jinja", layout="qwen", specials=_QWEN_SPECIALS + [
        ("<tool_call>", False), ("</tool_call>", False), ("<tool_response>", False), ("</tool_response>", False),
        ("<think>", False), ("</think>", False)],
        config={"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "errors": "replace"},
        generation={"bos": "<|endoftext|>", "pad": "<|endoftext|>", "eos": ["<|im_end|>", "<|endoftext|>"]}),
    "llama3.2": dict(template="llama-3.2-instruct.jinja", layout="llama3", specials=_LLAMA3_SPECIALS,
                     config={"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                             "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True},
                     generation={"bos": "<|begin_of_text|>", "eos": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]}),
    "smollm3": dict(template="smollm3.jinja", layout="llama3", specials=_SMOLLM3_SPECIALS, template_file=True,
                    config={"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
                            "pad_token": "<|im_end|>", "clean_up_tokenization_spaces": True,
                            "extra_special_tokens": {}},
                    generation={"bos": "<|begin_of_text|>", "pad": "<|finetune_right_pad_id|>", "eos": ["<|im_end|>"]}),
    "gemma3": dict(template="gemma-3-it.jinja", layout="gemma", specials=_GEMMA3_TRAILING,
                   config={"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
                           "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>", "add_bos_token": True,
                           "add_eos_token": False, "spaces_between_special_tokens": False},
                   generation={"bos": "<bos>", "pad": "<pad>", "eos": ["<eos>", "<end_of_turn>"]}),
}
# What the tokenizers learn their merges from: the tests' conversations and the templates' own text.
TOKENIZER_CORPUS = [
    "What colour is the circle? The circle is red. What is 3 plus 4? The answer is seven.",
    "Describe the image. One red circle and two blue squares. Hello, how are you today?",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Be brief and answer in one word.",
    "system user assistant model\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n",
    "## Metadata\n\nKnowledge Cutoff Date: June 2025\nReasoning Mode: /think\n## Custom Instructions\n",
]


def published_chat_template(name: str) -> str:
    """A published chat template of tests/chat_templates/ (its README names the sources)."""
    with open(os.path.join(CHAT_TEMPLATES_DIR, name), encoding="utf-8") as f:
        return f.read()


def build_hf_tokenizer(family: str, out_dir: str, *, extra_eos: tuple = ()) -> str:
    """Writes a tokenizer of `family` (TOKENIZER_FAMILIES) into `out_dir`: tokenizer.json,
    tokenizer_config.json (with the published chat template, or SmolLM3's chat_template.jinja)
    and generation_config.json, whose eos ids are the family's plus the ids `extra_eos` (e.g. a
    token a random model's greedy continuation produces, to make generation stop). Returns out_dir."""
    import json

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    spec = TOKENIZER_FAMILIES[family]
    os.makedirs(out_dir, exist_ok=True)
    added = [(t, True) if isinstance(t, str) else t for t in spec["specials"]]
    if spec["layout"] == "gemma":
        # transformers' GemmaTokenizer: BPE with byte fallback over "▁"-joined text, one piece per byte
        # <0xNN>, its leading special tokens first
        learner = Tokenizer(BPE(unk_token="<unk>"))
        learner.normalizer = normalizers.Replace(" ", "▁")
        learner.train_from_iterator(TOKENIZER_CORPUS * 5, trainers.BpeTrainer(
            vocab_size=300, special_tokens=_GEMMA3_LEADING, show_progress=False))
        learned = json.loads(learner.to_str())["model"]
        vocab = {t: i for i, t in enumerate(_GEMMA3_LEADING)}
        vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
        for piece in sorted(learned["vocab"], key=learned["vocab"].get):
            vocab.setdefault(piece, len(vocab))
        tok = Tokenizer(BPE(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                 for m in learned["merges"]],
                            unk_token="<unk>", fuse_unk=True, byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _GEMMA3_LEADING])
    else:
        regex = QWEN_PRETOKENIZE if spec["layout"] == "qwen" else LLAMA3_PRETOKENIZE
        tok = Tokenizer(BPE())
        if spec["layout"] == "qwen":
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(TOKENIZER_CORPUS * 5, trainers.BpeTrainer(
            vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    for text, special in added:
        if special:
            tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        else:
            tok.add_tokens([AddedToken(text, special=False, normalized=False)])
    bos = spec["generation"].get("bos")
    if spec["layout"] == "gemma":
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                           special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    elif spec["layout"] == "llama3":  # Llama 3's tokenizer.json adds <|begin_of_text|> to every text
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    template = published_chat_template(spec["template"])
    config = dict(spec["config"])
    if spec.get("template_file"):
        with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template)
    else:
        config["chat_template"] = template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    gen = spec["generation"]
    eos = [tok.token_to_id(t) for t in gen["eos"]] + [int(i) for i in extra_eos]
    generation = {"bos_token_id": tok.token_to_id(gen["bos"]), "eos_token_id": eos}
    if "pad" in gen:
        generation["pad_token_id"] = tok.token_to_id(gen["pad"])
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    return out_dir
