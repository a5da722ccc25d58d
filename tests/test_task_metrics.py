"""Each official metric against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from unipelt.errors import DataError
from unipelt.tasks import compute_metrics


def test_classification_metrics_by_hand():
    # TP=1 FP=1 TN=2 FN=0
    predictions, references = [1, 1, 0, 0], [1, 0, 0, 0]
    scores = compute_metrics(["accuracy", "f1", "matthews_correlation"], predictions, references)
    assert scores["accuracy"] == pytest.approx(0.75)
    assert scores["f1"] == pytest.approx(2 / 3)  # precision 1/2, recall 1
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 2 / sqrt(2*1*3*2)
    assert scores["matthews_correlation"] == pytest.approx(2 / math.sqrt(12))
    # three classes: per-class F1 = 1 (class 0), 2/3 (class 1), 0 (class 2)
    macro = compute_metrics(["f1_macro"], [0, 1, 1, 0], [0, 1, 2, 0])["f1_macro"]
    assert macro == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_correlations_by_hand():
    scores = compute_metrics(["pearson", "spearmanr"], [1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert scores["pearson"] == pytest.approx(3 / math.sqrt(2 * 42 / 9))  # cov / (sd_p sd_r), sums of squares
    assert scores["spearmanr"] == pytest.approx(1.0)
    # ranks (1,2,3) vs (3,1,2): 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 36 / 24
    assert compute_metrics(["spearmanr"], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0])["spearmanr"] == pytest.approx(-0.5)


def test_rouge_by_hand():
    scores = compute_metrics(["rouge1", "rouge2", "rougeL"], ["the cat sat"], ["the cat sat down"])
    assert scores["rouge1"] == pytest.approx(2 * 1 * 0.75 / 1.75)  # P 3/3, R 3/4
    assert scores["rouge2"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))  # bigrams: P 2/2, R 2/3
    assert scores["rougeL"] == pytest.approx(scores["rouge1"])  # LCS = 3 words
    assert compute_metrics(["rouge1"], ["a b", "x y"], ["a b", "z w"])["rouge1"] == pytest.approx(0.5)


def test_bleu_by_hand():
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths so no brevity penalty
    score = compute_metrics(["bleu"], ["the cat sat on the mat"], ["the cat sat on a mat"])["bleu"]
    assert score == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-3)
    assert compute_metrics(["bleu"], ["a b c d e"], ["a b c d e"])["bleu"] == pytest.approx(100.0)


def test_seqeval_entity_scores_by_hand():
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predictions = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-MISC"]]
    scores = compute_metrics(["seqeval_f1", "seqeval_precision", "seqeval_recall", "token_accuracy"],
                             predictions, references)
    # gold entities PER, LOC, ORG; predicted PER, ORG, MISC: 2 correct of 3 each way
    assert scores["seqeval_precision"] == pytest.approx(2 / 3)
    assert scores["seqeval_recall"] == pytest.approx(2 / 3)
    assert scores["seqeval_f1"] == pytest.approx(2 / 3)
    assert scores["token_accuracy"] == pytest.approx(4 / 6)
    # a partly matched span is wrong as a whole: I-PER cut off
    assert compute_metrics(["seqeval_f1"], [["B-PER", "O"]], [["B-PER", "I-PER"]])["seqeval_f1"] == 0.0


def test_unknown_metric_and_length_mismatch_are_rejected():
    with pytest.raises(DataError, match=r"unknown metric 'bleurt' \(allowed: accuracy, f1, .*bleu"):
        compute_metrics(["bleurt"], ["a"], ["a"])
    with pytest.raises(DataError, match="2 predictions for 1 references"):
        compute_metrics(["accuracy"], [0, 1], [0])
