"""Does skipped work become wall-clock time? Dense twin vs TSA hard mode on trained checkpoints.

Measures, side by side in one process (alternating, several repeats, median):
- full-sequence forward tokens/s at batch 1, 8, 64 and ctx 128, 256 (up to the model's block_size),
  with the executed skip fraction and FLOPs measured on real text (test-split windows);
- KV-cache greedy decoding tokens/s at batch 1 and 8, eager and compiled, against the FLOPs ideal;
  at batch 8 also at forced skip rates (20-60%);
- `sample` (what `cli.py sample` runs) of 500 tokens for both checkpoints, and the dense twin's
  cached decoding against full recomputation;
- one training step (forward, backward, AdamW) of the TSA model (soft and straight-through gate),
  its dense twin and a plain PyTorch GPT, at the checkpoints' shape and the paper's;
- peak memory of each forward (CUDA: the allocator's peak; CPU: the profiler's allocation record).

    python benchmarks/speed.py --dense runs/bench/dense.ckpt --tsa runs/bench/tsa.ckpt
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

from tsa_lightning import model as model_module
from tsa_lightning.accounting import report
from tsa_lightning.data import ShakespeareDataModule
from tsa_lightning.inference import generate_cached
from tsa_lightning.model import TSAConfig, TSATransformer
from tsa_lightning.module import TSALanguageModel

PARTS = ("forward", "decode", "decode_paper_shape", "skip_sweep", "sample", "train", "memory")
PAPER_SHAPE = {"n_layer": 6, "n_embd": 256, "n_head": 8, "ffn_hidden": 1024, "block_size": 128}


class PlainGPT(nn.Module):
    """The straightforward PyTorch GPT (nanoGPT's shape: fused qkv, SDPA, GELU MLP, tied head)."""

    def __init__(self, c: TSAConfig) -> None:
        super().__init__()
        self.n_head = c.n_head
        self.wte, self.wpe = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln_1": nn.LayerNorm(c.n_embd),
                    "qkv": nn.Linear(c.n_embd, 3 * c.n_embd),
                    "proj": nn.Linear(c.n_embd, c.n_embd),
                    "ln_2": nn.LayerNorm(c.n_embd),
                    "fc": nn.Linear(c.n_embd, c.ffn_hidden),
                    "fc_proj": nn.Linear(c.ffn_hidden, c.n_embd),
                }
            )
            for _ in range(c.n_layer)
        )
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.blocks:
            q, k, v = b["qkv"](b["ln_1"](x)).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + b["proj"](y)
            x = x + b["fc_proj"](F.gelu(b["fc"](b["ln_2"](x))))
        return F.cross_entropy(self.head(self.ln_f(x)).flatten(0, 1), targets.flatten())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternate(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function, run in turn so machine noise hits all of them alike."""
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def windows(tokens, batch: int, ctx: int, device) -> torch.Tensor:
    starts = torch.linspace(0, len(tokens) - ctx - 2, batch).long().tolist()
    return torch.stack([torch.from_numpy(tokens[s : s + ctx].astype("int64")) for s in starts]).to(device)


def forward_speed(dense, tsa, tokens, device, repeats) -> list[dict]:
    rows = []
    for ctx in (128, 256):
        if ctx > tsa.config.block_size:
            print(f"ctx {ctx} skipped: the checkpoints' block_size is {tsa.config.block_size}")
            continue
        for batch in (1, 8, 64):
            x = windows(tokens, batch, ctx, device)
            with torch.inference_mode():
                rep = report(tsa.config, tsa(x, mode="hard")[2])
                fns = {"dense": lambda x=x: dense(x), "tsa_hard": lambda x=x: tsa(x, mode="hard")}
                fns["tsa_always_gather"] = with_rule(fns["tsa_hard"], ALWAYS_GATHER)
                t = alternate(fns, repeats, device)
            ideal = 1 / (1 - rep.flops_saved)
            speedup = t["dense"] / t["tsa_hard"]
            rows.append(
                {
                    "ctx": ctx,
                    "batch": batch,
                    "dense_tok_s": batch * ctx / t["dense"],
                    "tsa_tok_s": batch * ctx / t["tsa_hard"],
                    "speedup": speedup,
                    "executed_skip": rep.executed_tlops_saved,
                    "flops_saved": rep.flops_saved,
                    "ideal_speedup": ideal,
                    "fraction_of_ideal": speedup / ideal,
                    "speedup_always_gather": t["dense"] / t["tsa_always_gather"],
                }
            )
    return rows


ALWAYS_GATHER = 1.0  # a RUN_FOR_ALL_ABOVE no kept share exceeds


def with_rule(fn, run_for_all_above: float):
    """`fn` under another model.RUN_FOR_ALL_ABOVE (when a partly skipped block runs for every token)."""

    def run():
        default, model_module.RUN_FOR_ALL_ABOVE = model_module.RUN_FOR_ALL_ABOVE, run_for_all_above
        try:
            return fn()
        finally:
            model_module.RUN_FOR_ALL_ABOVE = default

    return run


def decode_speed(dense, tsa, tokens, device, repeats, new_tokens: int) -> list[dict]:
    """Cached greedy decoding, eager and compiled, at the TSA checkpoint's own threshold."""
    rows = []
    for batch in (1, 8):
        prompts = list(windows(tokens, batch, 16, device))
        n = min(new_tokens, tsa.config.block_size - 16)
        for compiled in (False, True):

            def run(model, prompts=prompts, n=n, compiled=compiled):
                return lambda: generate_cached(model, prompts, n, temperature=0, compile=compiled)

            torch._dynamo.reset()  # a fresh compile cache per comparison: no silent fallback to eager
            t = alternate({"dense": run(dense), "tsa": run(tsa)}, repeats, device)
            rows.append({"batch": batch, "compiled": compiled, **decode_row(tsa, prompts, n, t)})
    return rows


def threshold_for_skip(halts: torch.Tensor, skip: float) -> float:
    """The threshold above which a share `skip` of these p lie (torch.quantile takes <= 16M values)."""
    return float(torch.quantile(halts.flatten().float()[:100_000], 1 - skip))


def paper_shape_models(vocab_size: int, tokens, device, skip: float = 0.3):
    """A dense twin and a TSA model at the paper's shape, untrained, the TSA threshold set to `skip`.

    Speed depends on which blocks run, not on what the weights say: the threshold is the quantile
    of the (random) routers' p on real text that skips a share `skip` of routed blocks.
    """
    torch.manual_seed(0)
    config = TSAConfig(
        vocab_size=vocab_size, routing="tsa", gate="straight_through", dropout=0.0, **PAPER_SHAPE
    )
    tsa = TSATransformer(config).to(device).eval()
    dense = TSATransformer(replace(config, routing="none")).to(device).eval()
    with torch.inference_mode():
        halts = tsa(windows(tokens, 16, config.block_size, device), mode="hard", threshold=1.01)[2].halt_probs
    tsa.config.skip_threshold = threshold_for_skip(halts, skip)
    return dense, tsa


def decode_row(tsa, prompts, n: int, t: dict) -> dict:
    """Speedup of one decoding comparison, with the skip and FLOPs of what TSA generated."""
    with torch.inference_mode():  # cached decisions equal the full-sequence hard forward's
        generated = torch.stack(generate_cached(tsa, prompts, n, temperature=0))
        routing = tsa(generated, mode="hard")[2]
    start = len(prompts[0])
    new = type(routing)(routing.halt_probs[:, start:], routing.executed[:, start:])
    rep = report(tsa.config, new)
    ideal = 1 / (1 - rep.flops_saved)
    batch = len(prompts)
    return {
        "new_tokens": n,
        "dense_tok_s": batch * n / t["dense"],
        "tsa_tok_s": batch * n / t["tsa"],
        "speedup": t["dense"] / t["tsa"],
        "executed_skip": rep.executed_tlops_saved,
        "flops_saved": rep.flops_saved,
        "ideal_speedup": ideal,
        "fraction_of_ideal": t["dense"] / t["tsa"] / ideal,
    }


def skip_rate_sweep(dense, tsa, tokens, device, repeats, new_tokens: int) -> list[dict]:
    """Batch-8 decoding at forced skip rates (thresholds at quantiles of p on test text)."""
    prompts = list(windows(tokens, 8, 16, device))
    n = min(new_tokens, tsa.config.block_size - 16)
    with torch.inference_mode():
        halts = tsa(windows(tokens, 64, tsa.config.block_size, device), mode="hard")[2].halt_probs
    rows = []
    for skip in (0.2, 0.4, 0.6):
        threshold = threshold_for_skip(halts, skip)

        def run(model, threshold=threshold):
            return lambda: generate_cached(model, prompts, n, temperature=0, threshold=threshold)

        t = alternate({"dense": run(dense), "tsa": run(tsa)}, repeats, device)
        saved, tsa.config.skip_threshold = tsa.config.skip_threshold, threshold
        try:
            row = decode_row(tsa, prompts, n, t)
        finally:
            tsa.config.skip_threshold = saved
        rows.append({"batch": 8, "target_skip": skip, "threshold": threshold, **row})
    return rows


def sample_speed(dense_module, tsa_module, repeats: int, new_tokens: int = 500) -> dict:
    """`sample` as the CLI runs it, for both checkpoints; the dense twin's cache against recomputation."""
    prompt = "\n"
    idx = torch.tensor(dense_module.codec.encode(prompt), device=dense_module.device)[None]
    t = alternate(
        {
            "dense": lambda: dense_module.sample(prompt, new_tokens, temperature=0),
            "tsa": lambda: tsa_module.sample(prompt, new_tokens, temperature=0),
            "dense_full_recompute": lambda: dense_module.model.generate(idx, new_tokens, temperature=0),
        },
        max(1, repeats),
        dense_module.device,
    )
    return {
        "new_tokens": new_tokens,
        **{f"{name}_s": v for name, v in t.items()},
        "tsa_over_dense": t["tsa"] / t["dense"],
        "cached_speedup_over_recompute": t["dense_full_recompute"] / t["dense"],
    }


def train_speed(tsa_config: TSAConfig, device, repeats, batch: int, ctx: int) -> dict:
    """One optimizer step each; dropout off, as in the plain GPT, so all four do the same computation."""
    torch.manual_seed(0)
    tsa_config = replace(tsa_config, dropout=0.0)
    models = {
        "tsa_soft": TSATransformer(replace(tsa_config, routing="tsa", gate="soft")).to(device),
        "tsa_straight_through": TSATransformer(
            replace(tsa_config, routing="tsa", gate="straight_through")
        ).to(device),
        "dense_twin": TSATransformer(replace(tsa_config, routing="none")).to(device),
        "plain_gpt": PlainGPT(tsa_config).to(device),
    }
    x = torch.randint(0, tsa_config.vocab_size, (batch, ctx), device=device)

    def step(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()

        def run():
            out = model(x, x)
            loss = out if isinstance(out, torch.Tensor) else out[1]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    t = alternate({name: step(m) for name, m in models.items()}, repeats, device)
    c = tsa_config
    return {
        "shape": f"{c.n_layer}x{c.n_embd}, {c.n_head} heads",
        "batch": batch,
        "ctx": ctx,
        **{f"{name}_ms": 1e3 * v for name, v in t.items()},
        "soft_over_dense": t["tsa_soft"] / t["dense_twin"],
        "straight_through_over_dense": t["tsa_straight_through"] / t["dense_twin"],
        "dense_over_plain": t["dense_twin"] / t["plain_gpt"],
    }


def peak_forward_mib(model, x: torch.Tensor, mode: str) -> float:
    """Peak of the memory the forward's own allocations hold at once (CUDA: the allocator's peak)."""
    with torch.inference_mode():
        if x.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model(x, mode=mode)
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(x, mode=mode)
    held, peak = 0, 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage  # this op's own allocations minus frees
        peak = max(peak, held)
    return peak / 2**20


def peak_memory(dense, tsa, tokens, device, batch: int, ctx: int) -> dict:
    x = windows(tokens, batch, ctx, device)
    return {
        "batch": batch,
        "ctx": ctx,
        "dense_mib": peak_forward_mib(dense, x, "soft"),
        "tsa_hard_mib": peak_forward_mib(tsa, x, "hard"),
    }


def table(result: dict) -> str:
    """Markdown of whichever parts were measured."""
    lines = [f"speed benchmark, {result['date']}, {result['machine']}"]
    if "forward" in result:
        lines += [
            "",
            "| ctx | batch | dense tok/s | TSA hard tok/s | speedup | executed skip | FLOPs saved | ideal "
            "| of ideal | speedup, always gathering |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["forward"]:
            lines.append(
                f"| {r['ctx']} | {r['batch']} | {r['dense_tok_s']:.0f} | {r['tsa_tok_s']:.0f} | "
                f"{r['speedup']:.2f}x | {r['executed_skip']:.1%} | {r['flops_saved']:.1%} | "
                f"{r['ideal_speedup']:.2f}x | {r['fraction_of_ideal']:.2f} | "
                f"{r['speedup_always_gather']:.2f}x |"
            )
    decode = [(part, r) for part in ("decode", "decode_paper_shape") for r in result.get(part, [])]
    if decode:
        lines += [
            "",
            "| decode | batch | compiled | new tokens | dense tok/s | TSA tok/s | speedup | executed skip "
            "| FLOPs saved | of ideal |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for part, r in decode:
            shape = "paper shape, untrained" if part == "decode_paper_shape" else "checkpoints"
            lines.append(
                f"| {shape} | {r['batch']} | {'yes' if r['compiled'] else 'no'} | {r['new_tokens']} | "
                f"{r['dense_tok_s']:.0f} | {r['tsa_tok_s']:.0f} | {r['speedup']:.2f}x | "
                f"{r['executed_skip']:.1%} | {r['flops_saved']:.1%} | {r['fraction_of_ideal']:.2f} |"
            )
    if "skip_sweep" in result:
        lines += ["", "| batch 8, forced skip | executed skip | speedup | of ideal |", "|---|---|---|---|"]
        for r in result["skip_sweep"]:
            lines.append(
                f"| {r['target_skip']:.0%} | {r['executed_skip']:.1%} | "
                f"{r['speedup']:.2f}x | {r['fraction_of_ideal']:.2f} |"
            )
    if "sample" in result:
        m = result["sample"]
        lines += [
            "",
            f"`sample` of {m['new_tokens']} tokens (greedy): dense {m['dense_s']:.2f} s, "
            f"TSA {m['tsa_s']:.2f} s "
            f"(TSA/dense {m['tsa_over_dense']:.2f}); dense full recomputation "
            f"{m['dense_full_recompute_s']:.2f} s (cache {m['cached_speedup_over_recompute']:.1f}x faster)",
        ]
    if "train" in result:
        lines += [
            "",
            "| training step | batch x ctx | TSA soft ms | TSA straight-through ms | dense twin ms "
            "| plain GPT ms | soft/dense | ST/dense | dense/plain |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for t in result["train"]:
            lines.append(
                f"| {t['shape']} | {t['batch']}x{t['ctx']} | {t['tsa_soft_ms']:.1f} | "
                f"{t['tsa_straight_through_ms']:.1f} | {t['dense_twin_ms']:.1f} | {t['plain_gpt_ms']:.1f} | "
                f"{t['soft_over_dense']:.3f} | {t['straight_through_over_dense']:.3f} | "
                f"{t['dense_over_plain']:.3f} |"
            )
    if "memory" in result:
        lines += ["", f"peak forward memory: {json.dumps(result['memory'])}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dense", required=True, help="dense twin checkpoint")
    parser.add_argument("--tsa", required=True, help="TSA checkpoint")
    parser.add_argument(
        "--data_dir", default=None, help="folder with tinyshakespeare/ (default $TSA_DATA_DIR)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new_tokens", type=int, default=112)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.json"))
    parser.add_argument("--parts", nargs="+", choices=PARTS, help="measure only these (default: all)")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; pass another --out")
    device = torch.device(args.device)

    def load(path):
        return TSALanguageModel.load_from_checkpoint(path, map_location=device).eval()

    dense_module, tsa_module = load(args.dense), load(args.tsa)
    dense, tsa = dense_module.model, tsa_module.model
    data = ShakespeareDataModule(data_dir=args.data_dir)
    data.setup()
    tokens = data.splits["test"]
    c = tsa.config
    decode_repeats = max(3, args.repeats // 2)
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    parts = {
        "forward": lambda: forward_speed(dense, tsa, tokens, device, args.repeats),
        "decode": lambda: decode_speed(dense, tsa, tokens, device, decode_repeats, args.new_tokens),
        "decode_paper_shape": lambda: decode_speed(
            *paper_shape_models(c.vocab_size, tokens, device), tokens, device, decode_repeats, args.new_tokens
        ),
        "skip_sweep": lambda: skip_rate_sweep(dense, tsa, tokens, device, decode_repeats, args.new_tokens),
        "sample": lambda: sample_speed(dense_module, tsa_module, decode_repeats),
        "train": lambda: [
            train_speed(c, device, args.repeats, batch=32, ctx=min(128, c.block_size)),
            train_speed(replace(c, **PAPER_SHAPE), device, args.repeats, batch=32, ctx=128),
        ],
        "memory": lambda: peak_memory(dense, tsa, tokens, device, batch=64, ctx=min(128, c.block_size)),
    }
    result = {
        "date": str(date.today()),
        "machine": machine,
        "device": device.type,
        "shape": {"n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head, "block_size": c.block_size},
        "skip_threshold": c.skip_threshold,
        **{name: parts[name]() for name in args.parts or parts},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(table(result) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
