import stat

import pytest

from fedcore import (
    ConfigError,
    SignatureError,
    generate_key,
    load_private_key,
    load_public_key,
    public_key_b64,
    save_private_key,
    signer_from_key,
    verify_signature,
)


def test_private_key_file_is_owner_only_and_round_trips(tmp_path):
    key = generate_key()
    path = tmp_path / "keys" / "device.pem"
    save_private_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_private_key(path)
    assert public_key_b64(again) == public_key_b64(key)


def test_sign_and_verify():
    key = generate_key()
    sig = signer_from_key(key)(b"message")
    verify_signature(load_public_key(public_key_b64(key)), sig, b"message")
    with pytest.raises(SignatureError):
        verify_signature(key.public_key(), sig, b"messagE")


@pytest.mark.parametrize("bad", ["", "not base64!", "AAAA"])
def test_bad_public_keys(bad):
    with pytest.raises(ValueError):
        load_public_key(bad)


def test_unreadable_private_key_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.pem: cannot read private key"):
        load_private_key(tmp_path / "missing.pem")
    (tmp_path / "bad.pem").write_text("junk")
    with pytest.raises(ConfigError, match="bad.pem: not an unencrypted PEM private key"):
        load_private_key(tmp_path / "bad.pem")
