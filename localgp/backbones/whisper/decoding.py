"""Whisper's beam search (openai-whisper's `BeamSearchDecoder` with its logit filters and ranker,
without timestamps) for many clips at once, over localgp's incremental decoder: the clips x
beams are the rows of one batch, the encoder output is projected once per clip, token-level
gates skip modules by row groups as for OWSM, and a clip that is done leaves the batch.

On a plain Whisper it returns what `whisper.decode(model, mel, DecodingOptions(beam_size=K,
without_timestamps=True, language=...))` returns, token for token (tests), clip by clip or in
a batch (openai-whisper's own beam search decodes one clip at a time).

Whisper's rules, as its decoding.py has them: the prompt is <|startoftranscript|> <|lang|>
<|task|> <|notimestamps|>; with no language given, the language token is the most probable
one after <|startoftranscript|>; blank and <|endoftext|> are suppressed at the first sampled
position, non-speech and special tokens everywhere; each step, every hypothesis proposes its
beam_size + 1 best tokens, the candidates of a clip are ranked by summed log-probability, the
best beam_size that do not end go on, the ones ending in <|endoftext|> ahead of them are
finished; a clip is done with round(beam_size * patience) finished, or after sample_len
tokens; the finished hypothesis with the best length-normalised log-probability wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from localgp.backbones.whisper.model import whisper_decoder_view
from localgp.decoding.beam import Hypothesis
from localgp.decoding.incremental import IncrementalDecoder
from localgp.errors import UserError
from localgp.model.config import EXECUTIONS
from localgp.model.gating import profiled

TASKS = ("transcribe", "translate")


@dataclass(frozen=True)
class WhisperDecodeOptions:
    beam_size: int = 5  # hypotheses kept per clip
    patience: float = 1.0  # a clip is done with round(beam_size * patience) finished hypotheses (>= 1 here)
    length_penalty: float | None = None  # None: score / length; else Google NMT's ((5 + length) / 6) ** alpha
    sample_len: int | None = None  # most tokens sampled per clip; None: half the decoder's context (224)
    suppress_blank: bool = True  # no blank or <|endoftext|> as the first token
    suppress_non_speech: bool = True  # whisper's suppress_tokens="-1": symbols and special tokens never sampled
    # Gated decoders: "compact" skips pruned modules, "masked" computes them and multiplies by the mask.
    execution: str = "compact"

    def __post_init__(self):
        if self.beam_size < 1:
            raise UserError(f"WhisperDecodeOptions.beam_size must be >= 1, got {self.beam_size}")
        if not self.patience >= 1:
            raise UserError(f"WhisperDecodeOptions.patience must be >= 1, got {self.patience}")
        if self.length_penalty is not None and not 0 <= self.length_penalty <= 1:
            raise UserError(f"WhisperDecodeOptions.length_penalty must lie in [0, 1] or be None, got {self.length_penalty}")
        if self.sample_len is not None and self.sample_len < 1:
            raise UserError(f"WhisperDecodeOptions.sample_len must be >= 1 or None, got {self.sample_len}")
        if self.execution not in EXECUTIONS:
            raise UserError(f"WhisperDecodeOptions.execution must be one of {EXECUTIONS}, got {self.execution!r}")


@dataclass
class WhisperHypothesis(Hypothesis):
    """A finished hypothesis; `score` is its summed log-probability, `language` the clip's."""

    language: str = ""
    text: str = ""

    @property
    def avg_logprob(self) -> float:  # as whisper's DecodingResult: <|endoftext|> counted
        return self.score / (len(self.token_ids) + 1)


