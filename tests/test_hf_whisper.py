"""The transformers backbone (localgp/backbones/hf_whisper): the offline model directory against
openai-whisper on real clips, gating in place, generate() and pipeline() with the gates."""

import copy
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing here may reach the hub

import pytest
import torch
import whisper

from localgp.model.config import GateConfig
from localgp.model.convert import force_keep, set_execution

transformers = pytest.importorskip("transformers")

from localgp.backbones.hf_whisper.convert import hf_state_dict, write_transformers_dir  # noqa: E402
from localgp.backbones.hf_whisper.model import (  # noqa: E402
    GatedCacheLayer, SharedCrossLayer, cache_masks, gate_hf_whisper, gates_from_openai, set_padding_rule,
)

SPEECH_GATES = GateConfig(encoder="temporal", decoder="token", contexts=(("front", 0),), skip_fill="mean",
                          attention_keys="all", context_frames=64, predictor_width=64, inject=False)


@pytest.fixture(scope="module")
def hf_dir(whisper_base):
    """prepare_whisper (the whisper_base fixture) wrote DIR/transformers beside base.pt."""
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    return whisper_base / "transformers"


@pytest.fixture(scope="module")
def hf(hf_dir):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
    return model, WhisperProcessor.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def openai_base(whisper_base):
    from localgp.backbones.whisper.weights import load_whisper

    return load_whisper(whisper_base).float().eval()


def features(processor, speech, **kw):
    return processor([u["wav"] for u in speech], sampling_rate=16000, return_tensors="pt", **kw)


def generated(out: torch.Tensor) -> list[list[int]]:
    """generate()'s sequences (Whisper's generate returns them without the prompt) without <|eot|> and the padding."""
    return [[t for t in row if t != 50257] for row in out.tolist()]


def test_directory_is_written_once_and_loads_offline(whisper_base, hf_dir, tmp_path):
    from transformers import GenerationConfig, WhisperConfig

    config = WhisperConfig.from_pretrained(hf_dir)
    assert (config.d_model, config.encoder_layers, config.vocab_size) == (512, 6, 51865)
    generation = GenerationConfig.from_pretrained(hf_dir)
    assert generation.no_timestamps_token_id == 50363 and generation.task_to_id == {"transcribe": 50359,
                                                                                     "translate": 50358}
    assert generation.lang_to_id["<|de|>"] == 50261 and generation.begin_suppress_tokens == [220, 50257]
    before = {p.name: p.stat().st_mtime_ns for p in hf_dir.iterdir()}
    lines = []
    write_transformers_dir(whisper_base / "base.pt", hf_dir, lines.append)  # idempotent: nothing rewritten
    assert "up to date" in lines[0] and {p.name: p.stat().st_mtime_ns for p in hf_dir.iterdir()} == before
    assert not [p for p in hf_dir.parent.iterdir() if p.name.startswith((".staging-transformers", ".old-"))]


def test_tokenizer_equals_openai_whisper(hf):
    _, processor = hf
    want = whisper.tokenizer.get_tokenizer(True, num_languages=99)
    for text in ["Hello world!", " Grüß Gott, wie geht's?", "l'été 2026: 12,5 % — ça va", "日本語のテキスト"]:
        assert processor.tokenizer.encode(text, add_special_tokens=False) == want.encode(text)
        assert processor.tokenizer.decode(want.encode(text)) == text


def test_key_mapping_is_one_to_one(openai_base):
    state = openai_base.state_dict()
    mapped = hf_state_dict(state)
    assert len(mapped) == len(state)
    assert mapped["model.decoder.layers.5.encoder_attn.k_proj.weight"] is not None
    assert mapped["model.encoder.layers.0.fc2.bias"].equal(state["encoder.blocks.0.mlp.2.bias"])


