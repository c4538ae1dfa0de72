"""docs/configuration.md is what the config models say, and the command that writes it is
safe to point anywhere."""

from __future__ import annotations

import enum
import itertools
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

from fedcore import StrictModel, UnsafePathError
from fedledger._reference import (
    COMMAND,
    MARKER,
    _wrap,
    config_files,
    render,
    sections,
    write_reference,
)

ROOT = Path(__file__).parents[1]
REFERENCE = ROOT / "docs" / "configuration.md"
FEDLEDGER = [sys.executable, "-m", "fedledger"]


def run(*args, cwd=None):
    return subprocess.run([*FEDLEDGER, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


# ---------------------------------------------------------------- the committed reference
def test_the_committed_reference_is_a_fresh_generation():
    fresh = render().encode("utf-8")
    assert REFERENCE.read_bytes() == fresh, (
        f"docs/configuration.md differs from the config models; regenerate it: {COMMAND}"
        " (or make reference)"
    )


def _models(model: type[BaseModel], seen: dict[str, type[BaseModel]]) -> None:
    """``model`` and every model its fields hold (sections, optional sections, tables)."""
    seen[model.__qualname__] = model
    pending = [f.annotation for f in model.model_fields.values()]
    while pending:
        annotation = pending.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation.__qualname__ not in seen:
                _models(annotation, seen)
        else:
            pending += typing.get_args(annotation)


def test_every_field_of_every_model_has_a_description():
    seen: dict[str, type[BaseModel]] = {}
    for f in config_files():
        _models(f.model, seen)
    assert {"TaskSpec", "ModelSection", "DPSection", "BrokerSection", "SignalSection",
            "RegistryEntry", "PeerSection", "DeviceClass"} <= set(seen)  # fmt: skip
    missing = [
        f"{model.__module__}.{name}.{field}"
        for name, model in sorted(seen.items())
        for field, info in model.model_fields.items()
        if not (info.description or "").strip()
    ]
    assert missing == [], f"fields without Field(description=...): {missing}"


def test_every_key_is_in_the_reference():
    text = REFERENCE.read_text()
    for f in config_files():
        assert f"## `{f.file}`" in text
        for section in sections(f.model):
            for key in section.keys:
                assert f"- `{key.name}` (" in text, (f.file, section.path, key.name)


def test_the_reference_reads_at_100_columns():
    for number, line in enumerate(REFERENCE.read_text().splitlines(), 1):
        assert len(line) <= 100 or " " not in line.strip(), f"line {number} is {len(line)} long"


BLOCK_START = re.compile(r"([-+*>#]|\d+[.)])( |$)")


def test_a_wrapped_line_never_opens_a_block():
    """Markdown reads block structure before code spans: a wrapped line starting with
    ``- `` would start a list even inside a code span."""
    assert not any(BLOCK_START.match(line) for line in _wrap("a" * 99 + " - b"))
    assert not any(BLOCK_START.match(line) for line in _wrap("a" * 99 + " 1. b"))
    assert _wrap("a" * 99 + " - b")[0].endswith(" -")
    lines = REFERENCE.read_text().splitlines()
    for before, line in itertools.pairwise(lines):
        if before.strip() and not line.startswith(("- `", "- [")):  # a paragraph goes on
            assert not BLOCK_START.match(line.lstrip()), line


# ---------------------------------------------------------------- the generator
class Colour(enum.Enum):
    red = "red"
    blue = "blue"


class Inner(StrictModel):
    size: Annotated[int, Field(ge=1, le=10)] = Field(3, description="How big.")
    tags: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=2)] = Field(
        description="Labels - two or more."
    )


class Outer(StrictModel):
    name: Annotated[str, Field(pattern=r"^[a-z]+$")] = Field(description="A name.")
    mode: Literal["a", "b"] = Field("a", description="Which mode.")
    colour: Colour = Field(Colour.red, description="A colour.")
    ratio: Annotated[float, Field(gt=0, lt=1)] | None = Field(None, description="A share.")
    limits: dict[str, float | int] = Field(default_factory=dict, description="Some limits.")
    big: int = Field(1 << 20, description="Bytes.")
    inner: Inner = Field(description="The inner part.")
    maybe: Inner | None = Field(None, description="Present: more.")
    named: dict[Annotated[str, Field(title="thing id")], Inner] = Field(
        default_factory=dict, description="Things by id."
    )


