"""Device classes in firmware_configs/: every file validates, a bad one names its file and
key, and a task too big for a class is refused with a message naming the limit."""

from pathlib import Path

import numpy as np
import pytest

from fedcore import ConfigError, TaskSpec, init_params, model_payload
from fedcore._device_class import (
    DeviceBudgetError,
    DeviceClass,
    check_task_fits,
    f32_model_bytes,
    load_device_class,
)

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware_configs"
CLASSES = sorted(FIRMWARE.glob("*.toml"))

GOOD = """\
name = "{name}"
memory_mb = 512
memory_budget_mb = 100
cpu_cores = 4
max_model_params = 1_000_000
max_model_bytes = 4_194_304
codec = "topk-int8"
topk_fraction = 0.01
local_epochs = 2
batch_size = 16
"""


def task(kind="mlp", hidden=1536, n_features=64, n_classes=10) -> TaskSpec:
    return TaskSpec.model_validate(
        {
            "id": "digits-mlp",
            "model": {
                "kind": kind,
                "n_features": n_features,
                "n_classes": n_classes,
                "hidden": hidden,
            },
        }
    )


def test_the_four_device_classes_exist():
    assert {p.stem for p in CLASSES} >= {
        "raspberry-pi-zero-2w",
        "raspberry-pi-4",
        "raspberry-pi-5",
        "generic-arm64",
    }


@pytest.mark.parametrize("path", CLASSES, ids=lambda p: p.stem)
def test_every_device_class_validates(path):
    device_class = load_device_class(path)
    assert device_class.name == path.stem
    assert device_class.memory_budget_mb <= device_class.memory_mb
    assert device_class.max_model_bytes <= device_class.memory_budget_mb << 20
    # the benchmark model (digits MLP, 115,210 parameters) fits every class
    check_task_fits(device_class, task())


def test_pi_zero_2w_budget():
    zero = load_device_class(FIRMWARE / "raspberry-pi-zero-2w.toml")
    assert zero.memory_mb == 512 and zero.cpu_cores == 4
    assert zero.memory_budget_mb <= 100
    assert zero.codec.startswith("topk-") and zero.topk_fraction == pytest.approx(0.01)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_good_file_loads(tmp_path):
    path = write(tmp_path, "pi-test", GOOD.format(name="pi-test"))
    assert load_device_class(path).topk_fraction == 0.01


@pytest.mark.parametrize(
    ("old", "new", "key", "words"),
    [
        ('codec = "topk-int8"', 'codec = "zip"', "codec", "'int4'"),
        ("cpu_cores = 4", "cpu_cores = 4\ncolour = 1", "colour", "allowed: "),
        ("memory_budget_mb = 100", "memory_budget_mb = 1024", "memory_budget_mb", "memory_mb"),
        ("max_model_bytes = 4_194_304", "max_model_bytes = 500_000_000", "max_model_bytes", "MiB"),
        ("topk_fraction = 0.01\n", "", "topk_fraction", "required with codec"),
        ('codec = "topk-int8"', 'codec = "int8"', "topk_fraction", "only used by topk"),
        ("topk_fraction = 0.01", "topk_fraction = 1.5", "topk_fraction", "less than or equal"),
        ("batch_size = 16", 'batch_size = "16"', "batch_size", "integer"),
        ("local_epochs = 2\n", "", "local_epochs", "missing"),
        ("cpu_cores = 4", "cpu_cores = 0", "cpu_cores", "greater than or equal"),
    ],
)
def test_bad_file_names_file_and_key(tmp_path, old, new, key, words):
    text = GOOD.format(name="pi-test")
    assert old in text
    path = write(tmp_path, "pi-test", text.replace(old, new))
    with pytest.raises(ConfigError) as info:
        load_device_class(path)
    assert info.value.file == str(path)
    assert info.value.key == key
    message = str(info.value)
    assert str(path) in message and key in message and words in message


def test_name_must_match_file(tmp_path):
    path = write(tmp_path, "pi-test", GOOD.format(name="pi-other"))
    with pytest.raises(ConfigError) as info:
        load_device_class(path)
    assert info.value.key == "name" and "pi-test" in str(info.value)


def test_not_toml_names_file(tmp_path):
    path = write(tmp_path, "pi-test", "name = ")
    with pytest.raises(ConfigError) as info:
        load_device_class(path)
    assert info.value.file == str(path)


def test_too_many_parameters_is_refused():
    zero = load_device_class(FIRMWARE / "raspberry-pi-zero-2w.toml")
    big = task(hidden=20_000)  # 64*20000 + 20000 + 20000*10 + 10 = 1,500,010 parameters
    with pytest.raises(DeviceBudgetError) as info:
        check_task_fits(zero, big)
    error = info.value
    assert isinstance(error, ConfigError)
    assert error.key == error.limit == "max_model_params"
    assert error.device_class == "raspberry-pi-zero-2w"
    assert error.needed == 1_500_010 and error.allowed == zero.max_model_params
    message = str(error)
    for part in (
        "max_model_params",
        "digits-mlp",
        "1,500,010",
        "1,000,000",
        "raspberry-pi-zero-2w",
    ):
        assert part in message


def test_too_many_model_bytes_is_refused():
    small = DeviceClass.model_validate(
        {
            "name": "tiny",
            "memory_mb": 64,
            "memory_budget_mb": 16,
            "cpu_cores": 1,
            "max_model_params": 1_000_000,
            "max_model_bytes": 100_000,
            "codec": "int8",
            "local_epochs": 1,
            "batch_size": 8,
        }
    )
    check_task_fits(small, task(kind="logreg"))  # 650 parameters: fine
    with pytest.raises(DeviceBudgetError) as info:
        check_task_fits(small, task())
    assert info.value.limit == "max_model_bytes"
    assert "100,000 bytes" in str(info.value) and "tiny" in str(info.value)


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_f32_model_bytes_is_the_payload_size(kind):
    spec = task(kind=kind, hidden=37).model_spec()
    assert f32_model_bytes(spec) == len(model_payload(init_params(spec)))
    assert f32_model_bytes(spec) > 4 * spec.n_params()
    assert np.isclose(f32_model_bytes(spec), 4 * spec.n_params(), rtol=0.05)
