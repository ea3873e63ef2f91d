"""`finetune_checkpoint`: end-to-end distillation of a converted checkpoint from its dense teacher.

The run lives in a work directory beside OUT (`.OUT.finetune-work`): Trainer checkpoints every
`save_steps`, plus the tree-dynamics and perplexity histories. Rerunning the same command after
a kill resumes from the last checkpoint; a non-finite loss stops the run with the last good
checkpoint kept. OUT is written atomically at the end, and the work directory removed.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..checkpoint import CheckpointError, claim_work_dir, load, load_dense, prepare_output, save
from ..training.data import TrainingData, combine, teacher_data, text_data
from ..training.trainable import native_bf16

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# After `warmup_steps` of linear warmup: held, or decayed to zero by the last step.
LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def finetune_checkpoint(
    sparse_dir: Union[str, Path],
    out: Union[str, Path],
    *,
    dense: str,
    gguf_file: Optional[str] = None,
    data: Optional[str] = None,
    teacher_samples: int = 0,
    window: int = 256,
    max_windows: int = 512,
    steps: int = 300,
    batch_size: int = 4,
    grad_accum: int = 1,
    lr: float = 2e-4,
    warmup_steps: int = 10,
    lr_schedule: str = "cosine",
    sparsity_ramp_steps: int = 0,
    kl_weight: float = 1.0,
    lm_weight: float = 0.0,
    temperature: float = 1.0,
    teacher_top_k: int = 0,
    teacher_cache: str = "auto",
    bf16: Optional[bool] = None,
    trainable: str = "sparse",
    routing: str = "learned",
    routing_gradient: Optional[str] = "straight_through",
    gate_gradient: Optional[str] = "straight_through",
    lora_rank: int = 0,
    lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
    eval_windows: Optional[torch.Tensor] = None,
    eval_every: int = 0,
    stats_every: int = 0,
    save_steps: int = 50,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    start = time.perf_counter()
    if bf16 is None:  # the recipe's default: bf16 autocast where the hardware computes it
        bf16 = native_bf16()
    options = {k: v for k, v in locals().items() if k not in ("sparse_dir", "out", "start")}
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {tuple(LR_SCHEDULES)}, got {lr_schedule!r}")
    from ..training.trainer import TEACHER_CACHES

    if teacher_cache not in ("auto", *TEACHER_CACHES):
        raise ValueError(f"teacher_cache must be one of {('auto', *TEACHER_CACHES)}, got {teacher_cache!r}")
    out = prepare_output(out, overwrite, source=sparse_dir)
    work = out.parent / f".{out.name}.finetune-work"
    # What a resumed run must share with the run that made the work directory.
    run = {k: v for k, v in options.items() if k not in (
        "warmup_steps", "teacher_cache", "eval_windows", "eval_every", "stats_every", "save_steps", "overwrite",
        "progress")}  # (the teacher cache changes the speed, not the loss)
    run["sparse"] = str(Path(sparse_dir).resolve())
    run["lora_targets"] = list(lora_targets)
    processes = _processes()
    if processes.is_main_process:  # under `accelerate launch`, one process owns the files
        claim_work_dir(work, run)
    processes.wait_for_everyone()
    try:
        summary = _train(sparse_dir, out, work, run, start, **options)
    except BaseException:
        if processes.is_main_process and not any(work.glob("checkpoint-*")):  # nothing worth resuming
            shutil.rmtree(work, ignore_errors=True)
        raise
    processes.wait_for_everyone()  # every process is past the work directory before it goes
    if processes.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _processes():
    """The processes of this run (one, or those `accelerate launch` started)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _train(sparse_dir, out: Path, work: Path, run: dict, start: float, *, dense, gguf_file, data, teacher_samples,
           window, max_windows, steps, batch_size, grad_accum, lr, warmup_steps, lr_schedule, sparsity_ramp_steps,
           kl_weight, lm_weight, temperature, teacher_top_k, teacher_cache, bf16, trainable, routing, routing_gradient, gate_gradient,
           lora_rank, lora_targets, eval_windows, eval_every, stats_every, save_steps, seed, overwrite, progress) -> dict:
    """The run itself; writes OUT and returns the summary (the caller owns the work directory)."""
    from transformers import AutoTokenizer, TrainingArguments

    from ..training.data import WindowDataset
    from ..training.trainable import configure_training
    from ..training.trainer import DistillationTrainer, HistoryCallback, tokens_per_step

    student = load(sparse_dir)
    if sparsity_ramp_steps and not any(m.sparse_method == "mgs" for _, m in student.sparse_mlps()):
        raise CheckpointError(f"{sparse_dir}: progressive sparsity (--sparsity-ramp) applies to MGS models only")
    tokenizer = AutoTokenizer.from_pretrained(str(sparse_dir), trust_remote_code=True)
    teacher, _ = load_dense(dense, gguf_file=gguf_file, load_tokenizer=False)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise CheckpointError(f"{dense}: not the dense model {sparse_dir} was converted from (vocabularies differ)")
    training_data = _training_data(data, teacher_samples, teacher, tokenizer, window, max_windows, seed, progress)
    setup = configure_training(student, trainable=trainable, routing=routing, routing_gradient=routing_gradient,
                               gate_gradient=gate_gradient, seed=seed)
    model = student
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=list(lora_targets),
                            modules_to_save=["mlp"] if trainable == "sparse" else None)
        model = get_peft_model(student, config)

    args = TrainingArguments(
        output_dir=str(work), max_steps=steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, learning_rate=lr, warmup_steps=warmup_steps,
        lr_scheduler_type=LR_SCHEDULES[lr_schedule], weight_decay=0.0, logging_steps=max(1, min(10, steps)),
        save_steps=save_steps, save_total_limit=2, report_to=[], seed=seed, disable_tqdm=not progress,
        dataloader_num_workers=0, remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
        bf16=bf16,  # autocast: matmuls in bf16, weights, optimizer state and the KL in fp32
    )
    per_step = tokens_per_step(args, training_data.windows.shape[1])
    epochs = steps * per_step / training_data.tokens
    if teacher_cache == "auto":  # keeping the teacher pays off only where a window comes back
        teacher_cache = "hidden" if epochs > 1 else "none"
    callbacks = _callbacks(model, training_data, per_step, stats_every, eval_every, eval_windows, sparsity_ramp_steps)

    trainer = DistillationTrainer(model=model, args=args, train_dataset=WindowDataset(training_data.windows),
                                  teacher=teacher, kl_weight=kl_weight, lm_weight=lm_weight, temperature=temperature,
                                  teacher_top_k=teacher_top_k, teacher_cache=teacher_cache, callbacks=callbacks)
    resume = any(work.glob("checkpoint-*"))
    result = trainer.train(resume_from_checkpoint=True if resume else None)

    final, adapter = _trained_model(model, lora_rank, work)
    summary = {
        "data": training_data.describe(), "setup": setup, "run": run, "resumed": resume,
        "teacher_cache": trainer.teacher_cache_kind, "steps": int(result.global_step), "tokens_seen": int(result.global_step) * per_step,
        "train_loss": float(result.training_loss), "seconds": time.perf_counter() - start,
        "log": [e for e in trainer.state.log_history if "loss" in e],
        **{cb.name: cb.history for cb in callbacks if isinstance(cb, HistoryCallback)},
    }
    summary["main_process"] = trainer.is_world_process_zero()
    if summary["main_process"]:
        extra = {"treeffn_finetune.json": json.dumps(summary, indent=2)}
        save(final, out, tokenizer=tokenizer, overwrite=overwrite, base_model=str(dense), extra_files=extra,
             extra_dirs=adapter)
    return summary


