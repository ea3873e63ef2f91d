"""CPU kernel of the nested micro-gated MLP: one fused C function for a few fp32 or bf16 tokens.

On a CPU a decode step is bound by the bytes it reads, and the nested layer reads half of them
in 4-bit: the predictor's codes (the high nibbles of the 8-bit gate/up grid) for every neuron,
the low nibbles for the neurons it keeps, then their down_proj columns. PyTorch has no op that
reads selected rows in place, and its int4 matmul rounds the input to bf16, so this path is a
small C library, compiled on first use with the system compiler (`-march=native`, OpenMP),
cached, and called through ctypes. Up to `MAX_TOKENS` tokens one fused call does the layer:

1. the tokens are rounded per group of `group_size` columns to two int8 planes, a coarse one and
   its residual at 1/256 of the step (about 16 bits: scores within ~1e-4 of float32, where one
   int8 plane, llama.cpp's Q8 inputs, cost 0.002 of perplexity ratio and half of the demo's
   identical answers), so the 4-bit codes meet them in AVX-512 VNNI integer dot products, 64
   products an instruction;
2. the high-nibble pass scores every neuron (|silu(g~) u~|, the predictor) and a per-layer
   threshold selects;
3. the low-nibble pass adds the residual of the selected neurons only (the union over tokens);
4. down_proj: the union's int8 rows only (`down_format='int8_rows'`, the nested recipe's: a
   neuron's row is contiguous, a bf16 scale per group of outputs); a bf16 or float32 down_proj is
   read whole in its stock layout against the masked activations (from a cached bf16 copy when
   its weights are bf16 values: half the bytes, the same products).

Where the CPU has AMX, `mgs_nested_amx` computes the same layer with the same math on tiles
(int8 tile products of the unpacked nibbles and both token planes, exact int32 sums per group;
down_proj against h in three bf16 parts, float32 accumulation): the dispatch takes it from
`KernelPolicy.cpu_amx_min_tokens` tokens. Its operands (`amx_operands`) are made at its first call.

Without AMX, more tokens (a prefill) go through `nested_scores_cpu`: the same rounding of the tokens, the
high nibbles in a GEMM without horizontal sums (a copy of the codes in blocks of 16 rows,
`scoring_operands`), and the scores go back to the layer, whose GEMMs compute the selected neurons
from the float32 weights as its PyTorch path does. It replaces the PyTorch path's scoring, which
dequantises the codes and runs a GEMM as large as gate/up's.

`mgs_reference.mgs_nested_naive` is the kernel's math in plain PyTorch, int8 rounding included (the tests hold
the kernel to it tightly, and to the layer's exact reference path loosely). The kernel needs x86 AVX-512 (F, BW, VNNI): where the compiler
or the CPU lacks them `cpu_kernel_unavailable_reason` says so, and the PyTorch path runs,
recorded in `last_path`. This file is part of the remote-code bundle.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .activations import computes_silu
from .mgs_kernels_cpu_source import SOURCE  # csrc/mgs_nested_cpu.c, embedded for the bundle
from .mgs_predictors import dequantize_int4, int8_row_grid, int8_row_values, pack_nibbles, unpack_nibbles

# The default of KernelPolicy.cpu_fused_max_tokens: up to this many tokens the fused kernel
# computes the layer, beyond them `cpu:scores` (its scores, then GEMMs). `cpu:scores` is faster from
# 16 tokens (stacked recipe layers at 73%, bf16 activations, 2 threads: at 16 tokens the fused kernel
# 0.62x dense bf16 against 0.77x on the SmolLM2 shape, 0.29x against 0.63x on a 1B shape), but its
# GEMMs round differently from the fused kernel's int8 planes, so a batch's composition (a vLLM
# prefill of several prompts) would change a float32 model's greedy tokens: the switch stays here.
MAX_TOKENS = 64

TOKEN_DTYPES = (torch.float32, torch.bfloat16)  # the fused kernel's entry points (bf16: mgs_nested_forward_bf16)
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_library: Optional[ctypes.CDLL] = None
_library_error: Optional[str] = None


def _cache_dir() -> Path:
    root = os.environ.get("TREEFFN_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "treeffn_hf", "kernels")
    return Path(root)


def _cpu_signature() -> str:
    # -march=native compiles for this CPU: a cache shared between machines must not mix them.
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _build(defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    # TREEFFN_KERNEL_CFLAGS adds flags (the tests' AddressSanitizer build); they are part of the cache key
    flags = (*_FLAGS, *(f"-D{name}" for name in defines), *os.environ.get("TREEFFN_KERNEL_CFLAGS", "").split())
    key = hashlib.sha256("\0".join((SOURCE, compiler, *flags, _cpu_signature())).encode()).hexdigest()[:16]
    target = _cache_dir() / f"treeffn_cpu_{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            source = Path(work) / "kernels.c"
            source.write_text(SOURCE)
            built = Path(work) / target.name
            result = subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                errors = [line for line in result.stderr.splitlines() if "error" in line]
                raise RuntimeError(f"the C kernel did not compile: {(errors or [result.stderr.strip()])[0][:200]}")
            os.replace(built, target)  # atomic: a concurrent process sees the old state or the whole file
    library = ctypes.CDLL(str(target))
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    library.mgs_nested_forward.argtypes = [ctypes.POINTER(LayerStruct), integer] + [pointer] * 4 + [integer]
    library.mgs_nested_forward.restype = integer
    library.mgs_nested_forward_bf16.argtypes = library.mgs_nested_forward.argtypes
    library.mgs_nested_forward_bf16.restype = integer
    library.mgs_nested_scores.argtypes = [ctypes.POINTER(LayerStruct), integer, pointer, pointer, integer]
    library.mgs_nested_scores.restype = None
    library.mgs_nested_forward_amx.argtypes = library.mgs_nested_forward.argtypes
    library.mgs_nested_forward_amx.restype = integer
    library.amx_enable.argtypes = []
    library.amx_enable.restype = integer
    if "TREEFFN_COUNT_BYTES" in defines:
        library.count_register.argtypes = [integer, pointer, ctypes.c_int64]
        library.count_register.restype = None
        library.count_touched.argtypes = [integer]
        library.count_touched.restype = ctypes.c_int64
    return library


class LayerStruct(ctypes.Structure):
    """The C `Layer`: shapes, pointers to the tensors it reads, the threshold."""

    _fields_ = [("K", ctypes.c_int64), ("I", ctypes.c_int64), ("G", ctypes.c_int64),
                ("hi", ctypes.c_void_p), ("lo", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("zeros", ctypes.c_void_p), ("down", ctypes.c_void_p), ("down_bf16", ctypes.c_int64),
                ("threshold", ctypes.c_float), ("hi_blocks", ctypes.c_void_p), ("scales_t", ctypes.c_void_p),
                ("zeros_t", ctypes.c_void_p), ("R", ctypes.c_int64), ("hi_tiles", ctypes.c_void_p),
                ("lo_tiles", ctypes.c_void_p), ("scales_amx", ctypes.c_void_p), ("zeros_amx", ctypes.c_void_p),
                ("down_tiles", ctypes.c_void_p), ("Ip", ctypes.c_int64), ("down_rows", ctypes.c_void_p),
                ("down_row_scales", ctypes.c_void_p)]


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel library, built once per process; None when it cannot be (see
    `library_error`)."""
    global _library, _library_error
    if _library is None and _library_error is None:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            _library_error = f"the CPU kernel is written for x86-64 AVX-512, not {platform.machine()}"
        else:
            try:
                _library = _build()
            except (RuntimeError, OSError) as error:
                _library_error = str(error).splitlines()[0]
    return _library


