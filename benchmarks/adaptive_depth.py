"""Adaptive depth, measured honestly: TSA as published, our best TSA variant and fair baselines.

Trains on Tiny Shakespeare (same data, trainer and recipe for every model) and evaluates on the
test split in hard mode, sweeping each model's threshold:
- dense twin (6 blocks) and smaller dense models (2 and 3 blocks): the "just use a smaller
  model" control at matched executed FLOPs;
- TSA as published (soft gate, no depth loss), hard-skipped at threshold 0.5;
- TSA best variant (straight-through hard gate + depth loss; see README);
- early exit (tied exit heads, mean loss over exits, max-softmax confidence);
- Mixture-of-Depths (top-k capacity on every block, causal predictor at inference);
- the control row "TSA router at initialisation": the paper's metric before any training.
Every trained model runs with each seed. Writes JSON, a markdown table (mean and spread over
seeds) and the bpc-vs-executed-FLOPs plot.

    python benchmarks/adaptive_depth.py                      # CPU shape, about an hour on 2 cores
    python benchmarks/adaptive_depth.py --shape paper        # the paper's shape (a GPU run)
    # issue 12's regime (depth matters): the dense family, one folder per part, then --merge
    python benchmarks/adaptive_depth.py --shape regime --seeds 0 1 \
        --variants dense dense_4_blocks dense_3_blocks dense_2_blocks --out benchmarks/results/regime_dense
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from datetime import date
from pathlib import Path

import lightning as L
import torch

from tsa_lightning.accounting import dense_twin_flops
from tsa_lightning.data import Enwik8DataModule, ShakespeareDataModule, TextDataModule, data_root
from tsa_lightning.evaluation import QUIET, plot_curves, sweep
from tsa_lightning.model import TSAConfig
from tsa_lightning.module import TSALanguageModel

SHAPES = {
    "cpu": {
        "model": {"n_layer": 6, "n_head": 4, "n_embd": 128, "dropout": 0.0},
        "data": {"block_size": 256, "batch_size": 8},
        "steps": 1200,
        "learning_rate": 2e-3,
    },
    # issue 12 item 1: a CPU shape in which depth matters (see benchmarks/results/regime/)
    "regime": {
        "model": {"n_layer": 6, "n_head": 4, "n_embd": 64, "dropout": 0.1},
        "data": {"block_size": 128, "batch_size": 32},
        "steps": 3000,
        "learning_rate": 2e-3,
    },
    "paper": {
        "model": {"n_layer": 6, "n_head": 8, "n_embd": 256, "dropout": 0.1},
        "data": {"block_size": 128, "batch_size": 64},
        "steps": 5000,
        "learning_rate": 1e-3,
    },
}

# name -> model overrides; the hard-mode threshold each is reported at comes from its config
VARIANTS = {
    "dense": {"routing": "none"},
    "dense_4_blocks": {"routing": "none", "n_layer": 4},
    "dense_3_blocks": {"routing": "none", "n_layer": 3},
    "dense_2_blocks": {"routing": "none", "n_layer": 2},
    "tsa_published": {"routing": "tsa", "gate": "soft", "depth_loss_weight": 0.0},
    "tsa_best": {"routing": "tsa", "gate": "straight_through", "depth_loss_weight": 0.05},
    # the depth-loss sweep around tsa_best (run with --variants)
    "tsa_st_lambda_0.01": {"routing": "tsa", "gate": "straight_through", "depth_loss_weight": 0.01},
    "tsa_st_lambda_0.02": {"routing": "tsa", "gate": "straight_through", "depth_loss_weight": 0.02},
    # routers that start nearly closed (p ~ 0.02): the model begins as its dense twin
    "tsa_st_bias_-4": {
        "routing": "tsa",
        "gate": "straight_through",
        "depth_loss_weight": 0.05,
        "router_bias_init": -4.0,
    },
    # compute budgets: the share of routed token-blocks hard mode runs, asked for (issue 12)
    **{
        f"tsa_budget_{b}": {"routing": "tsa", "gate": "straight_through", "compute_budget": b}
        for b in (0.5, 0.7, 0.85)
    },
    # retrofits of the same seed's dense twin (train `dense` first, into the same --out), distilled
    **{
        f"retrofit_budget_{b}": {
            "routing": "tsa",
            "gate": "straight_through",
            "compute_budget": b,
            "init_from": "dense",
            "distill_weight": 1.0,
            "router_bias_init": -3.0,
        }
        for b in (0.5, 0.7, 0.85)
    },
    # the retrofits' control: the same dense twin trained (and distilled) for the same extra steps
    "dense_continued": {"routing": "none", "init_from": "dense", "distill_weight": 1.0},
    "early_exit": {"routing": "early_exit", "skip_threshold": 0.9},
    "mod": {"routing": "mod", "mod_capacity": 0.25, "mod_every": 1},
    "mod_capacity_0.5": {"routing": "mod", "mod_capacity": 0.5, "mod_every": 1},
}
DENSE_FAMILY = ("dense_2_blocks", "dense_3_blocks", "dense_4_blocks", "dense")
DEFAULT_VARIANTS = [
    "dense",
    "dense_3_blocks",
    "dense_2_blocks",
    "tsa_published",
    "tsa_best",
    "early_exit",
    "mod",
]
THRESHOLDS = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 0.95, 0.99, 1.01]
TRAINING_ARGS = (
    "depth_loss_weight",
    "compute_budget",
    "init_from",
    "distill_weight",
)  # the module's, not the net's
RETROFIT_STEPS = 0.15  # a retrofit trains for this share of the dense twin's steps
EVAL_BATCH = 64  # windows per evaluation batch: the split is walked once per threshold
# the second corpus: the first 4,154,399 bytes of enwik8 (../shared/data/enwik8/README.md), split 90/5/5
ENWIK8_PREFIX_SHA256 = "d502ac7ecb9dd47a062e7d19b8dcd3c753b07c142e48b13dcd521cb747116bdd"
CORPORA = {"shakespeare": "Tiny Shakespeare", "enwik8_prefix": "enwik8 prefix (bytes)"}


def corpus_data(corpus: str, data_dir: str | None, **kwargs) -> TextDataModule:
    if corpus == "enwik8_prefix":
        path = data_root(data_dir) / "enwik8" / "enwik8_prefix.bin"
        return Enwik8DataModule(path=str(path), sha256=ENWIK8_PREFIX_SHA256, **kwargs)
    return ShakespeareDataModule(data_dir=data_dir, **kwargs)


def train(
    name: str,
    overrides: dict,
    shape: dict,
    seed: int,
    data_dir: str | None,
    out: Path,
    dense_from: Path | None,
    corpus: str = "shakespeare",
) -> tuple[TSALanguageModel, int]:
    L.seed_everything(seed, verbose=False)
    data = corpus_data(corpus, data_dir, seed=seed, **shape["data"])
    training = {k: v for k, v in overrides.items() if k in TRAINING_ARGS}
    model_args = {k: v for k, v in overrides.items() if k not in TRAINING_ARGS}
    steps, warmup = shape["steps"], 100
    if training.get("init_from") == "dense":  # a retrofit of this seed's dense twin
        dense = (dense_from or out / "checkpoints") / f"dense_seed{seed}.ckpt"
        if not dense.is_file():
            raise SystemExit(
                f"error: {name} retrofits {dense}; train `dense` first (same --out, or --dense_from)"
            )
        training["init_from"], steps, warmup = str(dense), round(RETROFIT_STEPS * steps), 20
    config = TSAConfig(
        vocab_size=data.vocab_size, block_size=shape["data"]["block_size"], **{**shape["model"], **model_args}
    )
    model = TSALanguageModel(
        config,
        alphabet=data.alphabet,
        learning_rate=shape["learning_rate"],
        min_learning_rate=shape["learning_rate"] / 10,
        warmup_steps=warmup,
        **training,
    )
    trainer = L.Trainer(
        max_steps=steps,
        logger=L.pytorch.loggers.TensorBoardLogger(out / "tensorboard", name=f"{name}_seed{seed}"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        callbacks=[],
    )
    trainer.fit(model, data)
    if model.hparams.compute_budget is not None:  # a budget's test threshold: calibrated, refined twice
        for _ in range(3):
            L.Trainer(**QUIET).validate(model, data, verbose=False)
    trainer.save_checkpoint(out / "checkpoints" / f"{name}_seed{seed}.ckpt")
    return model, trainer.global_step


def at_threshold(curve: dict, threshold: float) -> dict:
    return next(p for p in curve["points"] if abs(p["threshold"] - threshold) < 1e-9)


def interpolate(points: list[dict], flops: float) -> float | None:
    """bpc of a curve at an executed-FLOPs fraction, linear between measured points."""
    xs = sorted((1 - p["flops_saved"], p["bpc"]) for p in points)
    for (x0, y0), (x1, y1) in itertools.pairwise(xs):
        if x0 <= flops <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (flops - x0) / (x1 - x0)
    return None


def summarize_runs(rows: list[dict]) -> dict:
    out = {}
    for key in ("bpc", "executed_tlops_saved", "flops_saved", "paper_tlops_saved"):
        values = [r[key] for r in rows]
        out[key] = {"mean": statistics.mean(values), "spread": max(values) - min(values), "values": values}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="override the shape's training steps")
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="shakespeare")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument(
        "--data_dir", default=None, help="folder with tinyshakespeare/, enwik8/ (default $TSA_DATA_DIR)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adaptive_depth"))
    parser.add_argument(
        "--dense_from",
        type=Path,
        default=None,
        help="folder of dense_seed<N>.ckpt to retrofit (default: --out's)",
    )
    parser.add_argument(
        "--merge", type=Path, nargs="+", help="no training: merge these result folders' runs into --out"
    )
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; pass another --out so earlier results are kept")
    if args.merge:
        merged = [json.loads((folder / "results.json").read_text()) for folder in args.merge]
        runs: dict[str, list[dict]] = {}
        for part in merged:  # a variant's seeds may come from several folders; each seed once
            for name, rows in part["runs"].items():
                seen = {row["seed"] for row in runs.setdefault(name, [])}
                runs[name] += [row for row in rows if row["seed"] not in seen]
        seeds = sorted({seed for part in merged for seed in part["seeds"]})
        results = {**merged[0], "seeds": seeds, "runs": runs, "merged_from": [str(f) for f in args.merge]}
        finish(results, args.out)
        return
    shape = {**SHAPES[args.shape], **({"steps": args.steps} if args.steps else {})}
    torch.manual_seed(0)
    data = corpus_data(
        args.corpus, args.data_dir, block_size=shape["data"]["block_size"], batch_size=EVAL_BATCH
    )
    data.setup()
    test = data.test_dataloader()
    started = time.time()

    results: dict = {
        "date": str(date.today()),
        "corpus": args.corpus,
        "vocab_size": data.vocab_size,
        "shape": shape,
        "seeds": args.seeds,
        "runs": {},
    }
    # the control: an untrained TSA router scored by the paper's formula
    init = TSALanguageModel(
        TSAConfig(vocab_size=data.vocab_size, block_size=shape["data"]["block_size"], **shape["model"])
    ).model
    control = sweep(init, test, [init.config.skip_threshold])["points"][0]
    results["runs"]["tsa_router_at_init"] = [
        {"seed": 0, "bpc": control["bpc"], "executed_tlops_saved": control["executed_tlops_saved"],
         "flops_saved": control["flops_saved"], "paper_tlops_saved": control["paper_tlops_saved"]}
    ]  # fmt: skip
    for name in args.variants:
        results["runs"][name] = []
        for seed in args.seeds:
            t0 = time.time()
            module, steps = train(
                name, VARIANTS[name], shape, seed, args.data_dir, args.out, args.dense_from, args.corpus
            )
            model = module.model
            train_s = time.time() - t0
            routed = model.config.routing != "none"
            thresholds = sorted({*THRESHOLDS, model.config.skip_threshold})  # a budget learns its own
            curve = sweep(model, test, thresholds if routed else [1.0])
            point = at_threshold(curve, model.config.skip_threshold if routed else 1.0)
            routed_share = statistics.mean(point["executed_per_layer"][1:])  # what a budget asks for
            run = {
                "seed": seed,
                "train_seconds": train_s,
                "train_steps": steps,
                "routed_executed": routed_share,
            }
            results["runs"][name].append({**run, **point, "curve": curve})
            bpc, saved, flops = point["bpc"], point["executed_tlops_saved"], point["flops_saved"]
            print(
                f"{name} seed {seed}: bpc {bpc:.4f}, executed saved {saved:.1%}, FLOPs saved {flops:.1%}, "
                f"routed executed {routed_share:.3f}, {steps} steps in {train_s:.0f} s",
                flush=True,
            )

    results["wall_seconds"] = time.time() - started
    finish(results, args.out)


def full_dense_fraction(shape: dict, name: str, vocab_size: int) -> float:
    """A smaller dense model's FLOPs as a fraction of the full-depth dense twin's."""
    n_layer = VARIANTS.get(name, {}).get("n_layer", shape["model"]["n_layer"])
    base = {"vocab_size": vocab_size, "block_size": shape["data"]["block_size"], "routing": "none"}
    full, small = (
        TSAConfig(**{**base, **shape["model"], "n_layer": n}) for n in (shape["model"]["n_layer"], n_layer)
    )
    T = shape["data"]["block_size"]
    return dense_twin_flops(small, 1, T) / dense_twin_flops(full, 1, T)


def shape_name(shape: dict) -> str:
    """The name of the shape a result was trained at (a merge reads it back from the results)."""
    named = [name for name, known in SHAPES.items() if known == shape]
    return f"{named[0]} shape" if named else f"custom shape ({shape['steps']} steps)"


def finish(results: dict, out: Path) -> None:
    """Summary, comparisons, JSON, markdown and plot; compute relative to the full-depth dense twin."""
    if not results.get("flops_relative_to_full_dense"):
        full = results["shape"]["model"]["n_layer"]
        for name, rows in results["runs"].items():
            factor = full_dense_fraction(results["shape"], name, results.get("vocab_size", 65))
            depth = VARIANTS.get(name, {}).get("n_layer", full) / full
            for row in rows:
                for point in [row, *row.get("curve", {}).get("points", [])]:
                    point["flops_saved"] = 1 - (1 - point["flops_saved"]) * factor
                    point["executed_tlops_saved"] = 1 - (1 - point["executed_tlops_saved"]) * depth
        results["flops_relative_to_full_dense"] = True
    summary = results["summary"] = {name: summarize_runs(rows) for name, rows in results["runs"].items()}
    results["comparisons"] = compare(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (out / "results.md").write_text(text)
    curves = {"dense 2/3/4/6 blocks": family_curve(summary, DENSE_FAMILY)}
    for family in ("tsa_budget_", "retrofit_budget_"):  # one curve through a family's budgets
        names = [n for n in summary if n.startswith(family)]
        if names:
            curves[f"{family.replace('_budget_', '')} at budgets"] = family_curve(summary, names)
    for name, rows in results["runs"].items():  # the others: the first seed's threshold sweep
        if "curve" in rows[0] and not name.startswith(("dense", "tsa_budget_", "retrofit_budget_")):
            curves[f"{name} (seed {rows[0]['seed']}, thresholds)"] = rows[0]["curve"]["points"]
    corpus = CORPORA[results.get("corpus", "shakespeare")]
    # threshold sweeps run far off to the right bpc-wise; the operating points set the scale
    top = 1.03 * max(s["bpc"]["mean"] for name, s in summary.items() if name != "tsa_router_at_init")
    title = f"{corpus} test, {shape_name(results['shape'])}"
    plot_curves(curves, out / "curves.png", title=title, ymax=top)
    print(text)


def family_curve(summary: dict, names) -> list[dict]:
    """Mean (executed FLOPs saved, bpc) of each named variant, ordered by FLOPs."""
    points = [
        {"flops_saved": summary[n]["flops_saved"]["mean"], "bpc": summary[n]["bpc"]["mean"]}
        for n in names
        if n in summary
    ]
    return sorted(points, key=lambda p: -p["flops_saved"])


def compare(results: dict) -> dict:
    """Every routed model against the dense twin, and against the other families at its executed FLOPs."""
    runs, summary = results["runs"], results["summary"]
    if "dense" not in summary:
        return {}
    dense_bpc = summary["dense"]["bpc"]["mean"]
    dense_steps = results["shape"]["steps"]
    smaller = family_curve(summary, DENSE_FAMILY)
    out = {}
    for name, s in summary.items():
        if name in DENSE_FAMILY or name == "tsa_router_at_init":
            continue
        flops = 1 - s["flops_saved"]["mean"]
        row = {
            "bpc": s["bpc"]["mean"],
            "bpc_spread": s["bpc"]["spread"],
            "vs_dense_twin": s["bpc"]["mean"] / dense_bpc - 1,
            "flops_saved": s["flops_saved"]["mean"],
            "smaller_dense_bpc_at_equal_flops": interpolate(smaller, flops),
        }
        for other in ("early_exit", "mod", "mod_capacity_0.5"):
            if other in runs and other != name:
                values = [
                    v for r in runs[other] if (v := interpolate(r["curve"]["points"], flops)) is not None
                ]
                row[f"{other}_bpc_at_equal_flops"] = statistics.mean(values) if values else None
        budget = VARIANTS.get(name, {}).get("compute_budget")
        if budget is not None:
            shares = [r["routed_executed"] for r in runs[name]]
            row.update(
                budget=budget, routed_executed=shares, budget_miss=max(abs(x - budget) for x in shares)
            )
        steps = [r["train_steps"] for r in runs[name] if r.get("train_steps")]
        if steps and VARIANTS.get(name, {}).get("init_from"):
            row["extra_steps_share_of_dense"] = max(steps) / dense_steps
        out[name] = row
    return out


def table(results: dict) -> str:
    lines = [
        f"{CORPORA[results.get('corpus', 'shakespeare')]} test split, hard mode, {results['date']}; "
        f"mean (spread) over seeds {results['seeds']}",
        "",
        "| model | test bpc | executed TLOps saved | executed FLOPs saved | paper TLOps saved "
        "| train s per seed | steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in results["summary"].items():
        cells = [f"{s[k]['mean']:.4f} ({s[k]['spread']:.4f})" for k in ("bpc",)]
        cells += [
            f"{s[k]['mean']:.1%} ({s[k]['spread']:.1%})" for k in ("executed_tlops_saved", "flops_saved")
        ]
        cells += [f"{s['paper_tlops_saved']['mean']:.1%}"]
        seconds = [f"{r['train_seconds']:.0f}" for r in results["runs"][name] if "train_seconds" in r]
        cells += [", ".join(seconds) or "-"]
        cells += [
            ", ".join(str(r["train_steps"]) for r in results["runs"][name] if "train_steps" in r) or "-"
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if results["comparisons"]:
        lines += [
            "",
            "| model | bpc | vs dense twin | FLOPs saved | smaller dense at equal FLOPs | early exit | MoD "
            "| routed executed (budget) |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for name, c in results["comparisons"].items():
        bpc = {key: "-" if c[key] is None else f"{c[key]:.4f}" for key in c if key.endswith("at_equal_flops")}
        budget = (
            f"{', '.join(f'{x:.3f}' for x in c['routed_executed'])} ({c['budget']})" if "budget" in c else "-"
        )
        lines.append(
            f"| {name} | {c['bpc']:.4f} ({c['bpc_spread']:.4f}) | {c['vs_dense_twin']:+.2%} | "
            f"{c['flops_saved']:.1%} | {bpc['smaller_dense_bpc_at_equal_flops']} | "
            f"{bpc.get('early_exit_bpc_at_equal_flops', '-')} | {bpc.get('mod_bpc_at_equal_flops', '-')} | "
            f"{budget} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
