"""The gated Whisper adapter on a small random openai-whisper model (the real base weights are
tested in test_whisper_weights.py and test_whisper_decoding.py)."""

import copy

import pytest
import torch
from whisper.model import ModelDimensions, Whisper

from localgp import ops
from localgp.model.config import GateConfig
from localgp.model.convert import force_keep, gate_state_dict, last_record, pruning_loss, set_execution
from localgp.backbones.whisper.model import frames_sparsity, gate_whisper, speech_frames
from tests.conftest import requires_cuda

DIMS = ModelDimensions(n_mels=80, n_audio_ctx=24, n_audio_state=32, n_audio_head=4, n_audio_layer=2,
                       n_vocab=300, n_text_ctx=16, n_text_state=32, n_text_head=4, n_text_layer=2)
CONFIGS = {
    "temporal_token": GateConfig(encoder="temporal", decoder="token"),
    "speaker": GateConfig(encoder="temporal", decoder="token", contexts=(("front", 0), ("speaker", 12))),
    "utterance": GateConfig(encoder="utterance", decoder="utterance"),
    "global": GateConfig(predictor="global", encoder="utterance", decoder="utterance"),
    # skipped modules add their calibrated mean, kept frames attend to every frame, pooled context
    "filled": GateConfig(encoder="temporal", decoder="token", contexts=(("front", 0), ("speaker", 12)),
                         skip_fill="mean", attention_keys="all", context_frames=5, predictor_width=8),
    "filled_utterance": GateConfig(encoder="utterance", decoder="utterance", skip_fill="mean"),
}


def tiny_whisper(seed: int = 0) -> Whisper:
    torch.manual_seed(seed)
    model = Whisper(DIMS)
    with torch.no_grad():  # Whisper leaves its decoder positions uninitialised
        model.decoder.positional_embedding.normal_(0, 0.02)
    return model.eval()


