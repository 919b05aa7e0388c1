"""SIGHUP reloads what can change safely and says what it did not: the sorting of settings,
and a running daemon taking new client keys and roots without a restart (the signal itself,
with systemd's RELOADING/READY, is in tests/test_notify.py)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from daemon import config, reload
from daemon.ctl import CtlError
from daemon.supervisor import Supervisor
from tests.test_control import live, make_keys, runtime, until  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(180)


def test_settings_are_sorted_into_applied_and_not_reloaded() -> None:
    running = config.Config()
    wanted = config.load(
        None,
        {
            "logging.level": "DEBUG",
            "display.opacity": 0.5,
            "display.width": 640,  # a new window: restart
            "control.roots": ["/srv/echod"],
            "offline.max_queued": 7,
            "offline.workers": 3,  # processes: restart
            "source.fps": 12.0,
        },
    )
    p = reload.plan(running, wanted)
    assert p.apply == {
        "all": {"logging.level": "DEBUG"},
        "sink": {"display.opacity": 0.5},
        "control": {"control.roots": ["/srv/echod"]},
        "jobs": {"offline.max_queued": 7},
    }
    assert p.not_reloaded == ["source.fps", "offline.workers", "display.width"]
    assert p.config.display.opacity == 0.5 and p.config.display.width == running.display.width
    assert p.config.source.fps == running.source.fps  # what runs is what the config says
    assert reload.plan(running, running).apply == {}
    paused = running.model_copy(
        update={"source": running.source.model_copy(update={"paused": True})}
    )
    kept = reload.plan(paused, running)  # paused over the control socket: not the file's to undo
    assert kept.apply == {} and kept.not_reloaded == [] and kept.config.source.paused


class Daemon:
    """A supervisor in a thread that reads its configuration from a file, as `echod run`."""

    def __init__(self, path: Path, overrides: dict[str, Any]) -> None:
        def load() -> config.Config:
            return config.load(path, overrides)

        self.sup = Supervisor(load(), loader=load)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        until(lambda: self.sup.state == "running" or self.error is not None, 90)
        assert self.error is None, self.error

    def _run(self) -> None:
        try:
            self.sup.run()
        except BaseException as e:
            self.error = e

    def stop(self) -> None:
        self.sup.request_stop("test")
        self.thread.join(60)
        assert self.error is None, self.error


def test_a_reload_takes_new_client_keys_and_roots(
    runtime: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    from daemon.ctl import Client

    keys = make_keys(tmp_path / "keys")
    clients = tmp_path / "keys" / "clients"
    newcomer = keys["rogue"]  # not on the allow-list yet
    conf = tmp_path / "echod.toml"
    tcp = {
        "endpoint": "tcp://127.0.0.1:0",
        "telemetry_endpoint": "tcp://127.0.0.1:0",
        "server_key": str(keys["server_secret"]),
        "clients_dir": str(clients),
    }
    body = "schema_version = 2\n[control]\n" + "".join(f'{k} = "{v}"\n' for k, v in tcp.items())
    conf.write_text(body)
    d = Daemon(conf, live(runtime))
    endpoint = d.sup.control.endpoint
    try:
        refused = Client(endpoint, server_key=keys["server"], client_key=newcomer, timeout_s=1.0)
        with pytest.raises(CtlError):
            refused.call("ping")
        refused.close()
        public = newcomer.parent / "clients" / "control" / "rogue.key"  # `echod keys` put it
        shutil.copy(public, clients / "control" / "rogue.key")
        conf.write_text(body + f'roots = ["{tmp_path}"]\n')
        d.sup.request_reload()
        until(lambda: d.sup.config.control.roots == [str(tmp_path)], 30)
        welcome = Client(endpoint, server_key=keys["server"], client_key=newcomer, timeout_s=10)
        assert welcome.call("ping")["pong"]
        assert welcome.call("config.get", {"key": "control.roots"}) == [str(tmp_path)]
        welcome.close()
        conf.write_text("[control\n")  # broken: refused, and everything stays as it was
        d.sup.request_reload()
        ops = Client(endpoint, server_key=keys["server"], client_key=keys["ops"], timeout_s=10)
        until(lambda: d.sup._reload is None, 30)
        assert ops.call("status")["state"] == "running"
        assert d.sup.config.control.roots == [str(tmp_path)]
        ops.close()
    finally:
        d.stop()
