"""An openai-whisper checkpoint as a Hugging Face transformers model directory, with no network:
config, safetensors weights, tokenizer, feature extractor and generation config.

transformers' own `convert_openai_to_hf.py` downloads a generation config and its tokenizer
conversion fetches tiktoken files; here everything comes from what openai-whisper ships: the key
mapping is localgp's, the tokenizer is read from openai-whisper's bundled
`assets/multilingual.tiktoken` (BPE ranks, from which the merges are recovered), the generation
config is written from openai-whisper's tokenizer and decoding rules (languages, tasks, the
suppressed tokens, the no-timestamps token).

`write_transformers_dir(base_pt, out)` writes `out` (staged in a sibling folder and renamed, so
nothing is ever half there); `localgp prepare whisper` calls it for `DIR/transformers/`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from localgp.files import file_sha256

MARKER = "localgp.json"  # what the directory was written from: base.pt's sha256, transformers' version


def hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """openai-whisper's state-dict keys -> WhisperForConditionalGeneration's (proj_out is tied to
    the token embedding and left out, as transformers saves it)."""
    parts = {"attn_ln": "self_attn_layer_norm", "cross_attn_ln": "encoder_attn_layer_norm", "mlp_ln": "final_layer_norm",
             "attn": "self_attn", "cross_attn": "encoder_attn", "mlp.0": "fc1", "mlp.2": "fc2",
             "query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
    whole = {"encoder.positional_embedding": "encoder.embed_positions.weight",
             "decoder.positional_embedding": "decoder.embed_positions.weight",
             "decoder.token_embedding.weight": "decoder.embed_tokens.weight"}
    out = {}
    for key, value in state.items():
        if key in whole:
            name = whole[key]
        else:
            stack, rest = key.split(".", 1)
            if rest.startswith("blocks."):
                _, index, rest = rest.split(".", 2)
                module, _, leaf = rest.rpartition(".")
                for old, new in parts.items():  # longest names first where one prefixes another
                    if module == old or module.startswith(old + "."):
                        module = new + module[len(old):]
                        break
                module = ".".join(parts.get(p, p) for p in module.split("."))
                name = f"{stack}.layers.{index}.{module}.{leaf}"
            elif rest.startswith(("ln_post.", "ln.")):
                name = f"{stack}.layer_norm.{rest.split('.', 1)[1]}"
            else:  # conv1, conv2
                name = f"{stack}.{rest}"
        out[f"model.{name}"] = value.contiguous()
    return out


def whisper_config(dims: dict):
    """WhisperConfig from openai-whisper's ModelDimensions (as a dict)."""
    from transformers import WhisperConfig

    multilingual = dims["n_vocab"] >= 51865
    return WhisperConfig(
        vocab_size=dims["n_vocab"], num_mel_bins=dims["n_mels"], d_model=dims["n_audio_state"],
        encoder_layers=dims["n_audio_layer"], encoder_attention_heads=dims["n_audio_head"],
        decoder_layers=dims["n_text_layer"], decoder_attention_heads=dims["n_text_head"],
        encoder_ffn_dim=4 * dims["n_audio_state"], decoder_ffn_dim=4 * dims["n_text_state"],
        max_source_positions=dims["n_audio_ctx"], max_target_positions=dims["n_text_ctx"],
        pad_token_id=50257, bos_token_id=50257, eos_token_id=50257,
        decoder_start_token_id=50258 if multilingual else 50257, tie_word_embeddings=True,
        architectures=["WhisperForConditionalGeneration"])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges behind tiktoken ranks: each multi-byte token is the merge of the two parts
    that byte-level BPE, with the merges of lower rank only, leaves of it."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) <= 1:  # a byte (or the empty token at 50256 of Whisper's file)
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"tiktoken ranks: token {token!r} (rank {rank}) is no merge of two lower tokens")
        merges.append((parts[0], parts[1]))
    return merges


def _languages(vocab_size: int) -> list[str]:
    """The language codes of a Whisper vocabulary, as openai-whisper counts them (base: 99)."""
    import whisper.tokenizer as wt

    if vocab_size < 51865:
        return []
    return list(wt.LANGUAGES)[: vocab_size - 51765 - 1]


def whisper_tokenizer(vocab_size: int = 51865):
    """transformers' WhisperTokenizer from openai-whisper's bundled tiktoken file, its special
    tokens in openai-whisper's order (ids equal to openai-whisper's)."""
    import whisper.tokenizer as wt
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    languages = _languages(vocab_size)
    multilingual = bool(languages)
    name = "multilingual" if multilingual else "gpt2"
    path = Path(wt.__file__).parent / "assets" / f"{name}.tiktoken"
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    table = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = [(text(a), text(b)) for a, b in _recover_merges(ranks)]
    specials = ["<|endoftext|>", "<|startoftranscript|>"]
    if multilingual:
        specials += [f"<|{code}|>" for code in languages]
    specials += ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                 "<|notimestamps|>"]
    vocab[specials[0]] = len(ranks)
    normalizer = Path(wt.__file__).parent / "normalizers" / "english.json"
    # pad token: as transformers' own Whisper checkpoints (pipeline batching needs one)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges, normalizer_file=str(normalizer), pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(s, special=True, normalized=False)
                                                                for s in specials[1:]]})
    tokenizer.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", special=False, normalized=False) for i in range(1501)])
    want = wt.get_tokenizer(multilingual, num_languages=len(languages) or 99)
    for s in specials:
        if tokenizer.convert_tokens_to_ids(s) != want.encoding.encode_single_token(s):
            raise ValueError(f"tokenizer: {s} got id {tokenizer.convert_tokens_to_ids(s)}, openai-whisper has "
                             f"{want.encoding.encode_single_token(s)}")
    return tokenizer