def library_error() -> Optional[str]:
    library()
    return _library_error


def _static_reason(layer: torch.nn.Module) -> Optional[str]:
    return layer_unsupported_reason(layer) or library_error()


def layer_unsupported_reason(layer: torch.nn.Module) -> Optional[str]:
    """Why the kernel does not implement `layer`, whatever the machine, or None when it does."""
    spec = getattr(layer, "spec", None)
    if getattr(layer, "sparse_method", None) != "mgs":
        return f"there is no CPU kernel for {type(layer).__name__}"
    if spec.predictor != "nested" or spec.selection != "threshold":
        return ("the CPU kernel implements the nested predictor with threshold selection, "
                f"not {spec.predictor}/{spec.selection}")
    if spec.group_size % 64 or layer.hidden_size % spec.group_size:
        return f"the CPU kernel needs groups of a multiple of 64 columns, not {spec.group_size}"
    weights = [getattr(layer, name).weight for name in ("gate_proj", "up_proj", "down_proj")]
    # meta: a layer built to describe a checkpoint (`treeffn info`), as it loads on the CPU
    if any(w.dtype != torch.float32 or w.device.type not in ("cpu", "meta") for w in weights):
        return "the CPU kernel reads float32 CPU weights"
    if any(getattr(layer, name).bias is not None for name in ("gate_proj", "up_proj", "down_proj")):
        return "the CPU kernel does not implement MLP biases"
    if not computes_silu(layer.act_fn):
        return f"the CPU kernel implements SiLU only, not {type(layer.act_fn).__name__}"
    return None


