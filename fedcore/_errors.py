"""Exceptions shared by every fedledger component.

The tree::

    FedledgerError                 root of everything fedledger raises on purpose
    ├── ConfigError                a config file is missing, unreadable or invalid (file, key)
    ├── WireError                  a message cannot be decoded (reason code)
    │   └── CodecError             a tensor payload is malformed (reason code)
    ├── SignatureError             a signature does not verify
    │   └── CertificateError       a signer's certificate is not vouched for (reason code)
    └── DecryptError               a sealed payload does not open with the gateway's key

Components add their own subtrees under ``FedledgerError`` (``gateway.GatewayError``,
``ledger.LedgerError``), so a command line can catch one type and print one line.
"""

from __future__ import annotations


class FedledgerError(Exception):
    """Root of every error fedledger raises on purpose."""


class ConfigError(FedledgerError):
    """A configuration file cannot be used.

    Carries the file and the dotted key at fault so the message can name both.
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file = file
        self.key = key
        self.detail = message
        where = ""
        if file:
            where = f"{file}: "
        if key:
            where += f"{key}: "
        super().__init__(f"{where}{message}")


class WireError(FedledgerError):
    """A message on the wire is malformed; ``reason`` is a short fixed code."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"{reason}: {message}")


class CodecError(WireError):
    """A tensor payload cannot be decoded."""


class SignatureError(FedledgerError):
    """A signature does not verify against the expected key."""


class CertificateError(SignatureError):
    """The certificate a frame carries is not acceptable; ``reason`` is a short fixed code
    (``bad_certificate``, ``subject_mismatch``, ``certificate_revoked``)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"{reason}: {message}")


class DecryptError(FedledgerError):
    """A sealed payload cannot be opened: another recipient key, or tampered bytes."""
