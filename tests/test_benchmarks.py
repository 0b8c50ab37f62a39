"""Every benchmark script imports and runs at its smallest setting; a suite's commands run and merge."""

import importlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, write_corpus
from tsa_lightning.budget import budget_grid
from tsa_lightning.cli import main as cli_main

BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import `common` by name, as they do when run
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
CLI = f"{sys.executable} -m tsa_lightning.cli"


def run(script: str, *args: str, monkeypatch) -> None:
    """A benchmark script's main(), as `python benchmarks/<script>.py args` runs it."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *map(str, args)])
    importlib.import_module(script).main()


@pytest.fixture(scope="module")
def tiny_shape(tmp_path_factory) -> Path:
    """A shape config small enough to fit in seconds, on a generated corpus."""
    folder = tmp_path_factory.mktemp("shape")
    corpus = write_corpus(folder / "corpus.txt", words=True)
    shape = {
        "trainer": {
            "max_steps": 3,
            "val_check_interval": 3,
            "limit_val_batches": 2,
            "enable_progress_bar": False,
        },
        "model": {"config": {"n_layer": 3, "n_head": 2, "n_embd": 16}, "learning_rate": 1e-2},
        "data": {
            "class_path": "tsa_lightning.data.TextDataModule",
            "init_args": {"path": str(corpus), "block_size": 16, "batch_size": 4},
        },
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(shape))
    return path


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_imports(script):
    importlib.import_module(script)


def test_a_suite_runs_its_commands_and_merges_them(tiny_shape, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pareto"
    listed = ["list", "pareto", "--shape", tiny_shape, "--seeds", "0", "--out", out, "--cli", CLI]
    short = [
        "--extra",
        "--trainer.max_steps=3 --trainer.val_check_interval=3",
    ]  # the retrofit's 450 steps too
    variants = ["--variants", "dense", "tsa_budget_0.7", "elastic", "retrofit_budget_0.5"]
    run("suite", *listed, *short, *variants, monkeypatch=monkeypatch)
    dense, budget, elastic, retrofit = capsys.readouterr().out.splitlines()  # stage 1, then stage 2
    # a line is a shell command: fit, then its scoring (evaluate for a sweep, test for a budget)
    result = subprocess.run(["sh", "-c", dense], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test --config" in budget and "evaluate" not in budget
    grid = ",".join(str(b) for b in reversed(budget_grid(0.35, 1.0)))
    assert f"--budgets=[{grid}]" in elastic  # one checkpoint scored at every budget of its grid
    assert f"--model.init_from={out}/runs/dense_seed0/checkpoints/last.ckpt" in retrofit
    for line in (budget, elastic, retrofit):
        for command in line.split(" && "):  # in this process: the same arguments, without a second start-up
            cli_main(shlex.split(command)[len(shlex.split(CLI)) :])
    run(
        "suite",
        "merge",
        out,
        "--suite",
        "pareto",
        "--shape",
        tiny_shape,
        "--out",
        out,
        monkeypatch=monkeypatch,
    )
    table = (out / "results.md").read_text()
    rows = {line.split(" | ")[0].strip("| ") for line in table.splitlines() if line.startswith("| ")}
    elastic_rows = {f"elastic_budget_{b}" for b in ("1", "0.85", "0.7", "0.5", "0.35")}
    assert {"dense", "tsa_budget_0.7", "retrofit_budget_0.5", *elastic_rows} <= rows
    assert "(0.7) |" in table and "(0.5) |" in table  # budgets beside the share each ran
    assert "Training: elastic " in table and "x the dense twin's" in table
    assert (out / "curves.png").is_file()
    merged = json.loads((out / "results.json").read_text())
    assert merged["runs"]["dense"][0]["train_steps"] == 3


def test_stage_two_lists_the_retrofits_after_their_dense_runs(tiny_shape, tmp_path, monkeypatch, capsys):
    listed = ["list", "pareto", "--shape", tiny_shape, "--seeds", "0", "1", "--out", tmp_path]
    run(
        "suite",
        *listed,
        "--variants",
        "dense",
        "retrofit_budget_0.85",
        "--stage",
        "2",
        monkeypatch=monkeypatch,
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("--trainer.logger.init_args.name=")[1].split()[0] for line in lines] == [
        "retrofit_budget_0.85_seed0",
        "retrofit_budget_0.85_seed1",
    ]


@pytest.mark.parametrize("suite", ["pareto", "enwik8", "paper", "cpu"])
def test_every_variant_of_every_suite_lists_one_line_per_seed(suite, tmp_path, monkeypatch, capsys):
    run(
        "suite",
        "list",
        suite,
        "--seeds",
        "0",
        "--data_dir",
        tmp_path,
        "--out",
        tmp_path,
        monkeypatch=monkeypatch,
    )
    lines = capsys.readouterr().out.splitlines()
    variants = yaml.safe_load((REPO / "configs" / "experiments" / "suites.yaml").read_text())[suite][
        "variants"
    ]
    assert len(lines) == len(variants)
    assert all(
        line.startswith("tsa-lightning fit --config=") and " && tsa-lightning " in line for line in lines
    )


@pytest.mark.parametrize("suite", ["pareto", "enwik8", "cpu"])
def test_the_committed_scores_merge_into_the_committed_tables(suite, tmp_path, monkeypatch):
    results = BENCHMARKS / "results" / suite
    run("suite", "merge", results, "--suite", suite, "--out", tmp_path, monkeypatch=monkeypatch)
    assert (tmp_path / "results.md").read_text() == (results / "results.md").read_text()


def test_speed_measures_a_trained_pair_and_an_untrained_one(tiny_shape, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    elastic = ["--model.config.gate=unit", "--model.elastic_budgets=[0.35,1.0]"]
    for name, routing, options in (("dense", "none", []), ("tsa", "tsa", elastic)):
        cli_main(
            [
                "fit",
                f"--config={tiny_shape}",
                f"--model.config.routing={routing}",
                *options,
                f"--trainer.logger.init_args.save_dir={runs}",
                f"--trainer.logger.init_args.name={name}",
            ]
        )
    pair = [f"--dense={runs}/dense/checkpoints/last.ckpt", f"--tsa={runs}/tsa/checkpoints/last.ckpt"]
    smallest = ["--config", tiny_shape, "--repeats", "1", "--new_tokens", "2", "--no_compile"]
    run("speed", *pair, *smallest, "--out", tmp_path / "trained.json", monkeypatch=monkeypatch)
    parts = ["--parts", "forward", "skip_sweep", "train"]
    run("speed", *smallest, *parts, "--out", tmp_path / "untrained.json", monkeypatch=monkeypatch)
    trained = json.loads((tmp_path / "trained.json").read_text())
    assert {"forward", "decode", "skip_sweep", "sample", "train", "validation", "memory"} <= trained.keys()
    assert trained["train"][0]["elastic_over_dense"] > 0  # elastic depth's step timed beside the others
    assert trained["train"][0]["elastic_teacher_over_dense"] > 0
    assert trained["validation"]["tsa_over_dense"] > 0 and trained["validation"]["batches"] > 0
    assert json.loads((tmp_path / "untrained.json").read_text())["pair"] == "untrained, 30% skip"
    assert (tmp_path / "untrained.md").read_text().startswith("speed benchmark")


def test_hard_vs_soft_times_the_three_forwards(tiny_shape, tmp_path, monkeypatch):
    out = tmp_path / "hard_vs_soft.json"
    run(
        "hard_vs_soft",
        "--config",
        tiny_shape,
        "--batch",
        "2",
        "--ctx",
        "16",
        "--repeats",
        "1",
        "--out",
        out,
        monkeypatch=monkeypatch,
    )
    assert {"dense_ms", "soft_ms", "hard_ms"} <= json.loads(out.read_text()).keys()


def flat(tree: dict, prefix: str = "") -> dict:
    """{"model.config.n_layer": 6, ...}: a config's leaves under their dotted keys."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_a_config_that_loads_a_shape_keeps_every_value_it_does_not_set(config):
    """A nested section in such a config would replace the shape's whole section (jsonargparse):
    every shape value the config does not set itself must survive."""
    from common import resolved_config

    own = flat(yaml.safe_load(config.read_text()))
    shape_file = own.pop("config", None)
    if shape_file is None:
        pytest.skip(f"{config.name} loads no shape")
    shape = flat(yaml.safe_load((config.parent / shape_file).read_text()))
    resolved = flat(resolved_config(config))
    for key, value in shape.items():
        if key not in own and not (key.startswith("data.") and "data.class_path" in own):
            assert resolved[key] == value, f"{config.name} loses {key}={value!r} of {shape_file}"
    for key, value in own.items():
        assert resolved[key] == value, f"{config.name}: {key} resolves to {resolved[key]!r}, not {value!r}"