# Per layer: (key, operands, reason, the tensors the key names, held so no identity is reused). Kept beside the layers, not in
# them, so that deepcopy, pickling and state dicts never meet the ctypes objects.
_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _operand_key(layer) -> tuple[tuple, tuple]:
    """(key, tensors): every tensor the kernel reads, and their identities and versions, which a
    replaced or edited weight, predictor or threshold changes. The cache holds the tensors, so no
    identity is reused. Read through the modules' dicts: this runs on every forward of every layer."""
    modules = layer._modules
    predictor = modules["micro_gate"]._buffers
    tensors = (modules["gate_proj"]._parameters["weight"], modules["up_proj"]._parameters["weight"],
               modules["down_proj"]._parameters["weight"], predictor["codes"], predictor["scales"],
               predictor["zeros"], layer._buffers["gate_threshold"])
    return tuple(map(id, tensors)) + tuple(t._version for t in tensors), tensors


def _operands(layer) -> tuple[Optional[tuple], Optional[str]]:
    """(the kernel's tensor arguments, None) or (None, why it cannot run), cached until a weight,
    the predictor or the threshold changes."""
    key, tensors = _operand_key(layer)
    cached = _CACHE.get(layer)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    operands, reason = None, _static_reason(layer)
    if reason is None:
        try:
            lo = low_nibbles(layer)
        except ValueError as error:
            reason = str(error)
        else:
            operands = _kernel_operands(layer, lo)
    _CACHE[layer] = (key, operands, reason, tensors)
    return operands, reason


def _kernel_operands(layer, lo: torch.Tensor) -> tuple:
    """(a pointer to the C `Layer`, [the struct, then the tensors it points at, in OPERAND_NAMES order]):
    the tensors stay alive as long as the struct that points at them."""
    predictor = layer.micro_gate
    codes, scales, zeros = (t.contiguous() for t in (predictor.codes, predictor.scales, predictor.zeros))
    down_format, int8_rows = _down_grid(layer)
    none = torch.empty(0, dtype=torch.uint8)
    if int8_rows is not None:  # only the selected neurons' rows are read
        down, (rows, row_scales) = none, int8_rows
    else:  # the stock layout, streamed whole: bf16 when its values are bf16 (half the bytes, the same products)
        dtype = torch.bfloat16 if down_format == "bf16" else torch.float32
        down, rows, row_scales = layer.down_proj.weight.detach().to(dtype).contiguous(), none, none
    blocks, scales_t, zeros_t = scoring_operands(predictor)
    pointer = lambda t: t.data_ptr() if t.numel() else None  # noqa: E731
    struct = LayerStruct(layer.hidden_size, layer.intermediate_size, predictor.group_size, codes.data_ptr(),
                         lo.data_ptr(), scales.data_ptr(), zeros.data_ptr(), pointer(down), down_format == "bf16",
                         float(layer.gate_threshold), blocks.data_ptr(), scales_t.data_ptr(), zeros_t.data_ptr(),
                         scales_t.shape[1])
    struct.down_rows, struct.down_row_scales = pointer(rows), pointer(row_scales)
    return ctypes.byref(struct), [struct, codes, lo, scales, zeros, down, blocks, scales_t, zeros_t, rows, row_scales]


