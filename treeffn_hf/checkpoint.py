"""Loading dense checkpoints and writing sparse ones, safely.

Every failure a user can cause (missing path, not a model, corrupt weights, unsupported
architecture, existing output) raises `CheckpointError` or a subclass with a one-line message.
Outputs are written to a temporary directory beside the destination and renamed into place only
when complete, so an interrupted save leaves no half-written output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedModel

from .architectures import architecture_for
from .model_card import write_model_card

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or written; the message says why."""


class OutputExistsError(CheckpointError):
    """The output directory exists and overwriting was not requested."""


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _check_source(src: str, gguf_file: Optional[str]) -> bool:
    """Fail fast on a bad local source; return whether `src` is a local directory."""
    path = Path(src).expanduser()
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise CheckpointError(f"{src}: no GGUF file {gguf_file!r} in this directory")
        elif not (path / "config.json").is_file():
            raise CheckpointError(f"{src}: not a model directory (no config.json)")
        return True
    if path.exists():
        raise CheckpointError(f"{src}: not a directory")
    if not _HUB_ID.match(src):
        raise CheckpointError(f"{src}: no such directory")
    return False


def read_dense_config(
    src: str, *, gguf_file: Optional[str] = None, revision: Optional[str] = None
) -> PreTrainedConfig:
    """The config of a dense checkpoint, checked to be a supported architecture. Reads no weights."""
    src = str(src)
    local = _check_source(src, gguf_file)
    try:
        config = AutoConfig.from_pretrained(src, gguf_file=gguf_file, revision=revision)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, ...
        where = "" if local else "no such directory, and not loadable as a Hub id: "
        raise CheckpointError(f"{src}: {where}cannot read the model config ({_first_line(error)})") from error
    architecture_for(config)
    return config


def load_dense(
    src: str,
    *,
    gguf_file: Optional[str] = None,
    dtype: Union[str, torch.dtype, None] = torch.float32,
    revision: Optional[str] = None,
    load_tokenizer: bool = True,
    config: Optional[PreTrainedConfig] = None,
) -> tuple[PreTrainedModel, Any]:
    """Load a dense causal LM (local directory, Hub id, or GGUF file in a directory) and its tokenizer.

    The architecture is checked from the config before any weight is read; pass `config` from
    `read_dense_config` to skip reading it again.
    """
    src = str(src)
    if config is None:
        config = read_dense_config(src, gguf_file=gguf_file, revision=revision)
    kwargs: dict[str, Any] = {"revision": revision}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["config"] = config  # GGUF loading derives its config from the file itself
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=resolve_dtype(dtype), **kwargs)
    except Exception as error:
        raise CheckpointError(f"{src}: cannot load the weights ({_first_line(error)})") from error
    if gguf_file is not None:
        _drop_gguf_quantizer(model)
    tokenizer = None
    if load_tokenizer:
        kwargs.pop("config", None)
        try:
            tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        except Exception:
            tokenizer = None  # a model without a tokenizer still converts
    return model, tokenizer


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    # GGUF weights arrive dequantized, but the bookkeeping makes save_pretrained refuse.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def prepare_output(out: Union[str, Path], overwrite: bool, source: Optional[Union[str, Path]] = None) -> Path:
    """Check `out` can be written (before any long work); return it as a Path.

    Overwriting is limited to an empty directory or an earlier treeffn checkpoint, and `out` may
    not be, contain, or lie inside the `source` checkpoint: nothing the user did not produce with
    treeffn_hf is ever deleted.
    """
    out = Path(out).expanduser()
    if source is not None and Path(source).expanduser().exists():
        src, dst = Path(source).expanduser().resolve(), out.resolve()
        if src == dst or src in dst.parents or dst in src.parents:
            raise CheckpointError(f"{out}: the output must not be, contain, or lie inside the source {source}")
    _recover_interrupted_replace(out)
    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
        if not out.is_dir():
            raise CheckpointError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not is_treeffn_checkpoint(out):
            raise CheckpointError(f"{out}: refusing to overwrite a directory that is not a treeffn checkpoint")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CheckpointError(f"{out}: parent directory {parent} does not exist")
    _probe_writable(parent, out)
    return out


def is_treeffn_checkpoint(directory: Path) -> bool:
    try:
        return "sparse_mlp" in json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _probe_writable(parent: Path, out: Path) -> None:
    # A real attempt: permission bits say nothing for root or read-only mounts.
    try:
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)).rmdir()
    except OSError as error:
        raise CheckpointError(f"{out}: cannot write in {parent} ({error.strerror or error})") from error


def _pid_prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{os.getpid()}-"


def _dead_runs(out: Path, kind: str) -> list[Path]:
    """Leftovers of `kind` ('partial' or 'old') from runs whose process is gone."""
    dead = []
    for candidate in out.parent.glob(f".{out.name}.{kind}-*"):
        try:
            os.kill(int(candidate.name[len(f".{out.name}.{kind}-"):].split("-")[0]), 0)
        except ProcessLookupError:
            dead.append(candidate)
        except (ValueError, PermissionError):
            continue
    return dead


def _recover_interrupted_replace(out: Path) -> None:
    """Clean up after killed runs: drop half-written outputs; if a run died between moving the old
    OUT aside and moving the new one in, put the old OUT back."""
    for staging in _dead_runs(out, "partial"):
        shutil.rmtree(staging, ignore_errors=True)
    for retired in _dead_runs(out, "old"):
        if not out.exists() and (retired / out.name).is_dir():
            os.rename(retired / out.name, out)
        shutil.rmtree(retired, ignore_errors=True)


def save(
    model: PreTrainedModel,
    out: Union[str, Path],
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    base_model: Optional[str] = None,
    extra_files: Optional[dict[str, str]] = None,
    extra_dirs: Optional[dict[str, Path]] = None,
    origin: Optional[str] = None,
) -> Path:
    """Write a sparse model as a self-contained checkpoint (weights, config, code, tokenizer, card,
    `extra_files`: name -> text, e.g. training provenance, and `extra_dirs`: name -> a directory
    copied in, e.g. a LoRA adapter; `origin`: the model card's account of a model not converted from
    `base_model`). Everything lands at once, by a rename."""
    out = prepare_output(out, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=_pid_prefix(out, "partial"), dir=out.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_model_card(staging, model, base_model=base_model, origin=origin)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        for name, source in (extra_dirs or {}).items():
            shutil.copytree(source, staging / name)
        _apply_umask(staging)
        _replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _apply_umask(directory: Path) -> None:
    # mkdtemp creates 0700; the finished checkpoint gets the permissions a plain mkdir would.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)


def _replace_directory(staging: Path, out: Path) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=_pid_prefix(out, "old"), dir=out.parent))
    os.rename(out, retired / out.name)
    os.rename(staging, out)
    shutil.rmtree(retired, ignore_errors=True)


def load(path: Union[str, Path], **kwargs: Any) -> PreTrainedModel:
    """Load a saved sparse checkpoint (local or Hub) the way any user would: with remote code."""
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, **kwargs)


def claim_work_dir(work: Path, run: dict) -> None:
    """A resumable run's work directory is resumed only by the run that made it: same inputs,
    same options. The first run stamps it with `run`."""
    stamp = work / "run.json"
    if stamp.is_file():
        if json.loads(stamp.read_text()) != run:
            raise CheckpointError(
                f"{work}: holds a run with other inputs or options; rerun that command to resume it, "
                "or delete the directory to start over"
            )
        return
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(run))
