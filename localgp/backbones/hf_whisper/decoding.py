"""openai-whisper's beam search as a decoding loop for transformers' generate():

    model.generate(features, language="en", num_beams=5, custom_generate=whisper_beam_search)

transformers' own beam search (`num_beams=K` alone) is another algorithm than openai-whisper's
`BeamSearchDecoder`, and picks other hypotheses on some clips (1 of the demo's first 20 test clips
with Whisper base, RESULTS.md): it keeps only the top K of its 2K candidates as finished, divides a
finished hypothesis' log-probability by its length counting <|endoftext|>, and applies the logits
processors after the log-softmax, so a suppressed token's probability is not given back to the rest.
`generate(custom_generate=...)` is transformers' documented hook for a decoding loop of one's own:
generate() still prepares the inputs, the logits processors (Whisper's suppressions), the
stopping criteria and the cache; this loop replaces `_beam_search` with openai-whisper's rules
(backbones/whisper/decoding.py has them, shared with localgp's WhisperBeamSearch): each row
proposes its K + 1 best tokens after the logit filters and a log-softmax, a clip's candidates are
ranked by summed log-probability, the best K that do not end go on, the ending ones ahead of them
are finished; a clip is done with K finished (patience 1) or at max_length; the finished
hypothesis with the best log-probability per output token wins. Of the stopping criteria only
max_length (max_new_tokens) applies, as openai-whisper has only its sample_len.

The cache is reordered with transformers' `reorder_cache`, so gate decisions kept in the cache
(localgp's GatedCacheLayer) follow the beams as they do in transformers' beam search. A clip that
is done keeps its rows in the batch (fed its last tokens, results ignored) so that the cache, the
encoder output and any per-row state keep one shape.
"""

from __future__ import annotations

import torch

from localgp.backbones.whisper.decoding import whisper_best, whisper_candidates


def whisper_beam_search(model, input_ids: torch.LongTensor, logits_processor, stopping_criteria, generation_config,
                        synced_gpus: bool = False, **model_kwargs) -> torch.LongTensor:
    """transformers' decoding-method signature (as GenerationMixin._beam_search): `input_ids`
    (clips x num_beams, prompt) already expanded by generate(). Returns the best sequence per clip,
    prompt included, padded with the pad token (generate() strips the prompt for Whisper).
    Whisper's generate() makes num_return_sequences=N by repeating each clip N times before this."""
    K = generation_config.num_beams
    if K < 1 or input_ids.shape[0] % K:
        raise ValueError(f"whisper_beam_search: input_ids has {input_ids.shape[0]} rows, not clips x num_beams={K}")
    for name in ("do_sample", "return_dict_in_generate"):
        if getattr(generation_config, name):
            raise ValueError(f"whisper_beam_search: {name}=True is not supported (openai-whisper's beam search "
                             f"returns the best sequence per clip)")
    if synced_gpus:
        raise ValueError("whisper_beam_search: synced_gpus=True is not supported")
    eot = int(generation_config._eos_token_tensor.reshape(-1)[0])
    pad = generation_config._pad_token_tensor
    pad = eot if pad is None else int(pad)
    rows, P = input_ids.shape
    B = rows // K
    device = input_ids.device
    steps = generation_config.max_length - P

    sequences = input_ids
    score = torch.zeros(rows, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    outputs = model._prefill(sequences, generation_config, model_kwargs)  # the prompt, as _beam_search starts
    for i in range(steps):
        if i:
            model_inputs = model.prepare_inputs_for_generation(sequences, next_sequence_length=1, **model_kwargs)
            outputs = model(**model_inputs, return_dict=True)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs,
                                                                 is_encoder_decoder=model.config.is_encoder_decoder)
        logits = outputs.logits[:, -1, :].float()
        del outputs
        logits = logits_processor(sequences, logits)  # the filters act on logits, as whisper's LogitFilters
        top, ids = torch.log_softmax(logits, dim=-1).topk(K + 1, dim=-1)
        candidates, ids, seqs = (score[:, None] + top).tolist(), ids.tolist(), sequences.tolist()
        parents, tokens, scores = [], [], []
        for b in range(B):
            # at the first step every beam of a clip holds the same prompt: one row proposes
            saved, ended = whisper_candidates(candidates, ids, range(b * K, b * K + (1 if i == 0 else K)), K, eot)
            if not done[b]:
                finished[b] += [(s, seqs[r][P:]) for s, r, _ in ended[: K - len(finished[b])]]
                if len(finished[b]) >= K or i == steps - 1:  # whisper's finalize: the best running rows end here
                    finished[b] += [(s, seqs[r][P:] + [t]) for s, r, t in saved[: K - len(finished[b])]]
                    done[b] = True
            parents += [r for _, r, _ in saved]
            tokens += [t for _, _, t in saved]
            scores += [s for s, _, _ in saved]
        if all(done):
            break
        beam_idx = torch.tensor(parents, device=device)
        sequences = torch.cat([sequences[beam_idx], torch.tensor(tokens, device=device)[:, None]], dim=1)
        score = torch.tensor(scores, dtype=torch.float32, device=device)
        model_kwargs["cache"].reorder_cache(beam_idx)

    best = []
    for b in range(B):
        hyps = finished[b] or [(float(score[b * K]), sequences[b * K, P:].tolist())]
        best.append(hyps[whisper_best([(s, len(t)) for s, t in hyps], None)][1])
    width = P + max(len(t) + 1 for t in best)
    out = torch.full((B, width), pad, dtype=torch.long, device=device)
    out[:, :P] = input_ids[::K]
    for b, t in enumerate(best):
        out[b, P:P + len(t) + 1] = torch.tensor(t + [eot], device=device)
    return out
