"""Benchmark suites as ordinary commands: `list` prints a suite's runs, `merge` tables their scores.

A run is one `tsa-lightning fit` of a shape (configs/shapes/) with a variant overlay on top
(configs/experiments/<suite>/<variant>.yaml), then its scoring on the test split: `tsa-lightning
evaluate` (a threshold sweep, <out>/<variant>_seed<N>.json) or, for a compute budget, `tsa-lightning
test` (the model at the threshold it calibrated, <out>/test/<variant>_seed<N>/test_step<S>/metrics.csv).
`list` prints one shell line per run (fit, then its scoring), for xargs, a SLURM array or Ray;
`merge` reads the scores of one or more folders and writes results.json, results.md and curves.png.

    python benchmarks/suite.py list pareto --seeds 0 1 --data_dir ../shared/data --out R --stage 1 \\
        | xargs -P 2 -I{} sh -c '{}'
    python benchmarks/suite.py list pareto --seeds 0 1 --data_dir ../shared/data --out R --stage 2 \\
        | xargs -P 2 -I{} sh -c '{}'                  # retrofits: they start from stage 1's dense runs
    python benchmarks/suite.py merge R --suite pareto --out R

Fits go to <out>/runs/<variant>_seed<N>/ and are resumed by a line run again (--ckpt_path last).
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import shlex
import statistics
import sys
from dataclasses import dataclass, replace
from datetime import date
from functools import cache
from pathlib import Path

import yaml
from common import EXPERIMENTS, SHAPES, data_module, network, resolved_config

from tsa_lightning import names
from tsa_lightning.accounting import dense_twin_flops
from tsa_lightning.budget import budget_grid
from tsa_lightning.corpus import data_root
from tsa_lightning.evaluation import plot_curves


@dataclass(frozen=True)
class Suite:
    """One entry of configs/experiments/suites.yaml."""

    name: str
    title: str
    shape: Path
    variants: tuple[str, ...]
    overlays: str = ""
    corpus: tuple[str, ...] = ()
    data_file: str | None = None

    def configs(self, variant: str) -> list[Path]:
        """The config files of a variant's run, in the order they apply."""
        overlay = EXPERIMENTS / (self.overlays or self.name) / f"{variant}.yaml"
        if not overlay.is_file():
            raise ValueError(f"{variant} is not a variant of the {self.name} suite: {overlay} does not exist")
        return [self.shape, *(EXPERIMENTS / c for c in self.corpus), overlay]


def suites() -> dict[str, Suite]:
    entries = yaml.safe_load((EXPERIMENTS / "suites.yaml").read_text())
    return {
        name: Suite(
            **{**entry, "name": name, "shape": SHAPES / f"{entry['shape']}.yaml"}
            | {key: tuple(entry[key]) for key in ("variants", "corpus") if key in entry}
        )
        for name, entry in entries.items()
    }


SUITES = suites()
CONTROL = "tsa_router_at_init"  # scored at its own threshold only, compared with nothing
RETROFIT = "retrofit_"  # variants that start from the same seed's `dense` run (stage 2)
SWEEP = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 0.95, 0.99, 1.01]  # a routed model's thresholds, besides its own
BASELINES = ("early_exit", "mod", "mod_capacity_0.5")  # compared at equal FLOPs along their sweeps
TRAINING_ONLY = ("seed", "samples_per_epoch", "num_workers")  # data options scoring does not take
NAME = re.compile(r"(?P<variant>.+)_seed(?P<seed>\d+)")


