"""OWSM v3.1 models built by ESPnet's S2T task: presets with random weights, and checkpoints in
the layout of a real OWSM snapshot (config.yaml + .pth, BPE model, feats_stats.npz)."""

from __future__ import annotations

import argparse
import logging
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from localgp.errors import UserError
from localgp.quiet import espnet_imports
from localgp.model.attention import Projections

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    d_model: int  # encoder and decoder width
    heads: int  # attention heads
    encoder_layers: int
    decoder_layers: int
    ffn_units: int  # FFN hidden units, encoder and decoder
    cgmlp_units: int  # cgMLP hidden units (split in two halves by the gating)
    vocab_size: int  # OWSM v3.1's BPE vocabulary, special tokens included
    conv_kernel: int = 31  # cgMLP and merge depthwise convolutions


PRESETS = {
    "base": Preset(384, 6, 6, 6, 1536, 1536, 50000),
    "small": Preset(768, 12, 9, 9, 3072, 3072, 50000),
    "medium": Preset(1024, 16, 18, 18, 4096, 4096, 50000),
    # Not an OWSM model: the same architecture at a size for tests and CPU demos.
    "tiny": Preset(64, 4, 2, 2, 128, 128, 600),
}

SAMPLE_RATE = 16000
HOP = 160
INPUT_SECONDS = 30  # OWSM pads or trims every input to 30 s

LANGUAGES = ("en", "de", "fr", "it")
SPECIAL_TOKENS_HEAD = ("<blank>", "<unk>")
SPECIAL_TOKENS_TAIL = ("<sos>", "<eos>", "<sop>")


def language_token(code: str) -> str:
    return f"<{code}>"


def task_tokens(languages=LANGUAGES) -> list[str]:
    return ["<asr>", *(f"<st_{code}>" for code in languages)]


def owsm_token_list(vocab_size: int | None, pieces: list[str] | None = None, languages=LANGUAGES) -> list[str]:
    """A token list shaped like OWSM's: blank/unk, BPE pieces, <na>, language and task tokens,
    timestamps, sos/eos/sop. Filler pieces pad a random-weight model to `vocab_size` (None: no
    padding, the list is as long as its tokens)."""
    specials = ["<na>", "<nospeech>", *map(language_token, languages), *task_tokens(languages)]
    specials += ["<notimestamps>", *(f"<{t * 0.02:.2f}>" for t in range(0, 1501, 50))]
    pieces = list(pieces or [])
    fixed = len(SPECIAL_TOKENS_HEAD) + len(pieces) + len(specials) + len(SPECIAL_TOKENS_TAIL)
    vocab_size = fixed if vocab_size is None else vocab_size
    if fixed > vocab_size:
        raise ValueError(f"owsm_token_list: {fixed} tokens do not fit vocab_size={vocab_size}")
    fillers = [f"<filler{i}>" for i in range(vocab_size - fixed)]
    return [*SPECIAL_TOKENS_HEAD, *pieces, *fillers, *specials, *SPECIAL_TOKENS_TAIL]


def owsm_args(preset: str | Preset, token_list: list[str], stats_file: str | None = None,
              bpemodel: str | None = None) -> argparse.Namespace:
    """The S2T task's arguments for an OWSM v3.1 model (as in its config.yaml)."""
    with espnet_imports():
        from espnet2.tasks.s2t import S2TTask

    p = PRESETS[preset] if isinstance(preset, str) else preset
    enc = dict(output_size=p.d_model, attention_heads=p.heads, attention_layer_type="selfattn",
               pos_enc_layer_type="abs_pos", rel_pos_type="latest", cgmlp_linear_units=p.cgmlp_units,
               cgmlp_conv_kernel=p.conv_kernel, use_linear_after_conv=False, gate_activation="identity",
               num_blocks=p.encoder_layers, dropout_rate=0.1, positional_dropout_rate=0.1,
               attention_dropout_rate=0.1, input_layer="conv2d", layer_drop_rate=0.0,
               linear_units=p.ffn_units, positionwise_layer_type="linear", use_ffn=True,
               macaron_ffn=True, merge_conv_kernel=p.conv_kernel, use_flash_attn=False)
    dec = dict(attention_heads=p.heads, linear_units=p.ffn_units, num_blocks=p.decoder_layers,
               dropout_rate=0.1, positional_dropout_rate=0.1, self_attention_dropout_rate=0.1,
               src_attention_dropout_rate=0.1)
    argv = ["--token_type", "bpe" if bpemodel else "word", "--token_list", "unused",
            "--frontend", "default", "--encoder", "e_branchformer", "--decoder", "transformer",
            "--normalize", "global_mvn" if stats_file else "none"]
    args = S2TTask.get_parser().parse_args(argv)
    args.token_list = list(token_list)
    args.bpemodel = bpemodel
    args.frontend_conf = dict(n_fft=512, win_length=400, hop_length=HOP, fs=SAMPLE_RATE)
    args.normalize_conf = dict(stats_file=stats_file) if stats_file else {}
    if not stats_file:
        args.normalize = None
    args.encoder_conf, args.decoder_conf = enc, dec
    args.model_conf = dict(ctc_weight=0.3, lsm_weight=0.1, length_normalized_loss=False, sym_na="<na>")
    args.preprocessor_conf = dict(speech_length=INPUT_SECONDS, fs=SAMPLE_RATE)
    return args


