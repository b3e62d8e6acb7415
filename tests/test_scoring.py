import numpy as np
import pytest

from openvino_reranker.errors import InferenceError
from openvino_reranker.scoring import logits_to_scores, rank


def test_sigmoid_is_stable_and_float64():
    s = logits_to_scores(np.array([[-1000.0], [0.0], [1000.0], [2.0]], dtype=np.float32))
    assert s.dtype == np.float64
    assert s[0] == 0.0 and s[1] == 0.5 and s[2] == 1.0
    assert s[3] == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-15)


def test_two_columns_give_the_positive_class_softmax_probability():
    logits = np.array([[0.3, 2.5], [4.0, -1.0], [-800.0, 800.0]])
    expected = [np.exp(r[1]) / np.exp(r).sum() if abs(r).max() < 50 else 1.0 for r in logits]
    assert logits_to_scores(logits) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_are_an_inference_error(bad):
    with pytest.raises(InferenceError) as info:
        logits_to_scores(np.array([[1.0], [bad]]))
    assert info.value.status == 500


def test_wrong_logit_shape_is_an_inference_error():
    with pytest.raises(InferenceError):
        logits_to_scores(np.zeros((2, 3)))


def test_rank_breaks_ties_by_ascending_index():
    assert rank([0.5, 0.9, 0.5, 0.9, 0.1]) == [1, 3, 0, 2, 4]
    assert rank([0.5, 0.9, 0.5, 0.9, 0.1], top_k=3) == [1, 3, 0]
    assert rank([0.2], top_k=10) == [0]


def test_scores_that_differ_only_in_float64_are_not_tied():
    s = logits_to_scores(np.array([[20.0], [20.5]]))
    assert s[1] > s[0] and rank(s) == [1, 0]
