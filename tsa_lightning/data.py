"""Character and byte corpora as LightningDataModules.

One base, `TextDataModule`, serves any local text file or folder; Tiny Shakespeare and enwik8
are thin specialisations that know their canonical address, checksum and vocabulary. Tokens are
kept as one flat uint8 (or uint16) array - a memmap of the file itself for byte-level corpora -
so no window is ever materialised ahead of time.

Training draws random windows of block_size + 1 tokens, reproducible from
(seed, epoch, rank, index) and distinct across DDP ranks. Validation and test walk their split in
contiguous windows so that every target is scored exactly once.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

IGNORE_INDEX = -100  # targets past the end of a split; cross_entropy skips them

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_ALPHABET = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"  # of the 10^8 bytes


class CorpusError(RuntimeError):
    """A corpus is missing, corrupt or unusable; the message says how to fix it."""


def data_root(data_dir: str | None = None) -> Path:
    """An explicit data_dir wins, then $TSA_DATA_DIR, then ./data."""
    return Path(data_dir or os.environ.get("TSA_DATA_DIR") or "data")


def fetch(url: str, target: Path) -> Path:
    with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as f:
        shutil.copyfileobj(response, f)
    return target


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Codec:
    """Text <-> token ids: bytes (alphabet None, 256 ids) or a fixed character alphabet."""

    alphabet: str | None = None

    @property
    def vocab_size(self) -> int:
        return 256 if self.alphabet is None else len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        if self.alphabet is None:
            return list(text.encode("utf-8"))
        index = {c: i for i, c in enumerate(self.alphabet)}
        unknown = sorted(set(text) - index.keys())
        if unknown:
            raise ValueError(f"characters {''.join(unknown)!r} are not in the corpus alphabet")
        return [index[c] for c in text]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        if self.alphabet is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.alphabet[i] for i in ids)


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
            raise ValueError(f"level must be 'byte' or 'char', got {level!r}")
        if level == "byte" and alphabet is not None:
            raise ValueError("alphabet applies to level='char' only; byte-level corpora use all 256 bytes")
        if len(split) != 3 or any(f < 0 for f in split) or not math.isclose(sum(split), 1.0) or split[0] == 0:
            raise ValueError(
                f"split must be three non-negative fractions summing to 1 with train > 0, got {split}"
            )
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("max_bytes", max_bytes)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.path = Path(path)
        self.level, self._alphabet = level, alphabet
        self.block_size, self.batch_size = block_size, batch_size
        self.split, self.max_bytes = tuple(split), max_bytes
        self.sha256, self.url = sha256, url
        self.samples_per_epoch, self.seed, self.num_workers = samples_per_epoch, seed, num_workers
        self.splits: dict[str, np.ndarray] = {}

    # --- vocabulary: known at instantiation, so LightningCLI can link it to the model ---

    @property
    def alphabet(self) -> str | None:
        if self.level == "char" and self._alphabet is None:
            if not self.path.exists():
                raise CorpusError(
                    f"corpus file {self.path} does not exist, and its character vocabulary is read from it "
                    "when the module is built: "
                    + (f"download it from {self.url} first, " if self.url else "create it first, ")
                    + "or fix the vocabulary with alphabet=..., or use level='byte'"
                )
            self._alphabet = "".join(sorted(set(self._read_text())))
        return self._alphabet

    @property
    def codec(self) -> Codec:
        return Codec(self.alphabet)

    @property
    def vocab_size(self) -> int:
        return self.codec.vocab_size

    # --- files ---

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            files = sorted(p for p in self.path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                raise CorpusError(f"corpus folder {self.path} holds no files")
            return files
        if not self.path.exists():
            raise CorpusError(self._missing_message())
        return [self.path]

    def _missing_message(self, reason: str = "") -> str:
        message = f"corpus file {self.path} does not exist"
        if self.url:
            message += f" and could not be downloaded from {self.url}{f' ({reason})' if reason else ''}"
            message += (
                f". Download it yourself to {self.path}, or point the module at a local copy "
                "(path=..., data_dir=..., or the TSA_DATA_DIR environment variable)"
            )
        return message

    def _verify(self, path: Path) -> None:
        if self.sha256 is None:
            return
        actual = sha256_of(path)
        if actual != self.sha256:
            raise CorpusError(
                f"{path} has sha256 {actual}, expected {self.sha256}: the file is corrupt or a different "
                f"version (it was left untouched). Replace it with a fresh copy"
                + (f" from {self.url}" if self.url else "")
                + ", or pass sha256=null to use it unverified"
            )

    def _read_bytes(self) -> bytes | np.ndarray:
        files = self._files()
        if len(files) == 1 and self.level == "byte":
            data = np.memmap(files[0], dtype=np.uint8, mode="r") if files[0].stat().st_size else b""
        else:
            data = b"".join(f.read_bytes() for f in files)
        return data[: self.max_bytes] if self.max_bytes else data

    def _read_text(self) -> str:
        raw = bytes(self._read_bytes())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(
                f"{self.path} is not valid UTF-8 text (undecodable byte at offset {e.start}); "
                "use level='byte' for binary or mixed-encoding corpora, or re-encode the file as UTF-8"
            ) from None

    def _tokens(self) -> np.ndarray:
        if self.level == "byte":
            data = self._read_bytes()
            return data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
        text = self._read_text()
        try:
            ids = self.codec.encode(text)
        except ValueError as e:
            raise CorpusError(f"{self.path}: {e}; fix the file or leave alphabet unset") from None
        return np.array(ids, dtype=np.uint8 if self.vocab_size <= 256 else np.uint16)

    # --- Lightning hooks ---

    def prepare_data(self) -> None:
        """Download once, on one process: to a temporary name, verify, then rename."""
        if self.path.exists() or not self.url:
            return
        created = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(dir=self.path.parent, prefix=".download-") as tmp:
                try:
                    candidate = self._download(Path(tmp))
                except OSError as e:
                    raise CorpusError(self._missing_message(str(e))) from None
                self._install(candidate)
        except CorpusError:
            for folder in created:  # leave no empty folders behind a failed download
                folder.rmdir()
            raise

    def _download(self, tmp: Path) -> Path:
        return fetch(self.url, tmp / self.path.name)

    def _install(self, candidate: Path) -> None:
        """Verify a freshly made copy, then move it into place in one step."""
        self._verify(candidate)
        os.replace(candidate, self.path)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.sha256 is not None and self.path.is_dir():
            raise CorpusError(f"sha256 checks a single file, but {self.path} is a folder; pass sha256=null")
        for path in self._files():
            self._verify(path)
        tokens = self._tokens()
        if len(tokens) == 0:
            raise CorpusError(f"corpus {self.path} is empty" + (" after max_bytes" if self.max_bytes else ""))
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
                    f"the {name} split of {self.path} has {hi - lo} tokens, too few for block_size "
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

    The default 0.8/0.1/0.1 split is the TSA paper's; 0.9/0.1/0 reproduces nanoGPT.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        path: str | None = None,
        block_size: int = 128,
        batch_size: int = 64,
        split: tuple[float, float, float] = (0.8, 0.1, 0.1),
        samples_per_epoch: int | None = None,
        seed: int = 1234,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            path=path or str(data_root(data_dir) / "tinyshakespeare" / "input.txt"),
            level="char",
            alphabet=SHAKESPEARE_ALPHABET,
            block_size=block_size,
            batch_size=batch_size,
            split=split,
            sha256=SHAKESPEARE_SHA256,
            url=SHAKESPEARE_URL,
            samples_per_epoch=samples_per_epoch,
            seed=seed,
            num_workers=num_workers,
        )


class Enwik8DataModule(TextDataModule):
    """enwik8 the standard way: the first 10^8 bytes of Wikipedia, bytes as tokens, 90M/5M/5M split.

    `path` may be the raw file or enwik8.zip. With max_bytes only a prefix is used and the splits
    scale by the same fractions; a partial copy (such as a prefix file) needs its own `sha256`, or
    sha256=None to use it unverified.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        path: str | None = None,
        block_size: int = 256,
        batch_size: int = 64,
        max_bytes: int | None = None,
        sha256: str | None = ENWIK8_SHA256,
        samples_per_epoch: int | None = None,
        seed: int = 1234,
        num_workers: int = 0,
    ) -> None:
        path = Path(path) if path else data_root(data_dir) / "enwik8" / "enwik8"
        self.zip_path = path if path.suffix == ".zip" else None
        super().__init__(
            path=str(path.with_suffix("") if self.zip_path else path),
            level="byte",
            block_size=block_size,
            batch_size=batch_size,
            split=(0.9, 0.05, 0.05),
            max_bytes=max_bytes,
            sha256=sha256,
            url=ENWIK8_URL,
            samples_per_epoch=samples_per_epoch,
            seed=seed,
            num_workers=num_workers,
        )

    def prepare_data(self) -> None:
        if not self.path.exists() and self.zip_path is not None and self.zip_path.exists():
            with tempfile.TemporaryDirectory(dir=self.path.parent, prefix=".unzip-") as tmp:
                self._install(self._extract(self.zip_path, Path(tmp)))
        super().prepare_data()

    def _download(self, tmp: Path) -> Path:
        return self._extract(fetch(self.url, tmp / "enwik8.zip"), tmp)

    def _extract(self, zipped: Path, tmp: Path) -> Path:
        try:
            with zipfile.ZipFile(zipped) as archive:
                return Path(archive.extract("enwik8", tmp))
        except (zipfile.BadZipFile, KeyError) as e:
            raise CorpusError(
                f"{zipped} is not a valid enwik8.zip ({e}); download a fresh copy from {self.url}"
            ) from None
