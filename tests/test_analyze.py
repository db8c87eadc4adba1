import numpy as np
import pytest

from localgp.analyze import mask_figure, word_start_test


def test_mask_figure_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    masks = {f"encoder.{layer}.{m}": (rng.random(50) > 0.4).astype(float) for layer in range(3) for m in ("ffn1", "attn")}
    path = mask_figure(rng.standard_normal((203, 80)), masks, tmp_path / "masks.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="no temporal masks"):
        mask_figure(np.zeros((10, 80)), {}, tmp_path / "x.png")


def test_word_start_test_detects_a_difference():
    rng = np.random.default_rng(1)
    pieces = ["\u2581w"] * 200 + ["x"] * 200
    rates = list(rng.normal(0.8, 0.1, 200)) + list(rng.normal(0.6, 0.1, 200))
    result = word_start_test(pieces, rates)
    assert result["word_start"]["count"] == 200 and result["mann_whitney_u"]["p_value"] < 1e-6
    same = word_start_test(pieces, list(rng.normal(0.7, 0.1, 400)))
    assert same["welch_t"]["p_value"] > 1e-3
    with pytest.raises(ValueError, match="at least two tokens of each kind"):
        word_start_test(["\u2581a", "b"], [1.0, 0.0])


# ------------------------------------------------------------------ word-start on decoded records

def decoded(uid, lang, tgt, pieces, keep):
    from localgp.evaluate import Decoded

    return Decoded(uid, lang, tgt, "ref", "hyp", 1.0, 0.1, {}, pieces, keep)


def test_word_start_from_records_and_cli(tmp_path, capsys, cli_error):
    import json

    from localgp.analyze import word_start_from_records
    from localgp.cli import main
    from localgp.evaluate import append_decoded

    rng = np.random.default_rng(2)
    records = [decoded(f"de{i}", "de", "de", ["\u2581a", "b", "\u2581c", "d"], [*rng.normal(0.9, 0.05, 1), 0.2,
                                                                                   *rng.normal(0.9, 0.05, 1), 0.3])
               for i in range(20)]
    records += [decoded(f"fr{i}", "fr", "de", ["\u2581x", "y", "\u2581z", "w"], [0.1, 0.9, 0.1, 0.9]) for i in range(20)]
    records.append(decoded("empty", "de", "de", [], []))  # no tokens (an empty hypothesis): left out
    german = word_start_from_records(records, language="de", task="asr")
    assert german["records"] == 20 and german["word_start"]["count"] == 40 and german["other"]["count"] == 40
    assert german["word_start"]["mean_keep"] > 0.8 > 0.3 > german["other"]["mean_keep"]
    assert german["mann_whitney_u"]["p_value"] < 1e-6
    both = word_start_from_records(records)
    assert both["records"] == 40 and both["word_start"]["count"] == 80
    assert word_start_from_records(records, task="st")["word_start"]["mean_keep"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"none of the 0 records \(language it, task all\) has per-token"):
        word_start_from_records(records, language="it")
    with pytest.raises(ValueError, match="task must be"):
        word_start_from_records(records, task="tts")

    path = tmp_path / "decoded.jsonl"
    append_decoded(records, path)
    assert main(["analyze", "word-start", str(path), "--language", "de", "--out", str(tmp_path / "ws.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "ws.json").read_text())
    assert printed["records"] == 20 and printed["language"] == "de"
    plain = tmp_path / "plain.jsonl"
    append_decoded([decoded("u", "de", "de", [], [])], plain)
    cli_error(["analyze", "word-start", plain], "decode with a decoder gated per token")


# ------------------------------------------------------------------ the mask figure of a trained model

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory of `localgp train` (tiny model, one step, resemblyzer speaker context),
    its gates' output layers then randomised so that the masks vary per frame and layer (random
    weights elsewhere in the gates swamp the frames' own features and give constant masks)."""
    import torch

    from tests.test_train import config

    from localgp.train import Trainer

    root = tmp_path_factory.mktemp("analyze")
    cfg = config(root, "run", max_steps=1,
                 gates={"encoder": "temporal", "decoder": "token", "contexts": [["front", 0], ["speaker", 256]]},
                 context_extractors={"speaker": {"kind": "resemblyzer"}})
    Trainer(cfg).train()
    state = torch.load(root / "run" / "checkpoint.pth", weights_only=False)
    gen = torch.Generator().manual_seed(0)
    for key, value in state["model"].items():
        if "pruning." in key and ".to_logits." in key:
            state["model"][key] = torch.randn(value.shape, generator=gen) if key.endswith("weight") else 0 * value
    torch.save(state, root / "run" / "checkpoint.pth")
    return root


def test_encoder_masks_of_a_trained_model(trained):
    import soundfile as sf
    import torch

    from localgp.backbones.owsm.backbone import encoder_masks
    from localgp.data.audio import load_audio
    from localgp.runs import load_trained

    model, tokenizer, config = load_trained(trained / "run")
    assert config.out_dir == str(trained / "run") and tokenizer.prompt("de")
    # A chirp, then noise: frames that differ from one another (the corpus's steady tones give
    # every frame of a module the same decision, whatever the gates)
    t = np.arange(16000) / 16000
    noise = 0.1 * np.random.default_rng(0).standard_normal(8000)
    sf.write(trained / "chirp.wav", np.concatenate([0.3 * np.sin(2 * np.pi * (100 + 1500 * t) * t), noise]), 16000)
    wav = torch.from_numpy(load_audio(trained / "chirp.wav"))
    model.encoder.set_context(speaker=torch.randn(1, 3, 256))
    log_mel, masks = encoder_masks(model, wav)
    frames_in = len(wav) // 160 + 1
    assert log_mel.shape == (frames_in, 80)
    with torch.no_grad():  # the spectrogram is the model's own frontend output
        feats, _ = model._extract_feats(wav[None], torch.tensor([len(wav)]))
    assert np.array_equal(log_mel, feats[0].numpy())
    frames = ((frames_in - 1) // 2 - 1) // 2
    assert sorted(masks) == [f"encoder.{layer}.{m}" for layer in range(2) for m in ("attn", "ffn1", "ffn2")]
    stacked = np.stack(list(masks.values()))
    assert stacked.shape == (6, frames) and set(np.unique(stacked)) == {0.0, 1.0}
    assert any(0 < row.mean() < 1 for row in stacked)  # kept on some frames, skipped on others


def test_analyze_masks_cli(trained, tmp_path, cli_error):
    import soundfile as sf

    from localgp.cli import main

    # 44.1 kHz on purpose: load_audio resamples to the model's 16 kHz (documented, deliberate)
    t = np.arange(int(1.5 * 44100)) / 44100
    sf.write(tmp_path / "hi.wav", (0.2 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32),
             44100)
    out = tmp_path / "fig" / "masks.png"
    assert main(["analyze", "masks", "--checkpoint", str(trained / "run"), "--audio", str(tmp_path / "hi.wav"),
                 "--language", "fr", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000

    def masks(match, **changes):
        argv = {"--checkpoint": str(trained / "run"), "--audio": str(tmp_path / "hi.wav"), "--language": "de",
                "--out": str(tmp_path / "x.png"), **changes}
        return cli_error(["analyze", "masks", *[x for kv in argv.items() for x in kv]], match)

    masks("nope.wav does not exist", **{"--audio": str(tmp_path / "nope.wav")})
    masks(r"\['<xx>'\] not in the token list", **{"--language": "xx"})
    masks("checkpoint .*checkpoint.pth does not exist", **{"--checkpoint": str(tmp_path)})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoint.pth").write_bytes(b"garbage")
    masks("broken/checkpoint.pth is damaged .*train the run again", **{"--checkpoint": str(tmp_path / "broken")})
    assert not (tmp_path / "x.png").exists()


def test_encoder_masks_needs_temporal_gates():
    import torch

    from localgp.backbones.owsm.backbone import encoder_masks
    from localgp.backbones.owsm import weights as owsm
    from localgp.model.config import GateConfig
    from localgp.backbones.owsm.model import gate_s2t_model

    model = gate_s2t_model(owsm.build_owsm("tiny")[0], GateConfig(encoder="utterance"))
    with pytest.raises(ValueError, match="needs an encoder gated per frame .* this one is gated utterance"):
        encoder_masks(model, torch.zeros(16000))
