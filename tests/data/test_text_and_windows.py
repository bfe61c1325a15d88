"""Real text in, windows out: the fixed State-of-the-Union split, window cutting, and the
clear errors for text too short, non-UTF-8 text and a tokenizer that is not the model's."""

import pytest
import torch

from lqlora_dagster.data.corpora import read_text, sotu_files
from lqlora_dagster.data.windows import check_token_ids, token_windows, tokenize
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.metrics import perplexity
from lqlora_dagster.models.loading import load_tokenizer
from tests.tiny_models import tiny_llama


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    return load_tokenizer(smollm2_folder)


def test_sotu_splits_are_disjoint_and_ordered():
    years = {split: [int(p.name[:4]) for p in sotu_files(split)] for split in ("calibration", "train", "eval")}
    assert max(years["calibration"]) < min(years["train"]) <= max(years["train"]) < min(years["eval"])
    names = [set(p.name for p in sotu_files(s)) for s in ("calibration", "train", "eval")]
    assert not (names[0] & names[1] or names[1] & names[2] or names[0] & names[2])


def test_windows_cover_the_text_in_order(tokenizer):
    ids = tokenize(tokenizer, read_text(sotu_files("eval")[0]))
    windows = token_windows(ids, 128)
    assert windows.shape == (ids.numel() // 128, 128)
    assert torch.equal(windows.flatten(), ids[: windows.numel()])
    spread = token_windows(ids, 128, n_windows=3)
    assert torch.equal(spread[0], windows[0]) and torch.equal(spread[-1], windows[-1])


def test_text_shorter_than_one_window(tokenizer):
    ids = tokenize(tokenizer, "Mr. Speaker, the state of our union is strong.")
    with pytest.raises(LQLoRAInputError, match=r"shorter than one window of 512"):
        token_windows(ids, 512)


def test_too_many_windows(tokenizer):
    ids = tokenize(tokenizer, read_text(sotu_files("eval")[0]))
    with pytest.raises(LQLoRAInputError, match="ask for fewer windows"):
        token_windows(ids, 512, n_windows=10_000)


def test_empty_text(tokenizer):
    with pytest.raises(LQLoRAInputError, match="the text is empty"):
        tokenize(tokenizer, "  \n ")


def test_non_utf8_text_names_the_byte(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Fellow citizens of the Rep\xfablica".encode("latin-1"))
    with pytest.raises(LQLoRAInputError, match=r"not UTF-8 text \(byte 0xfa"):
        read_text(path)


def test_tokenizer_of_another_model_is_refused(tokenizer):
    """SmolLM2's tokenizer (49,152 ids) against a model with a 256-token vocabulary."""
    ids = tokenize(tokenizer, read_text(sotu_files("eval")[0]))
    windows = token_windows(ids, 64, n_windows=2)
    with pytest.raises(LQLoRAInputError, match="the tokenizer does not belong to this model"):
        perplexity(tiny_llama(), windows)
    with pytest.raises(LQLoRAInputError, match="2-D LongTensor"):
        check_token_ids(windows.float(), 49152)
