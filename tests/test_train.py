"""Training: the loss falls, resume continues exactly, bad input is caught."""

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from localgp.errors import UserError
from localgp.train_config import TrainConfig
from localgp.train import Trainer, batch_order, warmup_lr

SENTENCES = {
    "de": ["guten morgen", "wie geht es dir", "das ist gut", "bis bald"],
    "fr": ["bonjour", "comment ça va", "c'est bien", "à bientôt"],
}


def write_kaldi(root):
    """Two tiny languages in ESPnet data-dir layout, one tone pattern per sentence."""
    dirs = {}
    for lang, sentences in SENTENCES.items():
        data = root / lang
        data.mkdir(parents=True, exist_ok=True)
        lines = {"wav.scp": [], "text": [], "utt2spk": []}
        for i, text in enumerate(sentences):
            t = np.arange(int(0.8 * 16000)) / 16000
            wav = 0.2 * np.sin(2 * np.pi * (150 + 60 * i) * t) * (1 + np.sin(2 * np.pi * 3 * t))
            sf.write(data / f"{lang}{i}.wav", wav.astype(np.float32), 16000)
            lines["wav.scp"].append(f"{lang}{i} {data / f'{lang}{i}.wav'}")
            lines["text"].append(f"{lang}{i} {text}")
            lines["utt2spk"].append(f"{lang}{i} spk_{lang}")
        for name, rows in lines.items():
            (data / name).write_text("\n".join(rows) + "\n")
        dirs[lang] = str(data)
    return dirs


def config(tmp_path, out="run", **overrides):
    base = dict(out_dir=str(tmp_path / out), data={"kind": "kaldi", "dirs": write_kaldi(tmp_path / f"data_{out}")},
                tasks=("asr",), vocab_size=40, batch_size=4, lr=3e-3, warmup_steps=5, max_steps=30,
                log_every=5, save_every=10, gates={"encoder": "temporal", "decoder": "token"})
    base.update(overrides)
    return TrainConfig(**base)


def test_loss_falls_and_log_is_written(tmp_path):
    trainer = Trainer(config(tmp_path))
    first = trainer.train(steps=1)
    last = trainer.train()
    assert last["step"] == 30 and last["loss"] < 0.7 * first["loss"]
    rows = [yaml.safe_load(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 30 and "encoder.ffn1" in rows[-1]["sparsity_per_module"]


def test_resume_continues_exactly(tmp_path):
    straight = Trainer(config(tmp_path, "a", max_steps=12, save_every=6))
    straight.train()
    interrupted = Trainer(config(tmp_path, "b", max_steps=12, save_every=6))
    interrupted.train(steps=6)  # checkpoint at step 6, then the process "dies"
    resumed = Trainer(config(tmp_path, "b", max_steps=12, save_every=6))
    assert resumed.step == 6
    resumed.train()
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="tasks must be"):
        config(tmp_path, tasks=("tts",))
    with pytest.raises(ValueError, match="unknown settings"):
        (tmp_path / "c.yaml").write_text("out_dir: x\nbatchsize: 3\n")
        TrainConfig.from_yaml(tmp_path / "c.yaml")
    cfg = config(tmp_path, "bad")
    (tmp_path / "bad").mkdir(exist_ok=True)
    (tmp_path / "bad" / "checkpoint.pth").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"bad/checkpoint.pth is damaged .*: no whole checkpoint is left .*train the run "
                                        r"again"):
        Trainer(cfg)
    assert (tmp_path / "bad" / "checkpoint.pth").read_bytes() == b"garbage"  # nothing overwritten


def test_schedule_and_order():
    assert warmup_lr(5, 1.0, 10) == 0.5 and warmup_lr(10, 1.0, 10) == 1.0 and warmup_lr(40, 1.0, 10) == 0.5
    epoch0 = [batch_order(8, 4, s, 0) for s in (0, 1)]
    assert sorted(epoch0[0] + epoch0[1]) == list(range(8))
    assert batch_order(8, 4, 1, 0) == epoch0[1]


def test_train_cli(tmp_path, capsys):
    from localgp.cli import main

    cfg = config(tmp_path, "cli", max_steps=3)
    path = tmp_path / "train.yaml"
    raw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--steps", "2"]) == 0
    assert '"step": 2' in capsys.readouterr().out
    assert (tmp_path / "cli" / "checkpoint.pth").exists()


