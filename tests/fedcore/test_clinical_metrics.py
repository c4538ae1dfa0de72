"""Clinical metrics of a model against hand-computed values.

The models here are logistic regressions whose logits are the inputs (identity weights,
zero biases), so each row's scores, predictions and probabilities are chosen by hand.
"""

import numpy as np
import pytest

from fedcore import (
    DP_METRICS,
    MAX_CLASS_RECALLS,
    MAX_METRICS,
    ModelSpec,
    TaskSpec,
    accuracy,
    clinical_metrics,
    load_task,
)


def identity_model(n_classes: int) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """Logits equal the inputs: ``n_classes`` features, identity weights, zero biases."""
    spec = ModelSpec(kind="logreg", n_features=n_classes, n_classes=n_classes)
    params = {
        "w": np.eye(n_classes, dtype=np.float32),
        "b": np.zeros(n_classes, dtype=np.float32),
    }
    return spec, params


def binary_rows(scores) -> np.ndarray:
    """Rows whose class-1 logit is ``score`` and class-0 logit 0: P(class 1) = sigmoid(score)."""
    scores = np.asarray(scores, dtype=np.float32)
    return np.stack([np.zeros_like(scores), scores], axis=1)


# Four patients with the condition (class 1), six without (class 0).
Y_BINARY = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
SCORES = [3.0, 2.0, 1.0, -0.5, 1.5, -0.5, -1.5, -2.0, -3.0, -4.0]

# Three classes, two rows each; a row's logits are its inputs.
X_THREE = np.array(
    [
        [2.0, 0.0, 0.0],  # class 0, predicted 0
        [0.0, 1.0, 0.0],  # class 0, predicted 1
        [0.0, 2.0, 0.0],  # class 1, predicted 1
        [0.0, 1.5, 1.0],  # class 1, predicted 1
        [0.0, 0.0, 2.0],  # class 2, predicted 2
        [1.0, 0.0, 0.5],  # class 2, predicted 0
    ],
    dtype=np.float32,
)
Y_THREE = np.array([0, 0, 1, 1, 2, 2])


def test_binary_metrics_match_the_confusion_matrix():
    spec, params = identity_model(2)
    x = binary_rows(SCORES)
    got = clinical_metrics(spec, params, x, Y_BINARY)
    # Predicted positive when the score is > 0: TP 3, FN 1 (the -0.5), FP 1 (the 1.5), TN 5.
    assert got["sensitivity"] == pytest.approx(3 / 4)
    assert got["specificity"] == pytest.approx(5 / 6)
    assert got["recall_1"] == got["sensitivity"] and got["recall_0"] == got["specificity"]
    assert got["balanced_accuracy"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    # AUC: of the 4 x 6 (ill, healthy) pairs, the ill one scores higher in 21, ties in one
    # (-0.5 and -0.5, counted half): 21.5 / 24.
    assert got["auc"] == pytest.approx(43 / 48)
    assert set(got) == {
        "balanced_accuracy", "auc", "sensitivity", "specificity", "recall_0", "recall_1",
    }  # fmt: skip
    # Accuracy alone hides the missed patient: 8 of 10 right.
    assert accuracy(spec, params, x, Y_BINARY) == pytest.approx(0.8)


def test_the_positive_class_names_which_recall_is_the_sensitivity():
    """A data set whose condition is class 0 (breast cancer: malignant 0, benign 1)."""
    spec, params = identity_model(2)
    x = binary_rows(SCORES)
    got = clinical_metrics(spec, params, x, Y_BINARY, positive=0)
    assert got["sensitivity"] == pytest.approx(5 / 6) and got["specificity"] == pytest.approx(3 / 4)
    assert got["auc"] == pytest.approx(43 / 48)  # the same ranking either way


def test_a_task_names_its_positive_class_only_for_two_classes(tmp_path):
    from fedledger import TaskOptions, load_dataset, provision

    base = {"id": "t", "model": {"kind": "logreg", "n_features": 2, "n_classes": 2}}
    assert TaskSpec.model_validate({**base, "positive_class": 0}).positive_class == 0
    three = {"id": "t", "model": {"kind": "logreg", "n_features": 2, "n_classes": 3}}
    with pytest.raises(ValueError, match="two-class tasks only"):
        TaskSpec.model_validate({**three, "positive_class": 0})
    # the bundled breast cancer site finds malignant tumours (class 0)
    layout = provision(
        tmp_path / "site", load_dataset("breast_cancer", seed=0), devices=2, alpha=1.0, seed=0,
        options=TaskOptions(), broker_host="127.0.0.1", broker_port=1,
    )  # fmt: skip
    assert load_task(layout.task).positive_class == 0


def test_binary_metrics_agree_with_scikit_learn_on_random_scores(rng):
    from sklearn.metrics import balanced_accuracy_score, recall_score, roc_auc_score

    spec, params = identity_model(2)
    x = rng.normal(size=(200, 2)).astype(np.float32)
    y = (x[:, 1] - x[:, 0] + rng.normal(size=200) > 0).astype(np.int64)
    got = clinical_metrics(spec, params, x, y)
    predicted = (x[:, 1] > x[:, 0]).astype(np.int64)
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, predicted))
    assert got["sensitivity"] == pytest.approx(recall_score(y, predicted, pos_label=1))
    assert got["specificity"] == pytest.approx(recall_score(y, predicted, pos_label=0))
    assert got["auc"] == pytest.approx(roc_auc_score(y, x[:, 1] - x[:, 0]))