def inputs(B: int = 3, L: int = 7, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    mel = torch.randn(B, DIMS.n_mels, 2 * DIMS.n_audio_ctx, generator=gen)
    tokens = torch.randint(0, DIMS.n_vocab, (B, L), generator=gen)
    return mel, tokens


def feed_context(model, name: str, B: int) -> None:
    """The context the config needs (and the skip values of skip_fill "mean", calibrated)."""
    if name in ("speaker", "filled"):
        model.encoder.set_context(speaker=torch.randn(B, 12))
    if model.encoder.pruning.config.skip_fill == "mean":
        gen = torch.Generator().manual_seed(7)
        model.encoder.calibrate_skip_values([torch.randn(3, DIMS.n_mels, 2 * DIMS.n_audio_ctx, generator=gen)])
    if name == "global":
        model.encoder.set_context(prompt=torch.randint(0, DIMS.n_vocab, (B, 2)))


@pytest.mark.parametrize("forced", [False, True], ids=["fresh_gates", "forced_keep"])
@pytest.mark.parametrize("name", CONFIGS)
def test_every_gate_keeping_is_openai_whisper_bit_for_bit(name, forced):
    """Fresh gates keep everything (and inject nothing) until trained."""
    plain = tiny_whisper()
    gated = gate_whisper(copy.deepcopy(plain), CONFIGS[name])
    mel, tokens = inputs()
    feed_context(gated, name, mel.shape[0])
    if forced:
        force_keep(gated, 1.0)
    with torch.no_grad():
        want_audio = plain.encoder(mel)
        want = plain.decoder(tokens, want_audio)
        got_audio = gated.encoder(mel)
        got = gated.decoder(tokens, got_audio)
    assert torch.equal(got_audio, want_audio)
    assert torch.equal(got, want)


def test_dense_execution_is_openai_whisper_bit_for_bit():
    plain = tiny_whisper()
    gated = gate_whisper(copy.deepcopy(plain), CONFIGS["temporal_token"])
    gated.encoder.execution = "dense"
    mel, _ = inputs()
    with torch.no_grad():
        assert torch.equal(gated.encoder(mel), plain.encoder(mel))


def test_state_dict_keys_unchanged_and_gates_under_pruning():
    plain = tiny_whisper()
    gated = gate_whisper(copy.deepcopy(plain), CONFIGS["speaker"])
    original = set(plain.state_dict())
    new = set(gated.state_dict())
    assert original <= new
    assert all(".pruning." in k for k in new - original)
    assert set(gate_state_dict(gated)) == new - original
    assert any(k.startswith("encoder.pruning.") for k in new) and any(k.startswith("decoder.pruning.") for k in new)
    reloaded = gate_whisper(tiny_whisper(seed=3), CONFIGS["speaker"])
    reloaded.load_state_dict(gated.state_dict())  # strict: real weights and fine-tuned gates load together


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_masked_and_compact_agree(name, keep):
    model = gate_whisper(tiny_whisper(), CONFIGS[name])
    mel, tokens = inputs(B=4, L=9)
    feed_context(model, name, mel.shape[0])
    lengths = torch.tensor([9, 4, 1, 7])
    outputs = {}
    for execution in ("masked", "compact"):
        set_execution(model, execution)
        force_keep(model, keep, seed=5)
        with torch.no_grad():
            audio = model.encoder(mel)
            logits = model.decoder(tokens, audio, lengths=lengths)
        outputs[execution] = (audio, logits, last_record(model).sparsity())
    (a_m, l_m, s_m), (a_c, l_c, s_c) = outputs["masked"], outputs["compact"]
    torch.testing.assert_close(a_c, a_m, rtol=1e-5, atol=1e-5)
    valid = torch.arange(9)[None] < lengths[:, None]  # padding tokens' outputs are not part of the contract
    torch.testing.assert_close(l_c[valid], l_m[valid], rtol=1e-5, atol=1e-4)
    assert float(s_c) == pytest.approx(float(s_m))
    assert float(s_m) == pytest.approx(1 - keep, abs=0.2)
    if keep < 1:  # the masks changed the result
        set_execution(model, "masked")
        force_keep(model, None)
        with torch.no_grad():
            assert not torch.allclose(model.encoder(mel), a_m, atol=1e-3)


LOW_PRECISION = [("cpu", "bfloat16"), pytest.param("cuda", "bfloat16", marks=requires_cuda),
                 pytest.param("cuda", "float16", marks=requires_cuda)]


@pytest.mark.parametrize("device,dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", ["temporal_token", "filled", "utterance"])
def test_low_precision_in_every_execution(name, device, dtype):
    """bf16 (CPU: AVX512-BF16/AMX, linears packed; GPU) and fp16 (GPU) through `set_precision`,
    the fused ops in that dtype: dense, masked and compact each within 5% of the largest float32
    output (a tiny random model), compact within as much of masked, the same masks."""
    from localgp.model import packed
    from localgp.model.convert import set_precision

    if device == "cpu" and not packed.cpu_has_bf16():
        pytest.skip("this CPU has neither AVX512-BF16 nor AMX")
    want = gate_whisper(tiny_whisper(), CONFIGS[name])
    mel, tokens = inputs(B=4, L=9)
    feed_context(want, name, mel.shape[0])
    low = copy.deepcopy(want)
    set_precision(low, dtype, device)
    torch_dtype = packed.DTYPES[dtype]
    results = {}
    for execution, keep in (("dense", 1.0), ("masked", 0.5), ("compact", 0.5)):
        outs = []
        for model, dev, dt in ((want, "cpu", torch.float32), (low, device, torch_dtype)):
            model.encoder.execution = execution
            if execution != "dense":
                set_execution(model, execution)
            force_keep(model, keep, seed=5)
            with torch.no_grad():
                audio = model.encoder(mel.to(dev, dt))
                logits = model.decoder(tokens.to(dev), audio)
            assert audio.dtype == dt and audio.device.type == dev
            outs.append((audio.float().cpu(), logits.float().cpu()))
        (audio32, logits32), (audio_low, logits_low) = outs
        for got, ref in ((audio_low, audio32), (logits_low, logits32)):
            assert (got - ref).abs().max() <= 0.05 * ref.abs().max(), (execution, float((got - ref).abs().max()))
        results[execution] = (audio_low, logits_low, last_record(low).sparsity() if execution != "dense" else None)
    (a_m, l_m, s_m), (a_c, l_c, s_c) = results["masked"][:3], results["compact"][:3]
    assert float(s_m) == pytest.approx(float(s_c))
    assert (a_c - a_m).abs().max() <= 0.05 * a_m.abs().max() and (l_c - l_m).abs().max() <= 0.05 * l_m.abs().max()


@pytest.mark.parametrize("name", CONFIGS)
def test_compact_encoder_reads_the_host_once_per_layer_and_adds_in_place(name):
    """Inference adds the kept rows into the residual in place; with autograd on it cannot, and
    the two give the same numbers. Either way one host read per layer (ops.gate_plan)."""
    model = gate_whisper(tiny_whisper(), CONFIGS[name])
    mel, _ = inputs(B=4)
    feed_context(model, name, mel.shape[0])
    set_execution(model, "compact")
    force_keep(model, 0.5, seed=5)
    with torch.no_grad():
        before = ops.host_reads()
        in_place = model.encoder(mel)
        # attention_keys "all" reads the kept frames per utterance too (they size its calls)
        per_layer = 2 if CONFIGS[name].attention_keys == "all" else 1
        assert ops.host_reads() - before == per_layer * DIMS.n_audio_layer
    force_keep(model, 0.5, seed=5)  # the same random masks again
    with torch.enable_grad():
        out_of_place = model.encoder(mel)
    assert out_of_place.requires_grad or not any(p.requires_grad for p in model.parameters())
    assert torch.equal(in_place, out_of_place.detach())


@pytest.mark.parametrize("name", ["temporal_token", "global"])
def test_trained_gates_get_gradients_in_masked_mode(name):
    model = gate_whisper(tiny_whisper(), CONFIGS[name]).train()
    mel, tokens = inputs()
    feed_context(model, name, mel.shape[0])
    logits = model.decoder(tokens[:, :-1], model.encoder(mel))
    task = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    total, sparsity = pruning_loss(model, task, target=0.5)
    total.backward()
    grads = [p.grad for k, p in model.named_parameters() if ".pruning." in k and p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    assert 0 <= float(sparsity) <= 1


def test_compact_refuses_training_and_kv_cache_is_refused():
    model = gate_whisper(tiny_whisper(), CONFIGS["temporal_token"]).train()
    set_execution(model, "compact")
    mel, tokens = inputs()
    with pytest.raises(RuntimeError, match="train in masked mode"):
        model.encoder(mel)
    model.eval()
    with pytest.raises(ValueError, match="kv_cache"):
        model.decoder(tokens, model.encoder(mel), kv_cache={"x": 1})


def test_wrong_mel_length_names_the_expected_shape():
    model = gate_whisper(tiny_whisper(), CONFIGS["temporal_token"])
    with pytest.raises(ValueError, match="pad or trim the audio to 30 s"):
        model.encoder(torch.randn(1, DIMS.n_mels, 10))


def test_speech_frames_and_sparsity_over_speech_frames():
    assert speech_frames(16000 * 30) == 1500
    assert speech_frames(16000) == 50 and speech_frames(1) == 1 and speech_frames(0) == 0
    model = gate_whisper(tiny_whisper(), CONFIGS["temporal_token"])
    force_keep(model, 0.5, seed=1)
    mel, _ = inputs(B=2)
    with torch.no_grad():
        model.encoder(mel)
    record = model.encoder.last_record
    speech = torch.tensor([5, 24])
    masks = [record.masks[f"encoder.{i}.{m}"] for i in range(2) for m in ("attn", "mlp")]
    expect_all = 1 - float(sum(m.sum() for m in masks)) / sum(m.numel() for m in masks)
    expect_speech = 1 - float(sum(m[0, :5].sum() + m[1].sum() for m in masks)) / (len(masks) * 29)
    assert frames_sparsity(record) == pytest.approx(expect_all)
    assert frames_sparsity(record, speech) == pytest.approx(expect_speech)


def test_gate_whisper_refuses_other_models():
    with pytest.raises(TypeError, match="openai-whisper"):
        gate_whisper(torch.nn.Linear(2, 2), CONFIGS["temporal_token"])


# ------------------------------------------------------------------ GFLOPs
def test_whisper_base_flops_match_torch_flop_counter():
    """Our MACs of the dense whisper-base encoder against torch's own FLOP counter on the module
    (2 FLOPs per MAC of matmuls and convolutions; no LayerNorm). Whisper's attention through its
    explicit products: the counter does not see the CPU's fused attention kernel."""
    from torch.utils.flop_counter import FlopCounterMode
    from whisper.model import disable_sdpa

    from localgp import flops

    shape = flops.WHISPER_BACKBONES["whisper-base"]
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6,
                           n_vocab=51865, n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6)
    assert flops.WhisperShape.of_dims(dims) == shape
    encoder = Whisper(dims).encoder.eval()
    assert flops.WhisperShape.of_encoder(encoder) == shape
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), disable_sdpa(), counter:
        encoder(torch.randn(1, 80, 3000))
    ours = flops.whisper_encoder_macs(shape)
    layer_norms = flops.LN_OPS * shape.frames * shape.d_model * (2 * shape.layers + 1)
    assert counter.get_total_flops() == 2 * (ours["total"] - layer_norms)
    assert round(ours["total"] / 1e9, 2) == 43.73  # the figure the README gives


