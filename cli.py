"""Launcher: `python cli.py fit --config configs/shakespeare_cpu.yaml` (same as `tsa-lightning ...`)."""

from tsa_lightning.cli import main

if __name__ == "__main__":
    main()
