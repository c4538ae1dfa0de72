"""An agent config pointing at a sensor signal: windows shaped for the task's model."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent import load_agent_config
from edge_agent._run import local_data
from fedcore import ConfigError, ModelSpec, window_signal
from fedledger._datasets import synthetic_activity

CNN = ModelSpec(kind="cnn1d", n_features=32 * 3, n_classes=4, window=32, channels=3)


def _config(tmp_path, signal_section: str, data: str = "signal.npy"):
    path = tmp_path / "agent.toml"
    path.write_text(
        "[agent]\ndevice = 'd1'\nkey = 'k.pem'\ntask = 'task.toml'\n"
        f"data = '{data}'\ngateway_public_key = 'x'\nstate = 's.json'\n{signal_section}"
    )
    return path, load_agent_config(path)


@pytest.fixture
def files(tmp_path):
    signal, labels = synthetic_activity(2000, channels=3, seed=0)
    np.save(tmp_path / "signal.npy", signal)
    np.save(tmp_path / "labels.npy", labels)
    return signal, labels


def test_a_cnn1d_agent_windows_its_signal(tmp_path, files):
    signal, labels = files
    path, config = _config(tmp_path, "[agent.signal]\nlabels = 'labels.npy'\nmax_windows = 50\n")
    assert config.agent.signal.labels == tmp_path / "labels.npy"  # relative to the config
    x, y = local_data(config.agent, CNN, source=str(path))
    # The task's window; the stride defaults to half of it.
    ref_x, ref_y = window_signal(signal, labels, window=32, stride=16)
    np.testing.assert_array_equal(x, ref_x[-50:])
    np.testing.assert_array_equal(y, ref_y[-50:])


def test_a_dense_model_takes_windows_too(tmp_path, files):
    signal, labels = files
    mlp = ModelSpec(kind="mlp", n_features=8 * 3, n_classes=4)
    section = "[agent.signal]\nlabels = 'labels.npy'\nwindow = 8\nstride = 8\nlabel = 'majority'\n"
    path, config = _config(tmp_path, section)
    x, y = local_data(config.agent, mlp, source=str(path))
    ref_x, ref_y = window_signal(signal, labels, window=8, stride=8, label="majority")
    np.testing.assert_array_equal(x, ref_x)
    np.testing.assert_array_equal(y, ref_y)


def test_tables_stay_tables(tmp_path):
    np.savez(tmp_path / "data.npz", x=np.zeros((3, 96), np.float32), y=np.array([0, 1, 2]))
    path, config = _config(tmp_path, "", data="data.npz")
    x, y = local_data(config.agent, CNN, source=str(path))
    assert x.shape == (3, 96)


@pytest.mark.parametrize(
    ("section", "spec", "message"),
    [
        ("window = 16\n", CNN, "differs from the task's cnn1d window 32"),
        ("", ModelSpec(kind="logreg", n_features=6, n_classes=2), "required for a logreg task"),
        ("window = 4\n", ModelSpec(kind="logreg", n_features=6, n_classes=2), "does not divide"),
    ],
)
def test_signal_errors_name_the_key(tmp_path, files, section, spec, message):
    path, config = _config(tmp_path, f"[agent.signal]\nlabels = 'labels.npy'\n{section}")
    with pytest.raises(ConfigError, match=message) as caught:
        local_data(config.agent, spec, source=str(path))
    assert caught.value.key == "agent.signal.window"
    assert caught.value.file == str(path)


def test_unknown_signal_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key") as caught:
        _config(tmp_path, "[agent.signal]\nhop = 3\n")
    assert caught.value.key == "agent.signal.hop"
