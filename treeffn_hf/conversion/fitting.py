"""The loop shared by per-layer fitting (gate training, layer distillation): a held-out split,
Adam on random mini-batches, a NaN stop, and the best held-out state kept."""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """`fn` over the rows of `x` in batches, without gradients (bounded activation memory)."""
    return torch.cat([fn(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def holdout_split(n: int, holdout: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(eval indices, train indices), a random `holdout` fraction (at least one) held out."""
    order = torch.randperm(n, generator=generator)
    n_eval = max(1, int(holdout * n))
    return order[:n_eval], order[n_eval:]


def fit_keeping_best(
    module: torch.nn.Module,
    loss_on: Callable[[torch.Tensor], torch.Tensor],
    score: Callable[[], float],
    *,
    n_train: int,
    steps: int,
    lr: float,
    batch_size: int,
    eval_every: int,
    generator: torch.Generator,
    higher_is_better: bool,
    what: str,
) -> tuple[float, float]:
    """Train `module`'s parameters that require grad on `loss_on(batch positions in [0, n_train))`;
    every `eval_every` steps keep the state with the best `score()`, and end in it.
    Returns (score before, best score)."""
    before = score()
    best, best_state = before, {k: v.clone() for k, v in module.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    for step in range(1, steps + 1):
        loss = loss_on(torch.randint(0, n_train, (min(batch_size, n_train),), generator=generator))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{what} loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            value = score()
            if (value > best) if higher_is_better else (value < best):
                best, best_state = value, {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(best_state)
    return before, best