def test_each_shape_of_field_is_described():
    found = {s.path: s for s in sections(Outer)}
    assert list(found) == [(), ("inner",), ("maybe",), ("named", "<thing id>")]
    top = {k.name: k for k in found[()].keys}
    assert (top["name"].type, top["name"].constraint, top["name"].required) == (
        "string", "matching `^[a-z]+$`", True,
    )  # fmt: skip
    assert (top["mode"].constraint, top["mode"].default) == ('one of `"a"`, `"b"`', '"a"')
    assert (top["colour"].constraint, top["colour"].default) == (
        'one of `"red"`, `"blue"`', '"red"',
    )  # fmt: skip
    assert (top["ratio"].type, top["ratio"].constraint, top["ratio"].default) == (
        "float", "> 0, < 1", None,
    )  # fmt: skip
    assert (top["limits"].type, top["limits"].default) == ("table of float or integer", "{}")
    assert top["big"].default == "1_048_576"
    inner = {k.name: k for k in found[("inner",)].keys}
    assert (inner["size"].constraint, inner["size"].default) == ("1 to 10", "3")
    assert inner["tags"].type == "array of string"
    assert inner["tags"].constraint == "at least 2 items, each at least 1 character"
    assert found[("inner",)].required and not found[("maybe",)].required
    assert (
        found[("named", "<thing id>")].description
        == "Things by id. One entry per thing id (a string)."
    )


def test_a_rendered_key_keeps_its_description_on_its_own_lines():
    from fedledger._reference import ConfigFile

    text = render([ConfigFile("outer", "outer.toml", "toml", Outer, render, "Test.")])
    assert "### `[named.<thing id>]`" in text
    assert "- `tags` (array of string, at least 2 items, each at least 1 character; required):" in text  # fmt: skip


def test_a_field_without_description_or_of_an_unknown_type_is_refused():
    class Bare(StrictModel):
        x: int = 1

    class Odd(StrictModel):
        x: set[int] = Field(default_factory=set, description="A set.")

    with pytest.raises(ValueError, match="Bare.x has no description"):
        sections(Bare)
    with pytest.raises(TypeError, match="cannot describe"):
        sections(Odd)


# ---------------------------------------------------------------- the command
def test_the_command_prints_the_reference():
    done = run("config", "reference")
    assert done.returncode == 0, done.stderr
    assert done.stdout == REFERENCE.read_text()
    for known in ("`quorum`", "### `[gateway]`", "### `[agent.signal]`", "`certificate_sha256`"):
        assert known in done.stdout


def test_the_command_prints_one_file_or_json():
    done = run("config", "reference", "--file", "task")
    assert done.returncode == 0 and "`quorum`" in done.stdout
    assert "gateway_public_key" not in done.stdout
    data = json.loads(run("config", "reference", "--file", "registry", "--json").stdout)
    (registry,) = data["files"]
    assert registry["file"] == "registry.json" and registry["model"] == "gateway.RegistryFile"
    (devices,) = registry["sections"]
    assert devices["path"] == "devices.<device id>"
    assert [k["name"] for k in devices["keys"]] == ["public_key", "certificate_sha256"]


def test_the_help_explains_the_command():
    done = run("config", "reference", "--help")
    assert done.returncode == 0 and "Usage" in done.stdout
    for word in ("--file", "--out", "--json", "docs/configuration.md", "registry.json"):
        assert word in done.stdout


def test_the_files_the_command_offers_are_the_files_described():
    from fedledger.cli import ConfigFileName

    assert [n.value for n in ConfigFileName] == [f.name for f in config_files()]


def test_out_writes_then_reports_up_to_date(tmp_path):
    out = tmp_path / "docs" / "configuration.md"
    done = run("config", "reference", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["changed"] is True
    assert out.read_text() == REFERENCE.read_text()
    stamp = out.stat().st_mtime_ns
    again = run("config", "reference", "--out", str(out), "--json")
    assert json.loads(again.stdout)["changed"] is False and out.stat().st_mtime_ns == stamp
    out.write_text(MARKER + "\n\nan older reference\n")
    assert run("config", "reference", "--out", str(out)).returncode == 0
    assert out.read_text() == REFERENCE.read_text()
    assert [p.name for p in out.parent.iterdir()] == ["configuration.md"]  # no temp file left


def test_out_never_replaces_a_file_it_did_not_write(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n\nthree years of work\n")
    done = run("config", "reference", "--out", str(notes))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(notes) in lines[0]
    assert "not a configuration reference fedledger wrote" in lines[0]
    assert notes.read_text() == "# my notes\n\nthree years of work\n"


def test_out_refuses_a_folder_and_a_symbolic_link(tmp_path):
    with pytest.raises(UnsafePathError, match="is a folder"):
        write_reference(tmp_path, render())
    target = tmp_path / "elsewhere.md"
    target.write_text(render())
    link = tmp_path / "link.md"
    os.symlink(target, link)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        write_reference(link, render())
    assert link.is_symlink()