def _callbacks(model, training_data: TrainingData, per_step: int, stats_every, eval_every, eval_windows,
               sparsity_ramp_steps) -> list:
    """The Trainer callbacks the run asked for: tree statistics, a perplexity curve, the sparsity ramp."""
    from ..training.trainer import (
        PerplexityCurveCallback,
        SparsityRampCallback,
        TreeDynamicsCallback,
        has_tree_layers,
    )

    callbacks = []
    if stats_every and has_tree_layers(model):
        callbacks.append(TreeDynamicsCallback(training_data.windows[:2], stats_every, per_step))
    if eval_every and eval_windows is not None:
        callbacks.append(PerplexityCurveCallback(eval_windows, eval_every, per_step))
    if sparsity_ramp_steps:
        callbacks.append(SparsityRampCallback(sparsity_ramp_steps))
    return callbacks


def _trained_model(model, lora_rank: int, work: Path) -> tuple:
    """(the model to save, extra folders for OUT): LoRA adapters merged (and kept for reuse on the
    base checkpoint), every MGS predictor re-quantised to the trained weights."""
    final, adapter = model, {}
    if lora_rank:
        model.save_pretrained(str(work / "lora_adapter"))
        adapter = {"lora_adapter": work / "lora_adapter"}
        final = model.merge_and_unload()
    final.requires_grad_(True)
    for _, mlp in final.sparse_mlps():
        if mlp.sparse_method == "mgs":
            mlp.requantize()  # the 4-bit predictor (and the nested grid) follow the trained weights
    return final, adapter


def _training_data(data, teacher_samples, teacher, tokenizer, window, max_windows, seed, progress) -> TrainingData:
    parts = []
    if data is not None:
        try:
            parts.append(text_data(data, tokenizer, window, max_windows))
        except (FileNotFoundError, ValueError) as error:
            raise CheckpointError(f"{data}: unusable training data ({error})") from error
    if teacher_samples:
        parts.append(teacher_data(teacher, tokenizer, teacher_samples, window, seed=seed, progress=progress))
    return combine(parts)
