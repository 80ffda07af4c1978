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


# Modules whose module-scoped set-up takes minutes, longest first: with `--dist loadscope`
# (setup.cfg) each goes to one worker, and starting them first keeps them off the tail.
SLOW_MODULES = ("tests/test_demo.py", "tests/test_user_path.py")


def pytest_collection_modifyitems(config, items):
    rank = {m: i for i, m in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


def pytest_unconfigure(config):
    if _XLA_CACHE_OWNED:
        import shutil
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
