"""The public workflows: one Python function behind each CLI subcommand, with the CLI's defaults,
one module each.

- `convert_checkpoint` (`treeffn convert`, convert.py), `distill_checkpoint` (`treeffn distill`,
  distill.py: it runs the recipe of the checkpoint's method, conversion/mgs/recipe.py or
  conversion/tree/recipe.py), `finetune_checkpoint` (`treeffn finetune`, finetune.py),
  `prune_checkpoint` (`treeffn prune`, prune.py), `init_checkpoint` (`treeffn init`, init.py),
  `evaluate_checkpoint` (`treeffn eval`, evaluate.py), `describe_checkpoint` (`treeffn info`, info.py) and `hub.push` (`treeffn push`).

A subcommand parses its options, calls its function and prints the result; nothing else. The
benchmarks call the same functions, and state in their captions where they change a default.
"""

from ..conversion.fit_context import LOSS_WINDOWS
from .convert import ConversionReport, convert_checkpoint
from .distill import distill_checkpoint
from .evaluate import evaluate_checkpoint, load_for_evaluation
from .finetune import finetune_checkpoint
from .info import describe_checkpoint
from .init import init_checkpoint
from .prune import prune_checkpoint

__all__ = ["LOSS_WINDOWS", "ConversionReport", "convert_checkpoint",
           "describe_checkpoint", "distill_checkpoint", "evaluate_checkpoint", "finetune_checkpoint", "init_checkpoint",
           "load_for_evaluation", "prune_checkpoint"]
