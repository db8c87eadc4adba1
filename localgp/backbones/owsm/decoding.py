"""ESPnet's beam search for many utterances at once: `BatchBeamSearch` (its scores, `<eos>`
handling, length limits, end detection, optional CTC prefix scores) over B utterances x K
hypotheses as the rows of one `IncrementalDecoder` batch; an utterance that is done leaves it.
"""

from __future__ import annotations

import logging
import math
import re

import torch
from torch import Tensor

from localgp.decoding.beam import DecodeOptions, Hypothesis
from localgp.decoding.incremental import IncrementalDecoder
from localgp.model.gating import profiled

log = logging.getLogger(__name__)


def timestamp_ids(token_list: list[str]) -> list[int]:
    """OWSM's timestamp tokens <0.00> ... <30.00>."""
    return [i for i, t in enumerate(token_list) if re.fullmatch(r"<\d+\.\d\d>", t)]


class CTCPrefixScores:
    """ESPnet's vectorised CTC prefix scorer (CTCPrefixScoreTH) for utterances x hypotheses, with
    the state selection its batch beam search does (CTCPrefixScorer.select_state), vectorised."""

    def __init__(self, ctc, memory: Tensor, memory_lens: Tensor, eos: int):
        self.logp, self.lens, self.eos = ctc.log_softmax(memory), memory_lens, eos
        self._new_impl()
        self.state = None
        self.full = None

    def _new_impl(self):
        from espnet.nets.ctc_prefix_score import CTCPrefixScoreTH

        self.impl = CTCPrefixScoreTH(self.logp.clone(), self.lens, 0, self.eos)  # it pads its input in place

    def __call__(self, yseq: list[list[int]], ids: Tensor) -> Tensor:
        scores, self.full = self.impl(yseq, self.state, ids)
        return scores

    def select(self, rows: Tensor, tokens: Tensor) -> None:
        r, log_psi, f_min, f_max, idmap = self.full
        self.state = (r[:, :, rows, idmap[rows, tokens]],
                      log_psi[rows, tokens][:, None].expand(-1, log_psi.shape[1]), f_min, f_max)

    def keep(self, rows: Tensor, utterances: list[int]) -> None:
        """Only these rows (of the selected state) and utterances go on."""
        if len(utterances) != self.logp.shape[0]:
            index = torch.tensor(utterances, device=self.logp.device)
            self.logp, self.lens = self.logp.index_select(0, index), self.lens.index_select(0, index.to(self.lens.device))
            self._new_impl()
        r, s, f_min, f_max = self.state
        self.state = (r[:, :, rows], s[rows], f_min, f_max)