def generation_config(config, alignment_heads: list | None = None):
    """The GenerationConfig transformers' Whisper generate() reads, from openai-whisper's rules:
    its languages and tasks, the tokens it suppresses (`suppress_tokens="-1"`: the non-speech
    symbols and the special tokens of the prompt), its blank suppression at the first step, the
    no-timestamps token and the first timestamp's limit (max_initial_timestamp 1.0 s)."""
    import whisper.tokenizer as wt
    from transformers import GenerationConfig

    languages = _languages(config.vocab_size)
    multilingual = bool(languages)
    tok = wt.get_tokenizer(multilingual, num_languages=len(languages) or 99)
    suppress = sorted(set(tok.non_speech_tokens) | {tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm,
                                                     tok.no_speech})
    fields = dict(
        decoder_start_token_id=tok.sot, bos_token_id=tok.eot, eos_token_id=tok.eot, pad_token_id=tok.eot,
        max_length=config.max_target_positions, suppress_tokens=suppress,
        begin_suppress_tokens=[*tok.encode(" "), tok.eot], no_timestamps_token_id=tok.no_timestamps,
        prev_sot_token_id=tok.sot_prev, max_initial_timestamp_index=50, is_multilingual=multilingual,
        return_timestamps=False)
    if multilingual:
        fields["lang_to_id"] = {f"<|{code}|>": tok.encoding.encode_single_token(f"<|{code}|>") for code in languages}
        fields["task_to_id"] = {"transcribe": tok.transcribe, "translate": tok.translate}
    if alignment_heads:
        fields["alignment_heads"] = [list(h) for h in alignment_heads]
    return GenerationConfig(**fields)


# what localgp writes into the directory; a new one rewrites directories an older localgp wrote
FORMAT = 2


def write_transformers_dir(base_pt: str | Path, out: str | Path, log=print) -> Path | None:
    """Writes `out`, a transformers model directory, from an openai-whisper checkpoint (base.pt of
    `localgp prepare whisper`; the alignment heads from the ct2/config.json beside it). Idempotent:
    does nothing when `out` was written from this very checkpoint by this transformers version.
    Returns `out`, or None (said in the log) for a checkpoint whose vocabulary is not Whisper's."""
    import transformers
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    base_pt, out = Path(base_pt), Path(out)
    identity = {"base.pt_sha256": file_sha256(base_pt), "transformers": transformers.__version__,
                "format": FORMAT}
    try:
        if json.loads((out / MARKER).read_text()) == identity:
            log(f"whisper: {out} is up to date (written from this base.pt by transformers {transformers.__version__})")
            return out
    except (OSError, ValueError):
        pass
    checkpoint = torch.load(base_pt, map_location="cpu", weights_only=True)
    dims = checkpoint["dims"]
    if dims["n_vocab"] < 51864:  # only a test's tiny model: the tokenizer is Whisper's own
        log(f"whisper: {out} not written: {base_pt}'s vocabulary of {dims['n_vocab']} tokens is not Whisper's "
            f"(51,864 or 51,865), and no tokenizer fits it")
        return None
    config = whisper_config(dims)
    ct2_config = base_pt.parent / "ct2" / "config.json"
    heads = json.loads(ct2_config.read_text()).get("alignment_heads") if ct2_config.is_file() else None
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    state = hf_state_dict(checkpoint["model_state_dict"])
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k != "proj_out.weight"]
    if missing or result.unexpected_keys:
        raise ValueError(f"{base_pt}: keys do not map onto transformers' Whisper: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    model.generation_config = generation_config(config, heads)
    tokenizer = whisper_tokenizer(config.vocab_size)
    extractor = WhisperFeatureExtractor(feature_size=dims["n_mels"], sampling_rate=16000, hop_length=160,
                                        chunk_length=30, n_fft=400)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        # The weights stay fp16 (as base.pt holds them); the model loads in float32 by default, as
        # localgp and openai-whisper run it on the CPU (from_pretrained(..., dtype=...) picks another).
        saved = json.loads((staging / "config.json").read_text())
        saved["dtype"] = "float32"
        (staging / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps(identity, indent=2) + "\n")
        os.chmod(staging, 0o755)  # mkdtemp's 0700 is for the staging only
        for file in staging.iterdir():
            os.chmod(file, 0o644)
        old = None
        if out.exists():  # moved aside first, removed once the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".old-{out.name}-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(staging, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"whisper: wrote {out} (transformers {transformers.__version__}: config, safetensors, tokenizer, "
        f"feature extractor, generation config)")
    return out