def test_executed_whisper_macs_follow_the_masks():
    from localgp import flops

    model = gate_whisper(tiny_whisper(), CONFIGS["temporal_token"])
    shape = flops.WhisperShape.of_encoder(model.encoder)
    mel, _ = inputs(B=2)
    force_keep(model, 0.4, seed=2)
    with torch.no_grad():
        model.encoder(mel)
    record = model.encoder.last_record
    assert flops.executed_whisper_encoder_macs(model.encoder, execution="masked")["total"] == \
        2 * flops.whisper_encoder_macs(shape)["total"]
    compact = flops.executed_whisper_encoder_macs(model.encoder, execution="compact")
    expected = sum(flops.whisper_encoder_macs(shape, {m: [int(record.masks[f"encoder.{i}.{m}"][b].sum())
                                                          for i in range(2)] for m in ("attn", "mlp")})["total"]
                   for b in range(2))
    assert compact["total"] == expected < 2 * flops.whisper_encoder_macs(shape)["total"]


@pytest.mark.parametrize("inject", [True, False])
def test_without_injection_trained_predictors_leave_the_model_alone(inject):
    """inject=False: whatever the predictors learned, a frame every gate keeps is computed as
    the plain model computes it (gates trained on a frozen pretrained model)."""
    plain = tiny_whisper()
    config = GateConfig(encoder="temporal", decoder="token", inject=inject)
    gated = gate_whisper(copy.deepcopy(plain), config)
    with torch.no_grad():
        for name, p in gated.named_parameters():
            if ".pruning." in name and "to_logits" not in name:
                p.add_(0.5 * torch.randn_like(p))  # "trained": every weight moved, the decisions still keep
    mel, tokens = inputs()
    with torch.no_grad():
        same = torch.equal(gated.encoder(mel), plain.encoder(mel))
    assert float(last_record(gated).sparsity()) == 0.0
    assert same is (not inject)