def test_a_resumed_fit_is_timed_without_the_hours_between_its_stop_and_its_resume(tmp_path):
    """Each process spans its config's writing to its events file's last write; the pause between counts
    nothing, and the final last.ckpt ends the last span."""
    from suite import training

    version = tmp_path / "version_0"
    version.mkdir()
    (tmp_path / "checkpoints").mkdir()
    config = yaml.safe_dump({"trainer": {"max_steps": 30}})
    stamps = {  # file: when it was last written, in seconds
        "version_0/config.yaml": 1000,
        "version_0/events.out.tfevents.1": 1100,  # the first process stopped at 1100
        "version_0/config.resume1.yaml": 9000,  # resumed hours later
        "version_0/events.out.tfevents.2": 9040,
        "checkpoints/last.ckpt": 9050,
    }
    for name, stamp in stamps.items():
        (tmp_path / name).write_text(config)
        os.utime(tmp_path / name, (stamp, stamp))
    assert training(tmp_path) == (100 + 50, 30)


def test_a_retrofits_training_time_counts_the_dense_twin_it_starts_from():
    suite = importlib.import_module("suite")
    runs = {
        "dense": [{"train_seconds": 100.0}],
        "dense_2_blocks": [{"train_seconds": 40.0}],
        "elastic_budget_1": [{"train_seconds": 120.0}],
        "retrofit_elastic_budget_1": [{"train_seconds": 30.0}],
    }
    results = {"runs": runs, "summary": {name: {} for name in runs}}
    cost = suite.training_cost(results, suite.SUITES["pareto"])
    assert cost["elastic_vs_dense"] == pytest.approx(1.2)
    assert cost["retrofit_elastic"] == 130.0 and cost["retrofit_elastic_vs_dense"] == pytest.approx(1.3)
    assert cost["dense_family_sum"] == 140.0
