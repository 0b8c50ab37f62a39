"""Drawing the next token: greedy at temperature 0, softmax(logits / temperature) otherwise, top_k
keeping exactly the k most likely tokens."""

import logging
import re
import textwrap
import warnings

import pytest
import torch
from torch.nn import functional as F

from tests.helpers import TINY, quiet_trainer, write_corpus
from tsa_lightning import TSALanguageModel
from tsa_lightning.data import TextDataModule
from tsa_lightning.errors import ConfigError
from tsa_lightning.inference import generate_cached, sample
from tsa_lightning.model import TSAConfig, TSATransformer, sample_next

LOGITS = torch.tensor(
    [
        [2.0, 1.0, 0.0, -1.0, 0.5, 1.5, -0.5, 0.25],
        [0.0, 3.0, 2.9, 2.8, -1.0, 2.7, 0.1, 0.2],  # a flat top: top_k's cut falls between near-equals
    ]
)


def frequencies(logits: torch.Tensor, temperature: float, top_k: int | None, n: int = 20_000) -> torch.Tensor:
    """How often each token of one row of logits is drawn, in n draws (one batch of n equal rows)."""
    torch.manual_seed(0)
    draws = sample_next(logits.expand(n, -1), temperature, top_k)
    return torch.bincount(draws, minlength=logits.size(-1)).float() / n


def support(logits: torch.Tensor, temperature: float, top_k: int | None, draws: int = 300) -> list[set[int]]:
    """The tokens each row of a small batch ever draws."""
    torch.manual_seed(0)
    seen = [set() for _ in range(logits.size(0))]
    for _ in range(draws):
        for row, token in zip(seen, sample_next(logits, temperature, top_k).tolist(), strict=True):
            row.add(token)
    return seen


def test_temperature_zero_is_greedy():
    assert sample_next(LOGITS, 0, None).tolist() == [0, 1]
    assert sample_next(LOGITS, 0, 3).tolist() == [0, 1]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_tokens_are_drawn_from_the_softmax_of_the_logits_over_the_temperature(temperature):
    expected = F.softmax(LOGITS[0] / temperature, dim=-1)
    torch.testing.assert_close(frequencies(LOGITS[0], temperature, None), expected, atol=0.015, rtol=0)


def test_top_k_draws_from_the_k_most_likely_tokens_in_their_own_proportions():
    logits = LOGITS[0]
    top = logits.topk(3).indices
    expected = torch.zeros_like(logits)
    expected[top] = F.softmax(logits[top], dim=-1)
    torch.testing.assert_close(frequencies(logits, 1.0, 3), expected, atol=0.015, rtol=0)


@pytest.mark.parametrize("top_k", [1, 2, 3, 5])
def test_top_k_keeps_exactly_the_k_largest_logits_of_each_row(top_k):
    """Whatever the batch size (two rows here, fewer than k)."""
    expected = [set(row.topk(top_k).indices.tolist()) for row in LOGITS]
    assert support(LOGITS, 1.0, top_k) == expected


def test_a_top_k_above_the_vocabulary_keeps_every_token():
    assert support(LOGITS, 2.0, 20, draws=500) == [set(range(LOGITS.size(1)))] * 2


@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
def test_top_k_one_is_greedy_at_any_temperature(temperature):
    torch.manual_seed(0)
    for _ in range(20):
        assert sample_next(LOGITS, temperature, 1).tolist() == [0, 1]


