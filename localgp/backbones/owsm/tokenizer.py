"""Text <-> token ids for OWSM-style training: a sentencepiece BPE model for the words, and the
OWSM special tokens (<lang>, <asr> / <st_xx>, <notimestamps>, <sos>/<eos>) as single ids.

A real OWSM checkpoint brings its own BPE model and token list (`Tokenizer(bpe, token_list)`);
`Tokenizer.train` makes both from the training text of a corpus.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from localgp.errors import UserError
from localgp.backbones.owsm.weights import LANGUAGES, language_token, owsm_token_list

NO_TIMESTAMPS = "<notimestamps>"


class Tokenizer:
    def __init__(self, bpe_model: str | Path, token_list: list[str]):
        import sentencepiece as spm

        path = Path(bpe_model)
        if not path.exists():
            raise FileNotFoundError(f"Tokenizer: BPE model {path} does not exist")
        self.bpe_model = path
        self.processor = spm.SentencePieceProcessor(model_file=str(path))
        self.token_list = list(token_list)
        self.id_of = {token: i for i, token in enumerate(self.token_list)}
        self.unk = self.id_of["<unk>"]

    @classmethod
    def train(cls, texts: list[str], out_dir: str | Path, vocab_size: int = 500, languages=LANGUAGES) -> "Tokenizer":
        """BPE on `texts` (vocab_size pieces), written to out_dir/bpe.model and out_dir/tokens.txt
        (and the training text): built in a staging folder and moved in once complete, so a failure
        leaves nothing half-written."""
        import sentencepiece as spm

        texts = [t.strip() for t in texts if t.strip()]
        if not texts:
            raise ValueError("Tokenizer.train: no training text")
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            (stage / "train_text.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
            try:
                spm.SentencePieceTrainer.train(
                    input=str(stage / "train_text.txt"), model_prefix=str(stage / "bpe"), vocab_size=vocab_size,
                    model_type="bpe", character_coverage=1.0, minloglevel=2, hard_vocab_limit=False,
                )
            except RuntimeError as err:  # e.g. fewer pieces than the text has characters
                raise UserError(f"vocab_size {vocab_size}: sentencepiece cannot train on this corpus: "
                                f"{str(err).split('] ', 1)[-1]}") from err
            processor = spm.SentencePieceProcessor(model_file=str(stage / "bpe.model"))
            # sentencepiece's own <unk>, <s>, </s> are replaced by OWSM's specials.
            pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())
                      if not processor.is_control(i) and not processor.is_unknown(i)]
            token_list = owsm_token_list(None, pieces, languages)
            (stage / "tokens.txt").write_text("\n".join(token_list) + "\n", encoding="utf-8")
            out.mkdir(exist_ok=True)
            for name in ("train_text.txt", "bpe.model", "bpe.vocab", "tokens.txt"):  # tokens.txt last: it marks done
                (stage / name).replace(out / name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return cls(out / "bpe.model", token_list)

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        return cls(directory / "bpe.model", (directory / "tokens.txt").read_text(encoding="utf-8").splitlines())

    def encode(self, text: str) -> list[int]:
        return [self.id_of.get(piece, self.unk) for piece in self.processor.encode(text, out_type=str)]

    def decode(self, ids) -> str:
        """Text of the BPE pieces among ids; special tokens are dropped."""
        pieces = [self.token_list[i] for i in ids if not self.token_list[i].startswith("<")]
        return self.processor.decode_pieces(pieces)

    def prompt(self, language: str, target: str | None = None) -> list[int]:
        """<lang><asr><notimestamps>, or <lang><st_target><notimestamps> for translation."""
        task = "<asr>" if target is None or target == language else f"<st_{target}>"
        tokens = [language_token(language), task, NO_TIMESTAMPS]
        missing = [t for t in tokens if t not in self.id_of]
        if missing:
            raise UserError(f"Tokenizer.prompt: {missing} not in the token list (languages of this model: "
                             f"{[t for t in self.token_list if len(t) == 4 and t.startswith('<')]})")
        return [self.id_of[t] for t in tokens]
