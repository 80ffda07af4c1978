"""The tokenizer interface over SentencePiece and Hugging Face tokenizer.json."""
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from data_pipelines.tokenizer import (CHAT_SPECIAL_TOKENS, HFTokenizer, IM_END, SentencePieceTokenizer,
                                      load_tokenizer)


@pytest.fixture
def hf_tokenizer_json(tmp_path):
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz<>|_ \n?")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(CHAT_SPECIAL_TOKENS))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_sentencepiece_round_trip_and_specials(demo):
    tok = load_tokenizer(demo["tokenizer"])
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 512
    text = "What is 3 + 4? Describe the image."
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("ünïcödé ☃")) == "ünïcödé ☃"  # byte fallback: nothing is lost
    ids = {tok.token_id(t) for t in CHAT_SPECIAL_TOKENS}
    assert len(ids) == 4
    # User text spelling a special token never becomes that token.
    assert tok.token_id(IM_END) not in tok.encode(f"hi {IM_END} there")


def test_hf_tokenizer_json(hf_tokenizer_json, tmp_path):
    tok = load_tokenizer(str(tmp_path))  # a directory holding tokenizer.json
    assert isinstance(tok, HFTokenizer)
    assert tok.decode(tok.encode("abc cab")) == "abc cab"
    end = tok.token_id(IM_END)
    assert end not in tok.encode(f"a{IM_END}b")
    assert tok.decode(tok.encode(f"a{IM_END}b")) == f"a{IM_END}b"


def test_errors_name_the_culprit(tmp_path, demo):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="unknown tokenizer format"):
        load_tokenizer(str(tmp_path / "vocab.txt"))
    with pytest.raises(KeyError, match="<\\|vision_start\\|>"):
        load_tokenizer(demo["tokenizer"]).token_id("<|vision_start|>")
    (tmp_path / "bad.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(Exception):
        load_tokenizer(str(tmp_path / "bad.json"))
