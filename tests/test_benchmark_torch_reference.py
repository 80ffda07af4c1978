"""The PyTorch reference of genieblue_jax/cli/benchmark_torch_reference.py trains what it claims to train.

Hand-derived parameter counts (demo-qwen2 / demo-siglip, as hard-coded in the tool):

LLM block (hidden 256, 4 heads x 64 = 256, 2 KV heads x 64 = 128, MLP 704; Qwen2 q/k/v biases):
    q 256*256 + 256 = 65,792   k 256*128 + 128 = 32,896   v 32,896   o 256*256 = 65,536
    gate = up = down = 256*704 = 180,224 each -> 540,672     2 RMSNorms 2*256 = 512
    block = 65,792 + 2*32,896 + 65,536 + 540,672 + 512 = 738,304
LLM = 8 * 738,304 + embedding 512*256 (tied head) 131,072 + final norm 256 = 6,037,760
LoRA r=8 per block, r*(in + out) per target:
    q 8*(256+256) = 4,096   k 8*(256+128) = 3,072   v 3,072   o 4,096
    gate = up = down = 8*(256+704) = 7,680 each -> 23,040
    per block = 4,096 + 2*3,072 + 4,096 + 23,040 = 37,376
SigLIP (hidden 128, MLP 256, 4 layers, 7x7 patches of 8x8x3, no head):
    patch conv 3*8*8*128 + 128 = 24,704   positions 49*128 = 6,272
    layer = 2 LayerNorms 2*256 + q/k/v/o 4*(128*128 + 128) = 66,048
            + fc1 128*256 + 256 = 33,024 + fc2 256*128 + 128 = 32,896 -> 132,480
    post LayerNorm 256 -> vision = 24,704 + 6,272 + 4*132,480 + 256 = 561,152
Projector: LayerNorm(512) 1,024 + Linear(512, 256) 131,328 + Linear(256, 256) 65,792 = 198,144
vision + projector = 759,296

stage2_skip: trainable 2*738,304 + 6*37,376 + 759,296 = 2,460,160
             total     6,037,760 + 2*738,304 + 6*37,376 + 759,296 = 8,497,920 (base + copies + LoRA)
lora:        trainable 8*37,376 + 759,296 = 1,058,304;  total 6,037,760 + 1,058,304 = 7,096,064
full_ft:     trainable = total = 6,037,760 + 759,296 = 6,797,056
"""
import math

import pytest
import torch

from genieblue_jax.cli import benchmark_torch_reference as ref_tool

EXPECTED = {  # variant: (trainable, total)
    "stage2_skip": (2_460_160, 8_497_920),
    "lora": (1_058_304, 7_096_064),
    "full_ft": (6_797_056, 6_797_056),
}


@pytest.fixture
def one_thread():
    """Tiny shapes gain nothing from threads, and on a busy 2-core machine a 2-thread
    OpenMP pool spins at its barriers (a 0.1 s step became seconds); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", ref_tool.VARIANTS)
def test_one_step_trains_exactly_the_trainable_set(variant, one_thread):
    ref = ref_tool.build_model(variant, seed=0)
    assert (ref.num_trainable(), ref.num_total()) == EXPECTED[variant]
    assert ref.model.llm.config._attn_implementation == "sdpa"

    trainable, frozen = ref.trainable(), ref.frozen()
    assert not set(map(id, trainable.values())) & set(map(id, frozen.values()))
    if variant == "full_ft":
        assert not frozen
    before = {name: p.detach().clone() for name, p in {**trainable, **frozen}.items()}

    tokens, images = ref_tool.make_batch(batch_size=1, seq_len=96, tiles_per_row=1, seed=0)
    loss = ref_tool.train_step(ref, ref_tool.make_optimizer(ref), tokens, images)
    assert math.isfinite(loss)

    unchanged = [n for n, p in frozen.items() if not torch.equal(p, before[n])]
    assert not unchanged, f"frozen parameters changed: {unchanged[:5]}"
    # Every trainable tensor moves: by its gradient, or (LoRA A, whose first gradient is 0
    # because B starts at 0) by the decoupled weight decay.
    not_moved = [n for n, p in trainable.items() if torch.equal(p, before[n])]
    assert not not_moved, f"trainable parameters did not change: {not_moved[:5]}"

    if variant == "stage2_skip":
        base_layers, mm_layers = ref.base.model.layers, ref.model.llm.model.layers
        for i in range(8):
            base_q, mm_q = base_layers[i].self_attn.q_proj.weight, mm_layers[i].self_attn.q_proj.weight
            if i in (0, 4):  # replicated: a trained copy, the base block untouched
                assert i in ref.replicated_layers and mm_q is not base_q and mm_q.requires_grad
                assert not torch.equal(mm_q, base_q)
            else:            # LoRA on the shared, frozen base tensor
                assert mm_q is base_q and not mm_q.requires_grad
                assert hasattr(mm_layers[i].self_attn.q_proj, "lora_A")
        assert ref.model.llm.get_input_embeddings().weight is ref.base.get_input_embeddings().weight


def test_downsample_matches_vila_flat_square():
    # The reference's projector is the exporter's PyTorch one (export.torch_modules); the worked
    # example of genieblue_jax.models.projector.vila_downsample (ids + 1; 0 = pad) holds for it.
    from genieblue_jax.export.torch_modules import vila_downsample
    x = (torch.arange(9.0) + 1).reshape(1, 9, 1)
    assert vila_downsample(x)[0].tolist() == [[1, 2, 4, 5], [7, 8, 0, 0], [3, 0, 6, 0], [9, 0, 0, 0]]
