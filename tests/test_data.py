import hashlib
import re
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import write_corpus
from tsa_lightning.corpus import SHAKESPEARE_ALPHABET, Codec, CorpusError
from tsa_lightning.data import (
    IGNORE_INDEX,
    ContiguousWindows,
    Enwik8DataModule,
    RandomWindowSampler,
    ShakespeareDataModule,
    ShardSampler,
    TextDataModule,
    WindowDataset,
)

ENWIK8_PREFIX_SHA256 = "d502ac7ecb9dd47a062e7d19b8dcd3c753b07c142e48b13dcd521cb747116bdd"


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under folder with its bytes and modification time."""
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("level", ["char", "byte"])
@pytest.mark.parametrize("split", [(0.8, 0.1, 0.1), (0.9, 0.1, 0.0), (0.5, 0.25, 0.25)])
def test_splits_are_contiguous_disjoint_and_complete(small_corpus, level, split):
    dm = TextDataModule(str(small_corpus), level=level, block_size=16, split=split)
    dm.setup()
    parts = [dm.splits[name] for name in ("train", "val", "test") if name in dm.splits]
    whole = np.concatenate(parts)
    assert np.array_equal(whole, dm.corpus.tokens())
    n = len(whole)
    assert len(dm.splits["train"]) == int(n * split[0])
    assert len(dm.splits["val"]) == int(n * split[1])
    assert ("test" in dm.splits) == (split[2] > 0)


def test_char_vocabulary_comes_from_the_file(small_corpus):
    dm = TextDataModule(str(small_corpus), level="char")
    assert dm.alphabet == "\n abcdefgh" and dm.vocab_size == 10
    assert dm.codec.decode(dm.codec.encode("bad cafe\n")) == "bad cafe\n"
    assert TextDataModule(str(small_corpus), level="byte").vocab_size == 256


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_windows_score_every_target_exactly_once(small_corpus, world):
    tokens = np.frombuffer(small_corpus.read_bytes()[:1003], dtype=np.uint8)
    windows = ContiguousWindows(tokens, block_size=64)
    scored = []
    for rank in range(world):
        for i in ShardSampler(windows, rank, world):
            x, y = windows[i]
            valid = y != IGNORE_INDEX
            positions = i * 64 + torch.arange(64)[valid] + 1
            assert torch.equal(y[valid], torch.from_numpy(tokens[positions.numpy()].astype(np.int64)))
            assert torch.equal(x[1:][valid[1:]], y[:-1][valid[1:]])  # inputs are the previous targets
            scored.extend(positions.tolist())
    assert sorted(scored) == list(range(1, len(tokens)))  # every target once, none twice


def test_training_windows_reproducible_and_distinct_across_ranks(small_corpus):
    tokens = np.frombuffer(small_corpus.read_bytes(), dtype=np.uint8)
    dataset = WindowDataset(tokens, block_size=32)

    def starts(rank: int, epoch: int, seed: int = 7) -> list[int]:
        sampler = RandomWindowSampler(dataset, samples_per_rank=200, seed=seed, rank=rank, world_size=2)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert starts(0, 0) == starts(0, 0)
    assert starts(0, 0) != starts(0, 1) and starts(0, 0) != starts(0, 0, seed=8)
    rank0, rank1 = starts(0, 0), starts(1, 0)
    assert len(set(rank0) & set(rank1)) < 10  # independent draws, not the same stream
    x, y = dataset[rank0[0]]
    assert x.shape == y.shape == (32,) and torch.equal(x[1:], y[:-1])
    assert max(rank0 + rank1) <= len(tokens) - 33


def test_train_loader_batches(small_corpus):
    dm = TextDataModule(str(small_corpus), level="char", block_size=16, batch_size=4, samples_per_epoch=40)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert len(batches) == 10 and batches[0][0].shape == (4, 16)
    val = list(dm.val_dataloader())
    assert sum(int((y != IGNORE_INDEX).sum()) for _, y in val) == len(dm.splits["val"]) - 1


def test_missing_offline_says_what_to_do_and_touches_nothing(tmp_path):
    before = snapshot(tmp_path)
    target = tmp_path / "corpora" / "missing.txt"
    dm = TextDataModule(str(target), url="http://127.0.0.1:9/input.txt")
    with pytest.raises(CorpusError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert str(target) in message and "http://127.0.0.1:9/input.txt" in message
    assert "path=" in message and "TSA_DATA_DIR" in message
    assert snapshot(tmp_path) == before and not target.exists() and not target.parent.exists()
    with pytest.raises(CorpusError, match="does not exist"):
        dm.setup()


@pytest.mark.parametrize("first_to_fail", ["the run that made the folder", "the other"])
def test_two_first_runs_on_one_offline_folder_both_fail_in_one_line_and_leave_no_folder(
    tmp_path, monkeypatch, first_to_fail
):
    """Two processes start on one new data folder at once, and each download fails while the other
    is still under way in that folder, in either order."""
    target = tmp_path / "data" / "corpus" / "input.txt"
    maker, other = (TextDataModule(str(target), url="http://127.0.0.1:9/input.txt").corpus for _ in range(2))
    under_way = {id(maker): threading.Event(), id(other): threading.Event()}
    failed = {id(maker): threading.Event(), id(other): threading.Event()}
    errors = []

    def offline(corpus, tmp):
        under_way[id(corpus)].set()
        partner = other if corpus is maker else maker
        under_way[id(partner)].wait(10)
        if (corpus is maker) != (first_to_fail == "the run that made the folder"):
            failed[id(partner)].wait(10)  # this one fails second
        raise CorpusError("offline")

    def run(corpus):
        try:
            corpus.prepare()
        except Exception as e:
            errors.append(e)
        finally:
            failed[id(corpus)].set()

    monkeypatch.setattr(type(maker), "fetch", offline)
    first = threading.Thread(target=run, args=(maker,))
    first.start()
    under_way[id(maker)].wait(10)  # the folder is made, the first download under way
    second = threading.Thread(target=run, args=(other,))
    second.start()
    first.join(10)
    second.join(10)
    assert [str(e) for e in errors] == ["offline", "offline"], errors  # one line each, no OSError
    assert list(tmp_path.iterdir()) == []  # no folder left, whichever run made it


def test_char_vocabulary_needs_the_file(tmp_path):
    dm = TextDataModule(str(tmp_path / "missing.txt"), level="char", url="http://127.0.0.1:9/x.txt")
    with pytest.raises(CorpusError, match=re.escape("download it from http://127.0.0.1:9/x.txt first")):
        print(dm.vocab_size)


def test_shakespeare_offline_error_names_the_expected_path(tmp_path):
    dm = ShakespeareDataModule(data_dir=str(tmp_path))
    dm.corpus.url = "http://127.0.0.1:9/input.txt"  # never the real address from a test
    with pytest.raises(CorpusError, match=str(tmp_path / "tinyshakespeare" / "input.txt")):
        dm.prepare_data()


def test_checksum_mismatch_is_clear_and_leaves_the_file_alone(small_corpus):
    before = snapshot(small_corpus.parent)
    dm = TextDataModule(str(small_corpus), sha256="0" * 64)
    with pytest.raises(CorpusError, match="sha256") as err:
        dm.setup()
    assert "left untouched" in str(err.value) and "sha256=null" in str(err.value)
    assert snapshot(small_corpus.parent) == before


def test_an_edited_shakespeare_follows_the_checksum_advice(tmp_path):
    edited = write_corpus(tmp_path / "input.txt", alphabet=SHAKESPEARE_ALPHABET)
    with pytest.raises(CorpusError, match="sha256=null"):
        ShakespeareDataModule(path=str(edited), block_size=8).setup()
    data = ShakespeareDataModule(path=str(edited), block_size=8, sha256=None)  # the advice, taken
    data.setup()
    assert data.vocab_size == len(SHAKESPEARE_ALPHABET)


def test_download_goes_through_a_temporary_name_and_is_verified(tmp_path):
    source = write_corpus(tmp_path / "source.txt")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    target = tmp_path / "data" / "corpus.txt"
    bad = TextDataModule(str(target), url=source.as_uri(), sha256="1" * 64)
    with pytest.raises(CorpusError, match="sha256"):
        bad.prepare_data()
    assert not target.exists() and not target.parent.exists()  # no half-finished file, no stray folder
    good = TextDataModule(str(target), url=source.as_uri(), sha256=digest)
    good.prepare_data()
    assert target.read_bytes() == source.read_bytes()
    good.setup()


def test_folder_corpus_concatenates_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("world\n" * 50)
    (tmp_path / "a.txt").write_text("hello\n" * 50)
    dm = TextDataModule(str(tmp_path), level="byte", block_size=8)
    dm.setup()
    assert bytes(dm.corpus.tokens()[:6]) == b"hello\n" and bytes(dm.corpus.tokens()[-6:]) == b"world\n"
    with pytest.raises(CorpusError, match="single file"):
        TextDataModule(str(tmp_path), level="byte", block_size=8, sha256="0" * 64).setup()


def test_a_bad_byte_in_a_folder_corpus_names_its_file_and_its_offset_there(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n" * 50)
    (tmp_path / "b.txt").write_bytes(b"fine " * 10 + b"caf\xe9")
    with pytest.raises(CorpusError) as error:
        TextDataModule(str(tmp_path), block_size=8).setup()
    assert str(error.value).startswith(
        f"{tmp_path / 'b.txt'} is not valid UTF-8 text (undecodable byte at offset 53)"
    )


@pytest.mark.parametrize(
    "content, kwargs, match",
    [
        (b"", {}, "empty"),
        (b"\xff\xfe not utf-8" * 100, {"level": "char"}, "not valid UTF-8"),
        (b"abc" * 20, {"block_size": 128}, "too few for block_size"),
        (b"abcXYZ" * 500, {"alphabet": "abc"}, "not in the corpus alphabet"),
    ],
)
def test_bad_corpora_raise_clear_errors(tmp_path, content, kwargs, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=match):
        TextDataModule(str(path), **kwargs).setup()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": (0.5, 0.5, 0.5)}, "split"),
        ({"split": (0.0, 0.5, 0.5)}, "split"),
        ({"level": "word"}, "level"),
        ({"block_size": 0}, "block_size"),
        ({"level": "byte", "alphabet": "ab"}, "alphabet"),
    ],
)
def test_bad_options_raise(small_corpus, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextDataModule(str(small_corpus), **kwargs)


def test_enwik8_from_a_zip(tmp_path):
    content = write_corpus(tmp_path / "raw", n_chars=5000).read_bytes()
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as archive:
        archive.writestr("enwik8", content)
    dm = Enwik8DataModule(
        path=str(tmp_path / "enwik8.zip"), sha256=hashlib.sha256(content).hexdigest(), block_size=32
    )
    dm.prepare_data()
    dm.setup()
    assert bytes(np.concatenate([dm.splits[s] for s in ("train", "val", "test")])) == content
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [4500, 250, 250]


def test_codec_bytes_round_trip():
    codec = Codec()
    assert codec.vocab_size == 256 and codec.decode(codec.encode("héllo")) == "héllo"
    assert codec.decode(torch.tensor([104, 105])) == "hi"


# --- the real corpora in ../shared/data ---


def test_real_tiny_shakespeare(shared_data):
    dm = ShakespeareDataModule(data_dir=str(shared_data))
    assert dm.vocab_size == 65 and dm.alphabet == SHAKESPEARE_ALPHABET  # known before reading
    dm.prepare_data()  # present: no download
    dm.setup()  # verifies the sha256
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [892_315, 111_539, 111_540]
    assert dm.codec.decode(dm.splits["train"][:14]) == "First Citizen:"


def test_real_enwik8_prefix_through_the_byte_pipeline(shared_data):
    prefix = shared_data / "enwik8" / "enwik8_prefix.bin"
    with pytest.raises(CorpusError, match="sha256"):  # the standard checksum is for all 10^8 bytes
        Enwik8DataModule(path=str(prefix), max_bytes=1_000_000).setup()
    dm = Enwik8DataModule(path=str(prefix), sha256=ENWIK8_PREFIX_SHA256, max_bytes=1_000_000)
    dm.setup()
    assert dm.vocab_size == 256
    assert isinstance(dm.splits["train"], np.memmap)  # bytes are read in place, never copied whole
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [900_000, 50_000, 50_000]
    assert bytes(dm.splits["train"][:10]) == b"<mediawiki"


def test_train_loader_resumes_mid_epoch_and_starts_the_next_epoch_afresh(small_corpus):
    dm = TextDataModule(str(small_corpus), level="char", block_size=16, batch_size=4, samples_per_epoch=40)
    dm.setup()
    full = [x for x, _ in dm.train_dataloader()]
    killed = dm.train_dataloader()
    stream = iter(killed)
    seen = [next(stream)[0] for _ in range(3)]
    state = killed.state_dict()
    assert state == {"epoch": 0, "batches": 3}
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    rest = [x for x, _ in resumed]
    assert len(seen + rest) == len(full) and all(
        torch.equal(a, b) for a, b in zip(seen + rest, full, strict=True)
    )
    assert resumed.state_dict() == {"epoch": 0, "batches": 10}
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # a checkpoint of an earlier epoch skips nothing in this one
    assert len(list(resumed)) == 10
