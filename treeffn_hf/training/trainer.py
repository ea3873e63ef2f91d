"""Distillation from the dense teacher on the Hugging Face `Trainer` (so `accelerate launch`
scales it to several GPUs unchanged), with the callbacks a sparse fine-tune needs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..evaluation import perplexity
from ..tree_stats import collect_tree_stats, summary, tree_layers
from .kl import chunked_kl, teacher_top_k, top_k_kl


class NonFiniteLossError(FloatingPointError):
    pass


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) on temperature-softened distributions, times T^2."""
    return chunked_kl(student_logits, teacher_logits, temperature)


TEACHER_CACHES = ("hidden", "none")  # (`finetune_checkpoint` also takes "auto")


def teacher_hidden_states(teacher: torch.nn.Module, ids: torch.Tensor, check: bool = False) -> torch.Tensor:
    """The teacher's final normed hidden states, what its LM head reads. With `check`, also that
    the head alone makes the teacher's logits (no logit scale or soft-cap after it), on one row."""
    hidden = teacher.base_model(input_ids=ids, use_cache=False).last_hidden_state
    if check:
        logits = teacher(input_ids=ids[:1], use_cache=False).logits
        remade = teacher.get_output_embeddings()(hidden[:1]).to(logits.dtype)
        if not torch.allclose(remade, logits, rtol=1e-3, atol=1e-3 * float(logits.abs().max())):
            raise ValueError("the teacher's logits are not its LM head applied to its last hidden state; "
                             "fine-tune with teacher_cache='none' (--teacher-cache none)")
    return hidden


