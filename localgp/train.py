"""Training of a gated OWSM model: ASR + ST multitask with OWSM prompts, Adam with a warm-up
learning-rate schedule, gradient clipping, the sparsity target; progress, a JSONL log, and
checkpoints that resume exactly (model, optimizer, schedule, step, RNG state)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from localgp.data.corpora import Utterance, europarl_st, kaldi_dir
from localgp.data.tokenizer import Tokenizer
from localgp.model import owsm
from localgp.model.config import GateConfig
from localgp.model.convert import gate_s2t_model, last_record, pruning_loss, set_execution

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str  # checkpoints, tokenizer, log.jsonl
    # Corpus: {"kind": "manifest", "path": "data/demo/manifest.jsonl", "split": "train"}
    # (localgp prepare demo), {"kind": "kaldi", "dirs": {"de": "data/de_train", ...}} or
    # {"kind": "europarl", "root": ..., "source": "de", "targets": ["fr", "it"], "split": "train"}
    data: dict = field(default_factory=dict)
    preset: str = "tiny"  # model size when not starting from a snapshot
    init: str | None = None  # an OWSM snapshot directory to start from (brings its tokenizer)
    gates: dict = field(default_factory=lambda: {"encoder": "temporal"})  # GateConfig fields
    # Context extractors by context name, for the contexts the gates use, e.g.
    # {"speaker": {"kind": "resemblyzer"}, "lang2vec": {"kind": "lang2vec"}}; "ecapa" and "beats"
    # take "model_dir" / "checkpoint" or "allow_random": true. Features are cached under out_dir.
    context_extractors: dict = field(default_factory=dict)
    tasks: tuple[str, ...] = ("asr", "st")  # asr: transcript; st: every translation present
    vocab_size: int = 300  # BPE pieces of a tokenizer trained on the corpus
    batch_size: int = 4
    lr: float = 1e-3  # peak learning rate, reached after warmup_steps
    warmup_steps: int = 50
    max_steps: int = 200
    max_minutes: float | None = None  # stop (with a checkpoint) after this much training time
    grad_clip: float = 5.0
    target_sparsity: float = 0.3
    sparsity_weight: float = 1.0  # alpha of the sparsity loss
    seed: int = 0
    device: str = "cpu"  # cpu, cuda or cuda:N
    log_every: int = 10
    save_every: int = 50

    def __post_init__(self):
        if not set(self.tasks) <= {"asr", "st"} or not self.tasks:
            raise ValueError(f"TrainConfig.tasks must be a non-empty subset of ('asr', 'st'), got {self.tasks}")
        for name in ("batch_size", "max_steps", "log_every", "save_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        if "tasks" in raw:
            raw["tasks"] = tuple(raw["tasks"])
        return cls(**raw)


@dataclass(frozen=True)
class Example:
    utterance: Utterance
    target_language: str  # == utterance.language for ASR
    target_text: str


def load_corpus(data: dict) -> list[Utterance]:
    """The utterances `data` names (TrainConfig.data); their audio files must exist, so a missing
    one stops the run before any work, not at the step that first reads it."""
    kind = data.get("kind")
    if kind == "manifest":
        from localgp.data.demo_corpus import load_manifest

        splits = load_manifest(data["path"])
        split = data.get("split", "train")
        if split not in splits:
            raise ValueError(f"{data['path']}: no split {split!r}; it has {sorted(splits)}")
        utterances = splits[split]
    elif kind == "kaldi":
        utterances = [u for lang, d in data["dirs"].items() for u in kaldi_dir(d, lang, data.get("audio_root"))]
    elif kind == "europarl":
        utterances = europarl_st(data["root"], data["source"], data["targets"], data["split"])
    else:
        raise ValueError(f"TrainConfig.data.kind must be 'manifest', 'kaldi' or 'europarl', got {kind!r}")
    missing = sorted({str(u.audio) for u in utterances if not u.audio.is_file()})
    if missing:
        raise FileNotFoundError(f"{len(missing)} audio files of the corpus do not exist, e.g. {missing[:3]}")
    return utterances


def make_examples(utterances: list[Utterance], tasks) -> list[Example]:
    examples = []
    for u in utterances:
        if "asr" in tasks:
            examples.append(Example(u, u.language, u.text))
        if "st" in tasks:
            examples.extend(Example(u, lang, text) for lang, text in sorted(u.translations.items()))
    if not examples:
        raise ValueError("training: the corpus gives no example for the tasks asked")
    return examples


def build_extractor(spec: dict):
    from localgp.context.events import BeatsEvents
    from localgp.context.language import Lang2Vec
    from localgp.context.speaker import EcapaSpeaker, ResemblyzerSpeaker

    kinds = {"resemblyzer": ResemblyzerSpeaker, "ecapa": EcapaSpeaker, "beats": BeatsEvents, "lang2vec": Lang2Vec}
    options = dict(spec)
    kind = options.pop("kind", None)
    if kind not in kinds:
        raise ValueError(f"context extractor kind must be one of {sorted(kinds)}, got {kind!r}")
    return kinds[kind](**options)


class ContextFeeder:
    """Computes (with the on-disk cache) and sets the external contexts of a batch, and globalGP's
    discrete context: the <lang> and <task> tokens of each example's prompt."""

    def __init__(self, model, extractors: dict, cache_dir: Path, tokenizer: Tokenizer):
        from localgp.context.cache import FeatureCache

        self.model, self.cache, self.tokenizer = model, FeatureCache(cache_dir), tokenizer
        encoder_pruning = getattr(model.encoder, "pruning", None)
        self.global_prompt = encoder_pruning is not None and encoder_pruning.config.predictor == "global"
        decoder_pruning = getattr(model.decoder, "pruning", None)
        encoder_streams = dict(encoder_pruning.config.contexts) if encoder_pruning else {}
        decoder_streams = dict(decoder_pruning.config.decoder_contexts) if decoder_pruning else {}
        encoder_streams.pop("front", None)  # the speech itself, taken inside the encoder
        self.encoder_names, self.decoder_names = list(encoder_streams), list(decoder_streams)
        sizes = {**encoder_streams, **decoder_streams}
        missing = [n for n in self.encoder_names + self.decoder_names if n not in extractors]
        if missing:
            raise ValueError(f"training: the gates use contexts {missing} but context_extractors names no extractor for them")
        self.extractors = {n: build_extractor(extractors[n]) for n in self.encoder_names + self.decoder_names}
        for name, extractor in self.extractors.items():
            if extractor.size != sizes[name]:
                raise ValueError(f"training: context {name!r} is configured with size {sizes[name]} but its "
                                 f"extractor gives {extractor.size}")

    def __call__(self, examples: list[Example]) -> None:
        device = next(self.model.parameters()).device
        if self.global_prompt:
            self.model.encoder.set_context(prompt=torch.tensor(
                [self.tokenizer.prompt(e.utterance.language, e.target_language)[:2] for e in examples], device=device))
        if self.encoder_names:
            streams = {}
            for name in self.encoder_names:
                feats = [self.cache.get(name, e.utterance.id, lambda e=e, n=name: self.extractors[n](e.utterance.load()))
                         for e in examples]
                longest = max(f.shape[0] for f in feats)  # pad by repeating each one's last frame
                streams[name] = torch.stack([torch.cat([f, f[-1:].expand(longest - f.shape[0], -1)]) for f in feats])
            self.model.encoder.set_context(**{name: seq.to(device) for name, seq in streams.items()})
        if self.decoder_names:
            self.model.decoder.set_context(**{
                name: torch.cat([self.extractors[name](e.target_language) for e in examples]).to(device)
                for name in self.decoder_names})


