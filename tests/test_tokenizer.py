import pytest

from localgp.backbones.owsm.tokenizer import Tokenizer

TEXTS = [f"{w} number {i} is here" for i in range(60) for w in ("hello", "bonjour", "ciao", "hallo")]


def test_train_encode_decode_and_prompts(tmp_path):
    tok = Tokenizer.train(TEXTS, tmp_path, vocab_size=60)
    assert (tmp_path / "bpe.model").exists() and (tmp_path / "tokens.txt").exists()
    ids = tok.encode("bonjour number 7")
    assert ids and tok.unk not in ids
    assert tok.decode(tok.prompt("fr") + ids) == "bonjour number 7"
    fr_to_de = [tok.token_list[i] for i in tok.prompt("fr", "de")]
    assert fr_to_de == ["<fr>", "<st_de>", "<notimestamps>"]
    assert [tok.token_list[i] for i in tok.prompt("it", "it")][1] == "<asr>"
    again = Tokenizer.load(tmp_path)
    assert again.encode("ciao number 3") == tok.encode("ciao number 3")
    for special in ("<blank>", "<unk>", "<sos>", "<eos>", "<na>"):
        assert special in tok.id_of


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no training text"):
        Tokenizer.train(["", "  "], tmp_path)
    tok = Tokenizer.train(TEXTS, tmp_path, vocab_size=60)
    with pytest.raises(ValueError, match=r"\['<xx>'\] not in the token list"):
        tok.prompt("xx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(tmp_path / "none.model", tok.token_list)