def shown(path: Path) -> str:
    """A path as a command line shows it: relative to the working folder when inside it."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def data_args(suite: Suite, data_dir: str | None) -> list[str]:
    if suite.data_file:
        return [f"--data.init_args.path={data_root(data_dir) / suite.data_file}"]
    return [f"--data.init_args.data_dir={data_dir}"] if data_dir else []


@cache
def variant_config(suite: Suite, variant: str, args: tuple[str, ...] = ()) -> dict:
    return resolved_config(*suite.configs(variant), args=args)


def run_lines(suite: Suite, variant: str, seeds: list[int], args, extra: list[str]) -> list[str]:
    """One shell line per seed: fit (resumed when run again), then the scoring that writes the run's score."""
    fixed = [*data_args(suite, args.data_dir), *extra]
    config = variant_config(suite, variant, tuple(fixed))
    model, data = config["model"], config["data"]
    files = [f"--config={shown(c)}" for c in suite.configs(variant)]
    lines = []
    for seed in seeds:
        name = f"{variant}_seed{seed}"
        ckpt = args.out / "runs" / name / "checkpoints" / "last.ckpt"
        fit = [
            "fit",
            *files,
            f"--seed_everything={seed}",
            f"--data.init_args.seed={seed}",
            f"--trainer.logger.init_args.save_dir={args.out / 'runs'}",
            f"--trainer.logger.init_args.name={name}",
            "--ckpt_path=last",
            *fixed,
        ]
        if variant.startswith(RETROFIT):
            fit.append(
                f"--model.init_from={args.out / 'runs' / f'dense_seed{seed}' / 'checkpoints' / 'last.ckpt'}"
            )
        elastic = model.get("elastic_budgets")
        if model["compute_budget"] is not None and not elastic:  # scored where it calibrated its threshold
            score = [
                "test",
                *files,
                f"--ckpt_path={ckpt}",
                "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                f"--trainer.logger.init_args.save_dir={args.out / 'test'}",
                f"--trainer.logger.init_args.name={name}",
                *fixed,
            ]
        else:
            own = model["config"]["skip_threshold"]
            routed = model["config"]["routing"] != "none"
            thresholds = [own] if variant == CONTROL else sorted({*SWEEP, own}) if routed else [1.0]
            sweep = [f"--thresholds={cli_value(thresholds)}"]
            if elastic:  # every budget it trained, each at the threshold its table gives
                sweep = [f"--budgets={cli_value(sorted(budget_grid(*elastic), reverse=True))}"]
            score = [
                "evaluate",
                f"--ckpt_path={ckpt}",
                f"--data={data['class_path']}",
                *(
                    f"--data.{key}={cli_value(value)}"
                    for key, value in data["init_args"].items()
                    if value is not None and key not in TRAINING_ONLY
                ),
                "--split=test",
                *sweep,
                f"--out_dir={args.out}",
                f"--name={name}",
            ]
        lines.append(" && ".join(shlex.join([*args.cli, *command]) for command in (fit, score)))
    return lines


def cli_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def chosen_suite(args) -> Suite:
    suite = SUITES[args.suite]
    return replace(suite, shape=args.shape.resolve()) if args.shape else suite


def list_runs(args) -> None:
    suite = chosen_suite(args)
    variants = args.variants or list(suite.variants)
    stages = {
        1: [v for v in variants if not v.startswith(RETROFIT)],
        2: [v for v in variants if v.startswith(RETROFIT)],
    }
    if args.stage is None and stages[2]:
        print(
            f"note: the last {len(stages[2]) * len(args.seeds)} lines (stage 2) start from the dense runs of "
            "the first lines: run them once those have finished (--stage 1, then --stage 2)",
            file=sys.stderr,
        )
    for stage in (1, 2) if args.stage is None else (args.stage,):
        for variant in stages[stage]:
            for line in run_lines(suite, variant, args.seeds, args, shlex.split(args.extra)):
                print(line, flush=True)


# ---------------------------------------------------------------------------------------------- merge


