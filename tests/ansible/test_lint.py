"""The playbooks and roles stay ansible-lint clean (production profile) and every role
declares its options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"
BIN = Path(sys.executable).parent


def test_ansible_lint_production_profile_passes():
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", NO_COLOR="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        [str(BIN / "ansible-lint"), "--profile", "production"],
        cwd=ANSIBLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_every_role_default_is_prefixed_and_declared():
    roles = sorted(p for p in (ANSIBLE / "roles").iterdir() if p.is_dir())
    assert {r.name for r in roles} >= {"pki", "mosquitto", "gateway", "edge_agent", "monitoring"}
    for role in roles:
        defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
        specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
        options = specs["argument_specs"]["main"]["options"]
        for name in defaults:
            assert name.startswith(f"{role.name}_"), f"{role.name}: {name} lacks the role prefix"
            assert name in options, f"{role.name}: {name} is not in meta/argument_specs.yml"
        for template in (role / "templates").rglob("*.j2") if (role / "templates").exists() else ():
            first = template.read_text().splitlines()[0]
            assert first == "{{ ansible_managed | comment }}", template


def test_site_playbook_has_one_playbook_per_group():
    site = yaml.safe_load((ANSIBLE / "site.yml").read_text())
    imported = [entry["ansible.builtin.import_playbook"] for entry in site]
    assert imported == ["brokers.yml", "gateways.yml", "edge_devices.yml", "monitoring.yml"]
    inventory = yaml.safe_load((ANSIBLE / "inventory/hospital/hosts.yml").read_text())
    groups = set(inventory["all"]["children"])
    assert groups == {"brokers", "gateways", "edge_devices", "monitoring"}