def test_sampling_is_silent():
    """No warning on any path: a sampling loop would print it once per token."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for temperature, top_k in ((0, None), (1.0, None), (0.7, 3)):
            sample_next(LOGITS, temperature, top_k)


@pytest.mark.parametrize("training", [True, False])
def test_decoding_leaves_the_model_in_the_mode_it_found_it(training):
    model = TSATransformer(TSAConfig(vocab_size=11, block_size=16, **TINY)).train(training)
    generate_cached(model, [torch.tensor([1, 2, 3])], 4, temperature=0)
    assert model.training is training


@pytest.mark.parametrize(
    "options, message",
    [
        ({"top_k": 0}, "--top_k must be >= 1"),
        ({"temperature": -1.0}, "--temperature must be >= 0"),
        ({"threshold": 7.0}, "--threshold must be in [0, 1.01]"),
        ({"max_new_tokens": -3}, "--max_new_tokens must be >= 1"),
    ],
)
def test_python_sampling_refuses_what_the_command_line_refuses(options, message):
    module = TSALanguageModel(TSAConfig(vocab_size=11, block_size=16, **TINY))
    with pytest.raises(ConfigError, match=re.escape(message)):
        module.sample("", **{"max_new_tokens": 4, **options})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny TSA model as published (soft gate: trained for soft mode), trained until its blocks
    matter to what it writes."""
    folder = tmp_path_factory.mktemp("sample")
    corpus = write_corpus(folder / "corpus.txt", words=True)
    corpus.write_text("\n".join(textwrap.wrap(corpus.read_text(), 40)))  # lines: "\n" is the default prompt
    data = TextDataModule(str(corpus), block_size=16, batch_size=8)
    config = TSAConfig(vocab_size=data.vocab_size, block_size=16, **TINY)
    module = TSALanguageModel(config, alphabet=data.alphabet, learning_rate=1e-2, warmup_steps=1)
    trainer = quiet_trainer(max_steps=30, limit_val_batches=0)
    trainer.fit(module, data)
    trainer.save_checkpoint(folder / "last.ckpt")
    return str(folder / "last.ckpt")


def test_sample_prints_the_prompt_and_its_continuation_and_says_how_it_decoded(checkpoint, capsys):
    text = sample(checkpoint)
    out, err = capsys.readouterr()
    assert out == "\n" + text + "\n"  # the default prompt: a new line
    assert err == "[soft mode at threshold 0.5, KV-cache decoding]\n"
    module = TSALanguageModel.load_from_checkpoint(checkpoint)
    torch.manual_seed(1337)
    assert text == module.sample("\n", 500, temperature=0.8)  # the documented defaults

    def decoded(**options) -> str:  # as `sample` decodes: seeded first
        torch.manual_seed(1337)
        return module.sample("the", 30, **{"temperature": 1.0, **options})

    assert sample(checkpoint, "the", 30, top_k=1) == decoded(temperature=0)  # top_k 1 is greedy
    # hard mode, nothing or everything skipped: the mode and the threshold matter to this model
    hard = {threshold: decoded(mode="hard", threshold=threshold) for threshold in (1.01, 0.0)}
    assert hard[0.0] not in (hard[1.01], decoded())
    capsys.readouterr()
    for threshold, text in hard.items():
        assert sample(checkpoint, "the", 30, temperature=1.0, mode="hard", threshold=threshold) == text
    assert capsys.readouterr().err.splitlines() == [
        "[hard mode at threshold 1, KV-cache decoding]",
        "[hard mode at threshold 0, KV-cache decoding]",
    ]


def test_sample_compiles_the_decoder_when_asked(checkpoint, capsys, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **options: compiled.append(options) or model)
    sample(checkpoint, "the", 4, compile=True)
    assert compiled == [{"dynamic": True}]
    assert logging.getLogger("torch._dynamo").getEffectiveLevel() == logging.ERROR  # its notes: not for users
    assert capsys.readouterr().err == "[soft mode at threshold 0.5, KV-cache decoding, compiled]\n"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"threshold": 7.0}, "--threshold must be in [0, 1.01]"),
        ({"threshold": 0.5, "budget": 0.5}, "give a budget or a threshold, not both"),
        ({"max_new_tokens": 0}, "--max_new_tokens must be >= 1"),
        ({"temperature": -1.0}, "--temperature must be >= 0"),
        ({"top_k": 0}, "--top_k must be >= 1"),
    ],
)
def test_sample_refuses_bad_arguments_before_it_reads_the_checkpoint(tmp_path, options, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        sample(str(tmp_path / "missing.ckpt"), **options)