def test_trains_on_a_demo_manifest(tmp_path):
    import json

    dirs = write_kaldi(tmp_path / "data")
    lines = []
    for lang, directory in dirs.items():
        other = "fr" if lang == "de" else "de"
        for i, text in enumerate(SENTENCES[lang]):
            lines.append(json.dumps({"id": f"{lang}{i}", "audio": f"{directory}/{lang}{i}.wav", "language": lang,
                                     "text": text, "speaker": f"spk_{lang}", "split": "train",
                                     "translations": {other: SENTENCES[other][i]}}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    cfg = config(tmp_path, "m", data={"kind": "manifest", "path": str(tmp_path / "manifest.jsonl")},
                 tasks=("asr", "st"), max_steps=2)
    trainer = Trainer(cfg)
    assert len(trainer.examples) == 16  # 8 transcripts + 8 translations
    assert trainer.train()["step"] == 2
    with pytest.raises(ValueError, match="no split 'dev'"):
        Trainer(config(tmp_path, "m2", data={"kind": "manifest", "path": str(tmp_path / "manifest.jsonl"), "split": "dev"}))


def test_trains_with_speaker_and_language_context(tmp_path):
    cfg = config(tmp_path, "ctx", max_steps=2,
                 gates={"encoder": "temporal", "decoder": "token", "contexts": [["front", 0], ["speaker", 256]],
                        "decoder_contexts": [["lang2vec", 289]]},
                 context_extractors={"speaker": {"kind": "resemblyzer"}, "lang2vec": {"kind": "lang2vec"}})
    trainer = Trainer(cfg)
    assert trainer.train()["step"] == 2
    assert len(list((tmp_path / "ctx" / "context" / "speaker").glob("*.npy"))) >= 4  # cached per utterance
    with pytest.raises(ValueError, match="names no extractor"):
        Trainer(config(tmp_path, "ctx2", gates={"encoder": "temporal", "contexts": [["front", 0], ["speaker", 192]]}))
    with pytest.raises(ValueError, match="size 192 but its extractor gives 256"):
        Trainer(config(tmp_path, "ctx3", gates={"encoder": "temporal", "contexts": [["front", 0], ["speaker", 192]]},
                       context_extractors={"speaker": {"kind": "resemblyzer"}}))


def test_trains_global_gates_from_the_prompt(tmp_path):
    cfg = config(tmp_path, "glob", max_steps=2, gates={"predictor": "global", "encoder": "utterance", "decoder": "utterance"})
    assert Trainer(cfg).train()["step"] == 2


def test_bad_corpus_is_refused_before_training(tmp_path):
    import json

    from localgp.runs import load_trained

    cfg = config(tmp_path, "missing")
    (tmp_path / "data_missing" / "fr" / "fr2.wav").unlink()
    with pytest.raises(UserError, match="1 of 8 utterances have audio that cannot be used .*fr2.wav does not exist"):
        Trainer(cfg)
    assert not (tmp_path / "missing" / "tokenizer").exists()  # refused before any work

    dirs = write_kaldi(tmp_path / "data")
    entry = {"id": "x0", "audio": f"{dirs['de']}/de0.wav", "language": "xx", "text": "hallo", "speaker": "s",
             "split": "train"}
    (tmp_path / "m.jsonl").write_text(json.dumps(entry) + "\n")
    with pytest.raises(ValueError, match=r"\['<xx>'\] not in the token list"):
        Trainer(config(tmp_path, "lang", data={"kind": "manifest", "path": str(tmp_path / "m.jsonl")}))
    (tmp_path / "m.jsonl").write_text(json.dumps({**entry, "language": "de"}) + "\n"
                                      + json.dumps({**entry, "id": "x1", "text": "  "}) + "\n")
    with pytest.raises(ValueError, match="m.jsonl:2: utterance 'x1' has an empty transcript"):
        Trainer(config(tmp_path, "empty", data={"kind": "manifest", "path": str(tmp_path / "m.jsonl")}))
    with pytest.raises(UserError, match="checkpoint .*nowhere/checkpoint.pth does not exist"):
        load_trained(tmp_path / "nowhere")