def kernel_down_format(layer) -> str:
    """How the fused kernel reads this nested layer's down_proj: 'int8_rows' (the selected neurons'
    rows, one byte a weight) where its values are on the int8 row grid, 'bf16' (all of it, from a
    bf16 copy) where they are bf16 values, else 'float32' (all of it). A layer on the meta device
    (built to describe a checkpoint) reads as its spec stores it."""
    return _down_grid(layer)[0]


def _down_grid(layer) -> tuple[str, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """(`kernel_down_format`, and for 'int8_rows' the codes and scales read back from the values)."""
    weight = layer.down_proj.weight
    if weight.is_meta:
        return layer.spec.down_format, None
    codes, scales = int8_row_grid(weight, layer.spec.group_size)
    if torch.equal(int8_row_values(codes, scales), weight.detach().float()):
        return "int8_rows", (codes, scales)
    return ("bf16" if holds_bf16_values(weight) else "float32"), None


def holds_bf16_values(weight: torch.Tensor) -> bool:
    """Whether every value of `weight` is a bf16 value, so the kernel reads a bf16 copy of it."""
    return torch.equal(weight.detach().bfloat16().float(), weight.detach())


def cpu_kernel_unavailable_reason(layer: torch.nn.Module, x: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why the CPU kernel cannot run `layer` (on `x`, when given), or None when it can."""
    if x is not None and (x.device.type != "cpu" or x.dtype not in TOKEN_DTYPES):
        return f"the CPU kernel takes float32 or bf16 CPU tensors, not {x.dtype} on {x.device}"
    if getattr(layer, "sparse_method", None) != "mgs" or layer.spec.predictor != "nested":
        return _static_reason(layer)
    if layer.gate_proj.weight.is_meta:  # a layer built to describe a checkpoint: no values to check yet
        return _static_reason(layer)
    return _operands(layer)[1]


def operand_copy_bytes(layer) -> int:
    """Bytes the kernel's operands hold beside the layer's own tensors, once it has run: the low
    nibbles and the scoring blocks (each as many bytes as the predictor's codes), the float32
    scales and zeros, and down_proj as `kernel_down_format` reads it (int8 rows with bf16 scales,
    or a bf16 copy); where this machine runs AMX, the layer's policy lets it and down_proj holds
    bf16 values, the AMX kernel's `amx_operands` too (both nibbles unpacked: a byte per gate/up
    weight each, down_proj in bf16 tiles, float32 scales and zeros)."""
    rows, width = 2 * layer.intermediate_size, layer.hidden_size
    padded_rows = -(-rows // 16) * 16
    groups = width // layer.spec.group_size
    down_format, down_weights = kernel_down_format(layer), layer.down_proj.weight.numel()
    down = {"int8_rows": down_weights + 2 * layer.intermediate_size * groups, "bf16": 2 * down_weights}.get(down_format, 0)
    fused = rows * width // 2 + padded_rows * width // 2 + 2 * 4 * padded_rows * groups + down
    if not amx_takes_many_tokens(layer):
        return fused
    padded = 2 * -(-layer.intermediate_size // 32) * 32  # gate and up, each padded to 32 rows
    return fused + 2 * padded * width + 2 * 4 * groups * padded + 2 * width * padded // 2


def amx_takes_many_tokens(layer) -> bool:
    """Whether the AMX kernel runs this layer's batches from `cpu_amx_min_tokens` on this machine (it
    reads down_proj as bf16 values)."""
    return (amx_machine_reason() is None and layer.kernel_policy.cpu_amx_min_tokens != float("inf")
            and kernel_down_format(layer) == "bf16")


def scoring_operands(predictor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the scoring GEMM reads: the predictor's codes in blocks of 16 rows and 8 columns
    (64 bytes: byte 4j + b holds column 8c + b of row j in its low nibble, 8c + 4 + b in its high
    one; rows padded to R, a multiple of 16), and the scales and zeros as float32 (groups, R).
    A copy of the codes (as many bytes as the predictor), kept beside the layer."""
    codes = unpack_nibbles(predictor.codes)
    rows, width = codes.shape
    padded_rows = -(-rows // 16) * 16
    codes = F.pad(codes, (0, 0, 0, padded_rows - rows)).reshape(padded_rows // 16, 16, width // 8, 2, 4)
    codes = codes.permute(0, 2, 1, 3, 4)  # (row block, column chunk, row, half, byte)
    blocks = (codes[..., 0, :] | (codes[..., 1, :] << 4)).contiguous()
    per_group = [F.pad(t.float(), (0, 0, 0, padded_rows - rows)).t().contiguous()
                 for t in (predictor.scales, predictor.zeros)]
    return blocks, per_group[0], per_group[1]


def low_nibbles(layer) -> torch.Tensor:
    """The packed low nibbles of [gate_proj; up_proj] on the predictor's nested grid, (2I, K/2)
    uint8. Raises ValueError when the weights are not on that grid (trained without
    `requantize()`)."""
    predictor = layer.micro_gate
    with torch.no_grad():
        codes, scales = unpack_nibbles(predictor.codes), predictor.scales
        high = dequantize_int4(codes, scales, predictor.zeros)
        step = (scales.float() / 16).repeat_interleave(predictor.group_size, dim=1)
        weight = torch.cat([layer.gate_proj.weight, layer.up_proj.weight]).float()
        residual = ((weight - high) / step).round()
        off_grid = (residual < -8) | (residual > 7) | ((high + residual * step - weight).abs() > 1e-3 * step)
        if bool(off_grid.any()):
            raise ValueError("gate_proj/up_proj are not on the predictor's nested 8-bit grid "
                             "(call requantize() after training them)")
        return pack_nibbles((residual + 8).to(torch.uint8))


def mgs_nested_cpu(layer, x: torch.Tensor, counts: Optional[torch.Tensor] = None,
                   scores: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int]:
    """The layer on x (N, hidden) float32 or bf16 through the C kernel: (output (N, hidden) in x's
    dtype, neurons computed, summed over tokens). bf16 tokens are widened, and the output rounded to
    nearest even, inside the C call. When given, `counts` ((N,) int32) receives each token's count
    and `scores` ((N, intermediate) float32) the predictor's scores."""
    operands, reason = _operands(layer)
    if operands is None:
        raise RuntimeError(f"the CPU kernel cannot run this layer: {reason}")
    return _forward(_fused_entry(x), operands, x, counts, scores)


def _fused_entry(x: torch.Tensor):
    kernels = library()
    return kernels.mgs_nested_forward_bf16 if x.dtype == torch.bfloat16 else kernels.mgs_nested_forward


def decode_step(layer, x: torch.Tensor) -> Optional[tuple[torch.Tensor, int]]:
    """`mgs_nested_cpu(layer, x)` when cheap checks show the dispatch would take the fused kernel
    (no gradients, a CPU batch below the AMX and cpu:scores switch points, a nested layer whose
    operands are cached), else None: the caller dispatches. A decode step runs this for every layer
    and token, where `choose_path`'s full checks and a second operand lookup cost measurable time."""
    policy = layer.kernel_policy
    tokens = x.shape[0]
    if (torch.is_grad_enabled() or policy.path not in ("auto", "cpu") or tokens > policy.cpu_fused_max_tokens
            or tokens >= policy.cpu_amx_min_tokens or x.device.type != "cpu"
            or x.dtype not in TOKEN_DTYPES or layer.spec.predictor != "nested"):
        return None
    operands = _operands(layer)[0]
    return None if operands is None else _forward(_fused_entry(x), operands, x, None, None)


def _forward(function, operands: tuple, x: torch.Tensor, counts: Optional[torch.Tensor],
             scores: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """One call of a C entry point with `mgs_nested_forward`'s signature."""
    x = x.contiguous()
    out = torch.empty_like(x)
    selected = function(operands[0], x.shape[0], x.data_ptr(), out.data_ptr(),
                        None if counts is None else counts.data_ptr(), None if scores is None else scores.data_ptr(),
                        torch.get_num_threads())
    return out, selected


# From this many tokens the fused kernel scores through the scoring GEMM (GEMM_TOKENS in the C source).
SCORING_GEMM_MIN_TOKENS = 8
# The tensors the fused kernel reads, in the order `_operands` holds them (after the struct).
OPERAND_NAMES = ("codes", "low_nibbles", "scales", "zeros", "down", "codes_blocks", "scales_t", "zeros_t", "down_rows",
                 "down_row_scales")


def fused_bytes_read(layer, tokens: int, union: float) -> dict[str, float]:
    """Weight bytes the fused kernel reads for a batch of `tokens` whose selections cover `union`
    neurons, per operand: every neuron's high nibbles with their scales and zeros (the predictor;
    from `SCORING_GEMM_MIN_TOKENS` tokens its blocked copy with float32 scales and zeros), the low
    nibbles of the union's gate and up rows (and their bf16 scales, when the scoring GEMM did not
    read them), and down_proj as `kernel_down_format` says: the union's int8 rows with their bf16
    scales, or all of it (bf16 or float32), streamed against the masked activations.
    `touched_bytes` measures the same on the kernel; a test holds the two equal."""
    hidden, rows = layer.hidden_size, 2 * layer.intermediate_size
    groups = hidden // layer.spec.group_size
    read = {"low_nibbles": union * hidden, **_down_bytes_read(layer, union)}
    if tokens >= SCORING_GEMM_MIN_TOKENS:
        padded = -(-rows // 16) * 16
        read.update(codes_blocks=padded * hidden / 2, scales_t=4 * groups * padded, zeros_t=4 * groups * padded,
                    scales=2 * 2 * union * groups)
    else:
        read.update(codes=rows * hidden / 2, scales=2 * rows * groups, zeros=2 * rows * groups)
    return read


def _down_bytes_read(layer, union: float) -> dict[str, float]:
    hidden, down_format = layer.hidden_size, kernel_down_format(layer)
    if down_format == "int8_rows":
        return {"down_rows": union * hidden, "down_row_scales": 2 * union * hidden / layer.spec.group_size}
    return {"down": (2 if down_format == "bf16" else 4) * hidden * layer.intermediate_size}


_counting_library: Optional[ctypes.CDLL] = None


def touched_bytes(layer, x: torch.Tensor) -> tuple[torch.Tensor, int, dict[str, int]]:
    """The layer on x through the counting build of the fused kernel (-DTREEFFN_COUNT_BYTES):
    (output, neurons computed, the bytes of each operand its reads touched, with "stray" for
    reads outside them). For tests: the counting slows every read."""
    global _counting_library
    operands, reason = _operands(layer)
    if operands is None:
        raise RuntimeError(f"the CPU kernel cannot run this layer: {reason}")
    if _counting_library is None:
        _counting_library = _build(("TREEFFN_COUNT_BYTES",))
    tensors = operands[1][1:]
    for region, tensor in enumerate(tensors):
        _counting_library.count_register(region, tensor.data_ptr(), tensor.numel() * tensor.element_size())
    out, selected = _forward(_counting_library.mgs_nested_forward, operands, x, None, None)
    touched = {name: _counting_library.count_touched(region) for region, name in enumerate(OPERAND_NAMES)}
    touched["stray"] = _counting_library.count_touched(-1)
    return out, selected, touched


_amx_state: Optional[int] = None  # amx_enable(): 1 granted, 0 refused by the OS, -1 not compiled


def amx_machine_reason() -> Optional[str]:
    """Why this process cannot run AMX tiles, or None when it can (asks Linux once)."""
    global _amx_state
    if library() is None:
        return library_error()
    if _amx_state is None:
        _amx_state = library().amx_enable()
    if _amx_state == -1:
        return "this CPU has no AMX int8 and bf16 tiles"
    return None if _amx_state == 1 else "Linux refused this process the AMX tile state"


def amx_unavailable_reason(layer: torch.nn.Module, x: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why the AMX kernel cannot run `layer` (on `x`, when given), or None when it can."""
    return cpu_kernel_unavailable_reason(layer, x) or _amx_operand_reason(_operands(layer)[0])


def _amx_operand_reason(operands: tuple) -> Optional[str]:
    """What keeps the AMX kernel from layer operands the fused kernel can run, or None."""
    if not operands[1][0].down_bf16:
        return "the AMX kernel reads down_proj as bf16 values (down_format='bf16'), and these are not"
    return amx_machine_reason()


def amx_operands(layer, lo: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the AMX kernel reads besides the fused kernel's operands: gate and up each padded to
    Ip rows (a multiple of 32), their high (`hi_tiles`) and low (`lo_tiles`, from `lo`, the
    packed low nibbles) nibbles unpacked in 16-row, 64-column tiles, byte 64 kk + 4 j + b holding
    column 4 kk + b of row j (AMX's int8 operand layout), the scales and zeros float32
    (groups, 2 Ip), and down_proj in bf16 tiles of 16 outputs and 32 neurons, element
    32 kk + 2 j + b holding neuron 2 kk + b of output j (AMX's bf16 pairs)."""
    predictor = layer.micro_gate
    width, hidden = layer.intermediate_size, layer.hidden_size
    padded = -(-width // 32) * 32

    def halves(t: torch.Tensor) -> torch.Tensor:  # [gate; up] rows, each padded to `padded`
        return torch.cat([F.pad(part, (0, 0, 0, padded - width)) for part in (t[:width], t[width:])])

    def int8_tiles(packed: torch.Tensor) -> torch.Tensor:
        codes = halves(unpack_nibbles(packed)).reshape(2 * padded // 16, 16, hidden // 64, 16, 4)
        return codes.permute(0, 2, 3, 1, 4).contiguous()  # (row block, chunk, kk, row, byte)

    down = F.pad(layer.down_proj.weight.detach().bfloat16(), (0, padded - width))
    return {"hi_tiles": int8_tiles(predictor.codes), "lo_tiles": int8_tiles(lo),
            "scales_amx": halves(predictor.scales.float()).t().contiguous(),
            "zeros_amx": halves(predictor.zeros.float()).t().contiguous(),
            "down_tiles": down.reshape(hidden // 16, 16, padded // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous()}


def mgs_nested_amx(layer, x: torch.Tensor, counts: Optional[torch.Tensor] = None,
                   scores: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int]:
    """`mgs_nested_cpu` on AMX tiles (the same math; many tokens). Its operands are made at the
    first call and kept with the fused kernel's."""
    operands, reason = _operands(layer)
    reason = reason or _amx_operand_reason(operands)
    if reason is not None:
        raise RuntimeError(f"the AMX kernel cannot run this layer: {reason}")
    if x.dtype != torch.float32:
        raise TypeError(f"the AMX kernel takes float32 tokens, not {x.dtype}")
    struct, held = operands[1][0], operands[1]
    if not struct.hi_tiles:
        tiles = amx_operands(layer, held[2])
        for name, tensor in tiles.items():
            setattr(struct, name, tensor.data_ptr())
        struct.Ip = tiles["scales_amx"].shape[1] // 2
        held.extend(tiles.values())
    return _forward(library().mgs_nested_forward_amx, operands, x, counts, scores)


def nested_scores_cpu(layer, x: torch.Tensor) -> torch.Tensor:
    """The predictor's scores (N, intermediate) of x (N, hidden) float32, from the kernel's scoring
    GEMM: the tokens rounded as `quantize_tokens` rounds them, every neuron's high nibbles, no
    horizontal sums (the many-token path: the layer computes the selection with its GEMMs)."""
    operands, reason = _operands(layer)
    if operands is None:
        raise RuntimeError(f"the CPU kernel cannot run this layer: {reason}")
    if x.dtype != torch.float32:
        raise TypeError(f"the scoring GEMM takes float32 tokens, not {x.dtype}")
    x = x.contiguous()
    scores = torch.empty(x.shape[0], layer.intermediate_size)
    library().mgs_nested_scores(operands[0], x.shape[0], x.data_ptr(), scores.data_ptr(), torch.get_num_threads())
    return scores