def warmup_lr(step: int, peak: float, warmup: int) -> float:
    """ESPnet's WarmupLR: linear warm-up to `peak`, then inverse square-root decay."""
    step = max(step, 1)
    warmup = max(warmup, 1)
    return peak * min(step / warmup, math.sqrt(warmup / step))


def collate(examples: list[Example], tokenizer: Tokenizer):
    """The S2T model's inputs: waveforms, prompt + target ids, <na> as previous text, and the
    source transcript for CTC."""
    waves = [torch.from_numpy(e.utterance.load()) for e in examples]
    texts = [torch.tensor(tokenizer.prompt(e.utterance.language, e.target_language) + tokenizer.encode(e.target_text))
             for e in examples]
    ctc = [torch.tensor(tokenizer.encode(e.utterance.text)) for e in examples]
    pad = torch.nn.utils.rnn.pad_sequence
    lengths = lambda xs: torch.tensor([len(x) for x in xs])  # noqa: E731
    na = tokenizer.id_of["<na>"]
    prev = torch.full((len(examples), 1), na)
    return (pad(waves, batch_first=True), lengths(waves), pad(texts, batch_first=True, padding_value=-1),
            lengths(texts), prev, torch.ones(len(examples), dtype=torch.long),
            pad(ctc, batch_first=True, padding_value=-1), lengths(ctc))