def read_runs(folder: Path, suite: Suite) -> list[dict]:
    """The scored runs of a folder, each with its operating point: the point of a one-point sweep, else
    the model at its own threshold (`test`'s CSV log for a budget, or the sweep's point there). An
    elastic run gives one row per budget it was scored at, named `<variant>_budget_<budget>`."""
    scores = {p.stem: p for p in folder.glob("*_seed*.json") if NAME.fullmatch(p.stem)}
    tests = {
        p.parent.parent.name: p for p in sorted(folder.glob("test/*/*/metrics.csv"), key=os.path.getmtime)
    }
    runs = []
    for name in sorted(scores.keys() | tests.keys()):
        score = json.loads(scores[name].read_text()) if name in scores else {}
        points, source = score.get("points", []), scores.get(name) or tests[name]
        variant, seed = NAME.fullmatch(name)["variant"], int(NAME.fullmatch(name)["seed"])
        model = variant_config(suite, variant)["model"]
        threshold = model["config"]["skip_threshold"]
        budgets = [p for p in points if "budget" in p]
        if name in tests:
            point = test_point(tests[name])
        elif budgets:
            point = None
        elif len(points) == 1:
            point = points[0]
        elif model["compute_budget"] is not None:
            raise ValueError(f"{source}: a budgeted run is scored at its calibrated threshold, by `test`")
        else:
            own = [p for p in points if abs(p["threshold"] - threshold) < 1e-9]
            if not own:
                raise ValueError(f"{source} has no point at the model's threshold {threshold}")
            point = own[0]
        if "train_steps" in score:  # recorded with the score
            seconds, steps = score["train_seconds"], score["train_steps"]
        else:
            seconds, steps = training(folder / "runs" / name)
        run = {
            "variant": variant,
            "seed": seed,
            "date": score.get("date") or date.fromtimestamp(source.stat().st_mtime).isoformat(),
            "train_seconds": seconds,
            "train_steps": steps,
        }
        if budgets:
            runs += [
                {**run, **p, "variant": f"{variant}_budget_{p['budget']:g}", "curve": None} for p in budgets
            ]
        else:
            runs.append({**run, **point, "curve": points if len(points) > 1 else None})
    return runs


def variant_of(name: str, suite: Suite) -> str:
    """The variant a row comes from: itself, or the elastic variant of `<variant>_budget_<budget>`."""
    elastic = name.rsplit("_budget_", 1)[0]
    if name not in suite.variants and elastic in suite.variants and is_elastic(suite, elastic):
        return elastic
    return name


def is_elastic(suite: Suite, variant: str) -> bool:
    return bool(variant_config(suite, variant)["model"].get("elastic_budgets"))


def test_point(path: Path) -> dict:
    """The last row of a `test` run's CSV log, under the names of a sweep's points."""
    row = list(csv.DictReader(path.read_text().splitlines()))[-1]
    per_layer = [float(share) for share in names.block_shares(row, "test")]
    return {
        "threshold": None,
        "bpc": float(row[names.loss("test", "hard")]),
        "executed_fraction": statistics.mean(per_layer),
        "executed_tlops_saved": float(row[names.of_split("test")]),
        "flops_saved": float(row[names.of_split("test", "flops_saved")]),
        "paper_tlops_saved": float(row[names.of_split("test", "tlops_saved_paper")]),
        "executed_per_layer": per_layer,
    }


def training(run: Path) -> tuple[float | None, int | None]:
    """A fit's wall clock and the steps its config asked for (None, None: no fit there).

    Each process of the fit (the first, then every resume) writes its config as it starts and its
    own TensorBoard events file until it stops: the fit's time is the sum of those spans, up to the
    final last.ckpt, so the hours between a stop and its resume are not counted."""
    configs = sorted(run.glob("version_*/config*.yaml"), key=os.path.getmtime)
    events = sorted(run.glob("version_*/events.out.tfevents.*"), key=os.path.getmtime)
    end = run / "checkpoints" / "last.ckpt"
    if not configs or not end.is_file():
        return None, None
    steps = yaml.safe_load(configs[-1].read_text())["trainer"]["max_steps"]
    if len(events) != len(configs):  # not one events file per process: the whole span
        return end.stat().st_mtime - configs[0].stat().st_mtime, steps
    ends = [os.path.getmtime(e) for e in events]
    ends[-1] = max(ends[-1], os.path.getmtime(end))
    return sum(stop - os.path.getmtime(c) for c, stop in zip(configs, ends, strict=True)), steps


