"""Upgrades: a configuration file of an earlier echod boots (its old settings migrated with
a warning naming the new one), `echod config migrate` rewrites it, and a setting that never
existed still fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from daemon import config, migrate
from daemon.cli import main as cli_main
from daemon.errors import ConfigError
from tests.conftest import ROOT, Echod

OLD = ROOT / "tests" / "configs" / "echod-a3f0b7e.toml"  # schema 1, as shipped then


@pytest.fixture
def old(tmp_path: Path) -> Path:
    return Path(shutil.copy(OLD, tmp_path / "echod.toml"))


def test_a_config_of_the_previous_schema_boots_with_a_warning_naming_the_new_key(
    run_echod: type[Echod], old: Path, tmp_path: Path
) -> None:
    e = run_echod(
        "run",
        "--config",
        str(old),
        "--frames",
        "5",
        "--pace",
        "none",
        "--mode",
        "all",
        "--set",
        f"paths.runtime_dir={tmp_path}/rt",
    )
    code, out = e.finish(timeout=120)
    assert code == 0, "".join(e.stderr)
    assert out.strip().splitlines()[-1].startswith("echod: 5 frames in = 5 out")
    warning = next(line for line in e.stderr if "source.synthetic.fps" in line)
    assert " WARNING " in warning and "'source.fps'" in warning
    assert f"echod config migrate {old}" in warning


def test_config_migrate_writes_the_migrated_file_and_keeps_the_old_one(
    old: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = old.read_text()
    assert cli_main(["config", "migrate", str(old)]) == 0
    said = capsys.readouterr().out
    assert "'source.synthetic.fps' was removed in schema 2" in said and "wrote" in said
    assert old.with_name("echod.toml.bak").read_text() == before
    text = old.read_text()
    assert "schema_version = 2" in text and "synthetic.fps" not in text.replace("[source", "")
    _, was, notes = migrate.upgrade(config._read_toml(old), str(old))
    assert (was, notes) == (2, [])  # loads as it is now: nothing left to migrate
    migrated, original = config.load(old), config.load(OLD)
    assert migrated == original  # the same settings, read either way
    assert cli_main(["config", "migrate", str(old)]) == 0
    assert "nothing to migrate" in capsys.readouterr().out


def test_migrate_to_another_file_leaves_the_old_one(old: Path, tmp_path: Path) -> None:
    before = old.read_text()
    out = tmp_path / "new.toml"
    assert cli_main(["config", "migrate", str(old), "--output", str(out)]) == 0
    assert old.read_text() == before and config.load(out) == config.load(old)


def test_a_setting_that_never_existed_still_fails(
    old: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old.write_text(old.read_text().replace("[model]\n", "[model]\nwarmpu = 2\n"))
    with pytest.raises(ConfigError, match=r"unknown setting 'model\.warmpu': did you mean"):
        config.load(old)
    before = old.read_text()
    assert cli_main(["config", "migrate", str(old)]) == 78
    assert "model.warmpu" in capsys.readouterr().err
    assert old.read_text() == before and not old.with_name("echod.toml.bak").exists()


def test_a_file_of_the_current_schema_is_not_migrated(tmp_path: Path) -> None:
    """An old name in a file that says it is schema 2 is simply unknown."""
    path = tmp_path / "echod.toml"
    path.write_text("schema_version = 2\n[source.synthetic]\nfps = 12.0\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'source\.synthetic\.fps'"):
        config.load(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("schema_version = 3\n", "newer than this echod knows"),
        ("schema_version = 'two'\n", "must be a whole number"),
        ("schema_version = 0\n", "must be a whole number"),
    ],
)
def test_a_schema_this_echod_does_not_know_is_one_line(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "echod.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        config.load(path)
    assert "\n" not in str(e.value)


def test_renamed_settings_move_and_a_clash_is_refused() -> None:
    """The rules a later schema lists (here a made-up schema 2 that renamed and removed)."""
    changes = {
        2: (
            migrate.Renamed("sink.every_s", "sink.status_interval_s"),
            migrate.Removed("sink.colour", "the display's colours come from the model card"),
        )
    }
    data = {"sink": {"every_s": 2.0, "colour": "red"}, "source": {"fps": 5.0}}
    out, was, notes = migrate.upgrade(data, "f.toml", changes)
    assert was == 1 and out["schema_version"] == 2
    assert out["sink"] == {"status_interval_s": 2.0} and out["source"] == {"fps": 5.0}
    assert "'sink.every_s' is now 'sink.status_interval_s'" in notes[0]
    assert "'sink.colour' was removed in schema 2: the display's colours" in notes[1]
    clash = {"sink": {"every_s": 2.0, "status_interval_s": 1.0}}
    with pytest.raises(ConfigError, match=r"keep 'sink\.status_interval_s' only"):
        migrate.upgrade(clash, "f.toml", changes)