def build_owsm(preset: str | Preset = "tiny", token_list: list[str] | None = None,
               stats_file: str | None = None, bpemodel: str | None = None):
    """An OWSM v3.1 model (ESPnetS2TModel) with random weights; returns (model, args)."""
    with espnet_imports():
        from espnet2.tasks.s2t import S2TTask

    p = PRESETS[preset] if isinstance(preset, str) else preset
    token_list = token_list or owsm_token_list(p.vocab_size)
    args = owsm_args(p, token_list, stats_file, bpemodel)
    return S2TTask.build_model(args), args


def write_feats_stats(path: str | Path, mean: np.ndarray, std: np.ndarray, count: int = 1000) -> None:
    """ESPnet's global-MVN statistics file (count, sum, sum_square)."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, count=np.array(count), sum=mean * count, sum_square=(std**2 + mean**2) * count)


# Paths inside a snapshot, as in the published OWSM v3.1 repositories.
EXP_DIR = "exp/s2t_train_localgp"
MODEL_NAME = "valid.total_count.ave.pth"
STATS_PATH = "exp/s2t_stats_raw_bpe/train/feats_stats.npz"
BPE_PATH = "data/token_list/bpe_unigram/bpe.model"


def write_checkpoint(model: torch.nn.Module, args: argparse.Namespace, directory: str | Path,
                     bpemodel: str | Path | None = None) -> Path:
    """Writes `model` as an OWSM snapshot: exp/<name>/config.yaml and .pth, the stats file and
    BPE model at their usual places, referenced by relative paths. Returns the .pth path."""
    root = Path(directory)
    exp = root / EXP_DIR
    exp.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items()}
    stats = config.get("normalize_conf", {}).get("stats_file")
    if stats:
        (root / STATS_PATH).parent.mkdir(parents=True, exist_ok=True)
        (root / STATS_PATH).write_bytes(Path(stats).read_bytes())
        config["normalize_conf"] = dict(config["normalize_conf"], stats_file=STATS_PATH)
    if bpemodel:
        (root / BPE_PATH).parent.mkdir(parents=True, exist_ok=True)
        (root / BPE_PATH).write_bytes(Path(bpemodel).read_bytes())
        config["bpemodel"] = BPE_PATH
    with open(exp / "config.yaml", "w") as f:
        yaml.safe_dump(config, f, allow_unicode=True, sort_keys=False)
    model_path = exp / MODEL_NAME
    torch.save(model.state_dict(), model_path)
    return model_path


def find_checkpoint(directory: str | Path) -> tuple[Path, Path]:
    """(config.yaml, model .pth) of a snapshot directory, or a clear error."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    configs = sorted(p for p in root.glob("exp/*/config.yaml") if "encoder" in p.read_text(errors="ignore"))
    if not configs:
        raise FileNotFoundError(f"{root}: no exp/*/config.yaml of an S2T model (an OWSM snapshot has one)")
    if len(configs) > 1:
        raise ValueError(f"{root}: several model configs, name one: {[str(c) for c in configs]}")
    models = sorted(configs[0].parent.glob("*.pth"))
    if len(models) != 1:
        raise FileNotFoundError(f"{configs[0].parent}: expected one .pth model file, found {[m.name for m in models]}")
    return configs[0], models[0]


def load_owsm(directory: str | Path, device: str = "cpu"):
    """Loads an OWSM snapshot through ESPnet's S2T task; returns (model, train_args).

    Relative paths in config.yaml (stats file, BPE model, token list) are resolved against the
    snapshot root, as the published snapshots expect.
    """
    with espnet_imports():
        from espnet2.tasks.s2t import S2TTask

    root = Path(directory)
    config_path, model_path = find_checkpoint(root)
    with open(config_path) as f:
        config = yaml.safe_load(f)

    def resolve(path):
        if path is None or Path(path).is_absolute():
            return path
        resolved = root / path
        if not resolved.exists():
            raise FileNotFoundError(f"{config_path} names {path}, which is not in {root}")
        return str(resolved)

    if config.get("normalize_conf", {}).get("stats_file"):
        config["normalize_conf"]["stats_file"] = resolve(config["normalize_conf"]["stats_file"])
    if config.get("bpemodel"):
        config["bpemodel"] = resolve(config["bpemodel"])
    if isinstance(config.get("token_list"), str):
        config["token_list"] = resolve(config["token_list"])
    with tempfile.TemporaryDirectory() as tmp:
        resolved_config = Path(tmp) / "config.yaml"
        with open(resolved_config, "w") as f:
            yaml.safe_dump(config, f, allow_unicode=True, sort_keys=False)
        try:
            model, args = S2TTask.build_model_from_file(resolved_config, model_path, device)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            raise UserError(f"could not load the model weights {model_path}: {err}") from err
    return model, args


class EspnetAttention(Projections):
    """ESPnet's MultiHeadedAttention seen as localgp's attention projections (with its optional
    query/key norms)."""

    def __init__(self, attn):
        self.module, self.heads, self.head_dim = attn, attn.h, attn.d_k

    def query(self, x):
        return self.module.q_norm(self.split(self.module.linear_q(x)))

    def key(self, x):
        return self.module.k_norm(self.split(self.module.linear_k(x)))

    def value(self, x):
        return self.split(self.module.linear_v(x))

    def out(self, o):
        return self.module.linear_out(o.flatten(-2))
