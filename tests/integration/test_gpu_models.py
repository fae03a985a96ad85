"""Patched tiny models on the GPU (bf16): the Triton path end to end, including estimation."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import sparseprefill  # noqa: E402
from sparseprefill import SparseConfig, VerticalSlashConfig  # noqa: E402

from tests.tiny_models import random_ids, tiny_model  # noqa: E402

LENGTH = 2000
# bf16 logits of two attention implementations differ by rounding: relative error ~1e-2.
BF16_REL = 3e-2


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3_text", "phi3"])
@pytest.mark.parametrize("pattern", ["auto", "block_sparse", "antidiagonal"])
def test_keep_everything_on_gpu_matches_unpatched(family, pattern):
    model = tiny_model(family).to("cuda", torch.bfloat16)
    ids = random_ids(LENGTH).cuda()
    with torch.no_grad():
        reference = model(ids).logits.float()
    sparseprefill.patch(model, SparseConfig.keep_everything(pattern=pattern))
    with torch.no_grad():
        patched = model(ids).logits.float()
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    assert stats.phases["sparse_prefill"] + stats.phases["sliding_window_exact"] == model.config.num_hidden_layers
    assert float((patched - reference).norm() / reference.norm()) < BF16_REL


def test_default_lossy_config_on_gpu_is_sparse_and_generates():
    model = tiny_model("llama", qk_scale=8.0).to("cuda", torch.bfloat16)
    ids = random_ids(LENGTH).cuda()
    config = SparseConfig(min_sparse_len=0, vertical_slash=VerticalSlashConfig(vertical_mass=0.5, slash_mass=0.5,
                                                                               max_vertical=128, max_slash=32))
    sparseprefill.patch(model, config)
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    stats = sparseprefill.stats(model)
    sparseprefill.unpatch(model)
    assert tokens.shape[1] == LENGTH + 4
    assert stats.density < 1.0 and stats.fallbacks["decode"] == 3 * model.config.num_hidden_layers
