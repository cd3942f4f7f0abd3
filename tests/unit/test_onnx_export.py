"""The exporter's rewrite of open_clip's attention: the same numbers as torch's
nn.MultiheadAttention, and a compact graph (speed is measured in bench/bench_runtime.py)."""

import onnx
import pytest
import torch

from imgembed import ImageEmbeddingService
from imgembed.models.onnx_export import _SelfAttention
from tests.conftest import TINY


@pytest.fixture
def attention():
    torch.manual_seed(3)
    module = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    torch.nn.init.normal_(module.in_proj_bias)  # torch starts it at zero
    return module


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_equals_torch_s(attention, causal):
    x = torch.randn(3, 10, 64)
    mask = torch.full((10, 10), float("-inf")).triu(1) if causal else None
    with torch.no_grad():
        expected = attention(x, x, x, need_weights=False, attn_mask=mask)[0]
        actual, weights = _SelfAttention(attention)(x, x, x, need_weights=False, attn_mask=mask)
    assert weights is None
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_other_uses_fall_back_to_torch_s_module(attention):
    """Cross-attention, padding masks and returned weights are not rewritten."""
    x, memory = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[:, -1] = True
    ours = _SelfAttention(attention)
    with torch.no_grad():
        for args, kwargs in [
            ((x, memory, memory), {"need_weights": False}),
            ((x, x, x), {"key_padding_mask": padding, "need_weights": False}),
            ((x, x, x), {}),  # need_weights defaults to True, as in torch
        ]:
            expected = attention(*args, **kwargs)
            actual = ours(*args, **kwargs)
            torch.testing.assert_close(actual[0], expected[0])
            assert (actual[1] is None) == (expected[1] is None)


def test_only_batch_first_self_attention_fits():
    assert _SelfAttention.fits(torch.nn.MultiheadAttention(8, 2, batch_first=True))
    assert not _SelfAttention.fits(torch.nn.MultiheadAttention(8, 2))  # sequence first
    assert not _SelfAttention.fits(torch.nn.MultiheadAttention(8, 2, batch_first=True, kdim=4))
    assert not _SelfAttention.fits(torch.nn.MultiheadAttention(8, 2, batch_first=True, bias=False))
    assert not _SelfAttention.fits(torch.nn.Linear(8, 8))


def test_exported_towers_use_the_compact_attention(tmp_path):
    """torch's own module exported as 8 transposes per layer; the rewrite needs 4 (q, k, v and
    the output), and onnxruntime folds the one of k into its matrix product."""
    with ImageEmbeddingService(runtime="onnx", model_cache_dir=tmp_path, **TINY) as service:
        encoder = service.encoder
        for tower in ("visual", "text"):
            graph = onnx.load(encoder.folder / encoder.manifest["towers"][tower]).graph
            ops = [node.op_type for node in graph.node]
            heads = ops.count("Softmax")  # one per attention layer
            assert heads >= 1
            assert ops.count("Transpose") <= 4 * heads + 2, tower
