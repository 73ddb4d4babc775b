"""What of the CUDA backend's Python side runs without a GPU: input preparation and the refusal reasons."""
import pytest
import torch

from dash_kernels.ops.mixed_attention import cuda_op


def test_rows_aligned_keeps_aligned_views_and_copies_the_rest():
    base = torch.zeros(2, 10, 4, 64, dtype=torch.bfloat16)
    assert cuda_op._rows_aligned(base) is base
    strided = base.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # [B, H, T, D] storage seen as [B, T, H, D]
    assert cuda_op._rows_aligned(strided).data_ptr() == strided.data_ptr()  # strides are multiples of 8: kept
    flat = torch.zeros(1 + 2 * 10 * 4 * 64, dtype=torch.bfloat16)
    shifted = flat[1:].view(2, 10, 4, 64)  # contiguous, but 2 bytes off a 16-byte boundary
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    fixed = cuda_op._rows_aligned(shifted)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, shifted)
    odd = torch.zeros(2, 10, 4, 72, dtype=torch.bfloat16)[..., :64]  # last dim contiguous, row strides fine
    assert cuda_op._rows_aligned(odd).data_ptr() == odd.data_ptr()
    column = torch.zeros(2, 10, 64, 4, dtype=torch.bfloat16).transpose(2, 3)  # head dim not contiguous
    assert cuda_op._rows_aligned(column).stride(-1) == 1


def test_refusal_names_the_missing_extension(monkeypatch):
    monkeypatch.setattr(cuda_op, "cuda_extension_available", lambda: False)
    q = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
    assert "not built" in cuda_op.unsupported_reason(q, q, 2)


@pytest.mark.skipif(not cuda_op.cuda_extension_available(), reason="dash_kernels._C not built")
def test_refusal_names_a_cpu_tensor():
    q = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
    assert "CUDA tensors" in cuda_op.unsupported_reason(q, q, 2)
