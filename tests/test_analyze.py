import numpy as np
import pytest

from localgp.analyze import mask_figure, word_start_test


def test_mask_figure_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    masks = {f"encoder.{layer}.{m}": (rng.random(50) > 0.4).astype(float) for layer in range(3) for m in ("ffn1", "attn")}
    path = mask_figure(rng.standard_normal((203, 80)), masks, tmp_path / "masks.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="no temporal masks"):
        mask_figure(np.zeros((10, 80)), {}, tmp_path / "x.png")


def test_word_start_test_detects_a_difference():
    rng = np.random.default_rng(1)
    pieces = ["\u2581w"] * 200 + ["x"] * 200
    rates = list(rng.normal(0.8, 0.1, 200)) + list(rng.normal(0.6, 0.1, 200))
    result = word_start_test(pieces, rates)
    assert result["word_start"]["count"] == 200 and result["mann_whitney_u"]["p_value"] < 1e-6
    same = word_start_test(pieces, list(rng.normal(0.7, 0.1, 400)))
    assert same["welch_t"]["p_value"] > 1e-3
    with pytest.raises(ValueError, match="at least two tokens of each kind"):
        word_start_test(["\u2581a", "b"], [1.0, 0.0])
