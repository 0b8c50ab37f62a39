"""The user's main job end to end, through the real command line."""

import json
import re
import zipfile
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalars_metadata
from tensorboard.plugins.hparams import metadata as hparams_metadata

from tests.helpers import REPO, cli, write_corpus
from tsa_lightning import names
from tsa_lightning.callbacks import HPARAM_LEAD, HPARAM_METRICS
from tsa_lightning.cli import main
from tsa_lightning.corpus import SHAKESPEARE_ALPHABET
from tsa_lightning.data import ShakespeareDataModule
from tsa_lightning.inference import sample

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# two steps and two validation batches of 4 windows: the config's network and data, checked quickly
SHORT = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=2",
    "--data.init_args.batch_size=4",
]


def data_overrides(config: Path, shared_data: Path, tmp_path: Path) -> list[str]:
    """Shakespeare reads the real file; enwik8 configs get a small generated enwik8.zip."""
    if "enwik8" not in config.name:
        return [f"--data.init_args.data_dir={shared_data}"]
    content = write_corpus(tmp_path / "raw", n_chars=200_000).read_bytes()
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as archive:
        archive.writestr("enwik8", content)
    return [f"--data.init_args.path={tmp_path / 'enwik8.zip'}", "--data.init_args.sha256=null"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_prints_and_fits_two_steps(config, shared_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={config}", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "checkpoint:" in printed
    main(
        [
            "fit",
            f"--config={config}",
            *SHORT,
            *data_overrides(config, shared_data, tmp_path),
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert list((tmp_path / "runs").glob("*/checkpoints/last.ckpt"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shared_data):
    """A short fit of the CPU config through the real CLI, in a subprocess."""
    root = tmp_path_factory.mktemp("run")
    result = cli(
        "fit",
        f"--config={REPO / 'configs' / 'shakespeare_cpu.yaml'}",
        "--trainer.max_steps=12",
        "--trainer.val_check_interval=6",
        "--trainer.limit_val_batches=3",
        "--halting_histograms.every_n_steps=5",
        "--model.config.router_bias_init=0.0",  # p starts near the threshold 0.5: some tokens skip
        "--trainer.logger.init_args.name=cpu",
        f"--data.init_args.data_dir={shared_data}",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "fit.stderr").write_text(result.stderr)
    return root


def test_fit_writes_checkpoint_and_config(trained_run):
    assert (trained_run / "runs/cpu/checkpoints/last.ckpt").is_file()
    assert (trained_run / "runs/cpu/version_0/config.yaml").is_file()


def test_fit_says_where_everything_goes_and_ends_with_a_summary(trained_run):
    printed = (trained_run / "fit.stderr").read_text()
    checkpoints = (trained_run / "runs/cpu/checkpoints").resolve()
    assert "Logs: runs/cpu/version_0 (watch them: tensorboard --logdir runs)" in printed
    assert f"Checkpoints: {checkpoints}" in printed
    summary = printed[printed.index("Run finished at step 12.") :]
    assert "hard-mode bpc" in summary and "mean blocks per token" in summary
    table = "| step | val bpc | executed TLOps saved | executed FLOPs saved | paper TLOps saved |"
    assert f"  validations:\n    {table}\n    |---|---|---|---|---|\n    | 6 | " in summary
    scalars = run_events(trained_run / "runs/cpu/version_0").Scalars(names.loss("val", "hard"))
    assert [e.step for e in scalars] == [6, 12]  # the steps of the summary, best-12.ckpt and `validate`
    bpc = [
        line.split(" | ")[2] for line in summary.splitlines() if line.startswith(("    | 6 |", "    | 12 |"))
    ]
    assert bpc == [f"{e.value:.4f}" for e in scalars]  # each validation, as TensorBoard has it
    assert f"final state:     {checkpoints / 'last.ckpt'}" in summary
    assert "💡" not in printed and "weights_only" not in printed  # Lightning's notes, silenced
    assert "`Trainer.fit` stopped" not in printed  # it broke the final bar in two; the summary says it
    bars = [line for line in printed.split("\n") if "step: 100%" in line]  # \r redraws stay on a line
    assert len(bars) <= 1, bars


OWN_OPTIONS = (
    "--model.",
    "--data.",
    "--dashboard.",
    "--halting_histograms.",
    "--depth_map.",
    "--budget_curve.",
)
OWN_OPTIONS += ("--prediction_writer.", "--hard_sample.", "--last_checkpoint.")


def test_fit_help_describes_every_option_of_the_package():
    result = cli("fit", "--help", cwd=REPO)
    described = " ".join(result.stdout.split())
    assert "--model.compute_budget COMPUTE_BUDGET share of the routed token-blocks" in described
    assert "--model.config.gate {soft,straight_through,unit} how p gates a block in training" in described
    entries = re.split(r"\n  (?=--)", result.stdout)  # one per option, its description under it
    own = [e for e in entries if e.startswith(OWN_OPTIONS) and "CONFIG  " not in e and "(type:" in e]
    assert len(own) > 30 and any(e.startswith("--model.config.gate") for e in own)
    bare = [e.split()[0] for e in own if not " ".join(e.split("(type:")[0].split()[2:]).strip()]
    assert not bare, bare


def run_events(run: Path) -> EventAccumulator:
    everything = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
    events = EventAccumulator(str(run), size_guidance=everything)
    events.Reload()
    return events


def test_tensorboard_has_routing_views(trained_run):
    events = run_events(trained_run / "runs/cpu/version_0")
    tags = events.Tags()
    histograms, scalars, images = set(tags["histograms"]), set(tags["scalars"]), set(tags["images"])
    n_layer = 6
    for stage in ("train", "val"):
        # every block on both sides, a router named by the block it gates (block 0 always runs)
        assert {t for t in histograms if t.startswith(f"halting/{stage}/")} == {
            f"halting/{stage}/block_{l}" for l in range(1, n_layer)
        }
        assert {t for t in scalars if t.startswith(f"executed/{stage}/")} == {
            f"executed/{stage}/block_{l}" for l in range(n_layer)
        }
        saved = ("tlops_saved_paper", "tlops_saved_executed", "flops_saved")
        assert {f"{stage}/{name}" for name in saved} <= scalars
    assert {"val/soft/bpc", "val/hard/bpc", "val/hard/loss", "val/hard/ppl", "train/loss"} <= scalars
    assert "depth_map/val" in images
    histogram = events.Histograms("halting/val/block_1")[-1].histogram_value
    data = yaml.safe_load((trained_run / "runs/cpu/version_0/config.yaml").read_text())["data"]["init_args"]
    assert histogram.num == 3 * data["batch_size"] * data["block_size"]  # every token of 3 validation batches
    assert histogram.min >= 0.0 and histogram.max <= 1.0
    assert events.Scalars("executed/val/block_0")[-1].value == 1.0  # the stem always runs


def test_histograms_and_executed_shares_count_the_same_block(trained_run):
    """A router's histogram and the share of the block it gates: p <= 0.5 is 'ran' in hard mode."""
    events = run_events(trained_run / "runs/cpu/version_0")
    shares = []
    for block in range(1, 6):
        histograms = events.Histograms(f"halting/val/block_{block}")
        executed = events.Scalars(f"executed/val/block_{block}")
        assert len(histograms) == len(executed) == 2  # one each per validation
        for histogram, share in zip(histograms, executed, strict=True):
            value = histogram.histogram_value
            below_half = sum(c for c, top in zip(value.bucket, value.bucket_limit, strict=True) if top <= 0.5)
            # a token or two may sit on p == 0.5 exactly: it ran, but its histogram bin starts at 0.5
            assert share.value == pytest.approx(below_half / value.num, abs=1e-3), block
            shares.append(share.value)
    assert any(0.0 < share < 1.0 for share in shares)  # some tokens skipped: a numbering slip would show


def test_every_tag_once_under_one_name(trained_run):
    """The full list of scalar tags: one name per quantity, the same names for train and val."""
    scalars = set(run_events(trained_run / "runs/cpu/version_0").Tags()["scalars"])
    saved = ("tlops_saved_executed", "flops_saved", "tlops_saved_paper")
    expected = {"train/loss", "train/bpc", "train/ppl", "val/step"}  # no epoch chart: runs count steps
    expected |= {f"val/{mode}/{name}" for mode in ("soft", "hard") for name in ("loss", "bpc", "ppl")}
    for stage in ("train", "val"):
        expected |= {f"{stage}/{name}" for name in saved} | {f"executed/{stage}/block_{l}" for l in range(6)}
    assert scalars == expected


def test_custom_scalars_charts_find_their_tags(trained_run):
    events = run_events(trained_run / "runs/cpu/version_0")
    proto = events.Tensors(custom_scalars_metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto
    layout = layout_pb2.Layout.FromString(proto.string_val[0])
    scalars = events.Tags()["scalars"]
    charts = {chart.title: chart for category in layout.category for chart in category.chart}
    for (
        title,
        chart,
    ) in charts.items():  # one tag per run: TensorBoard tells a run's tags apart by marker only
        assert len(chart.multiline.tag) == 1, title
        matched = [tag for tag in scalars if re.match(chart.multiline.tag[0], tag)]
        assert matched, title
        assert len({tag.split("/")[0] for tag in matched}) == 1 or "val / test" in title, (title, matched)
    assert "executed FLOPs saved (routers counted), val / test" in charts
    for stage in ("train", "val / test"):
        blocks = next(c for c in layout.category if c.title == f"each block, {stage} (executed share)").chart
        assert len(blocks) == 6  # one chart per block, its own colours


def test_hparams_table_shows_final_quality_and_compute(trained_run):
    events = run_events(trained_run / "runs/cpu/version_0")
    content = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    experiment = hparams_metadata.parse_experiment_plugin_data(content[hparams_metadata.EXPERIMENT_TAG])
    metrics = {info.name.tag for info in experiment.metric_infos}
    assert metrics == set(HPARAM_METRICS)
    logged = metrics & set(events.Tags()["scalars"])  # the table reads the scalars the module logs
    assert {"val/step", "val/hard/bpc", "val/tlops_saved_executed", "val/flops_saved"} <= logged
    leading = {h.name for h in experiment.hparam_infos if h.differs}  # TensorBoard lists these first
    assert leading == set(HPARAM_LEAD)
    hparams = {h.name for h in experiment.hparam_infos}
    assert {"n_layer", "skip_threshold", "depth_loss_weight", "gate"} <= hparams
    assert "alphabet" not in hparams and not any(name.startswith("_") for name in hparams)
    start = hparams_metadata.parse_session_start_info_plugin_data(
        content[hparams_metadata.SESSION_START_INFO_TAG]
    )
    assert start.hparams["router_bias_init"].number_value == 0.0 and start.hparams["gate"].string_value
    assert start.hparams["command"].string_value == "fit"  # a validate of it says validate


def test_depth_map_fits_the_image_card(trained_run):
    image = run_events(trained_run / "runs/cpu/version_0").Images("depth_map/val")[-1]
    assert 400 <= image.width <= 640 and image.height < image.width


def test_hard_sample_annotates_each_character_with_its_blocks(trained_run, shared_data):
    samples = run_events(trained_run / "runs/cpu/version_0").Tensors("sample/val/text_summary")
    assert len(samples) == 2  # one per validation
    text = samples[-1].tensor_proto.string_val[0].decode()
    assert "threshold 0.5" in text
    rows = [line[4:] for line in text.splitlines() if line.startswith("    ")]
    chars, digits = rows[0::2], rows[1::2]
    assert len(rows) == 2 and len(chars[0]) == len(digits[0]) == 64  # 16 prompt + 48 new characters
    assert set("".join(digits)) <= set("123456")
    data = ShakespeareDataModule(data_dir=str(shared_data))
    data.setup("fit")
    prompt = data.codec.decode(data.splits["val"][:16].tolist())
    assert chars[0].startswith(prompt.replace("\n", "¶"))


def test_saved_config_reproduces_the_run(trained_run):
    saved = trained_run / "runs/cpu/version_0/config.yaml"
    again = cli("fit", f"--config={saved}", "--checkpoint.dirpath=runs/again", cwd=trained_run)
    assert again.returncode == 0, again.stderr[-3000:]

    def final(version: str) -> float:
        events = EventAccumulator(str(trained_run / "runs/cpu" / version))
        events.Reload()
        return events.Scalars("val/hard/bpc")[-1].value

    assert final("version_1") == pytest.approx(final("version_0"), abs=1e-6)


def test_rerun_never_overwrites_a_previous_run(trained_run):
    checkpoint = trained_run / "runs/cpu/checkpoints/last.ckpt"
    before = checkpoint.stat().st_mtime_ns
    result = cli("fit", f"--config={trained_run / 'runs/cpu/version_0/config.yaml'}", cwd=trained_run)
    assert result.returncode != 0
    assert "already holds checkpoints" in result.stderr and "--ckpt_path last" in result.stderr
    assert checkpoint.stat().st_mtime_ns == before


@pytest.mark.parametrize("subcommand, split", [("validate", "val"), ("test", "test")])
def test_validate_and_test_print_bpc_and_tlops(trained_run, subcommand, split):
    versions = sorted((trained_run / "runs/cpu").glob("version_*"))
    result = cli(
        subcommand,
        f"--config={trained_run / 'runs/cpu/version_0/config.yaml'}",
        "--ckpt_path=runs/cpu/checkpoints/last.ckpt",
        f"--trainer.limit_{split}_batches=2",
        cwd=trained_run,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for metric in ("soft/bpc", "hard/bpc", "tlops_saved_paper", "tlops_saved_executed", "flops_saved"):
        assert f"{split}/{metric}" in result.stdout
    # beside the training run, not a new version of it, at the step the checkpoint was trained to
    logged = trained_run / f"runs/cpu/{subcommand}_step12"
    assert f"Logged to runs/cpu/{subcommand}_step12" in result.stderr
    assert [e.step for e in run_events(logged).Scalars(f"{split}/hard/bpc")] == [12]
    assert sorted((trained_run / "runs/cpu").glob("version_*")) == versions  # no new training version
    assert sorted(p.name for p in logged.iterdir() if p.suffix == ".yaml") == ["config.yaml", "hparams.yaml"]
    # the HParams table, which cuts run names to the training run's, says which command made the row
    content = run_events(logged).PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    start = hparams_metadata.parse_session_start_info_plugin_data(
        content[hparams_metadata.SESSION_START_INFO_TAG]
    )
    assert start.hparams["command"].string_value == subcommand


def test_two_validations_of_one_checkpoint_never_share_a_log_folder(trained_run):
    """Other budgets or precisions of one checkpoint are other runs: each its own TensorBoard run."""
    command = ["validate", f"--config={trained_run / 'runs/cpu/version_0/config.yaml'}"]
    command += ["--ckpt_path=runs/cpu/checkpoints/last.ckpt", "--trainer.limit_val_batches=1"]
    before = {p.name for p in (trained_run / "runs/cpu").iterdir()}
    for threshold in (0.3, 0.7):
        result = cli(*command, f"--model.config.skip_threshold={threshold}", cwd=trained_run)
        assert result.returncode == 0, result.stderr[-3000:]
    new = sorted({p.name for p in (trained_run / "runs/cpu").iterdir()} - before)
    assert len(new) == 2 and all(name.startswith("validate_step12") for name in new), new
    for name in new:  # one validation each, and its own config: nothing resumed
        assert len(run_events(trained_run / "runs/cpu" / name).Scalars("val/hard/bpc")) == 1
        assert not list((trained_run / "runs/cpu" / name).glob("config.resume*.yaml"))


def test_predict_reports_tokens_and_depths(trained_run):
    result = cli(
        "predict",
        f"--config={trained_run / 'runs/cpu/version_0/config.yaml'}",
        "--ckpt_path=runs/cpu/checkpoints/last.ckpt",
        "--trainer.limit_predict_batches=2",
        cwd=trained_run,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = list((trained_run / "runs/cpu").glob("*/predictions.jsonl"))
    assert [p.parent.name for p in written] == ["predict_step12"]
    assert f"Wrote {Path('runs/cpu/predict_step12/predictions.jsonl')}" in result.stderr
    lines = [json.loads(line) for line in written[0].read_text().splitlines()]
    data = yaml.safe_load((trained_run / "runs/cpu/version_0/config.yaml").read_text())["data"]["init_args"]
    assert len(lines) == 2 * data["batch_size"] and [line["window"] for line in lines] == list(
        range(len(lines))
    )
    for line in lines:
        assert len(line["text"]) == len(line["next"]) == len(line["blocks_run"]) == data["block_size"]
        assert set(line["next"]) <= set(SHAKESPEARE_ALPHABET) and min(line["blocks_run"]) >= 1


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "sample", "evaluate"):
        assert f"    {name} " in printed, name


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_sample_from_checkpoint(trained_run, mode, capsys):
    text = sample(
        str(trained_run / "runs/cpu/checkpoints/last.ckpt"), prompt="ROMEO:", max_new_tokens=40, mode=mode
    )
    assert len(text) == 40 and set(text) <= set(SHAKESPEARE_ALPHABET)
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_compiled_sampling_prints_no_compiler_notes(trained_run):
    """Skipping tokens break the compiled graph and recompile it per block: expected, so not shown."""
    ckpt = "runs/cpu/checkpoints/last.ckpt"
    result = cli("sample", f"--ckpt_path={ckpt}", "--compile=true", "--max_new_tokens=40", cwd=trained_run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip() == "[hard mode at threshold 0.5, KV-cache decoding, compiled]", result.stderr


def test_sample_command_line(trained_run):
    result = cli(
        "sample", "--ckpt_path=runs/cpu/checkpoints/last.ckpt", "--max_new_tokens=25", cwd=trained_run
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) >= 25
    # the CPU config trains a straight-through gate: hard mode, at the threshold it was trained with
    assert "[hard mode at threshold 0.5, KV-cache decoding]" in result.stderr


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--temperature=-1", "--temperature must be >= 0"),
        ("--top_k=0", "--top_k must be >= 1"),
        ("--max_new_tokens=0", "--max_new_tokens must be >= 1"),
        ("--threshold=1.5", "--threshold must be in [0, 1.01]"),
    ],
)
def test_sample_refuses_bad_arguments_in_one_line(trained_run, flag, message):
    ckpt = str(trained_run / "runs/cpu/checkpoints/last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", f"--ckpt_path={ckpt}", flag])
    assert str(exit_info.value.code).startswith(f"error: {message}")


def test_the_python_api_raises_typed_errors(trained_run, tmp_path):
    from tsa_lightning import load_checkpoint
    from tsa_lightning.errors import ConfigError, RunError, TSAError

    ckpt = str(trained_run / "runs/cpu/checkpoints/last.ckpt")
    with pytest.raises(ConfigError, match="--temperature must be >= 0"):
        sample(ckpt, temperature=-1)
    with pytest.raises(RunError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.ckpt"))
    assert issubclass(ConfigError, ValueError) and issubclass(RunError, TSAError)
    assert load_checkpoint(ckpt).config.n_layer > 0


def test_a_budget_for_a_checkpoint_trained_without_one_is_refused_in_one_line(trained_run):
    result = cli(
        "validate",
        f"--config={trained_run / 'runs/cpu/version_0/config.yaml'}",
        "--ckpt_path=runs/cpu/checkpoints/last.ckpt",
        "--model.compute_budget=0.5",
        cwd=trained_run,
    )
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert "trained without a compute budget" in message and "--model.config.skip_threshold" in message
    assert "depth_loss_weight" not in message  # not the fit-time rule, which does not apply here