def whisper_candidates(scores: list[list[float]], ids: list[list[int]], rows: range, beam_size: int,
                       eot: int) -> tuple[list[tuple[float, int, int]], list[tuple[float, int, int]]]:
    """One clip's step of whisper's BeamSearchDecoder.update: `scores[r][j]` the summed log-probability
    of row r continued by its j-th best token `ids[r][j]` (beam_size + 1 per row). The candidates
    (score, row, token) of `rows` ranked by score (stable, as whisper's dict order): the best
    beam_size that do not end in `eot` go on; those ending in it ranked ahead of them are finished.
    Returns (going on, finished), each best first."""
    ranked = sorted(((scores[r][j], r, ids[r][j]) for r in rows for j in range(beam_size + 1)),
                    key=lambda c: c[0], reverse=True)
    saved, ended = [], []
    for c in ranked:
        (ended if c[2] == eot else saved).append(c)
        if len(saved) == beam_size:
            break
    return saved, ended


def whisper_best(finished: list[tuple[float, int]], length_penalty: float | None) -> int:
    """Whisper's MaximumLikelihoodRanker: the index of the best of `finished` (summed log-probability,
    output tokens without <|endoftext|>), normalised by length (None) or by Google NMT's penalty."""

    def normalised(i: int) -> float:
        score, length = finished[i]
        return score / (length if length_penalty is None else ((5 + length) / 6) ** length_penalty)

    return max(range(len(finished)), key=normalised)  # the first of equals, as numpy's argmax


def whisper_tokenizer(model, language: str | None = None, task: str = "transcribe"):
    from whisper.tokenizer import get_tokenizer

    return get_tokenizer(model.is_multilingual, num_languages=model.num_languages, language=language, task=task)


