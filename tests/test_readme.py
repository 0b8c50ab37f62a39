"""The README's commands work: each one runs, in a short version, in the order a reader meets them.

Every line of a ```bash block that starts with `python cli.py` or `tsa-lightning` (after any
`VAR=value` prefixes) runs through this checkout's cli.py in a fresh folder, with options appended
that make it short (2 training steps, 2 batches, 20 sampled characters); each ```python block runs as
a script in the same folder. Later commands use what earlier ones wrote (`sample` reads the
checkpoint `fit` saved), so they run in order. Commands run on the real Tiny Shakespeare from
$TSA_DATA_DIR (the README's commands download it; a test does not), and a command that needs a GPU
is skipped on a machine without one.
"""

import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from tests.helpers import REPO

README = REPO / "README.md"
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
STAGES = {"validate": "val", "test": "test", "predict": "predict"}


def blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of a Markdown text, as (language, body), in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def cli_commands(body: str) -> list[tuple[dict, list[str]]]:
    """The CLI commands of a bash block: (environment prefixes, arguments after the program)."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        env = {}
        while words and ASSIGNMENT.match(words[0]):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        if words[:2] == ["python", "cli.py"]:
            commands.append((env, words[2:]))
        elif words[:1] == ["tsa-lightning"]:
            commands.append((env, words[1:]))
    return commands


def shortened(args: list[str]) -> list[str]:
    """A command as the README gives it, plus the options that make it a quick check."""
    subcommand = args[0] if args else ""
    if "--help" in args or "--print_config" in args:
        return args
    quiet = ["--trainer.enable_progress_bar=false"]
    if subcommand == "fit":
        steps = 4 if "--ckpt_path" in args else 2  # a resume goes on past the first run's 2 steps
        short = [f"--trainer.max_steps={steps}", "--trainer.val_check_interval=2"]
        return [*args, *short, "--trainer.limit_val_batches=2", *quiet]
    if subcommand in STAGES:
        return [*args, f"--trainer.limit_{STAGES[subcommand]}_batches=2", *quiet]
    if subcommand == "sample":
        return [*args, "--max_new_tokens=20"]
    if subcommand == "evaluate":
        return [*args, "--limit_batches=2", "--thresholds=[0.5,1.0]"]
    return args


def needs_gpu(args: list[str]) -> bool:
    return any(a in ("--trainer.accelerator=gpu", "--trainer.accelerator=cuda") for a in args)


def steps_of(readme: str) -> list[tuple[str, dict, list[str]]]:
    """("cli", env, args) and ("python", {}, [script]) in README order."""
    steps = []
    for language, body in blocks(readme):
        if language == "bash":
            steps += [("cli", env, args) for env, args in cli_commands(body)]
        elif language == "python":
            steps.append(("python", {}, [body]))
    return steps


def test_the_readme_parses_into_the_commands_a_user_runs():
    steps = steps_of(README.read_text())
    subcommands = {args[0] for kind, _, args in steps if kind == "cli" and args}
    assert {"fit", "validate", "test", "predict", "sample", "evaluate"} <= subcommands
    assert any(kind == "python" for kind, _, _ in steps), "the Python API example is missing"
    assert any("--reference" in args for _, _, args in steps), "evaluate beside the dense twin is missing"


def test_the_readme_keeps_the_command_ci_runs():
    """.ci/run runs the README's test command verbatim: the two must not drift apart."""
    ci_line = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    bash = "\n".join(body for language, body in blocks(README.read_text()) if language == "bash")
    assert any(line.endswith(ci_line) for line in bash.splitlines()), ci_line


def run_forked(folder: str) -> None:
    """Run each step in a process of its own, forked from one that imported the package once.

    The entry point of a `python -c` process; the steps are in `folder/steps.json`. Each child changes
    to `folder`, takes the
    step's environment, writes its output to `logs/<n>.log` and runs cli.py as `__main__` (or the
    Python example as a script); its exit status is what the command's would be. Importing torch and
    Lightning takes most of a short command's time, so paying for it once keeps the test short.
    """
    import tsa_lightning.cli  # noqa: F401  (imported before forking: the children inherit it)

    folder = Path(folder)
    steps = json.loads((folder / "steps.json").read_text())
    (folder / "logs").mkdir()
    for n, step in enumerate(steps):
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.chdir(folder)
                os.environ.update(step["env"])
                log = os.open(folder / "logs" / f"{n}.log", os.O_WRONLY | os.O_CREAT)
                os.dup2(log, 1)
                os.dup2(log, 2)
                if step["kind"] == "cli":
                    sys.argv = [str(REPO / "cli.py"), *step["args"]]
                    runpy.run_path(sys.argv[0], run_name="__main__")
                else:
                    exec(compile(step["args"][0], "README.md", "exec"), {"__name__": "__main__"})
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(
            json.dumps({"step": n, "code": code, "seconds": round(time.monotonic() - started, 1)}), flush=True
        )
        if code != 0:
            return


def test_every_readme_command_runs(shared_data, tmp_path):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {"TSA_DATA_DIR": str(shared_data), "OMP_NUM_THREADS": "1", "TSA_TRACEBACK": "1"}
    steps, skipped = [], []
    for kind, prefix, args in steps_of(README.read_text()):
        if kind == "cli" and needs_gpu(args) and not torch.cuda.is_available():
            skipped.append(shlex.join(args))  # a GPU command: checked where a GPU is
            continue
        args = shortened(args) if kind == "cli" else args
        steps.append({"kind": kind, "env": {**env, **prefix}, "args": args})
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    driver = "import sys; from tests.test_readme import run_forked; run_forked(sys.argv[1])"
    result = subprocess.run(
        [sys.executable, "-c", driver, str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    done = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    for report in done:
        step = steps[report["step"]]
        shown = shlex.join(step["args"]) if step["kind"] == "cli" else "the README's Python example"
        log = (tmp_path / "logs" / f"{report['step']}.log").read_text()
        assert report["code"] == 0, f"{shown} exited {report['code']}:\n{log[-5000:]}"
    assert len(done) == len(steps), (
        f"the driver stopped early:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    assert len(steps) >= 10, steps
    assert (tmp_path / "runs" / "shakespeare_cpu" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "runs" / "shakespeare_cpu_dense" / "checkpoints" / "last.ckpt").is_file()