def logits_from_hidden(teacher: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The teacher's logits from its cached last hidden states: its LM head alone, one GEMM."""
    head = teacher.get_output_embeddings()
    return head(hidden.to(head.weight.dtype))


class DistillationTrainer(Trainer):
    """loss = kl_weight * KL(teacher || student) + lm_weight * next-token cross-entropy.

    The teacher's body runs once per training window: with `teacher_cache="hidden"` (the default)
    its final hidden states are kept (in memory, 4 x hidden_size bytes a token) and each step
    makes the teacher's logits from them with its LM head alone, so the KL is exactly the full
    one. With `teacher_top_k` = k > 0 only its k most likely tokens per position are
    kept (8k bytes a token) and the KL is `top_k_kl`, over those k tokens and one bucket for the
    rest of the vocabulary. `teacher_cache="none"` runs the whole teacher every step."""

    def __init__(self, *args, teacher: torch.nn.Module, kl_weight: float = 1.0, lm_weight: float = 0.0,
                 temperature: float = 1.0, teacher_top_k: int = 0, teacher_cache: str = "hidden",
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if teacher_cache not in TEACHER_CACHES:
            raise ValueError(f"teacher_cache must be one of {TEACHER_CACHES}, got {teacher_cache!r}")
        self.teacher = teacher.to(self.args.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.kl_weight, self.lm_weight, self.temperature = kl_weight, lm_weight, temperature
        self.teacher_top_k = teacher_top_k
        self.teacher_cache_kind = "top_k" if teacher_top_k else teacher_cache
        self.teacher_cache: dict[int, tuple[torch.Tensor, ...]] = {}

    def _cached_teacher(self, ids: torch.Tensor, windows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The cached teacher for each row of `ids` (computed for the windows not seen before),
        stacked: (hidden,) or (top-k log-probs, top-k ids)."""
        keys = windows.tolist()
        missing = [row for row, key in enumerate(keys) if key not in self.teacher_cache]
        if missing:
            with torch.no_grad():
                if self.teacher_cache_kind == "hidden":
                    entries = (teacher_hidden_states(self.teacher, ids[missing], check=not self.teacher_cache).float(),)
                else:
                    logits = self.teacher(input_ids=ids[missing], use_cache=False).logits
                    entries = teacher_top_k(logits, self.teacher_top_k, self.temperature)
            for row, *entry in zip(missing, *(e.cpu() for e in entries)):
                self.teacher_cache[keys[row]] = tuple(entry)
        rows = [self.teacher_cache[key] for key in keys]
        return tuple(torch.stack(parts).to(ids.device) for parts in zip(*rows))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        outputs = model(input_ids=ids, labels=inputs["labels"] if self.lm_weight else None, use_cache=False)
        loss = outputs.logits.new_zeros((), dtype=torch.float32)
        if self.kl_weight and self.teacher_cache_kind == "top_k":
            log_p, top = self._cached_teacher(ids, inputs["window_index"])
            loss = loss + self.kl_weight * top_k_kl(outputs.logits, log_p, top, self.temperature)
        elif self.kl_weight:
            with torch.no_grad():
                if self.teacher_cache_kind == "hidden":
                    (hidden,) = self._cached_teacher(ids, inputs["window_index"])
                    teacher_logits = logits_from_hidden(self.teacher, hidden)
                else:
                    teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
            loss = loss + self.kl_weight * distillation_loss(outputs.logits, teacher_logits, self.temperature)
        if self.lm_weight:
            loss = loss + self.lm_weight * outputs.loss.float()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the fine-tuning loss became {loss.item()} at step {self.state.global_step}; training stopped. "
                f"The last good checkpoint is kept in {self.args.output_dir} (rerun with a lower learning rate "
                "to resume from it)"
            )
        return (loss, outputs) if return_outputs else loss


class HistoryCallback(TrainerCallback):
    """Base of callbacks that measure something every `every` steps and keep a JSON history in
    the run's output directory (so a resumed run continues it)."""

    name = "history"

    def __init__(self, every: int, tokens_per_step: int) -> None:
        self.every = every
        self.tokens_per_step = tokens_per_step
        self.history: list[dict] = []

    def _file(self, args) -> Path:
        return Path(args.output_dir) / f"{self.name}.json"

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._file(args).is_file():
            self.history = [h for h in json.loads(self._file(args).read_text()) if h["step"] <= state.global_step]
        if not any(h["step"] == state.global_step for h in self.history):
            self._record(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._record(args, state, model)

    def _record(self, args, state, model) -> None:
        row = {"step": state.global_step, "tokens_seen": state.global_step * self.tokens_per_step,
               **self.measure(model)}
        self.history.append(row)
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        self._file(args).write_text(json.dumps(self.history, indent=1))

    def measure(self, model) -> dict:
        raise NotImplementedError


class TreeDynamicsCallback(HistoryCallback):
    """Dead paths and routing entropy of every tree layer on fixed probe windows."""

    name = "tree_dynamics"

    def __init__(self, probe: torch.Tensor, every: int, tokens_per_step: int) -> None:
        super().__init__(every, tokens_per_step)
        self.probe = probe

    def measure(self, model) -> dict:
        return summary(collect_tree_stats(_unwrap(model), self.probe, progress=False))


class PerplexityCurveCallback(HistoryCallback):
    """Perplexity on fixed evaluation windows (the quality-against-tokens curve)."""

    name = "perplexity_curve"

    def __init__(self, windows: torch.Tensor, every: int, tokens_per_step: int) -> None:
        super().__init__(every, tokens_per_step)
        self.windows = windows

    def measure(self, model) -> dict:
        return {"perplexity": perplexity(model, self.windows, progress=False).perplexity}


class SparsityRampCallback(TrainerCallback):
    """Progressive sparsity: MGS layers go from every neuron at step 0 to their calibrated selection
    at step `ramp_steps` (linearly in the threshold, or in k), and stay there."""

    def __init__(self, ramp_steps: int) -> None:
        self.ramp_steps = ramp_steps

    def ramp_at(self, step: int) -> float:
        return min(1.0, step / self.ramp_steps) if self.ramp_steps > 0 else 1.0

    def _set(self, model, ramp: float) -> None:
        for _, mlp in _unwrap(model).sparse_mlps():
            if mlp.sparse_method == "mgs":
                mlp.selection_ramp = ramp

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._set(model, self.ramp_at(state.global_step))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._set(model, 1.0)


def _unwrap(model):
    # peft wraps the model; the tree layers are found on the base model.
    base = getattr(model, "get_base_model", None)
    return base() if base is not None else model


def has_tree_layers(model) -> bool:
    try:
        return bool(tree_layers(_unwrap(model)))
    except AttributeError:
        return False


def tokens_per_step(args, window: int) -> int:
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size) * window

