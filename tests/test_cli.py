"""The command line a technician meets first: settings on it, typos, readable output, pipes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon import cli, config, ctl, human
from daemon.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def load(*argv: str) -> config.Config:
    """The configuration ``echod run ARGV`` would run with."""
    return config.load(None, *cli._overrides(cli._parser().parse_args(["run", *argv])))


# -- --set --------------------------------------------------------------------------------


def test_list_settings_take_commas_or_toml() -> None:
    # the advice of a path outside the roots, as written
    assert load("--set", "control.roots=/tmp/x").control.roots == ["/tmp/x"]
    assert load("--set", "control.roots=/srv/a,/srv/b").control.roots == ["/srv/a", "/srv/b"]
    assert load("--set", 'control.roots=["/srv/a", "/srv/b"]').control.roots == [
        "/srv/a",
        "/srv/b",
    ]
    assert load("--set", "control.roots=").control.roots == []
    assert load("--set", "source.igtl.max_shape=616,820").source.igtl.max_shape == (616, 820)
    # scalars and tables as before
    cfg = load("--set", "source.loop=true", "--set", "model.options={precision='fp16'}")
    assert cfg.source.loop is True and cfg.model.options == {"precision": "fp16"}
    assert ctl.parse_args("config.set", ["control.roots=/srv/a,/srv/b"]) == {
        "key": "control.roots",
        "value": ["/srv/a", "/srv/b"],
    }


def test_a_command_line_mistake_is_blamed_on_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load("--set", "source.fpss=30")
    msg = str(err.value)
    assert msg.startswith("--set source.fpss (command line): unknown setting 'source.fpss'")
    assert "echod.toml" not in msg and "did you mean 'source.fps'" in msg
    with pytest.raises(ConfigError, match=r"^--fps \(command line\): setting 'source\.fps'"):
        load("--fps", "-1")
    with pytest.raises(ConfigError, match=r"^--set source\.uri\.x \(command line\): no setting"):
        load("--set", "source.uri.x=1")
    bad = tmp_path / "echod.toml"
    bad.write_text("[source]\nfpss = 3\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: unknown setting 'source\.fpss'"):
        config.load(bad, *cli._overrides(cli._parser().parse_args(["run", "--fps", "3"])))


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "usage", "hint"),
    [
        (["run", "--sorce", "x.mha"], "usage: echod run", "did you mean --source?"),
        (["run", "--headles"], "usage: echod run", "did you mean --headless?"),
        (["run", "--frame", "3"], "usage: echod run", "did you mean --frames?"),
        (["ctl", "status", "--jsn"], "usage: echod ctl", "did you mean --json?"),
        (["engines", "--jsno"], "usage: echod engines", "did you mean --json?"),
    ],
)
def test_an_option_typo_gets_the_commands_usage_and_the_nearest_option(
    argv: list[str], usage: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith(usage) and hint in err.splitlines()[-1], err


def test_ctl_help_shows_the_timeout_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["ctl", "--help"])
    assert "seconds to wait for an answer (default: 5)" in " ".join(capsys.readouterr().out.split())


def test_a_closed_pipe_ends_quietly() -> None:
    """``echod engines | head -0``: the reader is gone before echod writes."""
    p = subprocess.Popen(
        [sys.executable, "-m", "daemon", "engines"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    p.stdout.close()
    _, err = p.communicate(timeout=120)
    assert p.returncode == 141, err  # 128 + SIGPIPE, as a program killed by the signal
    assert "Traceback" not in err and "BrokenPipe" not in err, err


# -- readable results ---------------------------------------------------------------------


def test_status_of_either_shape_reads_as_lines_and_a_stage_table() -> None:
    stages = {
        name: {"pid": 100 + i, "alive": True, "ready": True, "restarts": i}
        for i, name in enumerate(("acquire", "infer", "sink"))
    }
    old = {
        "state": "running",
        "source": "recording tank.igs.mha (201 frames)",
        "stages": stages,
        "latency_ms": {"p50": 12.345, "p99": 30.0},
        "dropped": 3,
        "engine": "onnxruntime",
        "load": [0.5, 0.25],
    }
    lines = human.render(old).splitlines()
    assert "source      recording tank.igs.mha (201 frames)" in lines
    assert "latency_ms  p50=12.35 p99=30" in lines and "load        0.5, 0.25" in lines
    at = lines.index("stages:")
    assert lines[at + 1].split() == ["STAGE", "PID", "ALIVE", "READY", "RESTARTS"]
    assert lines[at + 3].split() == ["infer", "101", "yes", "yes", "1"]
    new = {
        **old,
        "state": "paused",
        "source": {"description": "igtl://us:18944", "state": "streaming", "reconnects": 2},
        "dropped": {"infer": 3},
        "skipped": {"display": 120, "igtl_out": 4},
    }
    text = human.render(new)
    assert "source      description=igtl://us:18944 state=streaming reconnects=2" in text
    assert "dropped     infer=3" in text and "skipped     display=120 igtl_out=4" in text
    assert ctl._brief({"state": "running", "fps": 29.97, "dropped": {"infer": 3}}).endswith(
        "dropped infer=3"
    )


def test_a_model_card_is_a_few_lines_not_one_value_per_line() -> None:
    card = {
        "engine": "onnxruntime",
        "model": "ultrasound-seg.onnx",
        "input": {"name": "image", "shape": [None, 1, 256, 256], "layout": "NCHW"},
        "classes": [
            {"name": "background", "colour": [0, 0, 0], "opacity": 0.0},
            {"name": "artery", "colour": [230, 25, 75], "opacity": 0.45},
        ],
        "engine_skipped": [],
    }
    lines = human.render(card).splitlines()
    assert "input           name=image shape=-,1,256,256 layout=NCHW" in lines
    assert "engine_skipped  -" in lines
    assert lines[-3:] == [
        "NAME        COLOUR     OPACITY",
        "background  0,0,0      0",
        "artery      230,25,75  0.45",
    ]
