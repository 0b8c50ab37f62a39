"""Corpora as LightningDataModules: seeded contiguous splits, samplers and loaders.

One base, `TextDataModule`, serves any local text file or folder; Tiny Shakespeare and enwik8
are thin specialisations that know their canonical address, checksum and vocabulary. Files,
downloads, checksums and tokenising are `corpus.py`'s; no window is ever materialised ahead of time.

Training draws random windows of block_size + 1 tokens, reproducible from
(seed, epoch, rank, index) and distinct across DDP ranks. Validation and test walk their split in
contiguous windows so that every target is scored exactly once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tsa_lightning.corpus import (
    ENWIK8_SHA256,
    ENWIK8_URL,
    SHAKESPEARE_ALPHABET,
    SHAKESPEARE_SHA256,
    SHAKESPEARE_URL,
    Codec,
    Corpus,
    data_root,
)
from tsa_lightning.errors import ConfigError, CorpusError

IGNORE_INDEX = -100  # targets past the end of a split; cross_entropy skips them


class WindowDataset(Dataset):
    """Item `start` is the window tokens[start : start + block_size + 1] as (inputs, targets)."""

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return len(self.tokens) - self.block_size

    def __getitem__(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class ContiguousWindows(Dataset):
    """Consecutive windows covering every target of a split once; the last one is padded."""

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return math.ceil((len(self.tokens) - 1) / self.block_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.block_size
        chunk = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        x = torch.zeros(self.block_size, dtype=torch.int64)
        y = torch.full((self.block_size,), IGNORE_INDEX, dtype=torch.int64)
        x[: len(chunk) - 1], y[: len(chunk) - 1] = chunk[:-1], chunk[1:]
        return x, y


class RandomWindowSampler(DistributedSampler):
    """Random window starts: one draw per (seed, epoch) for all ranks, dealt out rank by rank.

    Being a DistributedSampler, Lightning neither replaces it under DDP nor forgets set_epoch.
    `skip` drops the first starts of the next pass: those a resumed run already trained on.
    """

    def __init__(
        self, dataset: WindowDataset, samples_per_rank: int, seed: int, rank: int, world_size: int
    ) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, seed=seed)
        self.samples_per_rank, self.skip = samples_per_rank, 0

    def starts(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        draws = torch.randint(len(self.dataset), (self.samples_per_rank * self.num_replicas,), generator=g)
        return draws[self.rank :: self.num_replicas]

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return iter(self.starts()[skip:].tolist())

    def __len__(self) -> int:
        return self.samples_per_rank  # the whole epoch, also when resuming: Lightning counts on from there


class ResumableLoader(DataLoader):
    """The training loader, with its place in the epoch saved in every checkpoint.

    Lightning checkpoints a loader that has state_dict/load_state_dict and restores it on resume,
    so a run killed mid-epoch skips the batches it already trained on and continues the very stream
    an uninterrupted run sees. Lightning fetches from a sized loader without prefetching, so a
    batch handed out is a batch trained on (the SIGKILL test in tests/test_scale.py checks it).
    """

    sampler: RandomWindowSampler

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epoch, self.batches = 0, 0  # batches handed out in this epoch
        self.resume_at: dict | None = None

    def __iter__(self):
        self.epoch, self.batches = self.sampler.epoch, 0
        if self.resume_at is not None and self.resume_at["epoch"] == self.epoch:
            self.batches = self.resume_at["batches"]
            self.sampler.skip = self.batches * self.batch_size
        self.resume_at = None
        for batch in super().__iter__():
            self.batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.resume_at = state


class ShardSampler(DistributedSampler):
    """Every window goes to exactly one rank, in order; unlike DistributedSampler, no padding repeats."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


