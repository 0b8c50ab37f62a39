"""Corpora on disk: where a text file comes from, how it is checked, and how it becomes tokens.

A `Corpus` is a local text file or folder; `prepare` downloads it (or unpacks a local archive)
to a temporary name, verifies its sha256 and only then moves it into place, so a failed or
corrupt download never leaves a file behind. `tokens` reads it as one flat uint8 (or uint16)
array - a memmap of the file itself for byte-level corpora. The Lightning side (splits, samplers,
loaders) lives in `data.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.hub import download_url_to_file

from tsa_lightning.errors import ConfigError, CorpusError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_ALPHABET = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"  # of the 10^8 bytes


def data_root(data_dir: str | None = None) -> Path:
    """An explicit data_dir wins, then $TSA_DATA_DIR, then ./data."""
    return Path(data_dir or os.environ.get("TSA_DATA_DIR") or "data")


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

    @property
    def unit(self) -> str:
        """What one token is, as "bits per <unit>" names it."""
        return "byte" if self.alphabet is None else "character"

    def check_fits(self, vocab_size: int) -> None:
        """A model has one output per token of its alphabet."""
        if self.alphabet is not None and len(self.alphabet) != vocab_size:
            raise ConfigError(f"alphabet has {len(self.alphabet)} characters but vocab_size is {vocab_size}")

    def encode(self, text: str) -> list[int]:
        if self.alphabet is None:
            return list(text.encode("utf-8"))
        index = {c: i for i, c in enumerate(self.alphabet)}
        unknown = sorted(set(text) - index.keys())
        if unknown:
            raise ConfigError(f"characters {''.join(unknown)!r} are not in the corpus alphabet")
        return [index[c] for c in text]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        if self.alphabet is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.alphabet[i] for i in ids)

    def difference(self, other: Codec, names: tuple[str, str] = ("the first", "the second")) -> str | None:
        """None when both give every symbol the same id; else where they differ, in words."""
        if self.alphabet == other.alphabet:
            return None
        sizes = f"{names[0]}: {self.described}, {names[1]}: {other.described}"
        if self.alphabet is None or other.alphabet is None:
            return sizes
        only = "".join(sorted(set(self.alphabet) - set(other.alphabet)))
        missing = "".join(sorted(set(other.alphabet) - set(self.alphabet)))
        if not only and not missing:
            return f"the same {len(self.alphabet)} characters in another order"
        return "; ".join(
            [sizes]
            + ([f"only {names[0]} has {only!r}"] if only else [])
            + ([f"only {names[1]} has {missing!r}"] if missing else [])
        )

    @property
    def described(self) -> str:
        return "bytes (256 ids)" if self.alphabet is None else f"{len(self.alphabet)} characters"


def made_by_downloads(folder: Path) -> int:
    """How many folders, from `folder` up, the downloads under way in it made: each download's
    temporary folder beside the corpus is named `.download-<that many>-...`."""
    entries = folder.iterdir() if folder.is_dir() else []
    return max((int(m[1]) for e in entries if (m := re.match(r"\.download-(\d+)-", e.name))), default=0)


@dataclass
class Corpus:
    """A text file, or folder of files (concatenated in name order), read as bytes or characters.

    `member` names the file inside a zip: the url then points to the zip, and `archive` may be a
    local copy of it.
    """

    path: Path
    level: Literal["byte", "char"] = "char"
    alphabet: str | None = None  # None with level="char": the characters of the file
    max_bytes: int | None = None
    sha256: str | None = None
    url: str | None = None
    member: str | None = None
    archive: Path | None = None

    @property
    def codec(self) -> Codec:
        """Known without reading the file for bytes and fixed alphabets; otherwise read from the file."""
        if self.level == "char" and self.alphabet is None:
            if not self.path.exists():
                raise CorpusError(
                    f"corpus file {self.path} does not exist, and its character vocabulary is read from it "
                    "when the module is built: "
                    + (f"download it from {self.url} first, " if self.url else "create it first, ")
                    + "or fix the vocabulary with alphabet=..., or use level='byte'"
                )
            self.alphabet = "".join(sorted(set(self.read_text())))
        return Codec(self.alphabet)

    def files(self) -> list[Path]:
        if self.path.is_dir():
            files = sorted(p for p in self.path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                raise CorpusError(f"corpus folder {self.path} holds no files")
            return files
        if not self.path.exists():
            raise CorpusError(self.missing_message())
        return [self.path]

    def missing_message(self, reason: str = "") -> str:
        message = f"corpus file {self.path} does not exist"
        if self.url:
            message += f" and could not be downloaded from {self.url}{f' ({reason})' if reason else ''}"
            message += (
                f". Download it yourself to {self.path}, or point the module at a local copy "
                "(path=..., data_dir=..., or the TSA_DATA_DIR environment variable)"
            )
        return message

    def verify(self, path: Path) -> None:
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

    def verify_all(self) -> None:
        if self.sha256 is not None and self.path.is_dir():
            raise CorpusError(f"sha256 checks a single file, but {self.path} is a folder; pass sha256=null")
        for path in self.files():
            self.verify(path)

    def read_bytes(self) -> bytes | np.ndarray:
        files = self.files()
        if len(files) == 1 and self.level == "byte":
            data = np.memmap(files[0], dtype=np.uint8, mode="r") if files[0].stat().st_size else b""
        else:
            data = b"".join(f.read_bytes() for f in files)
        return data[: self.max_bytes] if self.max_bytes else data

    def read_text(self) -> str:
        raw = bytes(self.read_bytes())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            path, offset = self.file_at(e.start)
            raise CorpusError(
                f"{path} is not valid UTF-8 text (undecodable byte at offset {offset}); "
                "use level='byte' for binary or mixed-encoding corpora, or re-encode the file as UTF-8"
            ) from None

    def file_at(self, offset: int) -> tuple[Path, int]:
        """The file of a folder corpus holding the joined text's byte `offset`, and the offset in it."""
        for path in self.files():
            size = path.stat().st_size
            if offset < size:
                return path, offset
            offset -= size
        return self.path, offset

    def tokens(self) -> np.ndarray:
        if self.level == "byte":
            data = self.read_bytes()
            return data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
        text = self.read_text()
        try:
            ids = self.codec.encode(text)
        except ValueError as e:
            raise CorpusError(f"{self.path}: {e}; fix the file or leave alphabet unset") from None
        return np.array(ids, dtype=np.uint8 if self.codec.vocab_size <= 256 else np.uint16)

    def prepare(self) -> None:
        """Make the file exist (unpack a local archive, else download), verified before it is moved in."""
        if self.path.exists() or not (self.url or self.archive):
            return
        # the folders this download makes, or another download of it under way made (two first runs
        # on one data folder): a failed download leaves none of them behind
        folders = [self.path.parent, *self.path.parent.parents]
        made = [p for p in folders if not p.exists()]  # nearest first, as RunLock counts them
        created = folders[: max(len(made), made_by_downloads(self.path.parent))]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(
                dir=self.path.parent, prefix=f".download-{len(created)}-"
            ) as tmp:
                self.verify(candidate := self.fetch(Path(tmp)))
                os.replace(candidate, self.path)
        except CorpusError:
            for folder in created:
                with contextlib.suppress(OSError):  # another download is still under way in it
                    folder.rmdir()
            raise

    def fetch(self, tmp: Path) -> Path:
        """A fresh copy of the file under tmp: from the local archive, else from the url."""
        if self.archive is not None and self.archive.exists():
            return self.unpack(self.archive, tmp)
        target = tmp / (Path(self.url).name if self.member else self.path.name)
        try:
            download_url_to_file(self.url, str(target), progress=False)
        except OSError as e:
            raise CorpusError(self.missing_message(str(e))) from None
        return self.unpack(target, tmp) if self.member else target

    def unpack(self, zipped: Path, tmp: Path) -> Path:
        try:
            with zipfile.ZipFile(zipped) as archive:
                return Path(archive.extract(self.member, tmp))
        except (zipfile.BadZipFile, KeyError) as e:
            raise CorpusError(
                f"{zipped} is not a valid archive holding {self.member} ({e}); "
                f"download a fresh copy from {self.url}"
            ) from None
