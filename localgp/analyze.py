"""The localGP paper's analyses: an utterance's log-mel spectrogram above its per-layer temporal
masks (its Figure), and whether tokens that start a word keep src-attention more often than
the others (its Table 2: Mann-Whitney U and Welch's t-test).

`localgp analyze masks` and `localgp analyze word-start` run them on a trained model and on
decoded records."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from localgp.errors import UserError

WORD_START = "\u2581"  # sentencepiece's word-boundary mark


def mask_figure(log_mel: np.ndarray, masks: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """log_mel (T_in, mels); masks: 'encoder.<layer>.<module>' -> (T_enc,) keep (0/1) of one
    utterance. Writes a PNG: the spectrogram on top, one mask row per layer and module below,
    on the same time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not masks:
        raise UserError("mask_figure: no temporal masks (was the encoder gated per frame?)")
    names = sorted(masks, key=lambda n: (int(n.split(".")[1]), n.split(".")[2]))
    grid = np.stack([np.asarray(masks[n], dtype=float) for n in names])
    seconds = log_mel.shape[0] / 100  # 10 ms hop
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 2 + 0.18 * len(names)), sharex=True,
                                      gridspec_kw={"height_ratios": [1, max(1, len(names) / 12)]})
    top.imshow(log_mel.T, origin="lower", aspect="auto", extent=(0, seconds, 0, log_mel.shape[1]), cmap="magma")
    top.set_ylabel("mel bin")
    top.set_title(title or "log-mel spectrogram and temporal masks (dark = kept)")
    bottom.imshow(grid, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1,
                  extent=(0, seconds, len(names), 0))
    bottom.set_yticks(np.arange(len(names)) + 0.5, [n.removeprefix("encoder.") for n in names], fontsize=6)
    bottom.set_xlabel("time (s)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def word_start_test(pieces: list[str], keep_rates: list[float]) -> dict:
    """src-attention keep rate of tokens starting a word vs the others, with the paper's tests."""
    from scipy import stats

    if len(pieces) != len(keep_rates):
        raise ValueError(f"word_start_test: {len(pieces)} tokens but {len(keep_rates)} keep rates")
    starts = [r for p, r in zip(pieces, keep_rates, strict=True) if p.startswith(WORD_START)]
    others = [r for p, r in zip(pieces, keep_rates, strict=True) if not p.startswith(WORD_START)]
    if len(starts) < 2 or len(others) < 2:
        raise UserError("word_start_test: needs at least two tokens of each kind")
    u = stats.mannwhitneyu(starts, others, alternative="two-sided")
    t = stats.ttest_ind(starts, others, equal_var=False)
    return {"word_start": {"count": len(starts), "mean_keep": float(np.mean(starts))},
            "other": {"count": len(others), "mean_keep": float(np.mean(others))},
            "mann_whitney_u": {"statistic": float(u.statistic), "p_value": float(u.pvalue)},
            "welch_t": {"statistic": float(t.statistic), "p_value": float(t.pvalue)}}


def masks_from_checkpoint(checkpoint: str | Path, audio: str | Path, language: str, out: str | Path) -> Path:
    """The mask figure of one audio file (any format PyAV decodes, resampled to 16 kHz by
    load_audio) under the model `localgp train` left in `checkpoint`, its contexts computed by
    the run's own extractors as in training. `language` is the speech's (its prompt and the
    language contexts)."""
    import tempfile

    import torch

    from localgp.context.feeder import ContextFeeder
    from localgp.data.corpora import Utterance
    from localgp.data.examples import Example, audio_problems
    from localgp.runs import load_run

    utterance = Utterance(Path(audio).stem, Path(audio), language, "", "")
    # a missing, undecodable, empty, too short or cut short file fails before the model loads
    problems = audio_problems([utterance])
    if problems:
        raise UserError(problems[utterance.id])
    speech = utterance.load()
    run = load_run(checkpoint)
    model, example = run.model, Example(utterance, language, "")
    run.backbone.check_examples([example])  # refuses a language the model has no token for
    # A throw-away feature cache: the run's cache is keyed by corpus utterance ids, which an
    # arbitrary file's name could collide with.
    with tempfile.TemporaryDirectory() as cache:
        ContextFeeder(model, run.config.context_extractors, Path(cache), run.backbone.prompt_context)([example])
    log_mel, masks = run.backbone.encoder_masks(model, torch.from_numpy(speech))
    kept = np.mean([m.mean() for m in masks.values()])  # over every gated module and frame
    return mask_figure(log_mel, masks, out, title=f"{Path(audio).name} ({language}): log-mel and temporal masks, "
                                                  f"{100 * kept:.0f}% kept (dark = kept)")


def word_start_from_records(records, language: str | None = None, task: str = "all") -> dict:
    """word_start_test over the tokens of decoded records (evaluate.Decoded) that carry per-token
    src-attention keep rates, optionally only those whose speech is in `language` and of one
    task ('asr', 'st' or 'all'); the paper's Table 2 is German ASR."""
    if task not in ("asr", "st", "all"):
        raise UserError(f"word_start: task must be 'asr', 'st' or 'all', got {task!r}")
    chosen = [r for r in records if (language is None or r.language == language)
              and (task == "all" or (task == "asr") == (r.language == r.target_language))]
    with_tokens = [r for r in chosen if r.tokens]
    if not with_tokens:
        raise UserError(f"word_start: none of the {len(chosen)} records (language {language or 'any'}, task {task}) "
                         f"has per-token src-attention keep rates (tokens, src_attn_keep): decode with a decoder "
                         f"gated per token")
    result = word_start_test([t for r in with_tokens for t in r.tokens],
                             [k for r in with_tokens for k in r.src_attn_keep])
    return {"records": len(with_tokens), "language": language, "task": task, **result}