def full_depth_fractions(suite: Suite, variant: str) -> tuple[float, float]:
    """A variant's dense FLOPs and depth as fractions of the shape's full-depth dense twin's."""
    config = variant_config(suite, variant)
    net = network(config, data_module(config))
    full = variant_config(suite, "dense")["model"]["config"]["n_layer"]
    if net.n_layer == full:
        return 1.0, 1.0
    T = net.block_size
    flops = dense_twin_flops(net, 1, T) / dense_twin_flops(replace(net, n_layer=full), 1, T)
    return flops, net.n_layer / full


def merge(args) -> None:
    suite = chosen_suite(args)
    runs = [run for folder in args.folders for run in read_runs(folder, suite)]
    if not runs:
        raise SystemExit(f"error: no scored runs in {', '.join(map(str, args.folders))}")
    unknown = sorted({variant_of(r["variant"], suite) for r in runs} - set(suite.variants))
    if unknown:
        raise SystemExit(f"error: {', '.join(unknown)} not in the {suite.name} suite")
    by_variant: dict[str, list[dict]] = {}
    names = {r["variant"] for r in runs}
    ordered = []  # suite order; an elastic variant's rows from its highest budget down
    for variant in suite.variants:
        mine = [n for n in names if variant_of(n, suite) == variant]
        ordered += sorted(mine, key=budget_of, reverse=True) if is_elastic(suite, variant) else mine
    for variant in ordered:
        rows = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        if len({r["seed"] for r in rows}) < len(rows):
            raise SystemExit(f"error: a seed of {variant} was scored twice; merge each run once")
        flops, depth = full_depth_fractions(suite, variant_of(variant, suite))
        for row in rows:
            for point in [row, *(row["curve"] or [])]:  # compute relative to the full-depth dense twin
                point["flops_saved"] = 1 - (1 - point["flops_saved"]) * flops
                point["executed_tlops_saved"] = 1 - (1 - point["executed_tlops_saved"]) * depth
            row["routed_executed"] = statistics.mean(row["executed_per_layer"][1:])
        if rows:
            by_variant[variant] = rows
    results = {
        "suite": suite.name,
        "title": suite.title,
        "shape": suite.shape.stem,
        "date": max(r["date"] for r in runs),
        "seeds": sorted({r["seed"] for r in runs}),
        "runs": by_variant,
        "summary": {name: summarize(rows) for name, rows in by_variant.items()},
    }
    results["comparisons"] = compare(results, suite)
    results["training_cost"] = training_cost(results, suite)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    (args.out / "results.md").write_text(text)
    plot(results, suite, args.out / "curves.png")
    print(text)


def budget_of(name: str) -> float:
    """The budget an elastic variant's row name ends with."""
    return float(name.rsplit("_budget_", 1)[1])


def training_cost(results: dict, suite: Suite) -> dict:
    """Mean training seconds per seed: each elastic run against the dense twin and the dense family; a
    retrofit's with the dense twin it starts from."""
    seconds = {
        variant_of(name, suite): statistics.mean(r["train_seconds"] for r in rows)
        for name, rows in results["runs"].items()
        if all(r["train_seconds"] is not None for r in rows)
    }
    family = [n for n in dense_family(results, suite) if n in seconds]
    elastic = [v for v in seconds if is_elastic(suite, v)]
    if "dense" not in seconds or not elastic:
        return {}
    return {
        "dense": seconds["dense"],
        "dense_family": family,
        "dense_family_sum": sum(seconds[n] for n in family),
        **{v: seconds[v] + (seconds["dense"] if v.startswith(RETROFIT) else 0) for v in elastic},
        **{
            f"{v}_vs_dense": (seconds[v] + (seconds["dense"] if v.startswith(RETROFIT) else 0))
            / seconds["dense"]
            for v in elastic
        },
    }


