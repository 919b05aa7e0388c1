"""Configuration: the shipped file, validation messages, command-line overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import config
from daemon.errors import ConfigError


def test_shipped_file_documents_every_setting_with_its_default() -> None:
    shipped = config.DEFAULT_CONFIG.read_text()
    assert shipped == config.to_toml(config.Config()), "regenerate: echod config --defaults"
    assert config.load() == config.Config()


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "echod.toml"
    p.write_text(text)
    return p


def test_unknown_key_names_the_field_and_the_nearest_valid_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, "[source]\nfpss = 30.0\n"))
    msg = str(e.value)
    assert "source.fpss" in msg and "did you mean 'source.fps'" in msg
    assert "\n" not in msg


def test_unknown_table_suggests_the_nearest_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'pipeline'"):
        config.load(write(tmp_path, "[pipelin]\nmode = 'all'\n"))


def test_wrong_type_names_field_rule_and_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, '[source]\nfps = "fast"\n'))
    msg = str(e.value)
    assert "source.fps" in msg and "'fast'" in msg and "number" in msg


def test_out_of_range_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pipeline\.ring_slots.*greater than or equal to 2"):
        config.load(write(tmp_path, "[pipeline]\nring_slots = 1\n"))


@pytest.mark.parametrize("value", ["-3", "100001", '"fast"', "true", "2.5"])
def test_spin_us_takes_microseconds_or_auto(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"'pipeline\.spin_us' must be 0 to 100000 \(us\)"):
        config.load(write(tmp_path, f"[pipeline]\nspin_us = {value}\n"))
    assert config.load(None, {"pipeline.spin_us": 250}).pipeline.spin_us == 250
    assert config.load(None, {"pipeline.spin_us": "auto"}).pipeline.spin_us == "auto"


def test_choice_suggests_nearest_option() -> None:
    with pytest.raises(ConfigError, match="did you mean 'newest'"):
        config.load(None, {"pipeline.mode": "newst"})


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[source\n"))
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.toml")


def test_overrides_apply_on_top_of_the_file(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "[source]\nfps = 12.5\n"), {"pipeline.mode": "all"})
    assert cfg.source.fps == 12.5 and cfg.pipeline.mode == "all"


def test_paths_follow_systemd_directories(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/echod:/other")
    assert config.Config().paths.cache() == Path("/var/cache/echod")
    assert config.load(None, {"paths.cache_dir": "/x"}).paths.cache() == Path("/x")


@pytest.mark.parametrize("kind", ["random bytes", "folder", "nested 5,000 deep", "unreadable"])
def test_a_config_that_is_no_toml_file_is_one_line_and_exit_78(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import random

    from daemon.cli import main as cli_main

    path = tmp_path / "echod.toml"
    if kind == "random bytes":
        path.write_bytes(random.Random(11).randbytes(4096))
    elif kind == "folder":
        path.mkdir()
    elif kind == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads any file")
        path.write_text("[source]\n")
        path.chmod(0)
    else:
        path.write_text("[source]\nuri = " + "[" * 5000 + "]" * 5000 + "\n")
    assert cli_main(["run", "--config", str(path), "--headless"]) == 78
    err = capsys.readouterr().err
    assert err.startswith(f"echod: error: config file {path} ") and err.count("\n") == 1, err
