"""Does skipped work become wall-clock time? A dense twin and a TSA model in hard mode, side by side.

The pair is two checkpoints (--dense, --tsa: a trained dense twin and a TSA model of the same shape)
or, without them, two untrained models at the shape of --config whose random routers skip a share
--skip of the routed blocks on real text (speed depends on which blocks run, not on what the weights
say). The text is the test split of --config's data. Measured in one process, alternating, the
median of several repeats:
- forward: full-sequence tokens/s at batch 1, 8, 64 and ctx 128, 256 (up to block_size), with the
  executed skip and FLOPs, TSA's rule for partly skipped blocks against always gathering;
- decode: KV-cache greedy decoding at batch 1 and 8, eager and compiled, against the FLOPs ideal;
- skip_sweep: batch-8 decoding at forced skip rates (20-60%);
- sample: `sample` of 500 tokens for both, and the dense twin's cache against full recomputation;
- train: one training step (forward, backward, AdamW) of TSA (soft and straight-through gate, and
  elastic depth: a threshold per row, then every budget's quantile), the dense twin and a plain
  PyTorch GPT, at the pair's shape (dropout off);
- memory: peak memory of each forward (CUDA: the allocator's peak; CPU: the profiler's record).

    python benchmarks/speed.py --dense dense.ckpt --tsa tsa.ckpt --config configs/shapes/regime.yaml
    python benchmarks/speed.py --config configs/shapes/paper.yaml --skip 0.3 --parts decode train
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
from common import SHAPES, alternate, data_module, network, resolved_config
from torch import nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

from tsa_lightning.accounting import report
from tsa_lightning.budget import Budgets, probability
from tsa_lightning.elastic import full_depth_kl
from tsa_lightning.inference import generate_cached
from tsa_lightning.model import TSAConfig, TSATransformer, skip_logit
from tsa_lightning.module import TSALanguageModel

PARTS = ("forward", "decode", "skip_sweep", "sample", "train", "validation", "memory")


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


def windows(tokens, batch: int, ctx: int, device) -> torch.Tensor:
    starts = torch.linspace(0, len(tokens) - ctx - 2, batch).long().tolist()
    return torch.stack([torch.from_numpy(tokens[s : s + ctx].astype("int64")) for s in starts]).to(device)


def forward_speed(dense, tsa, threshold, tokens, device, repeats) -> list[dict]:
    rows = []
    for ctx in sorted({min(128, tsa.config.block_size), min(256, tsa.config.block_size)}):
        for batch in (1, 8, 64):
            x = windows(tokens, batch, ctx, device)
            with torch.inference_mode():
                rep = report(tsa.config, tsa(x, mode="hard", threshold=threshold)[2])
                fns = {
                    "dense": lambda x=x: dense(x),
                    "tsa_hard": lambda x=x: tsa(x, mode="hard", threshold=threshold),
                }
                fns["tsa_always_gather"] = always_gathering(tsa, fns["tsa_hard"])
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


def always_gathering(model: TSATransformer, fn):
    """`fn` with every block gathering its kept tokens, however many run (the rule's alternative)."""

    def run():
        rules = [block.run_for_all_above for block in model.blocks]
        for block in model.blocks:
            block.run_for_all_above = 1.0  # no kept share exceeds it
        try:
            return fn()
        finally:
            for block, rule in zip(model.blocks, rules, strict=True):
                block.run_for_all_above = rule

    return run


def decode_speed(dense, tsa, threshold, tokens, device, repeats, new_tokens: int, compiles) -> list[dict]:
    """Cached greedy decoding, eager and compiled."""
    rows = []
    for batch in (1, 8):
        prompts = list(windows(tokens, batch, prompt_length(tsa), device))
        n = min(new_tokens, tsa.config.block_size - len(prompts[0]))
        for compiled in compiles:

            def run(model, prompts=prompts, n=n, compiled=compiled):
                return lambda: generate_cached(
                    model, prompts, n, temperature=0, threshold=threshold, compile=compiled
                )

            torch._dynamo.reset()  # a fresh compile cache per comparison: no silent fallback to eager
            t = alternate({"dense": run(dense), "tsa": run(tsa)}, repeats, device)
            rows.append({"batch": batch, "compiled": compiled, **decode_row(tsa, threshold, prompts, n, t)})
    return rows


def prompt_length(model: TSATransformer) -> int:
    """Decoding starts from 16 tokens of text, leaving room for new ones in a short context."""
    return min(16, model.config.block_size // 2)


def threshold_for_skip(halts: torch.Tensor, skip: float) -> float:
    """The threshold above which a share `skip` of these p lie (torch.quantile takes <= 16M values)."""
    return float(torch.quantile(halts.flatten().float()[:100_000], 1 - skip))


def halting(tsa: TSATransformer, tokens, device) -> torch.Tensor:
    """The routers' p on 64 windows of text, every block run."""
    with torch.inference_mode():
        return tsa(windows(tokens, 64, tsa.config.block_size, device), mode="hard", threshold=1.01)[
            2
        ].halt_probs


def decode_row(tsa, threshold, prompts, n: int, t: dict) -> dict:
    """Speedup of one decoding comparison, with the skip and FLOPs of what TSA generated."""
    with torch.inference_mode():  # cached decisions equal the full-sequence hard forward's
        generated = torch.stack(generate_cached(tsa, prompts, n, temperature=0, threshold=threshold))
        routing = tsa(generated, mode="hard", threshold=threshold)[2]
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
    prompts = list(windows(tokens, 8, prompt_length(tsa), device))
    n = min(new_tokens, tsa.config.block_size - len(prompts[0]))
    halts = halting(tsa, tokens, device)
    rows = []
    for skip in (0.2, 0.4, 0.6):
        threshold = threshold_for_skip(halts, skip)

        def run(model, threshold=threshold):
            return lambda: generate_cached(model, prompts, n, temperature=0, threshold=threshold)

        t = alternate({"dense": run(dense), "tsa": run(tsa)}, repeats, device)
        rows.append(
            {
                "batch": 8,
                "target_skip": skip,
                "threshold": threshold,
                **decode_row(tsa, threshold, prompts, n, t),
            }
        )
    return rows


def sample_speed(dense_module, tsa_module, threshold, repeats: int, new_tokens: int = 500) -> dict:
    """`sample` as the CLI runs it, for both models; the dense twin's cache against recomputation."""
    alphabet = dense_module.codec.alphabet
    prompt = "\n" if alphabet is None or "\n" in alphabet else alphabet[0]
    idx = torch.tensor(dense_module.codec.encode(prompt), device=dense_module.device)[None]
    t = alternate(
        {
            "dense": lambda: dense_module.sample(prompt, new_tokens, temperature=0),
            "tsa": lambda: tsa_module.sample(prompt, new_tokens, temperature=0, threshold=threshold),
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

    def step(model, budget: Budgets | None = None, teacher: bool = False):
        """One step; with a budget, elastic depth's: a threshold per row (with `teacher`, the
        full-depth pass over the rows below it: in-place distillation), then every budget's quantile."""
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        steps = iter(range(10**9))

        def run():
            threshold = None if budget is None else budget.row_thresholds(batch, step := next(steps))
            out = model(x, x, threshold=threshold) if budget is not None else model(x, x)
            loss = out if isinstance(out, torch.Tensor) else out[1]
            if teacher:
                loss = loss + full_depth_kl(model, x, out[0], threshold)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if budget is not None:
                budget.follow(out[2].halt_logits.detach(), step)

        return run

    runs = {name: step(m) for name, m in models.items()}
    for name, teacher in (
        ("tsa_elastic", False),
        ("tsa_elastic_teacher", True),
    ):  # the shipped recipe; + teacher
        elastic = Budgets.elastic(0.35, 1.0, momentum=0.1, initial=0.5).to(device)
        elastic_model = TSATransformer(replace(tsa_config, routing="tsa", gate="unit")).to(device)
        runs[name] = step(elastic_model, elastic, teacher)
    t = alternate(runs, repeats, device)
    c = tsa_config
    return {
        "shape": f"{c.n_layer}x{c.n_embd}, {c.n_head} heads",
        "batch": batch,
        "ctx": ctx,
        **{f"{name}_ms": 1e3 * v for name, v in t.items()},
        "soft_over_dense": t["tsa_soft"] / t["dense_twin"],
        "straight_through_over_dense": t["tsa_straight_through"] / t["dense_twin"],
        "elastic_over_dense": t["tsa_elastic"] / t["dense_twin"],
        "elastic_teacher_over_dense": t["tsa_elastic_teacher"] / t["dense_twin"],
        "dense_over_plain": t["dense_twin"] / t["plain_gpt"],
    }


def validation_speed(dense_module, tsa_module, batches: list, device, repeats: int) -> dict:
    """A validation while training, as each module runs one: every mode it reports at its own
    threshold (`reported_passes`), and an elastic model's pass over its grid (`GridScores.update`),
    which scores every GRID_EVERY-th batch."""

    def validation(module):
        module.eval()

        @torch.no_grad()
        def run():
            for i, (x, y) in enumerate(batches):
                module.reported_passes(x, y)
                if module.elastic_range:
                    module.grid_scores.update(
                        module.model, module.budget, (x, y), i, thorough=False, batches=len(batches)
                    )
                    module.budget.reset()  # the quantiles it observes would grow with every repeat

        return run

    t = alternate({"dense": validation(dense_module), "tsa": validation(tsa_module)}, repeats, device)
    return {
        "batches": len(batches),
        "dense_s": t["dense"],
        "tsa_s": t["tsa"],
        "tsa_over_dense": t["tsa"] / t["dense"],
    }


def peak_forward_mib(model, x: torch.Tensor, mode: str, threshold: float | None = None) -> float:
    """Peak of the memory the forward's own allocations hold at once (CUDA: the allocator's peak)."""
    with torch.inference_mode():
        if x.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model(x, mode=mode, threshold=threshold)
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(x, mode=mode, threshold=threshold)
    held, peak = 0, 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage  # this op's own allocations minus frees
        peak = max(peak, held)
    return peak / 2**20


def peak_memory(dense, tsa, threshold, tokens, device, batch: int, ctx: int) -> dict:
    x = windows(tokens, batch, ctx, device)
    return {
        "batch": batch,
        "ctx": ctx,
        "dense_mib": peak_forward_mib(dense, x, "soft"),
        "tsa_hard_mib": peak_forward_mib(tsa, x, "hard", threshold),
    }


def table(result: dict) -> str:
    """Markdown of whichever parts were measured."""
    lines = [f"speed benchmark, {result['date']}, {result['machine']}: {result['pair']}, {result['shape']}"]
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
    if "decode" in result:
        lines += [
            "",
            "| decode | batch | compiled | new tokens | dense tok/s | TSA tok/s | speedup | executed skip "
            "| FLOPs saved | of ideal |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["decode"]:
            lines.append(
                f"| {result['pair']} | {r['batch']} | {'yes' if r['compiled'] else 'no'} | "
                f"{r['new_tokens']} | "
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
            "| training step | batch x ctx | TSA soft ms | TSA straight-through ms | elastic ms "
            "| elastic + teacher ms | dense twin ms | plain GPT ms | soft/dense | ST/dense | elastic/dense "
            "| elastic + teacher/dense | dense/plain |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in result["train"]:
            lines.append(
                f"| {t['shape']} | {t['batch']}x{t['ctx']} | {t['tsa_soft_ms']:.1f} | "
                f"{t['tsa_straight_through_ms']:.1f} | {t['tsa_elastic_ms']:.1f} | "
                f"{t['tsa_elastic_teacher_ms']:.1f} | "
                f"{t['dense_twin_ms']:.1f} | {t['plain_gpt_ms']:.1f} | {t['soft_over_dense']:.3f} | "
                f"{t['straight_through_over_dense']:.3f} | {t['elastic_over_dense']:.3f} | "
                f"{t['elastic_teacher_over_dense']:.3f} | {t['dense_over_plain']:.3f} |"
            )
    if "validation" in result:
        v = result["validation"]
        lines += [
            "",
            f"validation while training ({v['batches']} batches of the validation split): dense "
            f"{v['dense_s']:.2f} s, TSA {v['tsa_s']:.2f} s (TSA/dense {v['tsa_over_dense']:.2f})",
        ]
    if "memory" in result:
        lines += ["", f"peak forward memory: {json.dumps(result['memory'])}"]
    return "\n".join(lines)


def pair(args, data, device) -> tuple[TSALanguageModel, TSALanguageModel, float | None, str]:
    """The dense and TSA modules, TSA's threshold (--threshold, else a checkpoint's own: a budget's
    calibrated one) and how the report names the pair."""
    if args.dense or args.tsa:
        if not (args.dense and args.tsa):
            raise SystemExit(
                "error: give both --dense and --tsa, or neither (random routers at --config's shape)"
            )
        dense, tsa = (
            TSALanguageModel.load_from_checkpoint(p, map_location=device).eval()
            for p in (args.dense, args.tsa)
        )
        threshold = (
            tsa.skip_threshold if args.threshold is None else args.threshold
        )  # a budget's own, calibrated
        return dense, tsa, threshold, "checkpoints"
    config = replace(network(args.config_dict, data), gate="straight_through", dropout=0.0)
    modules = []
    for routing in ("none", "tsa"):
        torch.manual_seed(0)  # the same blocks in both
        modules.append(
            TSALanguageModel(replace(config, routing=routing), alphabet=data.alphabet).to(device).eval()
        )
    dense, tsa = modules
    threshold = args.threshold
    if threshold is None:  # speed depends on which blocks run: skip a share --skip of them on real text
        threshold = threshold_for_skip(halting(tsa.model, data.splits["test"], device), args.skip)
    return dense, tsa, threshold, f"untrained, {args.skip:.0%} skip"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dense", help="dense twin checkpoint (with --tsa)")
    parser.add_argument("--tsa", help="TSA checkpoint of the same shape (with --dense)")
    parser.add_argument(
        "--config",
        type=Path,
        default=SHAPES / "regime.yaml",
        help="its data's test split is the text; without checkpoints, its shape is the pair's",
    )
    parser.add_argument("--data_dir", default=None, help="the data's data_dir (default $TSA_DATA_DIR)")
    parser.add_argument(
        "--skip", type=float, default=0.3, help="untrained pair: the share of routed blocks skipped"
    )
    parser.add_argument(
        "--threshold", type=float, help="TSA's skip threshold (default: its own, or --skip's)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new_tokens", type=int, default=112)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed/speed.json"))
    parser.add_argument("--parts", nargs="+", choices=PARTS, help="measure only these (default: all)")
    parser.add_argument(
        "--no_compile", action="store_true", help="decode eagerly only (compiling takes minutes)"
    )
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; pass another --out")
    device = torch.device(args.device)
    args.config_dict = resolved_config(args.config)
    data = data_module(args.config_dict, **({"data_dir": args.data_dir} if args.data_dir else {}))
    data.setup()
    tokens = data.splits["test"]
    dense_module, tsa_module, threshold, name = pair(args, data, device)
    dense, tsa = dense_module.model, tsa_module.model
    c = tsa.config
    decode_repeats = max(3, args.repeats // 2)
    compiles = (False,) if args.no_compile else (False, True)
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    parts = {
        "forward": lambda: forward_speed(dense, tsa, threshold, tokens, device, args.repeats),
        "decode": lambda: decode_speed(
            dense, tsa, threshold, tokens, device, decode_repeats, args.new_tokens, compiles
        ),
        "skip_sweep": lambda: skip_rate_sweep(dense, tsa, tokens, device, decode_repeats, args.new_tokens),
        "sample": lambda: sample_speed(dense_module, tsa_module, threshold, decode_repeats),
        "train": lambda: [train_speed(c, device, args.repeats, batch=32, ctx=min(128, c.block_size))],
        "validation": lambda: validation_speed(
            dense_module,
            tsa_module,
            [(x.to(device), y.to(device)) for x, y in data.val_dataloader()],
            device,
            max(3, args.repeats // 2),
        ),
        "memory": lambda: peak_memory(
            dense, tsa, threshold, tokens, device, batch=64, ctx=min(128, c.block_size)
        ),
    }
    result = {
        "date": str(date.today()),
        "machine": machine,
        "device": device.type,
        "pair": name,
        "shape": f"{c.n_layer}x{c.n_embd}, {c.n_head} heads, ctx {c.block_size}",
        "skip_threshold": probability(skip_logit(c.skip_threshold if threshold is None else threshold)),
        **{part: parts[part]() for part in args.parts or parts},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(result) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