def summarize(rows: list[dict]) -> dict:
    out = {}
    for key in ("bpc", "executed_tlops_saved", "flops_saved", "paper_tlops_saved"):
        values = [r[key] for r in rows]
        out[key] = {"mean": statistics.mean(values), "spread": max(values) - min(values), "values": values}
    return out


def interpolate(points: list[dict], flops: float) -> float | None:
    """bpc of a curve at an executed-FLOPs fraction, linear between measured points."""
    xs = sorted((1 - p["flops_saved"], p["bpc"]) for p in points)
    for (x0, y0), (x1, y1) in itertools.pairwise(xs):
        if x0 <= flops <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (flops - x0) / (x1 - x0)
    return None


def family_curve(summary: dict, names) -> list[dict]:
    """Mean (executed FLOPs saved, bpc) of each named variant, ordered by FLOPs."""
    points = [
        {"flops_saved": summary[n]["flops_saved"]["mean"], "bpc": summary[n]["bpc"]["mean"]} for n in names
    ]
    return sorted(points, key=lambda p: -p["flops_saved"])


def dense_family(results: dict, suite: Suite) -> list[str]:
    return [
        n
        for n in results["summary"]
        if variant_config(suite, variant_of(n, suite))["model"]["config"]["routing"] == "none"
    ]


def compare(results: dict, suite: Suite) -> dict:
    """Every routed model against the dense twin, and against the other families at its executed FLOPs."""
    runs, summary = results["runs"], results["summary"]
    if "dense" not in summary:
        return {}
    dense = dense_family(results, suite)
    smaller = family_curve(summary, dense)
    out = {}
    for name, s in summary.items():
        if name in dense or name == CONTROL:
            continue
        model = variant_config(suite, variant_of(name, suite))["model"]
        flops = 1 - s["flops_saved"]["mean"]
        row = {
            "bpc": s["bpc"]["mean"],
            "bpc_spread": s["bpc"]["spread"],
            "vs_dense_twin": s["bpc"]["mean"] / summary["dense"]["bpc"]["mean"] - 1,
            "flops_saved": s["flops_saved"]["mean"],
            "smaller_dense_bpc_at_equal_flops": interpolate(smaller, flops),
        }
        for other in BASELINES:
            if other in runs and other != name:
                values = [
                    v for r in runs[other] if r["curve"] and (v := interpolate(r["curve"], flops)) is not None
                ]
                row[f"{other}_bpc_at_equal_flops"] = statistics.mean(values) if values else None
        if model["compute_budget"] is not None or model.get("elastic_budgets"):
            shares = [r["routed_executed"] for r in runs[name]]
            budget = runs[name][0].get("budget", model["compute_budget"])
            row.update(
                budget=budget, routed_executed=shares, budget_miss=max(abs(x - budget) for x in shares)
            )
        out[name] = row
    return out


def table(results: dict) -> str:
    lines = [
        f"{results['title']} test split, hard mode, {results['date']}; "
        f"mean (spread) over seeds {results['seeds']}",
        "",
        "| model | test bpc | executed TLOps saved | executed FLOPs saved | paper TLOps saved "
        "| train s per seed | steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in results["summary"].items():
        rows = results["runs"][name]
        cells = [f"{s['bpc']['mean']:.4f} ({s['bpc']['spread']:.4f})"]
        cells += [
            f"{s[k]['mean']:.1%} ({s[k]['spread']:.1%})" for k in ("executed_tlops_saved", "flops_saved")
        ]
        cells += [f"{s['paper_tlops_saved']['mean']:.1%}"]
        cells += [
            ", ".join(f"{r['train_seconds']:.0f}" for r in rows if r["train_seconds"] is not None) or "-"
        ]
        cells += [", ".join(str(r["train_steps"]) for r in rows if r["train_steps"] is not None) or "-"]
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
            f"{c['flops_saved']:.1%} | {bpc['smaller_dense_bpc_at_equal_flops']}{versus(c)} | "
            f"{bpc.get('early_exit_bpc_at_equal_flops', '-')} | {bpc.get('mod_bpc_at_equal_flops', '-')} | "
            f"{budget} |"
        )
    cost = results.get("training_cost") or {}
    for variant in (v for v in cost if f"{v}_vs_dense" in cost):
        lines += [
            "",
            f"Training: {variant} {cost[variant]:.0f} s per seed"
            + (" (with the dense twin it starts from)" if variant.startswith(RETROFIT) else "")
            + f" = {cost[f'{variant}_vs_dense']:.2f}x the "
            f"dense twin's {cost['dense']:.0f} s; the dense family ({', '.join(cost['dense_family'])}) "
            f"{cost['dense_family_sum']:.0f} s = {cost['dense_family_sum'] / cost['dense']:.2f}x.",
        ]
    return "\n".join(lines) + "\n"


