"""Trees trained from scratch against dense, under one protocol (the tree paper's own setting).

Small Llama-architecture LMs (4 layers, hidden 256, MLP width 1024) trained from random weights on
the same data, tokenizer, steps, batch and schedule. Arms:
- dense at width W = 1024, and dense as narrow as the 5% tree's active width (the compute-matched
  control);
- trees storing about W neurons (`treeffn_hf.init_model`, as `treeffn init` makes them) at depth 6
  (5.5% of the units active), 5 (9.5%) and 3 (26.7%), each with `per_node` and `after_sum`;
- the 5% tree with its routing frozen at the random initialisation.
Each arm's learning rate is the best of a short sweep (a quarter of the steps, seed 0, the grid grown
past its ends where the best lies there); then every arm trains over --seeds seeds. Per run:
held-out bits per byte against tokens, wall time per step, and for trees dead and rare paths,
routing entropy and the input common mode (the auto-pruning curve).

Corpora (`--corpus`): `stdlib`, the Python standard library's sources split by file into train and
held-out (several million tokens: more than these models memorise in the budget); `wikitext`, the
smaller second run (train on WikiText-2 valid.txt, held out on wiki.test.raw). A byte-level BPE of
--vocab tokens is trained on the train split; bits per byte counts each predicted token's own bytes,
so the figure does not depend on the tokenizer.

    python benchmarks/from_scratch.py --work /tmp/scratch                    # stdlib, about 115 minutes on 2 cores
    python benchmarks/from_scratch.py --work /tmp/scratch --corpus wikitext --seeds 1 --arms dense "tree 5.5% per_node" "dense narrow"
    python benchmarks/from_scratch.py --work /tmp/scratch --plot-only
    # levers, each arm at the main run's learning rate: more tokens, a wider tree
    python benchmarks/from_scratch.py --work /tmp/scratch --steps 600 --seeds 1 --tag tokens2x \
        --arms dense "tree 5.5% per_node" --lr-from benchmarks/results/from_scratch_stdlib.json
    python benchmarks/from_scratch.py --work /tmp/scratch --seeds 1 --tag wider \
        --arms "tree 5.5% per_node, 2x stored" --lr-from benchmarks/results/from_scratch_stdlib.json

Finished runs are kept under --work (one JSON each), so a killed command resumes where it stopped.
Writes benchmarks/results/from_scratch_<corpus>.json and .png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, machine, write_json  # noqa: E402

from treeffn_hf import TreeSpec, init_model  # noqa: E402
from treeffn_hf.training.trainable import configure_training, native_bf16  # noqa: E402
from treeffn_hf.tree_stats import collect_tree_stats, rare_paths, summary  # noqa: E402

WIDTH = 1024
# name -> (depth, node width, activation, routing); node width x (2^(depth+1) - 1) blocks ~ WIDTH
TREE_ARMS = {
    "tree 5.5% per_node": (6, 8, "per_node", "learned"),
    "tree 5.5% after_sum": (6, 8, "after_sum", "learned"),
    "tree 5.5% per_node, frozen routing": (6, 8, "per_node", "frozen"),
    "tree 9.5% per_node": (5, 16, "per_node", "learned"),
    "tree 9.5% after_sum": (5, 16, "after_sum", "learned"),
    "tree 26.7% per_node": (3, 68, "per_node", "learned"),
    "tree 26.7% after_sum": (3, 68, "after_sum", "learned"),
    "tree 5.5% per_node, 2x stored": (6, 16, "per_node", "learned"),  # a lever: the same fraction, twice the rows
}
NARROW = 7 * 8  # the 5.5% tree's neurons per token: 6 nodes and one leaf of 8
ARMS = ["dense", "tree 5.5% per_node", "dense narrow", "tree 5.5% after_sum", "tree 5.5% per_node, frozen routing",
        "tree 9.5% per_node", "tree 9.5% after_sum", "tree 26.7% per_node", "tree 26.7% after_sum"]
SINGLE_SEED = ARMS[5:]  # the 2-hour budget gives the claim's arms three seeds, the wider trees one
LEVER_ARMS = ["tree 5.5% per_node, 2x stored"]


# -- data ----------------------------------------------------------------------------------------
def corpus_texts(corpus: str) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts)."""
    if corpus == "wikitext":
        return ([(DATA / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")],
                [(DATA / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")])
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held_out = [], []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if "site-packages" in relative:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        # by file, fixed by the path's hash: one file in 20 is held out
        (held_out if hashlib.sha1(relative.encode()).digest()[0] % 20 == 0 else train).append(text)
    return train, held_out


def prepare_data(corpus: str, vocab: int, work: Path) -> dict:
    """Token ids of both splits and each token's byte length, cached in `work`."""
    cache = work / f"data_{corpus}_{vocab}.pt"
    if cache.is_file():
        return torch.load(cache)
    from tokenizers import ByteLevelBPETokenizer

    train, held_out = corpus_texts(corpus)
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(train, vocab_size=vocab, min_frequency=2, show_progress=False)
    encode = lambda texts: torch.tensor([i for e in tokenizer.encode_batch(texts) for i in e.ids], dtype=torch.int16)  # noqa: E731
    # byte-level BPE: every vocabulary character stands for exactly one byte
    token_bytes = torch.zeros(tokenizer.get_vocab_size(), dtype=torch.float64)
    for token, index in tokenizer.get_vocab().items():
        token_bytes[index] = len(token)
    data = {"train": encode(train), "held_out": encode(held_out), "token_bytes": token_bytes,
            "vocab": tokenizer.get_vocab_size(),
            "bytes": {"train": sum(len(t.encode()) for t in train), "held_out": sum(len(t.encode()) for t in held_out)}}
    work.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data


# -- models --------------------------------------------------------------------------------------
def dense_config(args, vocab: int, width: int = WIDTH) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=width,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                       num_key_value_heads=args.hidden // 64, max_position_embeddings=args.window,
                       tie_word_embeddings=True)


def build(arm: str, args, vocab: int, seed: int) -> torch.nn.Module:
    if arm in ("dense", "dense narrow"):
        torch.manual_seed(seed)
        return LlamaForCausalLM(dense_config(args, vocab, WIDTH if arm == "dense" else NARROW))
    depth, node, activation, routing = TREE_ARMS[arm]
    stored = node * ((2 << depth) - 1)
    spec = TreeSpec(depth=depth, node_width=node, leaf_width=node, shared_width=0, activation=activation)
    model = init_model(dense_config(args, vocab, stored), spec, seed=seed)
    configure_training(model, trainable="all", routing=routing, routing_gradient="straight_through", seed=seed)
    return model


def active_fraction(model) -> float:
    """Active MLP units per token over the stored ones (1 for dense)."""
    return model.sparse_cost().unit_fraction if hasattr(model, "sparse_cost") else 1.0


# -- training ------------------------------------------------------------------------------------
def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warmup over 5% of the steps, then cosine decay to a tenth of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_bits_per_byte(model, windows: torch.Tensor, token_bytes: torch.Tensor, bf16: bool) -> float:
    """Summed next-token NLL over the windows, in bits, per byte of the predicted tokens."""
    model.eval()
    nats = 0.0
    for batch in windows.split(16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch).logits[:, :-1].float()
        nats += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                  reduction="sum").item()
    model.train()
    return nats / math.log(2) / token_bytes[windows[:, 1:]].sum().item()


def path_statistics(model, probe: torch.Tensor) -> dict:
    """Dead and rare paths, routing entropy and input common mode over the probe windows (trees)."""
    if not hasattr(model, "sparse_mlps"):
        return {}
    model.eval()
    stats = collect_tree_stats(model, probe, progress=False)
    model.train()
    return {**summary(stats), "rare_paths": sum(rare_paths(s.leaf_counts) for s in stats)}


def train_run(arm: str, seed: int, lr: float, steps: int, data: dict, args) -> dict:
    model = build(arm, args, data["vocab"], seed)
    model.train()
    bf16 = native_bf16()
    train = data["train"].long()
    held = data["held_out"].long()
    count = min(args.eval_windows, held.numel() // args.window)
    windows = held[: count * args.window].view(count, args.window)
    probe = windows[:8]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    generator = torch.Generator().manual_seed(1000 + seed)  # the same batches for every arm of a seed
    every = max(1, steps // args.points)
    curve, train_seconds = [], 0.0
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            curve.append({"step": step, "tokens": step * args.batch * args.window,
                          "bits_per_byte": held_out_bits_per_byte(model, windows, data["token_bytes"], bf16),
                          **path_statistics(model, probe)})
            if not math.isfinite(curve[-1]["bits_per_byte"]):
                break  # diverged: the sweep ranks it last
        if step == steps:
            break
        starts = torch.randint(0, train.numel() - args.window, (args.batch,), generator=generator)
        batch = torch.stack([train[s : s + args.window] for s in starts])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        train_seconds += time.perf_counter() - start
    final = curve[-1]
    print(f"  {arm:36s} seed {seed} lr {lr:.0e}: {final['bits_per_byte']:.4f} bits/byte, "
          f"{1000 * train_seconds / max(1, final['step']):.0f} ms/step", flush=True)
    return {"arm": arm, "seed": seed, "lr": lr, "steps": steps, "active_fraction": active_fraction(model),
            "mlp_parameters": _mlp_parameters(model), "bf16_autocast": bf16,
            "seconds_per_step": train_seconds / max(1, final["step"]), "final_bits_per_byte": final["bits_per_byte"],
            "curve": curve}


def _mlp_parameters(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if ".mlp." in name)


def cached_run(work: Path, key: str, run) -> dict:
    """Run once; a finished run's record is kept in `work` so a killed command resumes."""
    path = work / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    record = run()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(record))
    path.with_suffix(".tmp").rename(path)
    return record


# -- protocol ------------------------------------------------------------------------------------
def sweep(arm: str, data: dict, args, work: Path) -> tuple[float, list[dict]]:
    """The learning rate with the lowest held-out bits per byte after a quarter of the steps, seed 0;
    where the best is at an end of the grid, the grid grows past it (by factors of 2, twice at most)."""
    steps = max(1, args.steps // 4)

    def bits(lr: float) -> float:
        record = cached_run(work, f"sweep/{_slug(arm)}_lr{lr:g}", lambda: train_run(arm, 0, lr, steps, data, args))
        return record["final_bits_per_byte"] if math.isfinite(record["final_bits_per_byte"]) else math.inf

    tried = {lr: bits(lr) for lr in args.lrs}
    for _ in range(2):
        best = min(tried, key=tried.get)
        if best not in (min(tried), max(tried)):
            break
        lr = best * 2 if best == max(tried) else best / 2
        tried[lr] = bits(lr)
    best = min(tried, key=tried.get)
    return best, [{"lr": lr, "bits_per_byte": tried[lr]} for lr in sorted(tried)]


def _slug(arm: str) -> str:
    return arm.replace(" ", "_").replace("%", "pct").replace(",", "")


def arm_summary(runs: list[dict]) -> dict:
    finals = [r["final_bits_per_byte"] for r in runs]
    mean = sum(finals) / len(finals)
    spread = (sum((f - mean) ** 2 for f in finals) / max(1, len(finals) - 1)) ** 0.5
    last = [r["curve"][-1] for r in runs]
    return {"seeds": len(runs), "lr": runs[0]["lr"], "active_fraction": runs[0]["active_fraction"],
            "mlp_parameters": runs[0]["mlp_parameters"], "bits_per_byte_mean": mean, "bits_per_byte_std": spread,
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in runs),  # robust to a disturbed run
            **({"dead_paths": sum(c["dead_paths"] for c in last) / len(last),
                "rare_paths": sum(c["rare_paths"] for c in last) / len(last), "paths": last[0]["paths"],
                "routing_entropy": sum(c["mean_routing_entropy"] for c in last) / len(last)}
               if "dead_paths" in last[0] else {})}


def claims(runs: list[dict]) -> dict:
    """The paper's claim at this scale, per 5% tree: within 5% of the same-width dense in held-out
    bits per byte (means over seeds), and better than the compute-matched narrow dense, seed by
    seed (every arm of a seed sees the same batches, so the seeds pair up)."""
    finals: dict[str, dict[int, float]] = {}
    for run in runs:
        finals.setdefault(run["arm"], {})[run["seed"]] = run["final_bits_per_byte"]
    mean = lambda arm: sum(finals[arm].values()) / len(finals[arm])  # noqa: E731
    out = {}
    for tree in (arm for arm in finals if arm.startswith("tree 5.5%")):
        claim = {}
        if "dense" in finals:
            claim["over_dense"] = mean(tree) / mean("dense")
            claim["within_5pct_of_dense"] = claim["over_dense"] <= 1.05
        if "dense narrow" in finals:
            seeds = sorted(set(finals[tree]) & set(finals["dense narrow"]))
            claim["over_narrow_dense"] = mean(tree) / mean("dense narrow")
            claim["seeds_better_than_narrow_dense"] = f"{sum(finals[tree][s] < finals['dense narrow'][s] for s in seeds)} of {len(seeds)}"
        out[tree] = claim
    return out


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list] = {}
    for run in payload["runs"]:
        curves.setdefault(run["arm"], []).append(run["curve"])
    fig, (loss_ax, dead_ax, entropy_ax) = plt.subplots(1, 3, figsize=(16, 4.8))
    for arm, runs in curves.items():
        steps = [p["tokens"] / 1e6 for p in runs[0]]
        mean = lambda key, runs=runs: [sum(r[i][key] for r in runs) / len(runs) for i in range(len(runs[0]))]  # noqa: E731
        style = "-" if arm.startswith("dense") else ("--" if "after_sum" in arm else ":" if "frozen" in arm else "-.")
        loss_ax.plot(steps, mean("bits_per_byte"), style, label=f"{arm} ({len(runs)} seeds)")
        if "dead_paths" in runs[0][0]:
            dead_ax.plot(steps, mean("dead_paths"), style, label=arm)
            entropy_ax.plot(steps, mean("mean_routing_entropy"), style, label=arm)
    loss_ax.set(xlabel="training tokens (M)", ylabel="held-out bits per byte", title="held-out loss")
    loss_ax.set_ylim(top=min(loss_ax.get_ylim()[1], 1.5 * payload["arms"]["dense"]["bits_per_byte_mean"])
                     if "dense" in payload["arms"] else None)
    dead_ax.set(xlabel="training tokens (M)", ylabel="dead paths (all layers)", title="auto-pruning: dead paths")
    entropy_ax.set(xlabel="training tokens (M)", ylabel="routing entropy (1 = balanced)", title="routing balance")
    loss_ax.legend(fontsize=7)
    dead_ax.legend(fontsize=7)
    fig.suptitle(payload["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args, data: dict, sweeps: dict, runs: list[dict]) -> dict:
    arms = {arm: arm_summary([r for r in runs if r["arm"] == arm]) for arm in sweeps}
    tokens = args.steps * args.batch * args.window
    title = (f"from scratch on {args.corpus}: {args.layers} layers, hidden {args.hidden}, MLP width {WIDTH}, "
             f"{tokens / 1e6:.1f}M tokens ({args.steps} steps x {args.batch} x {args.window})")
    return {"benchmark": "from_scratch", "command": "python benchmarks/from_scratch.py " + shlex.join(sys.argv[1:]),
            "machine": machine(), "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "data": {"train_tokens": data["train"].numel(), "held_out_tokens": data["held_out"].numel(),
                     "bytes": data["bytes"], "vocab": data["vocab"]},
            "title": title, "claims": claims(runs), "arms": arms, "sweeps": sweeps, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="data cache and finished runs (resumable)")
    parser.add_argument("--corpus", choices=("stdlib", "wikitext"), default="stdlib")
    parser.add_argument("--arms", nargs="+", choices=ARMS + LEVER_ARMS, default=ARMS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--single-seed", nargs="*", choices=ARMS, default=SINGLE_SEED,
                        help="arms trained with seed 0 only (the budget's limit)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3], help="the sweep")
    parser.add_argument("--points", type=int, default=10, help="held-out evaluations per run")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--lr-from", type=Path, default=None,
                        help="take each arm's learning rate from this results file instead of sweeping (a lever's rerun)")
    parser.add_argument("--tag", default="", help="results file suffix (a lever's rerun beside the main one)")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    out = RESULTS / f"from_scratch_{args.corpus}{'_' + args.tag if args.tag else ''}.json"
    if args.plot_only:
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return
    torch.set_num_threads(2)
    data = prepare_data(args.corpus, args.vocab, args.work / args.corpus)
    # finished runs are reused only under the same protocol
    work = args.work / args.corpus / "_".join(f"{k}{getattr(args, k)}" for k in
                                              ("steps", "batch", "window", "hidden", "layers", "vocab", "eval_windows"))
    print(f"{args.corpus}: {data['train'].numel():,} train tokens ({data['bytes']['train']:,} bytes), "
          f"{data['held_out'].numel():,} held out, vocab {data['vocab']}", flush=True)
    chosen = {a: row["lr"] for a, row in json.loads(args.lr_from.read_text())["arms"].items()} if args.lr_from else {}
    runs, sweeps = [], {}
    for arm in args.arms:  # the results file is rewritten after every arm, so a cut run still reports
        base = arm if arm in chosen else arm.split(",")[0]  # a lever arm takes its base arm's rate
        lr, sweeps[arm] = (chosen[base], []) if base in chosen else sweep(arm, data, args, work)
        seeds = 1 if arm in args.single_seed else args.seeds
        runs += [cached_run(work, f"runs/{_slug(arm)}_seed{seed}_lr{lr:g}",
                            lambda seed=seed, arm=arm, lr=lr: train_run(arm, seed, lr, args.steps, data, args))
                 for seed in range(seeds)]
        payload = report(args, data, sweeps, runs)
        write_json(out.name, payload)
        plot(payload, out.with_suffix(".png"))
    arms = payload["arms"]
    for arm, row in arms.items():
        print(f"{arm:36s} {row['active_fraction']:6.1%} active  {row['bits_per_byte_mean']:.4f} "
              f"+- {row['bits_per_byte_std']:.4f} bits/byte  lr {row['lr']:g}  {1000 * row['seconds_per_step']:.0f} ms/step")
    print(json.dumps(payload["claims"], indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
