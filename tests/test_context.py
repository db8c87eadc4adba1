"""Context extractors: shapes, determinism, local weights, the cache and the errors.

These use a synthetic voiced signal; the tests on the demo corpus's real speech come with the
corpus (the end-to-end issue).
"""

import math

import pytest
import torch

from localgp.context.cache import FeatureCache
from localgp.context.events import BeatsEvents
from localgp.context.language import Lang2Vec
from localgp.context.speaker import EcapaSpeaker, ResemblyzerSpeaker


def voiced(seconds=2.0, pitch=180.0, seed=0):
    """A harmonic tone with syllable-rate amplitude modulation and a little noise."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    tone = sum(torch.sin(2 * math.pi * pitch * k * t) / k for k in range(1, 6))
    return 0.2 * tone * (1.2 + torch.sin(2 * math.pi * 4 * t)) + 0.005 * torch.randn(t.shape, generator=gen)


@pytest.fixture(scope="module")
def ecapa():
    return EcapaSpeaker(allow_random=True)


def test_ecapa_shape_determinism_and_local_weights(ecapa, tmp_path):
    wav = voiced()
    emb = ecapa(wav)
    assert emb.shape == (1, 192) and torch.equal(emb, ecapa(wav))
    torch.save(ecapa.model.state_dict(), tmp_path / "embedding_model.ckpt")
    assert torch.equal(EcapaSpeaker(model_dir=tmp_path)(wav), emb)


def test_resemblyzer_gives_pretrained_embeddings_over_time():
    encoder = ResemblyzerSpeaker()
    low, high = encoder(voiced(3.0, 110.0)), encoder(voiced(3.0, 240.0))
    assert low.shape[1] == 256 and low.shape[0] >= 2
    assert torch.allclose(low.norm(dim=1), torch.ones(low.shape[0]), atol=1e-4)  # GE2E embeddings are unit norm
    assert torch.equal(low, encoder(voiced(3.0, 110.0)))
    assert not torch.allclose(low.mean(0), high.mean(0))


def test_beats_one_vector_per_160ms():
    events = BeatsEvents(allow_random=True)
    out = events(voiced(2.0))
    assert out.shape == (12, 768) and torch.isfinite(out).all()
    assert abs(events(voiced(4.0)).shape[0] - 4.0 / 0.16) <= 1  # fbank edges may drop the last step


def test_lang2vec():
    l2v = Lang2Vec()
    de, fr = l2v("de"), l2v("fr")
    assert de.shape == (1, 289) and not torch.equal(de, fr)
    assert torch.equal(l2v("deu"), de)
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        l2v("xx")


def test_extractor_errors(ecapa, tmp_path):
    with pytest.raises(ValueError, match="must be 16 kHz"):
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
