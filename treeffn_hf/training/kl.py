"""The distillation loss, T^2 * mean over tokens of KL(teacher || student) on logits softened by T.

`kl_naive` is the plain autograd formula (the oracle of the tests and the benchmark).
`chunked_kl` computes the same value and its gradient in one pass over blocks of rows, as
Liger-Kernel's fused losses do: each block of (rows, vocab) logits is turned into log-probs,
loss and gradient while it sits in cache, and the gradient is kept for backward. The autograd
formula instead makes about a dozen full passes over the (tokens, vocab) logits in forward and
backward, which on a CPU cost as much time as the LM head's matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows per block: 32 x 49152 fp32 logits are 6 MiB, three such blocks fit in a server's L2 + L3 share.
CHUNK_ROWS = 32


def kl_naive(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


class _GradientInForward(torch.autograd.Function):
    """A loss whose forward also computes its gradient in the student logits (its first input),
    block by block while each block is in cache; backward only scales it."""

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        others = (None,) * ctx.other_inputs
        return (None if grad is None else (grad * grad_output).reshape(ctx.shape), *others)


def _keep_gradient(ctx, grad, shape: torch.Size, other_inputs: int) -> None:
    ctx.save_for_backward(grad)
    ctx.shape, ctx.other_inputs = shape, other_inputs


class _ChunkedKL(_GradientInForward):
    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                chunk_rows: int) -> torch.Tensor:
        vocab = student_logits.shape[-1]
        student = student_logits.detach().reshape(-1, vocab)
        teacher = teacher_logits.detach().reshape(-1, vocab)
        rows = student.shape[0]
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for first in range(0, rows, chunk_rows):
            block = slice(first, first + chunk_rows)
            s = student[block].to(torch.float32, copy=True)
            t = teacher[block].to(torch.float32, copy=True)
            if temperature != 1.0:
                s.div_(temperature)
                t.div_(temperature)
            s.sub_(torch.logsumexp(s, dim=-1, keepdim=True))  # log q (student)
            t.sub_(torch.logsumexp(t, dim=-1, keepdim=True))  # log p (teacher)
            p = t.exp()
            t.sub_(s)  # log p - log q
            total += torch.linalg.vecdot(p, t).sum()
            if grad is not None:
                # d/ds of T^2 * KL / rows, with s the raw logits: T * (q - p) / rows
                grad[block] = s.exp_().sub_(p).mul_(temperature / rows)
        _keep_gradient(ctx, grad, student_logits.shape, other_inputs=3)
        return total * (temperature**2 / rows)


def chunked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """`kl_naive` computed blockwise with its gradient (no gradient flows to the teacher)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    return _ChunkedKL.apply(student_logits, teacher_logits, float(temperature), chunk_rows)


# The teacher kept as its top-k: KL between the teacher's and the student's distributions coarsened
# to the k tokens the teacher ranks first plus one bucket for the rest of the vocabulary. It is a
# lower bound of the full KL (coarsening never adds divergence) and equals it when the teacher puts
# no mass outside its top k. Its gradient in the student's softened logits z is q - p on the k
# tokens and q * (1 - p_rest / q_rest) elsewhere.


def teacher_top_k(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0,
                  chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, token ids) of the teacher's k most likely tokens at `temperature`, each
    (..., k): log-probs in float32, ids in int32 (what a cache keeps: 8k bytes a token)."""
    vocab = teacher_logits.shape[-1]
    flat = teacher_logits.detach().reshape(-1, vocab)
    values = torch.empty(flat.shape[0], k, dtype=torch.float32, device=flat.device)
    ids = torch.empty(flat.shape[0], k, dtype=torch.int32, device=flat.device)
    for first in range(0, flat.shape[0], chunk_rows):
        block = flat[first:first + chunk_rows].float() / temperature
        top = block.topk(k, dim=-1)
        values[first:first + chunk_rows] = top.values - torch.logsumexp(block, dim=-1, keepdim=True)
        ids[first:first + chunk_rows] = top.indices.int()
    shape = teacher_logits.shape[:-1] + (k,)
    return values.reshape(shape), ids.reshape(shape)


def _rest(log_p_top: torch.Tensor) -> torch.Tensor:
    """log of the mass outside the top k, from the top k's log-probs (clamped away from log 0)."""
    return torch.log1p(-log_p_top.exp().sum(-1).clamp(max=1 - 1e-6))


def top_k_kl_naive(student_logits: torch.Tensor, teacher_log_p: torch.Tensor, teacher_ids: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    vocab, k = student_logits.shape[-1], teacher_ids.shape[-1]
    log_q = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    log_p = teacher_log_p.reshape(-1, k).float()
    log_q_top = log_q.gather(1, teacher_ids.reshape(-1, k).long())
    log_p_rest, log_q_rest = _rest(log_p), _rest(log_q_top)
    kl = (log_p.exp() * (log_p - log_q_top)).sum(-1) + log_p_rest.exp() * (log_p_rest - log_q_rest)
    return kl.mean() * temperature**2


class _ChunkedTopKKL(_GradientInForward):
    @staticmethod
    def forward(ctx, student_logits, teacher_log_p, teacher_ids, temperature: float, chunk_rows: int):
        vocab, k = student_logits.shape[-1], teacher_ids.shape[-1]
        student = student_logits.detach().reshape(-1, vocab)
        log_p_all, ids_all = teacher_log_p.reshape(-1, k).float(), teacher_ids.reshape(-1, k).long()
        rows = student.shape[0]
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for first in range(0, rows, chunk_rows):
            block = slice(first, first + chunk_rows)
            s = student[block].to(torch.float32, copy=True)
            if temperature != 1.0:
                s.div_(temperature)
            s.sub_(torch.logsumexp(s, dim=-1, keepdim=True))  # log q
            log_p, ids = log_p_all[block], ids_all[block]
            log_q_top = s.gather(1, ids)
            log_p_rest, log_q_rest = _rest(log_p), _rest(log_q_top)
            p = log_p.exp()
            total += ((p * (log_p - log_q_top)).sum(-1) + log_p_rest.exp() * (log_p_rest - log_q_rest)).sum()
            if grad is not None:
                q = s.exp_()
                q.mul_((1 - (log_p_rest - log_q_rest).exp())[:, None])  # off the top k: q (1 - p_rest / q_rest)
                q.scatter_(1, ids, log_q_top.exp() - p)  # on it: q - p
                grad[block] = q.mul_(temperature / rows)
        _keep_gradient(ctx, grad, student_logits.shape, other_inputs=4)
        return total * (temperature**2 / rows)


def top_k_kl(student_logits: torch.Tensor, teacher_log_p: torch.Tensor, teacher_ids: torch.Tensor,
             temperature: float = 1.0, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """`top_k_kl_naive` computed blockwise with its gradient; the teacher as `teacher_top_k` gives it."""
    if student_logits.shape[:-1] != teacher_ids.shape[:-1] or teacher_log_p.shape != teacher_ids.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and the teacher's top k "
                         f"{tuple(teacher_ids.shape)} do not match")
    return _ChunkedTopKKL.apply(student_logits, teacher_log_p, teacher_ids, float(temperature), chunk_rows)