class TextDataModule(L.LightningDataModule):
    """Any local text file, or folder of files (concatenated in name order), as a language corpus.

    Args:
        path: the text file or folder.
        level: "byte" (vocabulary of 256, always known up front) or "char" (vocabulary from the
            file unless `alphabet` fixes it; it travels with the checkpoint through the model).
        alphabet: fixed character vocabulary for level="char".
        block_size: context length of a window.
        batch_size: windows per batch on each device.
        split: contiguous train/val/test fractions, in that order.
        max_bytes: use only the first max_bytes bytes (quick runs); splits scale with it.
        sha256: checksum the file must have; None skips verification.
        url: where prepare_data downloads the file from when it is missing; None: never download.
        samples_per_epoch: training windows per epoch over all ranks (default: one token pass).
        seed: seeds the training windows.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        path: str,
        level: Literal["byte", "char"] = "char",
        alphabet: str | None = None,
        block_size: int = 128,
        batch_size: int = 64,
        split: tuple[float, float, float] = (0.8, 0.1, 0.1),
        max_bytes: int | None = None,
        sha256: str | None = None,
        url: str | None = None,
        samples_per_epoch: int | None = None,
        seed: int = 1234,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if level not in ("byte", "char"):
            raise ConfigError(f"level must be 'byte' or 'char', got {level!r}")
        if level == "byte" and alphabet is not None:
            raise ConfigError("alphabet applies to level='char' only; byte-level corpora use all 256 bytes")
        if len(split) != 3 or any(f < 0 for f in split) or not math.isclose(sum(split), 1.0) or split[0] == 0:
            raise ConfigError(
                f"split must be three non-negative fractions summing to 1 with train > 0, got {split}"
            )
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("max_bytes", max_bytes)):
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value}")
        self.corpus = Corpus(Path(path), level, alphabet, max_bytes, sha256, url)
        self.block_size, self.batch_size, self.split = block_size, batch_size, tuple(split)
        self.samples_per_epoch, self.seed, self.num_workers = samples_per_epoch, seed, num_workers
        self.splits: dict[str, np.ndarray] = {}

    # the vocabulary is known at instantiation, so LightningCLI can link it to the model

    @property
    def alphabet(self) -> str | None:
        return self.codec.alphabet

    @property
    def codec(self) -> Codec:
        return self.corpus.codec

    @property
    def vocab_size(self) -> int:
        return self.codec.vocab_size

    def prepare_data(self) -> None:
        """Download once, on one process."""
        self.corpus.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.corpus.verify_all()
        tokens = self.corpus.tokens()
        if len(tokens) == 0:
            empty = " after max_bytes" if self.corpus.max_bytes else ""
            raise CorpusError(f"corpus {self.corpus.path} is empty{empty}")
        n_train = int(len(tokens) * self.split[0])
        n_val = int(len(tokens) * self.split[1])
        edges = (0, n_train, n_train + n_val, len(tokens))
        for name, fraction, lo, hi in zip(
            ("train", "val", "test"), self.split, edges[:-1], edges[1:], strict=True
        ):
            if fraction == 0:
                continue
            if hi - lo <= self.block_size:
                raise CorpusError(
                    f"the {name} split of {self.corpus.path} has {hi - lo} tokens, too few for block_size "
                    f"{self.block_size} (needs more than block_size); lower block_size, change split, "
                    "or use a larger corpus or max_bytes"
                )
            self.splits[name] = tokens[lo:hi]

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        dataset = WindowDataset(self.splits["train"], self.block_size)
        rank, world = self._rank_and_world()
        total = self.samples_per_epoch or max(1, len(self.splits["train"]) // self.block_size)
        per_rank = max(self.batch_size, total // world)
        sampler = RandomWindowSampler(dataset, per_rank, self.seed, rank, world)
        return self._loader(dataset, sampler, drop_last=True, loader=ResumableLoader)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, name: str) -> DataLoader:
        if name not in self.splits:
            raise CorpusError(f"the {name} split is empty (split={self.split}); give it a non-zero fraction")
        dataset = ContiguousWindows(self.splits[name], self.block_size)
        return self._loader(dataset, ShardSampler(dataset, *self._rank_and_world()), drop_last=False)

    def _loader(
        self,
        dataset: Dataset,
        sampler: DistributedSampler,
        drop_last: bool,
        loader: type[DataLoader] = DataLoader,
    ) -> DataLoader:
        return loader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class ShakespeareDataModule(TextDataModule):
    """Tiny Shakespeare (char-rnn's input.txt): 1,115,394 characters over a fixed 65-character alphabet.

    The default 0.8/0.1/0.1 split is the TSA paper's; 0.9/0.1/0 reproduces nanoGPT. Other options
    are TextDataModule's.

    Args:
        data_dir: folder holding tinyshakespeare/input.txt (default: $TSA_DATA_DIR, else ./data).
        path: the file itself, wherever it is (overrides data_dir).
        sha256: checksum of the file; None uses an edited or other copy unverified.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        path: str | None = None,
        sha256: str | None = SHAKESPEARE_SHA256,
        **kwargs,
    ) -> None:
        super().__init__(
            path=path or str(data_root(data_dir) / "tinyshakespeare" / "input.txt"),
            level="char",
            alphabet=SHAKESPEARE_ALPHABET,
            sha256=sha256,
            url=SHAKESPEARE_URL,
            **kwargs,
        )


class Enwik8DataModule(TextDataModule):
    """enwik8 the standard way: the first 10^8 bytes of Wikipedia, bytes as tokens, 90M/5M/5M split.

    With max_bytes only a prefix is used and the splits scale by the same fractions; a partial copy
    (such as a prefix file) needs its own `sha256`, or sha256=None to use it unverified. Other
    options are TextDataModule's.

    Args:
        data_dir: folder holding enwik8/enwik8 or enwik8/enwik8.zip (default: $TSA_DATA_DIR, else ./data).
        path: the raw file or enwik8.zip itself (overrides data_dir).
        block_size: context length of a window.
        sha256: checksum of the raw file; None skips verification.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        path: str | None = None,
        block_size: int = 256,
        sha256: str | None = ENWIK8_SHA256,
        **kwargs,
    ) -> None:
        path = Path(path) if path else data_root(data_dir) / "enwik8" / "enwik8"
        zipped = path.suffix == ".zip"
        super().__init__(
            path=str(path.with_suffix("") if zipped else path),
            level="byte",
            alphabet=None,
            block_size=block_size,
            split=(0.9, 0.05, 0.05),
            sha256=sha256,
            url=ENWIK8_URL,
            **kwargs,
        )
        self.corpus.member = "enwik8"  # the url is a zip holding the raw file
        self.corpus.archive = path if zipped else path.with_suffix(".zip")