# Beam 5 through generate(custom_generate=whisper_beam_search): transformers' own beam search
# (num_beams=5 alone) is another algorithm (its finishing and ranking rules) and picks other
# hypotheses than openai-whisper's on some clips (RESULTS.md: 1 of the demo's first 20 test clips).
@pytest.mark.parametrize("beam", [1, 5])
def test_generate_equals_openai_whisper_on_real_clips(hf, openai_base, real_speech, beam):
    """transformers' own generate() on the converted model: openai-whisper's tokens, clip by clip,
    and (beam 5) for all the clips in one batch."""
    from localgp.backbones.hf_whisper.decoding import whisper_beam_search

    model, processor = hf
    mel = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.as_tensor(u["wav"]).float()))
                       for u in real_speech])
    options = whisper.DecodingOptions(beam_size=beam if beam > 1 else None, without_timestamps=True, fp16=False)
    want = [whisper.decode(openai_base, m, dataclasses.replace(options, language=u["language"])).tokens
            for m, u in zip(mel, real_speech)]
    assert all(len(w) > 3 for w in want)
    search = {"custom_generate": whisper_beam_search, "max_new_tokens": 224} if beam > 1 else {}
    got = []
    for u in real_speech:  # as openai-whisper decodes: one clip at a time
        inputs = features(processor, [u])
        with torch.no_grad():
            out = model.generate(inputs.input_features, language=u["language"], task="transcribe", num_beams=beam,
                                 **search)
        got += generated(out)
    assert got == want
    if beam > 1:
        with torch.no_grad():
            out = model.generate(features(processor, real_speech).input_features,
                                 language=[u["language"] for u in real_speech], task="transcribe", num_beams=beam,
                                 **search)
        assert generated(out) == want


def test_whisper_beam_search_refuses_what_it_does_not_do(hf, real_speech):
    from localgp.backbones.hf_whisper.decoding import whisper_beam_search

    model, processor = hf
    inputs = features(processor, real_speech[:1])
    # Whisper's generate() samples at a temperature above 0
    for kw, name in (({"return_dict_in_generate": True}, "return_dict_in_generate"), ({"temperature": 0.5}, "do_sample")):
        with pytest.raises(ValueError, match=f"{name}=True is not supported"):
            model.generate(inputs.input_features, language="en", num_beams=2, custom_generate=whisper_beam_search,
                           **kw)


def gated_pair(hf, openai_base, config=SPEECH_GATES, seed=0):
    """The same random gates (and calibrated-looking skip values) on openai-whisper and on transformers."""

    from localgp.backbones.whisper.model import gate_whisper

    source = gate_whisper(copy.deepcopy(openai_base), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in source.named_parameters():
            if "pruning." in name:
                p.normal_(0, 0.5)
        if config.skip_fill == "mean":
            values = source.encoder.pruning.skip_values
            values.set(0.01 * torch.randn_like(values.values), 1)
    model = gates_from_openai(copy.deepcopy(hf[0]), source)
    return source.eval(), model.eval()


def test_every_gate_keeping_is_bit_identical(hf, real_speech):

    model, processor = hf
    gated = gate_hf_whisper(copy.deepcopy(model), dataclasses.replace(SPEECH_GATES, skip_fill="zero"))
    force_keep(gated, 1.0)
    inputs = features(processor, real_speech[:3])
    ids = torch.tensor([[50258, 50259, 50359, 50363, 400, 286, 257]] * 3)
    with torch.no_grad():
        want = model(inputs.input_features, decoder_input_ids=ids).logits
        got = gated(inputs.input_features, decoder_input_ids=ids).logits
        want_enc = model.model.encoder(inputs.input_features).last_hidden_state
        gated.model.encoder.execution = "dense"
        dense = gated.model.encoder(inputs.input_features).last_hidden_state
    assert torch.equal(got, want)
    assert torch.equal(dense, want_enc)
    keys = list(gated.state_dict())
    assert [k for k in keys if "pruning." not in k] == list(model.state_dict())  # the original keys, unchanged
    assert {k.split(".pruning.")[0] for k in keys if "pruning." in k} == {"model.encoder", "model.decoder"}


def test_same_masks_as_the_openai_whisper_adapter(hf, openai_base, real_speech):
    """One set of gates for both implementations: identical encoder masks on real clips."""
    from localgp.model.convert import last_record

    source, model = gated_pair(hf, openai_base, dataclasses.replace(SPEECH_GATES, decoder=None))
    processor = hf[1]
    mel = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.as_tensor(u["wav"]).float()))
                       for u in real_speech])
    for execution in ("masked", "compact"):
        set_execution(source, execution)
        set_execution(model, execution)
        with torch.no_grad():
            want_out = source.encoder(mel)
            want = last_record(source).masks
            got_out = model.model.encoder(features(processor, real_speech).input_features).last_hidden_state
            got = last_record(model.model).masks
        assert list(got) == list(want)
        kept = sum(float(m.mean()) for m in want.values()) / len(want)
        assert 0.1 < kept < 0.9  # real decisions, not all one way
        for name in want:
            assert torch.equal(got[name], want[name]), name
        torch.testing.assert_close(got_out, want_out, rtol=1e-4, atol=2e-4)