def batch_order(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of training step `step` (0-based): a seeded permutation per epoch, so a
    resumed run sees exactly the batches the uninterrupted one would."""
    per_epoch = max(num_examples // batch_size, 1)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    picked = order[index * batch_size : (index + 1) * batch_size]
    return picked if picked else order[:batch_size]


def build_model(config: TrainConfig, texts=None):
    """The gated model of `config` and its tokenizer: an OWSM snapshot's (config.init), or a
    `preset` model with random weights and the BPE tokenizer in out_dir/tokenizer, trained on
    texts() when it is not there yet (None: it must be there). Returns (model, tokenizer)."""
    if config.init:
        model, args = owsm.load_owsm(config.init)
        if not args.bpemodel:
            raise ValueError(f"{config.init}: the snapshot names no BPE model")
        tokenizer = Tokenizer(args.bpemodel, args.token_list)
    else:
        tokenizer_dir = Path(config.out_dir) / "tokenizer"
        if (tokenizer_dir / "tokens.txt").exists():
            tokenizer = Tokenizer.load(tokenizer_dir)
        elif texts is None:
            raise FileNotFoundError(f"{tokenizer_dir / 'tokens.txt'} does not exist (localgp train writes it)")
        else:
            tokenizer = Tokenizer.train(texts(), tokenizer_dir, config.vocab_size)
        model, _ = owsm.build_owsm(config.preset, token_list=tokenizer.token_list)
    gates = dict(config.gates)
    for key in ("contexts", "decoder_contexts"):  # YAML lists -> the dataclass's tuples
        if key in gates:
            gates[key] = tuple(tuple(item) for item in gates[key])
    gate_s2t_model(model, GateConfig(**gates))
    return model, tokenizer


def read_checkpoint(path: Path, message: str) -> dict:
    """torch.load of a training checkpoint; a corrupt file raises RuntimeError(message) with
    {path} and {err} filled in, never a half-loaded model."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise RuntimeError(message.format(path=path, err=err)) from err


def load_trained(out_dir: str | Path):
    """The model `localgp train` left in out_dir (its checkpoint.pth and tokenizer), in eval
    mode, masked execution. Returns (model, tokenizer, config); config.out_dir is `out_dir`,
    so a moved run directory still loads."""
    out = Path(out_dir)
    path = out / "checkpoint.pth"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (localgp train CONFIG.yaml writes it into out_dir)")
    state = read_checkpoint(path, "cannot load the trained model {path}: {err}")
    config = dataclasses.replace(TrainConfig(**state["config"]), out_dir=str(out))
    model, tokenizer = build_model(config)
    model.load_state_dict(state["model"])
    set_execution(model, "masked")
    return model.eval(), tokenizer, config


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.out = Path(config.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.examples = make_examples(load_corpus(config.data), config.tasks)
        torch.manual_seed(config.seed)
        self.model, self.tokenizer = build_model(
            config, lambda: [e.target_text for e in self.examples] + [e.utterance.text for e in self.examples])
        for source, target in sorted({(e.utterance.language, e.target_language) for e in self.examples}):
            self.tokenizer.prompt(source, target)  # a language the model has no token for fails now, not mid-run
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device: {config.device!r} but torch {torch.__version__} sees no CUDA GPU")
        self.model.to(self.device)
        self.contexts = ContextFeeder(self.model, config.context_extractors, self.out / "context", self.tokenizer)
        set_execution(self.model, "masked")
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.step = 0
        self._resume()

    def _checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pth"

    def save(self) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "rng": torch.get_rng_state(), "config": dataclasses.asdict(self.config)}
        if self.device.type == "cuda":  # the Gumbel noise of the gates is drawn there
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        tmp = self._checkpoint_path().with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self._checkpoint_path())  # never a half-written checkpoint

    def _resume(self) -> None:
        path = self._checkpoint_path()
        if not path.exists():
            return
        state = read_checkpoint(path, "cannot resume from {path}: {err}; move it away to start afresh")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        torch.set_rng_state(state["rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        log.info("resumed from %s at step %d", path, self.step)

    def train(self, steps: int | None = None) -> dict:
        """Runs until max_steps (or `steps` more, or max_minutes); returns the last log row."""
        from tqdm import tqdm

        cfg = self.config
        end = cfg.max_steps if steps is None else min(cfg.max_steps, self.step + steps)
        started = time.monotonic()
        self.model.train()
        row = {}
        with open(self.out / "log.jsonl", "a") as log_file, tqdm(
                total=None if cfg.max_minutes is not None else end,  # a time limit: no step count to aim at
                initial=self.step, desc="train") as bar:
            while self.step < end:
                picked = batch_order(len(self.examples), cfg.batch_size, self.step, cfg.seed)
                examples = [self.examples[i] for i in picked]
                self.contexts(examples)
                batch = [t.to(self.device) for t in collate(examples, self.tokenizer)]
                lr = warmup_lr(self.step + 1, cfg.lr, cfg.warmup_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, stats, _ = self.model(*batch)
                total, sparsity = pruning_loss(self.model, loss, cfg.target_sparsity, cfg.sparsity_weight)
                self.optimizer.zero_grad()
                total.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                if torch.isfinite(grad_norm):
                    self.optimizer.step()
                else:
                    log.warning("step %d: non-finite gradient norm, update skipped", self.step + 1)
                self.step += 1
                bar.update(1)
                row = {"step": self.step, "loss": loss.item(), "total": total.item(), "sparsity": sparsity.item(),
                       "lr": lr, "grad_norm": float(grad_norm),
                       "sparsity_per_module": last_record(self.model).sparsity_per_module()}
                bar.set_postfix(loss=f"{row['loss']:.3f}", sparsity=f"{row['sparsity']:.3f}")
                if self.step % cfg.log_every == 0 or self.step == end:
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                if self.step % cfg.save_every == 0 or self.step == end:
                    self.save()
                if cfg.max_minutes is not None and time.monotonic() - started > 60 * cfg.max_minutes:
                    self.save()
                    break
        return row