class BatchBeamSearch:
    """ESPnet's beam search over many utterances at once. `model`: an ESPnetS2TModel (plain or
    gated) providing decoder, ctc, sos, eos and token_list."""

    def __init__(self, model, options: DecodeOptions = DecodeOptions()):
        from localgp.backbones.owsm.decoder import espnet_decoder_view  # ESPnet's classes: imported when used

        self.options = options
        self.decoder = IncrementalDecoder(model.decoder, espnet_decoder_view(model.decoder), options.execution)
        self.ctc = model.ctc if options.ctc_weight > 0 else None
        self.sos, self.eos, self.vocab = model.sos, model.eos, model.vocab_size
        token_list = list(model.token_list)
        self.suppressed = torch.tensor(timestamp_ids(token_list), dtype=torch.long)
        self.notimestamps = token_list.index("<notimestamps>") if "<notimestamps>" in token_list else None
        self.kept_share: float | None = None

    def _limits(self, frames: int) -> tuple[int, int]:
        o = self.options
        if o.fixed_length is not None:
            return o.fixed_length, 0
        if o.maxlenratio == 0:
            maxlen = frames
        elif o.maxlenratio < 0:
            maxlen = -int(o.maxlenratio)
        else:
            maxlen = max(1, int(o.maxlenratio * frames))
        minlen = -int(o.minlenratio) if o.minlenratio < 0 else int(o.minlenratio * frames)
        return maxlen, minlen

    def _weighted_scores(self, logp: Tensor, score: Tensor, yseq: list[list[int]], ctc) -> Tensor:
        """ESPnet's weighted sum for every next token of every row (rows, V), running score included."""
        o = self.options
        weighted = logp * (1 - o.ctc_weight) if ctc is not None else logp
        if self.suppressed.numel():  # OWSM's score filter without timestamps
            weighted.index_fill_(1, self.suppressed, -math.inf)
        if o.penalty:
            weighted += o.penalty
        if o.fixed_length is not None:
            weighted[:, self.eos] = -math.inf
        if ctc is not None:  # CTC scores only the best pre-beam tokens of each row
            pre_beam = int(o.pre_beam_ratio * o.beam_size)
            ids = torch.topk(weighted, pre_beam, dim=-1)[1] if pre_beam < self.vocab else None
            weighted = weighted + o.ctc_weight * ctc(yseq, ids)
        return weighted + score[:, None]

    def _top_k(self, weighted: Tensor, utterances: int, rows_per_utterance: int):
        """The beam's best (parent row, token) of each utterance over all its rows: parents,
        tokens and scores (utterances * beam,)."""
        K, V = self.options.beam_size, self.vocab
        top_scores, top_ids = weighted.view(utterances, rows_per_utterance * V).topk(K, dim=-1)
        base = (torch.arange(utterances, device=weighted.device) * rows_per_utterance)[:, None]
        return (top_ids // V + base).flatten(), (top_ids % V).flatten(), top_scores.flatten()

    def _end_hypotheses(self, step, yseq, score, host_parents, active, limits, ended, cache, primer_length):
        """ESPnet's post-processing: <eos> appended at the length limit, hypotheses ending in
        <eos> moved to `ended` (their score set to -inf, so they are never extended), end
        detection. Returns the indices (into `active`) of the utterances that go on."""
        from espnet.nets.e2e_asr_common import end_detect

        o, K = self.options, self.options.beam_size
        host_scores = score.tolist()
        dead, going_on = set(), []
        for u, a in enumerate(active):
            maxlen, minlen = limits[a]
            for r in range(u * K, (u + 1) * K):
                if step == maxlen - 1:  # the length limit: every hypothesis ends here
                    yseq[r].append(self.eos)
                if yseq[r][-1] != self.eos:
                    continue
                dead.add(r)
                if step >= minlen and math.isfinite(host_scores[r]):
                    ended[a].append(Hypothesis(yseq[r], host_scores[r], primer_length,
                                               slots=cache.ancestry[host_parents[r]]))
            finished = step == maxlen - 1 or all(r in dead for r in range(u * K, (u + 1) * K))
            if not finished and o.maxlenratio == 0 and o.fixed_length is None:
                finished = end_detect([{"yseq": h.yseq, "score": h.score} for h in ended[a]], step)
            if not finished:
                going_on.append(u)
        if dead:
            score[torch.tensor(sorted(dead), device=score.device)] = -math.inf
        return going_on

    @torch.no_grad()
    def __call__(self, memory: Tensor, memory_lens: Tensor, primers: Tensor) -> list[list[Hypothesis]]:
        """memory (A, S, D) encoder output, memory_lens (A,), primers (A, P) int64 prompts
        (<sos> <lang> <task> <notimestamps>). Returns each utterance's n-best, best first."""
        o, K = self.options, self.options.beam_size
        A = memory.shape[0]
        if memory.dim() != 3 or memory_lens.shape != (A,):
            raise ValueError(f"decode: memory must be (A, S, D) with memory_lens (A,), got {tuple(memory.shape)} "
                             f"and {tuple(memory_lens.shape)}")
        if primers.dim() != 2 or primers.shape[0] != A or primers.shape[1] < 1:
            raise ValueError(f"decode: primers must be ({A}, P>=1) token ids, got {tuple(primers.shape)}")
        primer_list = primers.tolist()
        if any(p[0] != self.sos for p in primer_list):
            raise ValueError(f"decode: every primer must start with <sos> ({self.sos})")
        if self.suppressed.numel() and any(self.notimestamps not in p for p in primer_list):
            raise ValueError("decode: timestamp prediction is not supported; the primers must contain <notimestamps>")
        device = memory.device
        primers, self.suppressed = primers.to(device), self.suppressed.to(device)  # once, not every step
        limits = [self._limits(int(n)) for n in memory_lens.tolist()]
        cache = self.decoder.start(memory, memory_lens)
        ctc = CTCPrefixScores(self.ctc, memory, memory_lens.to(device), self.eos) if self.ctc is not None else None
        P = primers.shape[1]
        for p in range(P - 1):
            self.decoder.step(cache, primers[:, p], logits=False)
        tokens, yseq = primers[:, -1], [list(p) for p in primer_list]
        score = torch.zeros(A, device=device)
        active = list(range(A))  # original index of each utterance still decoding
        ended: list[list[Hypothesis]] = [[] for _ in range(A)]
        step = 0
        while active:
            logp = self.decoder.step(cache, tokens)
            with profiled("beam"):  # scores, top-k, hypotheses, <eos>, limits
                weighted = self._weighted_scores(logp, score, yseq, ctc)
                parents, new_tokens, score = self._top_k(weighted, len(active), cache.rows_per_utterance)
                host_parents, host_tokens = torch.stack([parents, new_tokens]).tolist()
                if ctc is not None:
                    ctc.select(parents, new_tokens)
                yseq = [yseq[p] + [t] for p, t in zip(host_parents, host_tokens, strict=True)]
                going_on = self._end_hypotheses(step, yseq, score, host_parents, active, limits, ended, cache, P)
                step += 1
                if not going_on:
                    break
                keep_rows = [r for u in going_on for r in range(u * K, (u + 1) * K)]
                rows = torch.tensor(keep_rows, device=device)
                cache.reorder(parents.index_select(0, rows), going_on)
                if ctc is not None:
                    ctc.keep(rows, going_on)
                tokens, score = new_tokens.index_select(0, rows), score.index_select(0, rows)
                yseq = [yseq[r] for r in keep_rows]
                active = [active[u] for u in going_on]
        # share of (token, layer, module) units kept over the whole decode
        self.kept_share = float(cache.keep_slab[: cache.used].float().mean()) if self.decoder.gated else None
        results = []
        for a, hyps in enumerate(ended):
            best = sorted(hyps, key=lambda h: h.score, reverse=True)[: o.nbest]
            if not best:
                log.warning("decode: utterance %d ended no hypothesis (minlenratio too large?)", a)
            for h in best:
                if self.decoder.gated:
                    h.keep = cache.keep_slab.index_select(0, h.slots).cpu()
                h.slots = None
            results.append(best)
        return results