def test_masked_and_compact_agree(hf, openai_base, real_speech):
    _, model = gated_pair(hf, openai_base, dataclasses.replace(SPEECH_GATES, attention_keys="kept"))
    inputs = features(hf[1], real_speech[:4])
    ids = torch.tensor([[50258, 50259, 50359, 50363, 400, 286, 257, 1029]] * 4)
    outs = {}
    for execution in ("masked", "compact"):
        set_execution(model, execution)
        with torch.no_grad():
            outs[execution] = model(inputs.input_features, decoder_input_ids=ids).logits
    torch.testing.assert_close(outs["compact"], outs["masked"], rtol=1e-5, atol=1e-4)


def test_padding_rule_skips_the_frames_after_the_audio(hf, openai_base, real_speech):
    _, model = gated_pair(hf, openai_base, dataclasses.replace(SPEECH_GATES, decoder=None))
    force_keep(model, 1.0)
    set_padding_rule(model)
    inputs = features(hf[1], real_speech[:2], return_attention_mask=True)
    speech = (inputs.attention_mask.sum(-1) + 1) // 2
    outs = {}
    for execution in ("masked", "compact"):
        set_execution(model, execution)
        with torch.no_grad():
            outs[execution] = model.model.encoder(inputs.input_features, attention_mask=inputs.attention_mask)
        for mask in model.model.encoder.last_record.masks.values():
            assert mask.sum(1).tolist() == speech.tolist()  # every speech frame kept, every other skipped
    torch.testing.assert_close(outs["compact"].last_hidden_state, outs["masked"].last_hidden_state, rtol=1e-5,
                               atol=1e-4)
    with pytest.raises(ValueError, match="attention_mask"):
        model.model.encoder(inputs.input_features)


def test_generate_with_token_gates(hf, openai_base, real_speech):
    """Greedy: the decisions the cache layers hold equal a full-prefix forward's on the generated
    tokens (every token's keys/values appended, skipped or not). Beam 5: compact and masked give
    the same tokens, batch of 3."""
    _, model = gated_pair(hf, openai_base, dataclasses.replace(SPEECH_GATES, skip_fill="zero"))
    inputs = features(hf[1], real_speech[:3])
    set_execution(model, "compact")
    seen = []  # the cache generate() hands the decoder (Whisper's generate returns a rebuilt copy)
    hook = model.model.decoder.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("cache")), with_kwargs=True)
    with torch.no_grad():
        sequences = model.generate(inputs.input_features, language="en", max_new_tokens=12)
    hook.remove()
    cache = seen[-1]
    assert all(c is cache for c in seen)
    if sequences[0, 0] != 50258:  # without the prompt: put it back
        sequences = torch.cat([torch.tensor([[50258, 50259, 50359, 50363]] * len(sequences)), sequences], dim=1)
    fed = sequences[:, :-1]  # every token but the last went through the decoder (finished rows: the padding)
    layers = cache.self_attention_cache.layers
    assert all(isinstance(layer, GatedCacheLayer) for layer in layers)
    assert {layer.get_seq_length() for layer in layers} == {fed.shape[1]}  # skipped or not, every token's K/V
    set_execution(model, "masked")
    with torch.no_grad():
        model(inputs.input_features, decoder_input_ids=fed)
    full = model.model.decoder.last_record.masks
    for index, masks in enumerate(cache_masks(cache)):
        want = torch.stack([full[f"decoder.{index}.{n}"] for n in ("self_attn", "src_attn", "ffn")], dim=-1)
        assert torch.equal(masks, want)
        assert 0 < float(want.mean()) < 1
    results = {}
    for execution in ("masked", "compact"):
        set_execution(model, execution)
        with torch.no_grad():
            results[execution] = model.generate(inputs.input_features, language="en", num_beams=5, max_new_tokens=12)
    assert torch.equal(results["compact"], results["masked"])


