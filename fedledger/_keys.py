"""Ed25519 signing keys kept beside the CA, for deployments that provision every identity
from one control node (the Ansible ``pki`` role): updates and global models are signed with
these, while the certificates of the same names carry mutual TLS."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedcore import generate_key, load_private_key, public_key_b64, save_private_key
from fedcore.pki import PkiError, ca_cert_path


@dataclass(frozen=True)
class SigningKey:
    name: str
    key: Path
    public_key: str
    created: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "key": str(self.key),
            "public_key": self.public_key,
            "changed": self.created,
        }


def signing_key_path(directory: str | os.PathLike[str], name: str) -> Path:
    return Path(directory) / "signing" / f"{name}.pem"


def ensure_signing_key(directory: str | os.PathLike[str], name: str) -> SigningKey:
    """Create NAME's key (0600) unless it exists; either way report its public key, so that
    running it twice changes nothing and a registry can be built from the output."""
    if not name or "/" in name or name.startswith("."):
        raise PkiError(f"not a valid name: {name!r}")
    if not ca_cert_path(directory).exists():
        raise PkiError(f"no CA in {directory}: run 'fedledger pki init' first")
    path = signing_key_path(directory, name)
    created = not path.exists()
    if created:
        save_private_key(generate_key(), path)
    return SigningKey(name, path, public_key_b64(load_private_key(path)), created)