def test_three_classes_give_per_class_recall_and_macro_one_vs_rest_auc():
    from sklearn.metrics import roc_auc_score

    spec, params = identity_model(3)
    got = clinical_metrics(spec, params, X_THREE, Y_THREE)
    assert set(got) == {"balanced_accuracy", "auc", "recall_0", "recall_1", "recall_2"}
    assert (got["recall_0"], got["recall_1"], got["recall_2"]) == (0.5, 1.0, 0.5)
    assert got["balanced_accuracy"] == pytest.approx(2 / 3)
    # One vs rest, each class's two rows against the other four: 4 + 3 of 8 pairs ranked
    # right for every class (the second row of each loses to one row of another class).
    assert got["auc"] == pytest.approx(7 / 8)
    logits = X_THREE.astype(np.float64)
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert got["auc"] == pytest.approx(roc_auc_score(Y_THREE, prob, multi_class="ovr"))


def test_a_class_missing_from_the_data_leaves_its_metrics_out():
    spec, params = identity_model(2)
    only_ill = Y_BINARY[:4]
    got = clinical_metrics(spec, params, binary_rows(SCORES[:4]), only_ill)
    # No healthy patient: no specificity, no recall of class 0, no AUC (nothing to rank against)
    assert got == {"balanced_accuracy": 0.75, "sensitivity": 0.75, "recall_1": 0.75}

    spec, params = identity_model(3)
    got = clinical_metrics(spec, params, X_THREE[:4], Y_THREE[:4])  # no class 2
    assert set(got) == {"balanced_accuracy", "auc", "recall_0", "recall_1"}
    assert got["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    # Class 0 ranks both its rows above class 1's (1.0), class 1 wins 3 of 4 pairs (0.75).
    assert got["auc"] == pytest.approx((1.0 + 0.75) / 2)

    got = clinical_metrics(spec, params, X_THREE[2:4], Y_THREE[2:4])  # class 1 alone
    assert got == {"balanced_accuracy": 1.0, "recall_1": 1.0}


def test_no_data_gives_no_metrics():
    spec, params = identity_model(2)
    assert clinical_metrics(spec, params, np.zeros((0, 2), np.float32), np.zeros(0)) == {}


def test_many_classes_record_no_per_class_recall_and_fit_a_round_record(rng):
    n = MAX_CLASS_RECALLS + 1
    spec, params = identity_model(n)
    y = np.arange(4 * n) % n
    x = rng.normal(size=(len(y), n)).astype(np.float32)
    got = clinical_metrics(spec, params, x, y)
    assert set(got) == {"balanced_accuracy", "auc"}

    spec, params = identity_model(MAX_CLASS_RECALLS)
    y = np.arange(4 * MAX_CLASS_RECALLS) % MAX_CLASS_RECALLS
    x = rng.normal(size=(len(y), MAX_CLASS_RECALLS)).astype(np.float32)
    got = clinical_metrics(spec, params, x, y)
    assert {f"recall_{k}" for k in range(MAX_CLASS_RECALLS)} <= set(got)
    # The largest round record: accuracy, these, a DP task's metrics, FedBuff's staleness
    # and a robust rule's counts.
    largest = {"accuracy", *got, *DP_METRICS, "staleness_mean", "staleness_max"}
    largest |= {"updates_dropped", "updates_clipped"}
    assert len(largest) <= MAX_METRICS