def test_whisper_beam_search_with_token_gates_equals_localgp_s(hf, openai_base, real_speech):
    """The same random token gates on both implementations, compact: transformers' generate() with
    openai-whisper's beam search gives the tokens of localgp's WhisperBeamSearch on the gated
    openai-whisper model (the gate decisions follow the beams through transformers' cache)."""
    from localgp.backbones.hf_whisper.decoding import whisper_beam_search
    from localgp.backbones.whisper.decoding import WhisperBeamSearch, WhisperDecodeOptions

    source, model = gated_pair(hf, openai_base, dataclasses.replace(SPEECH_GATES, skip_fill="zero"))
    set_execution(source, "compact")
    set_execution(model, "compact")
    speech = real_speech[:4]
    mel = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.as_tensor(u["wav"]).float()))
                       for u in speech])
    search = WhisperBeamSearch(source, WhisperDecodeOptions(beam_size=5, execution="compact", sample_len=20))
    with torch.no_grad():
        want = [h.token_ids for h in search(source.encoder(mel), [u["language"] for u in speech])]
        out = model.generate(features(hf[1], speech).input_features, language=[u["language"] for u in speech],
                             task="transcribe", num_beams=5, max_new_tokens=20, custom_generate=whisper_beam_search)
    assert generated(out) == want
    assert 0 < search.kept_share < 1


def test_cross_attention_projected_once_per_clip(hf, openai_base, real_speech):
    """Gated, every gate keeping, compact: beam-5 generate() gives the ungated model's tokens, with
    each layer's cross-attention keys held once per clip and read through the beams' index."""
    model, processor = hf
    _, gated = gated_pair(hf, openai_base)
    force_keep(gated, 1.0)
    set_execution(gated, "compact")
    inputs = features(processor, real_speech[:3])
    seen = []
    hook = gated.model.decoder.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("cache")), with_kwargs=True)
    with torch.no_grad():
        want = model.generate(inputs.input_features, language="en", num_beams=5, max_new_tokens=20)
        got = gated.generate(inputs.input_features, language="en", num_beams=5, max_new_tokens=20)
    hook.remove()
    assert torch.equal(got, want)
    layers = seen[-1].cross_attention_cache.layers
    assert all(isinstance(layer, SharedCrossLayer) for layer in layers)
    assert {layer.keys.shape[0] for layer in layers} == {3} and {len(layer.rows) for layer in layers} == {15}
    assert all(sorted(set(layer.rows.tolist())) == [0, 1, 2] for layer in layers)


def test_shared_cross_layer_moves_its_index_only():
    layer = SharedCrossLayer()
    keys = torch.randn(2, 2, 3, 8)
    layer.update(keys, keys + 1)
    layer.rows = torch.tensor([0, 0, 1, 1])
    layer.reorder_cache(torch.tensor([1, 0, 3, 3]))
    assert layer.rows.tolist() == [0, 0, 1, 1] and torch.equal(layer.keys, keys)
    layer.batch_select_indices(torch.tensor([0, 2]))
    layer.batch_repeat_interleave(2)
    assert layer.rows.tolist() == [0, 0, 1, 1]
    layer.crop(-1)
    assert layer.get_seq_length() == 3


