"""Context extractors: shapes, determinism, local weights, the cache and the errors, on a
synthetic voiced signal and on the demo corpus's real speech (the `real_speech` fixture of
conftest.py), down to the alignment of each context to the encoder's frames.
"""

import math
import subprocess
import sys

import pytest
import torch

from localgp import flops
from localgp.context.cache import FeatureCache
from localgp.context.events import BeatsEvents
from localgp.context.language import Lang2Vec
from localgp.context.speaker import EcapaSpeaker, ResemblyzerSpeaker
from localgp.gates import align_to_frames


def voiced(seconds=2.0, pitch=180.0, seed=0):
    """A harmonic tone with syllable-rate amplitude modulation and a little noise."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    tone = sum(torch.sin(2 * math.pi * pitch * k * t) / k for k in range(1, 6))
    return 0.2 * tone * (1.2 + torch.sin(2 * math.pi * 4 * t)) + 0.005 * torch.randn(t.shape, generator=gen)


@pytest.fixture(scope="module")
def ecapa():
    return EcapaSpeaker(allow_random=True)


@pytest.fixture(scope="module")
def resemblyzer():
    return ResemblyzerSpeaker()


@pytest.fixture(scope="module")
def lang2vec(tmp_path_factory):
    return Lang2Vec(tmp_path_factory.mktemp("lang2vec"))  # loads the URIEL tables on its first vector: seconds


@pytest.fixture(scope="module")
def beats():
    torch.manual_seed(0)
    return BeatsEvents(allow_random=True)


def test_ecapa_shape_determinism_and_local_weights(ecapa, tmp_path):
    wav = voiced()
    emb = ecapa(wav)
    assert emb.shape == (1, 192) and torch.equal(emb, ecapa(wav))
    torch.save(ecapa.model.state_dict(), tmp_path / "embedding_model.ckpt")
    assert torch.equal(EcapaSpeaker(model_dir=tmp_path)(wav), emb)


def test_resemblyzer_gives_pretrained_embeddings_over_time(resemblyzer):
    encoder = resemblyzer
    low, high = encoder(voiced(3.0, 110.0)), encoder(voiced(3.0, 240.0))
    assert low.shape[1] == 256 and low.shape[0] >= 2
    assert torch.allclose(low.norm(dim=1), torch.ones(low.shape[0]), atol=1e-4)  # GE2E embeddings are unit norm
    assert torch.equal(low, encoder(voiced(3.0, 110.0)))
    assert not torch.allclose(low.mean(0), high.mean(0))


def test_beats_one_vector_per_160ms(beats):
    events = beats
    out = events(voiced(2.0))
    assert out.shape == (12, 768) and torch.isfinite(out).all()
    assert abs(events(voiced(4.0)).shape[0] - 4.0 / 0.16) <= 1  # fbank edges may drop the last step


def test_lang2vec(lang2vec):
    l2v = lang2vec
    de, fr = l2v("de"), l2v("fr")
    assert de.shape == (1, 289) and not torch.equal(de, fr)
    assert torch.equal(l2v("deu"), de)
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        l2v("xx")


def test_lang2vec_vectors_are_cached_on_disk(lang2vec, tmp_path):
    """A second process (here: another instance on the same directory) reads the vectors from disk,
    without importing lang2vec; a damaged cache file is named, with its fix."""
    de = lang2vec("de")
    again = Lang2Vec(lang2vec.cache_dir.parents[1])
    assert torch.equal(again("de"), de) and again._l2v is None
    cached = lang2vec.cache_dir / "deu.json"
    assert cached.is_file()
    damaged = Lang2Vec(tmp_path)
    damaged.cache_dir.mkdir(parents=True)
    (damaged.cache_dir / "deu.json").write_text("[1.0, 2.0]")
    with pytest.raises(ValueError, match="deu.json is damaged .not 289 numbers.: delete it"):
        damaged("de")


def test_lang2vec_from_a_console_script(tmp_path):
    """lang2vec's distribution puts a script lang2vec.py among the console scripts, and a console
    script (`localgp train`) runs with that directory first on sys.path: the package must still load."""
    (tmp_path / "lang2vec.py").write_text("raise ImportError('the script, not the package')\n")
    (tmp_path / "entry.py").write_text("from localgp.context.language import Lang2Vec\n"
                                       f"print(tuple(Lang2Vec({str(tmp_path / 'cache')!r})('de').shape))\n")
    result = subprocess.run([sys.executable, str(tmp_path / "entry.py")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 289)"


def test_extractor_errors(ecapa, tmp_path):
    with pytest.raises(ValueError, match="sample_rate must be 16000 Hz"):
        ecapa(voiced(), sample_rate=8000)
    with pytest.raises(ValueError, match="expected mono audio"):
        ecapa(torch.stack([voiced(), voiced()]))
    with pytest.raises(ValueError, match="shorter than 0.1 s"):
        ecapa(torch.zeros(100))
    with pytest.raises(ValueError, match="or allow_random=True"):
        EcapaSpeaker()
    with pytest.raises(FileNotFoundError, match="embedding_model.ckpt not found"):
        EcapaSpeaker(model_dir=tmp_path)
    with pytest.raises(ValueError, match="or allow_random=True"):
        BeatsEvents()


def test_cache_computes_once(tmp_path):
    cache = FeatureCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(6.0).reshape(2, 3)

    first = cache.get("speaker", "spk1/utt 1", compute)
    second = cache.get("speaker", "spk1/utt 1", compute)
    assert torch.equal(first, second) and len(calls) == 1
    assert cache.path("speaker", "spk1/utt 1").parent == tmp_path / "speaker"
    assert not list(tmp_path.rglob("*.tmp*"))


def test_cache_keeps_what_was_written_when_a_computation_fails(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    first = cache.get("event", "utt1", lambda: torch.ones(3, 4))

    def broken():
        raise RuntimeError("extractor died")

    with pytest.raises(RuntimeError, match="extractor died"):
        cache.get("event", "utt2", broken)
    # a write that dies half way leaves neither a half file under the real name nor its temporary
    import localgp.context.cache as cache_module

    def dies_mid_write(path, array):
        with open(path, "wb") as f:
            f.write(b"\x93NUMPY half")
        raise OSError("disk full")

    monkeypatch.setattr(cache_module.np, "save", dies_mid_write)
    with pytest.raises(OSError, match="disk full"):
        cache.get("event", "utt3", lambda: torch.zeros(2, 4))
    monkeypatch.undo()
    assert not cache.path("event", "utt2").exists() and not cache.path("event", "utt3").exists()
    assert not list(tmp_path.rglob("*.tmp*"))
    assert torch.equal(cache.get("event", "utt1", broken), first)  # read back, not recomputed


# ------------------------------------------------------------------ the demo corpus's real speech

@pytest.fixture(scope="module")
def real_contexts(ecapa, resemblyzer, beats, real_speech):
    """Each extractor's output on the real utterances (ECAPA, the slowest on CPU, on one
    utterance of each voice), computed once for the tests below."""
    out = {}
    for i, utt in enumerate(real_speech):
        out[utt["id"]] = {"speaker": resemblyzer(utt["wav"]), "event": beats(utt["wav"])}
        if i % 3 == 0:
            out[utt["id"]]["ecapa"] = ecapa(utt["wav"])
    return out


def test_real_speech_gives_the_same_contexts_twice(ecapa, resemblyzer, beats, real_speech, real_contexts):
    again = {"speaker": resemblyzer, "event": beats, "ecapa": ecapa}
    for utt in real_speech[::3]:  # one utterance of each voice
        for name, first in real_contexts[utt["id"]].items():
            assert torch.equal(again[name](utt["wav"]), first), name


def test_speaker_extractors_on_real_speech(real_speech, real_contexts):
    voices = {}
    for utt in real_speech:
        sequence = real_contexts[utt["id"]]["speaker"]
        assert sequence.shape[1] == 256 and sequence.shape[0] >= 2  # 2.8-4.4 s: several windows
        assert torch.allclose(sequence.norm(dim=1), torch.ones(len(sequence)), atol=1e-4)
        voices[utt["id"]] = (utt["speaker"], torch.nn.functional.normalize(sequence.mean(0), dim=0))
    ids = sorted(voices)
    pairs = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
    # The pretrained GE2E encoder tells the corpus's voices apart: every pair of utterances of one
    # voice is closer than every pair across voices.
    same = [float(voices[a][1] @ voices[b][1]) for a, b in pairs if voices[a][0] == voices[b][0]]
    other = [float(voices[a][1] @ voices[b][1]) for a, b in pairs if voices[a][0] != voices[b][0]]
    assert len(same) == 6 and len(other) == 9 and min(same) > max(other), (same, other)
    ecapa = [c["ecapa"] for c in real_contexts.values() if "ecapa" in c]
    assert len(ecapa) == 2 and all(e.shape == (1, 192) and torch.isfinite(e).all() for e in ecapa)
    assert not torch.equal(*ecapa)  # random weights, but the embedding depends on the input


def test_beats_and_lang2vec_on_real_speech(lang2vec, real_speech, real_contexts):
    for utt in real_speech:
        events = real_contexts[utt["id"]]["event"]
        assert events.shape[1] == 768 and torch.isfinite(events).all()
        assert abs(events.shape[0] - len(utt["wav"]) / 16000 / 0.16) <= 1
    vectors = {utt["language"]: lang2vec(utt["language"]) for utt in real_speech}
    assert sorted(vectors) == ["en", "it"] and not torch.equal(vectors["en"], vectors["it"])
    assert all(v.shape == (1, 289) and torch.isfinite(v).all() for v in vectors.values())


def test_real_contexts_align_to_the_encoder_frames(real_speech, real_contexts):
    from localgp.backbones.owsm import weights as owsm
    from localgp.model.config import GateConfig
    from localgp.backbones.owsm.model import gate_s2t_model
    from localgp.model.convert import last_record

    torch.manual_seed(0)
    model = gate_s2t_model(owsm.build_owsm("tiny")[0],
                           GateConfig(contexts=(("front", 0), ("speaker", 256), ("event", 768)))).eval()
    for utt in real_speech[::3]:  # one utterance of each voice
        wav = torch.from_numpy(utt["wav"])
        frames = flops.subsampled_frames(flops.input_frames(len(wav) / 16000))
        contexts = real_contexts[utt["id"]]
        for sequence in contexts.values():
            # fewer context steps than frames: the last one is repeated to the end
            assert len(sequence) < frames
            aligned = align_to_frames(sequence[None], frames)[0]
            assert aligned.shape == (frames, sequence.shape[1])
            assert torch.equal(aligned[: len(sequence)], sequence)
            assert torch.equal(aligned[len(sequence):], sequence[-1:].expand(frames - len(sequence), -1))
            # more steps than frames: trimmed
            fewer = max(len(sequence) - 1, 1)
            assert torch.equal(align_to_frames(sequence[None], fewer)[0], sequence[:fewer])
        model.encoder.set_context(speaker=contexts["speaker"][None], event=contexts["event"][None])
        with torch.no_grad():
            _, lengths = model.encode(wav[None], torch.tensor([len(wav)]))
        assert int(lengths[0]) == frames  # the frame count the contexts were aligned to
        masks = last_record(model).masks
        assert masks and all(m.shape == (1, frames) for m in masks.values())
