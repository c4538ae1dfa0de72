import numpy as np
import pytest

from fedcore import (
    ConfigError,
    ModelSpec,
    accuracy,
    device_from_topic,
    init_params,
    load_local_data,
    load_task,
    model_hash,
    model_topic,
    presence_topic,
    train,
    update_topic,
)


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_training_learns(task, dataset, kind):
    spec = ModelSpec.from_dict({**task.model_spec().to_dict(), "kind": kind})
    params = init_params(spec)
    before = accuracy(spec, params, dataset.x_test, dataset.y_test)
    after_params = train(
        spec, params, dataset.x_train, dataset.y_train, epochs=5, batch_size=16, lr=0.1, seed=0
    )
    after = accuracy(spec, after_params, dataset.x_test, dataset.y_test)
    assert after > 0.9 and after > before
    assert model_hash(params) == model_hash(
        init_params(spec)
    )  # inputs untouched, init deterministic


def test_spec_validation():
    with pytest.raises(ValueError):
        ModelSpec(kind="cnn", n_features=3, n_classes=2)
    with pytest.raises(ValueError):
        ModelSpec(kind="logreg", n_features=3, n_classes=2, feature_mean=(1.0,))


def test_topics():
    assert update_topic("t", "d1") == "fedledger/v1/t/update/d1"
    assert device_from_topic(update_topic("t", "d1"), "t") == "d1"
    assert device_from_topic(presence_topic("t", "d1"), "t") == "d1"
    assert device_from_topic(update_topic("t", "d1"), "other") is None
    assert device_from_topic("fedledger/v1/t/update/a/b", "t") is None
    assert device_from_topic(model_topic("t"), "t") is None


def test_task_file_errors_name_file_and_key(tmp_path):
    path = tmp_path / "task.toml"
    path.write_text("id = 'a b'\n[model]\nkind = 'logreg'\nn_features = 3\nn_classes = 2\n")
    with pytest.raises(ConfigError, match=r"task.toml: id: String should match pattern"):
        load_task(path)
    path.write_text(
        "id = 'x'\nrounds = 0\n[model]\nkind = 'logreg'\nn_features = 3\nn_classes = 2\n"
    )
    with pytest.raises(
        ConfigError, match=r"task.toml: rounds: Input should be greater than or equal to 1"
    ):
        load_task(path)
    path.write_text(
        "id = 'x'\n[model]\nkind = 'logreg'\nn_features = 3\nn_classes = 2\nfeature_mean = [1.0]\n"
    )
    with pytest.raises(
        ConfigError,
        match=r"task.toml: model.feature_mean: feature_mean has 1 values for 3 features",
    ):
        load_task(path)
    # An optional section lists its keys too.
    path.write_text(
        "id = 'x'\n[model]\nkind = 'logreg'\nn_features = 3\nn_classes = 2\n"
        "[asynchronous]\nbufer = 3\n"
    )
    with pytest.raises(
        ConfigError,
        match=r"asynchronous.bufer: unknown key \(allowed: buffer, max_staleness,"
        r" staleness_exponent\)",
    ):
        load_task(path)


def test_local_data_formats(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((4, 3)), y=np.array([0, 1, 0, 1]))
    x, y = load_local_data(tmp_path / "d.npz")
    assert x.shape == (4, 3) and x.dtype == np.float32 and y.tolist() == [0, 1, 0, 1]
    (tmp_path / "d.csv").write_text("a,b,label\n1,2,0\n3,4,1\n")
    x, y = load_local_data(tmp_path / "d.csv")
    assert x.tolist() == [[1, 2], [3, 4]] and y.tolist() == [0, 1]
    (tmp_path / "nan.csv").write_text("1,nan,0\n")
    with pytest.raises(ConfigError, match="nan.csv: features hold NaN"):
        load_local_data(tmp_path / "nan.csv")
    with pytest.raises(ConfigError, match="none.npz: file not found"):
        load_local_data(tmp_path / "none.npz")
    (tmp_path / "d.txt").write_text("")
    with pytest.raises(ConfigError, match="must be a .npz or .csv"):
        load_local_data(tmp_path / "d.txt")


def test_topic_device_with_newline_is_not_a_device():
    assert device_from_topic("fedledger/v1/t/update/d1\n", "t") is None


def test_fedprox_term_keeps_local_training_near_the_global_model(task, dataset):
    spec = task.model_spec()
    start = init_params(spec)
    # a device that only has one class: plain SGD drifts far, FedProx much less
    idx = dataset.y_train == 1
    x, y = dataset.x_train[idx][:40], dataset.y_train[idx][:40]
    plain = train(spec, start, x, y, epochs=20, batch_size=8, lr=0.1, seed=0)
    prox = train(spec, start, x, y, epochs=20, batch_size=8, lr=0.1, seed=0, prox_mu=1.0)

    def drift(p):
        return sum(float(np.sum((p[k] - start[k]) ** 2)) for k in start)

    assert drift(prox) < 0.5 * drift(plain)
    assert (
        train(spec, start, x, y, epochs=1, batch_size=8, lr=0.1, seed=0, prox_mu=0.0)["w"].tolist()
        == train(spec, start, x, y, epochs=1, batch_size=8, lr=0.1, seed=0)["w"].tolist()
    )
