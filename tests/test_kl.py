"""The chunked distillation loss equals the naive autograd formula, value and gradient."""

import pytest
import torch

from treeffn_hf.training.kl import chunked_kl, kl_naive


@pytest.mark.parametrize("shape", [(2, 7, 53), (1, 1, 5), (3, 33, 130)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk_rows", [1, 4, 32])
def test_chunked_kl_matches_naive(shape, temperature, chunk_rows):
    torch.manual_seed(0)
    student = (3 * torch.randn(shape)).requires_grad_(True)
    teacher = 3 * torch.randn(shape)
    naive = kl_naive(student, teacher, temperature)
    (naive_grad,) = torch.autograd.grad(2.0 * naive, student)
    fused = chunked_kl(student, teacher, temperature, chunk_rows=chunk_rows)
    (fused_grad,) = torch.autograd.grad(2.0 * fused, student)
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad, naive_grad, rtol=1e-4, atol=1e-7)
    assert fused.item() > 0


def test_chunked_kl_is_zero_on_equal_logits_and_keeps_low_precision_gradients():
    logits = torch.randn(2, 5, 40, dtype=torch.bfloat16, requires_grad=True)
    loss = chunked_kl(logits, logits.detach())
    loss.backward()
    assert abs(loss.item()) < 1e-5
    assert logits.grad.dtype == torch.bfloat16 and logits.grad.abs().max() < 1e-2


def test_chunked_kl_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        chunked_kl(torch.randn(2, 3, 10), torch.randn(2, 3, 11))