def versus(comparison: dict) -> str:
    """How far a model lies above (+) or below the smaller-dense curve at its FLOPs."""
    dense = comparison["smaller_dense_bpc_at_equal_flops"]
    return "" if dense is None else f" ({comparison['bpc'] / dense - 1:+.2%})"


def plot(results: dict, suite: Suite, path: Path) -> None:
    """bpc against executed FLOPs: the dense family and each budget family through their means, the other
    routed models along their first seed's threshold sweep."""
    summary = results["summary"]
    dense = dense_family(results, suite)
    depths = sorted(variant_config(suite, n)["model"]["config"]["n_layer"] for n in dense)
    curves = {f"dense {'/'.join(map(str, depths))} blocks": family_curve(summary, dense)}
    families = sorted({n.split("_budget_")[0] for n in summary if "_budget_" in n})
    for family in families:
        curves[f"{family} at budgets"] = family_curve(
            summary, [n for n in summary if n.startswith(family + "_budget_")]
        )
    for name, rows in results["runs"].items():
        if name not in dense and name != CONTROL and "_budget_" not in name and rows[0]["curve"]:
            curves[f"{name} (seed {rows[0]['seed']}, thresholds)"] = rows[0]["curve"]
    # threshold sweeps run far off to the right bpc-wise; the operating points set the scale
    top = 1.03 * max(s["bpc"]["mean"] for name, s in summary.items() if name != CONTROL)
    plot_curves(curves, path, title=f"{suite.title} test, {suite.shape.stem} shape", ymax=top)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    lister = commands.add_parser("list", help="print one shell line per run: fit, then its scoring")
    lister.add_argument("suite", choices=sorted(SUITES))
    lister.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    lister.add_argument("--out", type=Path, required=True, help="scores here; fits under <out>/runs/")
    lister.add_argument(
        "--data_dir", default=None, help="folder with tinyshakespeare/, enwik8/ (default $TSA_DATA_DIR)"
    )
    lister.add_argument(
        "--stage", type=int, choices=(1, 2), help="1: runs that need none; 2: retrofits (after 1)"
    )
    lister.add_argument("--variants", nargs="+", help="only these (default: the whole suite)")
    lister.add_argument("--shape", type=Path, help="another shape config instead of the suite's")
    lister.add_argument("--extra", default="", help="more fit/test options, e.g. '--trainer.max_steps=2'")
    lister.add_argument(
        "--cli", type=shlex.split, default=["tsa-lightning"], help="the command that runs the CLI"
    )
    merger = commands.add_parser(
        "merge", help="merge the scores of runs into results.json, results.md, curves.png"
    )
    merger.add_argument("folders", type=Path, nargs="+")
    merger.add_argument("--suite", choices=sorted(SUITES), required=True)
    merger.add_argument("--out", type=Path, required=True)
    merger.add_argument("--shape", type=Path, help="the shape config the runs used, if not the suite's")
    args = parser.parse_args()
    try:
        list_runs(args) if args.command == "list" else merge(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
