"""The chunked distillation losses equal their naive autograd formulas, value and gradient."""

import pytest
import torch

from treeffn_hf.training.kl import chunked_kl, kl_naive, teacher_top_k, top_k_kl, top_k_kl_naive


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


@pytest.mark.parametrize("shape, k", [((2, 7, 53), 5), ((1, 1, 5), 2), ((3, 33, 130), 16)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk_rows", [1, 32])
def test_top_k_kl_matches_naive_and_bounds_the_full_kl_from_below(shape, k, temperature, chunk_rows):
    torch.manual_seed(0)
    student = (3 * torch.randn(shape)).requires_grad_(True)
    teacher = 3 * torch.randn(shape)
    log_p, ids = teacher_top_k(teacher, k, temperature, chunk_rows=chunk_rows)
    assert log_p.shape == ids.shape == shape[:-1] + (k,) and ids.dtype == torch.int32
    torch.testing.assert_close(log_p, torch.log_softmax(teacher / temperature, -1).topk(k).values)
    naive = top_k_kl_naive(student, log_p, ids, temperature)
    (naive_grad,) = torch.autograd.grad(2.0 * naive, student)
    fused = top_k_kl(student, log_p, ids, temperature, chunk_rows=chunk_rows)
    (fused_grad,) = torch.autograd.grad(2.0 * fused, student)
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad, naive_grad, rtol=1e-4, atol=1e-7)
    assert 0 < fused.item() < kl_naive(student, teacher, temperature).item()


def test_top_k_kl_over_the_whole_vocabulary_is_the_full_kl():
    torch.manual_seed(1)
    student = (2 * torch.randn(3, 9, 40)).requires_grad_(True)
    teacher = 2 * torch.randn(3, 9, 40)
    full = chunked_kl(student, teacher, 1.5)
    (full_grad,) = torch.autograd.grad(full, student)
    top = top_k_kl(student, *teacher_top_k(teacher, 40, 1.5), 1.5)
    (top_grad,) = torch.autograd.grad(top, student)
    torch.testing.assert_close(top, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(top_grad, full_grad, rtol=1e-3, atol=1e-6)
