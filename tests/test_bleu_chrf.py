"""BLEU and chrF beside exact match (npflux.training.seq2seq.bleu_chrf): sacrebleu's corpus scores."""
import pytest

from npflux.training.seq2seq import bleu_chrf


def test_identical_outputs_score_100_and_disjoint_ones_0():
    refs = ["1998-03-03", "2024-12-31", "1901-01-01"]
    same = bleu_chrf(refs, refs)
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    none = bleu_chrf(["zz", "qq", "xx"], refs)
    assert none["bleu"] == 0.0 and none["chrf"] == 0.0
    assert "nrefs:1" in same["bleu_signature"] and "nc:6" in same["chrf_signature"]


def test_a_near_miss_scores_between_and_chrf_sees_characters():
    """One wrong digit: exact match 0, but chrF (character n-grams) keeps most of the credit."""
    refs = ["1998-03-03 morning", "2024-12-31 evening"]
    near = bleu_chrf(["1998-03-04 morning", "2024-12-31 evening"], refs)
    assert 0.0 < near["bleu"] < 100.0 and 50.0 < near["chrf"] < 100.0


def test_lengths_must_agree():
    with pytest.raises(ValueError, match="2 outputs for 1 targets"):
        bleu_chrf(["a", "b"], ["a"])
