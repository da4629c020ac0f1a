"""Mean and standard error over formats, against hand computations."""

from __future__ import annotations

import math

import pytest
from megatron_sfm.evaluation.stats import mean_stderr, summarize_cell


def test_stderr_of_half_zero_half_one_formats():
    # rates 0,0,0,0,1,1,1,1: mean 0.5; sample variance = 8 * 0.25 / 7 = 2/7;
    # SE = sqrt((2/7) / 8) = sqrt(1/28)
    mean, se = mean_stderr([0, 0, 0, 0, 1, 1, 1, 1])
    assert mean == 0.5
    assert se == pytest.approx(1 / math.sqrt(28), rel=1e-12)


def test_cell_from_counts_matches_hand_computation():
    # 4 questions per format; misaligned counts 1,2,0,3 in four formats, and one format
    # where 2 of 4 replies could not be parsed (1 of the 2 answered is misaligned).
    counts = {"f1": (1, 4, 4), "f2": (2, 4, 4), "f3": (0, 4, 4), "f4": (3, 4, 4), "f5": (1, 2, 4)}
    cell = summarize_cell(counts)
    rates = [0.25, 0.5, 0.0, 0.75, 0.5]
    # by hand: mean = 2.0 / 5 = 0.4; deviations -0.15, 0.1, -0.4, 0.35, 0.1;
    # squares 0.0225 + 0.01 + 0.16 + 0.1225 + 0.01 = 0.325; var = 0.325 / 4 = 0.08125;
    # SE = sqrt(0.08125 / 5) = sqrt(0.01625)
    assert cell["mean"] == pytest.approx(0.4)
    assert cell["stderr"] == pytest.approx(math.sqrt(0.01625))
    assert cell["per_format"] == dict(zip(counts, rates))
    assert cell["n_formats"] == 5 and cell["n_questions"] == 4
    assert cell["non_match_rate"] == pytest.approx(2 / 20)


def test_formats_without_answers_are_left_out_and_single_format_has_no_stderr():
    cell = summarize_cell({"f1": (1, 2, 2), "f2": (0, 0, 2)})
    assert cell["mean"] == 0.5 and cell["stderr"] is None and cell["n_formats"] == 1
    assert cell["per_format"]["f2"] is None
    assert mean_stderr([]) == (None, None)