def test_cache_layer_decisions_follow_the_beams():
    layer = GatedCacheLayer()
    keys = torch.randn(4, 2, 3, 8)
    layer.update(keys, keys + 1)
    layer.add_masks(torch.arange(4.0)[:, None, None].expand(4, 3, 3))
    beam = torch.tensor([2, 2, 0, 1])
    layer.reorder_cache(beam)
    assert torch.equal(layer.keys, keys[beam]) and layer.masks[:, 0, 0].tolist() == [2.0, 2.0, 0.0, 1.0]
    layer.batch_select_indices(torch.tensor([0, 3]))
    assert layer.masks[:, 0, 0].tolist() == [2.0, 1.0] and layer.keys.shape[0] == 2
    layer.batch_repeat_interleave(2)
    assert layer.masks[:, 0, 0].tolist() == [2.0, 2.0, 1.0, 1.0]
    layer.crop(-1)
    assert layer.masks.shape[1] == layer.get_seq_length() == 2


def test_pipeline_batches_and_long_form(hf, openai_base, real_speech):
    """pipeline() with gates that read a per-clip context (a speaker vector): clip by clip with
    set_context, and batch_size=3 with the contexts queued, the same texts; long-form generate()."""
    import numpy as np
    from transformers import pipeline

    from localgp.backbones.hf_whisper.model import queue_context

    config = dataclasses.replace(SPEECH_GATES, decoder=None, contexts=(("front", 0), ("speaker", 16)))
    _, model = gated_pair(hf, openai_base, config)
    set_execution(model, "compact")
    processor = hf[1]
    asr = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                   feature_extractor=processor.feature_extractor, device="cpu")
    clips = [u["wav"] for u in real_speech]
    speakers = torch.randn(len(clips), 16, generator=torch.Generator().manual_seed(0))
    one = []
    for i, clip in enumerate(clips):
        model.model.encoder.set_context(speaker=speakers[i : i + 1])
        one.append(asr(clip, generate_kwargs={"language": "en"})["text"])
    queue_context(model, speaker=speakers)
    batched = [r["text"] for r in asr(clips, batch_size=3, generate_kwargs={"language": "en"})]
    assert batched == one and any(t.strip() for t in one)  # random gates: a clip may come out empty
    assert min(len(v) for v in model.model.encoder.context_queue.values()) == 0  # every clip took its own

    pause = np.zeros(8000, dtype=np.float32)
    long = np.concatenate([c for clip in clips * 3 for c in (clip, pause)])
    assert len(long) > 30 * 16000
    model.model.encoder.context_queue = {}
    model.model.encoder.set_context(speaker=speakers[:1])
    force_keep(model, 1.0)  # the random gates' own text can be empty: every gate keeping, the words must come out
    inputs = processor(long, sampling_rate=16000, return_tensors="pt", truncation=False, padding="longest",
                       return_attention_mask=True)
    with torch.no_grad():
        out = model.generate(inputs.input_features, attention_mask=inputs.attention_mask, language="en",
                             return_timestamps=True)
    text = processor.batch_decode(out, skip_special_tokens=True)[0]
    assert len(text.split()) > 20


def test_other_paths_do_not_import_transformers():
    """`localgp transcribe`, the openai-whisper and OWSM paths do not pay transformers' import."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    for args in (["-X", "importtime", "-m", "localgp", "transcribe", "--help"],
                 ["-X", "importtime", "-c", "import localgp.longform, localgp.backbones.whisper.model, localgp.bench, "
                                            "localgp.backbones.whisper.backbone, localgp.backbones.whisper.weights"]):
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=root, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line]
        assert "localgp" in " ".join(imported)
        assert not [m for m in imported if m.split(".")[0] == "transformers"], args


def test_gates_under_a_rule_are_refused_naming_the_prior(hf):
    model, _ = hf
    with pytest.raises(ValueError, match="prior 'silence:25'"):
        gate_hf_whisper(copy.deepcopy(model), dataclasses.replace(SPEECH_GATES, prior="silence:25"))