class WhisperBeamSearch:
    """`model`: an openai-whisper Whisper, plain or gated by localgp.backbones.whisper.model.gate_whisper."""

    def __init__(self, model, options: WhisperDecodeOptions = WhisperDecodeOptions()):
        self.options = options
        self.decoder = IncrementalDecoder(model.decoder, whisper_decoder_view(model.decoder), options.execution)
        self.tokenizer = tok = whisper_tokenizer(model)
        self.n_ctx = model.dims.n_text_ctx
        self.codes = list(tok.all_language_codes)
        self.language_ids = torch.tensor(tok.all_language_tokens)
        suppressed = [tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm]
        if tok.no_speech is not None:
            suppressed.append(tok.no_speech)
        if options.suppress_non_speech:
            suppressed.extend(tok.non_speech_tokens)
        self.suppressed = torch.tensor(sorted(set(suppressed)))
        self.blank = torch.tensor(tok.encode(" ") + [tok.eot])
        self.kept_share: float | None = None

    def primer(self, language: str, task: str) -> list[int]:
        tok = self.tokenizer
        return [tok.sot, tok.to_language_token(language), tok.transcribe if task == "transcribe" else tok.translate,
                tok.no_timestamps]

    def _check(self, features: Tensor, languages, task: str) -> None:
        A = features.shape[0]
        if features.dim() != 3:
            raise ValueError(f"decode: audio_features must be (clips, frames, width), got {tuple(features.shape)}")
        if len(languages) != A:
            raise ValueError(f"decode: {A} clips but {len(languages)} languages (None: detect)")
        unknown = sorted({lang for lang in languages if lang is not None and lang not in self.codes})
        if unknown:
            raise ValueError(f"decode: unknown language code(s) {unknown}; Whisper knows {len(self.codes)}: "
                             f"{', '.join(self.codes[:10])}, ...")
        if task not in TASKS:
            raise ValueError(f"decode: task must be one of {TASKS}, got {task!r}")

    def detect_language(self, logits: Tensor) -> list[str]:
        """The most probable language token after <|startoftranscript|> (logits (A, V))."""
        ids = self.language_ids.to(logits.device)
        return [self.codes[i] for i in logits.index_select(1, ids).argmax(-1).tolist()]

    @torch.no_grad()
    def __call__(self, audio_features: Tensor, languages, task: str = "transcribe") -> list[WhisperHypothesis]:
        """audio_features (A, S, D) the encoder's output; languages: a code per clip, None to
        detect it. Returns each clip's best hypothesis."""
        self._check(audio_features, languages, task)
        o, K, eot = self.options, self.options.beam_size, self.tokenizer.eot
        A, S, _ = audio_features.shape
        device = audio_features.device
        cache = self.decoder.start(audio_features, torch.full((A,), S, device=device))
        detect = any(lang is None for lang in languages)
        logits = self.decoder.step(cache, torch.full((A,), self.tokenizer.sot, device=device), logits=detect,
                                   normalize=False)
        if detect:
            found = self.detect_language(logits)
            languages = [lang if lang is not None else found[a] for a, lang in enumerate(languages)]
        primers = torch.tensor([self.primer(lang, task) for lang in languages], device=device)
        P = primers.shape[1]
        for p in range(1, P - 1):
            self.decoder.step(cache, primers[:, p], logits=False)
        suppressed, blank = self.suppressed.to(device), self.blank.to(device)
        max_candidates = round(K * o.patience)
        steps = min(o.sample_len or self.n_ctx // 2, self.n_ctx + 1 - P)  # whisper stops past n_ctx tokens
        tokens, score = primers[:, -1], torch.zeros(A, device=device)
        yseq = [list(p) for p in primers.tolist()]
        active = list(range(A))
        finished: list[list[WhisperHypothesis]] = [[] for _ in range(A)]
        for i in range(steps):
            logits = self.decoder.step(cache, tokens, normalize=False)
            with profiled("beam"):
                logits.index_fill_(1, suppressed, -torch.inf)
                if i == 0 and o.suppress_blank:
                    logits.index_fill_(1, blank, -torch.inf)
                top, ids = torch.log_softmax(logits, dim=-1).topk(K + 1, dim=-1)
                candidates = (score[:, None] + top).tolist()  # float32 sums, as whisper's
                ids = ids.tolist()
                R = cache.rows_per_utterance
                parents, new_tokens, new_scores, going_on = [], [], [], []
                for u, a in enumerate(active):
                    saved, ended = whisper_candidates(candidates, ids, range(u * R, (u + 1) * R), K, eot)
                    for s, r, _ in ended[: max_candidates - len(finished[a])]:
                        finished[a].append(WhisperHypothesis(yseq[r] + [eot], s, P, slots=cache.ancestry[r],
                                                             language=languages[a]))
                    if len(finished[a]) >= max_candidates or i == steps - 1:
                        self._fill(finished[a], [(s, yseq[r] + [t], cache.ancestry[r]) for s, r, t in saved], P,
                                   languages[a])
                        continue
                    going_on.append(u)
                    parents += [r for _, r, _ in saved]
                    new_tokens += [t for _, _, t in saved]
                    new_scores += [s for s, _, _ in saved]
                if not going_on:
                    break
                yseq = [yseq[r] + [t] for r, t in zip(parents, new_tokens, strict=True)]
                cache.reorder(torch.tensor(parents, device=device), going_on)
                tokens = torch.tensor(new_tokens, device=device)
                score = torch.tensor(new_scores, dtype=torch.float32, device=device)
                active = [active[u] for u in going_on]
        self.kept_share = float(cache.keep_slab[: cache.used].float().mean()) if self.decoder.gated else None
        return [self._best(hyps, cache) for hyps in finished]

    def _fill(self, finished: list[WhisperHypothesis], rows, primer_length: int, language: str) -> None:
        """Whisper's finalize: too few finished, the best unfinished rows end here."""
        for s, seq, slots in sorted(rows, key=lambda c: c[0], reverse=True):
            if len(finished) >= self.options.beam_size:
                break
            finished.append(WhisperHypothesis(seq + [self.tokenizer.eot], s, primer_length, slots=slots,
                                              language=language))

    def _best(self, hyps: list[WhisperHypothesis], cache) -> WhisperHypothesis:
        """Whisper's MaximumLikelihoodRanker: the best length-normalised summed log-probability."""
        best = hyps[whisper_best([(h.score, len(h.token_ids)) for h in hyps], self.options.length_penalty)]
        if self.decoder.gated:
            best.keep = cache.keep_slab.index_select(0, best.slots).cpu()
        for h in hyps:
            h.slots = None
        best.text = self.tokenizer.decode(best.token_ids).strip()
        return best