def test_flops_command_for_whisper(capsys, cli_error):
    import json

    from localgp.cli import main

    assert main(["flops", "--backbone", "whisper-base", "--keep", "0.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dense_encoder_gflops"] == pytest.approx(43.73376)
    assert report["encoder_gflops"] < 0.5 * report["dense_encoder_gflops"]  # attention is quadratic in kept frames
    cli_error(["flops", "--backbone", "whisper-base", "--seconds", "5"], "whole 30 s window")


# ------------------------------------------------------------------ skip_fill "mean", attention_keys "all", context_frames
FILLED = CONFIGS["filled"]


def calibrated(config: GateConfig, seed: int = 0) -> Whisper:
    model = gate_whisper(tiny_whisper(seed), config)
    gen = torch.Generator().manual_seed(7)
    model.encoder.calibrate_skip_values([torch.randn(3, DIMS.n_mels, 2 * DIMS.n_audio_ctx, generator=gen)
                                         for _ in range(2)])
    return model


def module_outputs(plain: Whisper, mel: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Each block's attention and MLP outputs (B, T, D) in the plain model, by hooks."""
    outputs = [{} for _ in plain.encoder.blocks]
    hooks = []
    for store, block in zip(outputs, plain.encoder.blocks, strict=True):
        hooks.append(block.attn.register_forward_hook(lambda m, i, o, store=store: store.__setitem__("attn", o[0])))
        hooks.append(block.mlp.register_forward_hook(lambda m, i, o, store=store: store.__setitem__("mlp", o)))
    with torch.no_grad():
        plain.encoder(mel)
    for hook in hooks:
        hook.remove()
    return outputs


def test_calibration_is_the_mean_module_output_per_position():
    plain = tiny_whisper()
    model = calibrated(FILLED)
    gen = torch.Generator().manual_seed(7)
    mels = torch.cat([torch.randn(3, DIMS.n_mels, 2 * DIMS.n_audio_ctx, generator=gen) for _ in range(2)])
    outputs = module_outputs(plain, mels)
    values = model.encoder.pruning.skip_values
    assert values.clips == 6
    for index, out in enumerate(outputs):
        for m, name in enumerate(("attn", "mlp")):
            torch.testing.assert_close(values.values[index, m], out[name].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("execution", ["masked", "compact"])
def test_skipped_modules_add_their_calibrated_mean_and_kept_frames_see_every_frame(execution):
    """The reference: openai-whisper's own blocks, each module's output replaced by the calibrated
    mean at the frames its mask skips; attention over every frame's keys and values."""
    plain = tiny_whisper()
    model = calibrated(FILLED)
    mel, _ = inputs(B=3)
    model.encoder.set_context(speaker=torch.randn(3, 12))
    set_execution(model, execution)
    force_keep(model, 0.5, seed=4)
    with torch.no_grad():
        got = model.encoder(mel)
    masks = model.encoder.last_record.masks
    fill = model.encoder.pruning.skip_values.values
    with torch.no_grad():
        x = model.encoder.embed(mel)
        for index, block in enumerate(plain.encoder.blocks):
            for m, name in enumerate(("attn", "mlp")):
                y = block.attn(block.attn_ln(x))[0] if name == "attn" else block.mlp(block.mlp_ln(x))
                keep = masks[f"encoder.{index}.{name}"][..., None] > 0
                x = x + torch.where(keep, y, fill[index, m])
        want = plain.encoder.ln_post(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert 0.3 < float(last_record(model).sparsity()) < 0.7


def test_skipping_everything_adds_the_fill_alone():
    model = calibrated(FILLED)
    mel, _ = inputs(B=2)
    model.encoder.set_context(speaker=torch.randn(2, 12))
    set_execution(model, "compact")
    force_keep(model, 0.0)
    fill = model.encoder.pruning.skip_values.values
    with torch.no_grad():
        got = model.encoder(mel)
        want = model.encoder.ln_post(model.encoder.embed(mel) + fill.sum((0, 1)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_uncalibrated_skip_values_are_refused_and_the_count_travels_with_the_state_dict():
    model = gate_whisper(tiny_whisper(), FILLED)
    model.encoder.set_context(speaker=torch.randn(3, 12))
    mel, _ = inputs()
    with pytest.raises(ValueError, match="never calibrated"):
        model.encoder(mel)
    trained = calibrated(FILLED)
    state = gate_state_dict(trained)
    assert "encoder.pruning.skip_values.values" in state and "encoder.pruning.skip_values._extra_state" in state
    model.load_state_dict(trained.state_dict())
    assert model.encoder.pruning.skip_values.clips == 6
    with torch.no_grad():
        model.encoder(mel)


def test_pooled_context_frames():
    from localgp.model.pruning import pool_frames

    x = torch.randn(2, 10, 3)
    valid = torch.arange(10)[None] < torch.tensor([[10], [4]])
    pooled, present = pool_frames(x, valid, 3)
    for b, length in enumerate((10, 4)):
        chunks = [[t for t in range(length) if t * 3 // length == c] for c in range(3)]
        for c, frames in enumerate(chunks):
            torch.testing.assert_close(pooled[b, c], x[b, frames].mean(0))
            assert bool(present[b, c])
    pooled, present = pool_frames(x, valid, 6)  # 4 frames in 6 chunks: two chunks stay empty
    assert present[1].tolist() == [True, True, False, True, True, False]  # frames 0..3 -> chunks 0, 1, 3, 4
    assert int(present[0].sum()) == 6
    model = calibrated(FILLED)
    model.encoder.set_context(speaker=torch.randn(2, 12))
    context, pad = model.encoder.gate_context(model.encoder.embed(inputs(B=2)[0]), torch.ones(2, DIMS.n_audio_ctx,
                                                                                           dtype=torch.bool))
    assert context.shape == (2, 1, 5 + 1, DIMS.n_audio_state) and pad.shape == (2, 6) and not pad.any()


def test_owsm_refuses_what_it_does_not_implement():
    from localgp.backbones.owsm.model import gate_s2t_model
    from localgp.backbones.owsm.weights import build_owsm

    with pytest.raises(ValueError, match="fixed number of frames"):
        gate_s2t_model(build_owsm("tiny")[0], GateConfig(skip_fill="mean"))
    with pytest.raises(ValueError, match="attention_keys"):
        gate_s2t_model(build_owsm("tiny")[0], GateConfig(attention_keys="all"))
    with pytest.raises(ValueError, match="skip_fill"):
        GateConfig(skip_fill="median")
    with pytest.raises(ValueError, match="context_frames"):
        GateConfig(context_frames=0)
