"""First look at real savings: hard vs soft vs dense-twin forward time, routers biased to skip a share.

At the shape of --config (the paper's by default), routers get random weights, then each output
bias is set so that a chosen fraction of tokens passes the skip threshold (calibrated on soft-mode
states). Timings alternate between modes in one process; the median of the repeats is reported.

    python benchmarks/hard_vs_soft.py --skip 0.3 --batch 64 --ctx 128
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from common import SHAPES, alternate, data_module, network, resolved_config

from tsa_lightning import TSATransformer
from tsa_lightning.accounting import report


@torch.no_grad()
def bias_routers_to_skip(model: TSATransformer, idx: torch.Tensor, skip: float) -> None:
    """Random router weights, then per router the bias that makes `skip` of tokens exceed threshold."""
    g = torch.Generator().manual_seed(0)
    threshold_logit = torch.logit(torch.tensor(model.config.skip_threshold))
    for router in model.routers:
        router.hidden.weight.copy_(
            torch.randn(router.hidden.weight.shape, generator=g) / router.hidden.in_features**0.5
        )
        router.out.weight.copy_(torch.randn(router.out.weight.shape, generator=g))
        router.out.bias.zero_()
    x = model.wte(idx) + model.wpe(torch.arange(idx.size(1)))
    x = model.blocks[0](x)
    for router, block in zip(model.routers, model.blocks[1:], strict=True):
        logits = router.out(torch.relu(router.hidden(x))).flatten()
        router.out.bias.fill_(threshold_logit - torch.quantile(logits, 1 - skip))
        x = block(x, (1 - router(x))[..., None])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip", type=float, default=0.3, help="target share of routed token-blocks skipped")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--config", type=Path, default=SHAPES / "paper.yaml", help="the shape")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hard_vs_soft.json"))
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; pass another --out")

    shape = resolved_config(args.config, args=(f"--data.init_args.block_size={args.ctx}",))
    config = replace(network(shape, data_module(shape)), routing="tsa", gate="soft")
    torch.manual_seed(0)
    model = TSATransformer(config).eval()
    torch.manual_seed(0)  # the same seed gives the dense twin the very same blocks
    dense = TSATransformer(replace(config, routing="none")).eval()
    idx = torch.randint(0, config.vocab_size, (args.batch, args.ctx))
    bias_routers_to_skip(model, idx, args.skip)

    runs = {"dense": lambda: dense(idx), "soft": lambda: model(idx), "hard": lambda: model(idx, mode="hard")}
    with torch.inference_mode():
        ms = {name: t * 1e3 for name, t in alternate(runs, args.repeats, idx.device).items()}
        rep = report(config, model(idx, mode="hard")[2])
    result = {
        "shape": f"n_embd {config.n_embd}, {config.n_layer} layers, {config.n_head} heads, "
        f"FFN {config.ffn_hidden}, vocab {config.vocab_size}",
        "batch": args.batch,
        "ctx": args.ctx,
        "threads": torch.get_num_threads(),
        "executed_fraction": rep.executed_fraction,
        "routed_skip": 1 - (rep.executed_fraction * config.n_layer - 1) / (config.n_layer - 1),
        "flops_saved": rep.flops_saved,
        "dense_ms": ms["dense"],
        "soft_ms": ms["soft"],
        "hard_ms": ms["hard"],
        "speedup_hard_over_dense": ms["dense"] / ms["hard"],
        "speedup_hard_over_soft": ms["soft"] / ms["hard"],
        "ideal_speedup_from_flops": 1 / (1 - rep.flops_saved),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("| metric | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")


if __name__ == "__main__":
    main()
