"""Typed configuration: ``config/echod.toml`` and command-line overrides.

Validation happens once, at load. A mistake becomes one :class:`ConfigError`
line naming the field, the rule, the value received and, for unknown names,
the nearest valid one.
"""

from __future__ import annotations

import difflib
import logging
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

from daemon import migrate
from daemon.acquire.igtl import IgtlSettings
from daemon.acquire.synthetic import SyntheticSettings
from daemon.compat import tomllib
from daemon.dicom.settings import DicomConfig
from daemon.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "echod.toml"

log = logging.getLogger(__name__)


class Section(BaseModel):
    """A configuration table: unknown keys are errors, values are not coerced loosely."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


NO_SOURCE = "none"


class SourceConfig(Section):
    uri: str = Field(
        "synthetic",
        description="'synthetic', igtl://HOST:PORT[/DEVICE] (a scanner), a recording "
        "(.mha/.mhd, .dcm, .nrrd), a folder of images, or 'none' (no live pipeline: a "
        "workstation that only takes offline jobs)",
    )
    pace: Literal["timestamps", "fps", "none"] = Field(
        "timestamps", description="release frames by recorded timestamps, at `fps`, or at once"
    )
    fps: float = Field(
        30.0,
        gt=0,
        le=10_000,
        description="frames per second for pace = 'fps', and the rate of sources without "
        "timestamps (synthetic phantom, image folders)",
    )
    loop: bool = Field(False, description="replay the recording forever")
    frames: int = Field(0, ge=0, description="stop after this many frames (0 = no limit)")
    paused: bool = Field(False, description="start paused; resume over the control socket")
    synthetic: SyntheticSettings = Field(default_factory=SyntheticSettings)
    igtl: IgtlSettings = Field(default_factory=IgtlSettings)


class PipelineConfig(Section):
    mode: Literal["newest", "all"] = Field(
        "newest", description="'newest': real time, skip to the latest frame; 'all': every frame"
    )
    workers: Literal["processes", "threads"] = Field(
        "processes", description="each stage in its own process, or threads of one (tests)"
    )
    ring_slots: int = Field(8, ge=2, le=1024, description="slots per shared-memory ring")
    max_batch: int = Field(
        0,
        ge=0,
        le=256,
        description="mode 'all': frames waiting in the ring go to the engine together, up to this"
        " many; 0: 8 on a GPU, 1 on a CPU (where batches are no faster); the engine may take"
        " fewer; at most ring_slots wait",
    )
    max_batch_delay_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="mode 'all': how long a batch's first frame waits for more to fill it"
        " (0: the frames waiting now)",
    )
    max_frame_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="largest frame a ring slot holds (bytes)"
    )
    spin_us: int | Literal["auto"] = Field(
        "auto",
        description="how long a stage waiting on a ring polls it before it sleeps (us): a "
        "frame that comes meanwhile costs no wake-up; 'auto': 1000 on a machine of 8 cores or "
        "more, else 0 (a poll there takes a core from the stages)",
    )
    stage_timeout_s: float = Field(
        60.0, gt=0, description="a stage must report ready (model loaded, warmed up) within this"
    )

    @field_validator("spin_us", mode="before")
    @classmethod
    def _spin(cls, value: Any) -> Any:
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 100_000
        ):
            return value
        raise PydanticCustomError(
            "spin_us", "must be 0 to 100000 (us) or 'auto'"
        )
    max_restarts: int = Field(
        5, ge=0, description="restarts of one stage within restart_window_s before giving up"
    )
    restart_window_s: float = Field(
        60.0, gt=0, description="the window max_restarts counts in (older restarts are forgiven)"
    )
    heartbeat_timeout_s: float = Field(
        5.0,
        gt=0,
        description="a running stage silent this long is hung: killed (SIGABRT, then SIGKILL) and"
        " restarted; under systemd's watchdog, half of the unit's WatchdogSec= instead",
    )


class ModelConfig(Section):
    path: str = Field(
        "",
        description="model file; empty = the bundled ultrasound model; a bundled model's file "
        "name alone (ultrasound-view.onnx, ultrasound-needle.onnx: `echod models`) = that model",
    )
    engine: str = Field("", description="engine name; empty = best available for `device`")
    device: str = Field(
        "cpu",
        description="device for the engine: cpu, cuda[:N] (NVIDIA), gpu[.N] (Intel), npu, "
        "myriad, auto",
    )
    threads: int = Field(0, ge=0, description="engine CPU threads (0 = engine default)")
    warmup: int = Field(3, ge=0, description="warm-up inferences before READY")
    preprocess: Literal["cpu", "opencl", "auto"] = Field(
        "auto",
        description="pre-processing: 'cpu' (numpy/OpenCV), 'opencl' (any OpenCL device, else "
        "the CPU with the reason), 'auto' (OpenCL on a GPU when the engine runs off the CPU)",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="engine options, e.g. { precision = 'fp16', fallback = 'warn', "
        "provider = 'tensorrt' } (see `echod engines` and each engine's documentation)",
    )


# models per run: the frames ring has 8 reader entries, one per model plus the display's and
# the recorder's (the supervisor creates it with MAX_MODELS + 2)
MAX_MODELS = 6


def model_key(index: int) -> str:
    """The dotted name of model ``index``'s table: ``model`` (the first), ``model.1``, ..."""
    return "model" if index == 0 else f"model.{index}"


class SinkConfig(Section):
    headless: bool = Field(
        False,
        description="never open the display, print status lines instead; false: open it when a"
        " screen is there ($DISPLAY or $WAYLAND_DISPLAY), else run headless",
    )
    status_interval_s: float = Field(1.0, gt=0, description="seconds between status lines")


class RecordConfig(Section):
    enabled: bool = Field(False, description="write every frame to a PLUS sequence metafile")
    path: str = Field(
        "",
        description="the .igs.mha to write (pixels in a .raw beside it); an existing name, or "
        "a new part when the frame size changes, gets -2, -3, ...",
    )


class IgtlOutConfig(Section):
    enabled: bool = Field(
        False,
        description="serve the results over OpenIGTLink (e.g. to 3D Slicer): label maps as "
        "IMAGE, classes, boxes and values as STRING, points as POINT",
    )
    host: str = Field(
        "127.0.0.1", description="interface to listen on ('0.0.0.0': all; no authentication)"
    )
    port: int = Field(18945, ge=0, le=65535, description="TCP port clients connect to")
    device: str = Field(
        "Segmentation",
        min_length=1,
        max_length=20,
        description="device name of the label maps (a model's first segmentation); other "
        "outputs are named after themselves",
    )
    max_clients: int = Field(4, ge=1, le=64, description="clients served at once")


class PathsConfig(Section):
    runtime_dir: str = Field(
        "",
        description="sockets; empty = $RUNTIME_DIRECTORY, else $XDG_RUNTIME_DIR/echod, else "
        "/tmp/echod-<uid>; made 0700, refused when another user owns it or may write to it",
    )
    state_dir: str = Field("", description="job store; empty = $STATE_DIRECTORY or ~/.local/state")
    cache_dir: str = Field("", description="generated models; empty = $CACHE_DIRECTORY or ~/.cache")

    def jobs(self) -> Path:
        """The job store (SQLite) and each job's work folder."""
        return self.state() / "jobs"

    def results(self) -> Path:
        """Where job outputs go unless a submission names a folder."""
        return self.state() / "results"

    def cache(self) -> Path:
        return _dir(self.cache_dir, "CACHE_DIRECTORY", Path.home() / ".cache" / "echod")

    def state(self) -> Path:
        return _dir(self.state_dir, "STATE_DIRECTORY", Path.home() / ".local/state/echod")

    def runtime(self) -> Path:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        default = Path(xdg) / "echod" if xdg else Path(f"/tmp/echod-{os.getuid()}")
        return _dir(self.runtime_dir, "RUNTIME_DIRECTORY", default)


class ControlConfig(Section):
    enabled: bool = Field(True, description="serve the control socket")
    endpoint: str = Field(
        "",
        description="requests (ROUTER); empty = ipc://<runtime_dir>/control.sock; tcp:// needs"
        " server_key and clients_dir (CURVE)",
    )
    telemetry_endpoint: str = Field(
        "", description="telemetry and events (PUB); empty = ipc://<runtime_dir>/telemetry.sock"
    )
    telemetry_interval_s: float = Field(1.0, gt=0, description="seconds between telemetry messages")
    max_message_bytes: int = Field(
        65536, ge=1024, le=16 * 1024 * 1024, description="largest request answered"
    )
    ipc_role: Literal["read", "control", "admin"] = Field(
        "control", description="role of local (ipc) clients: read, control or admin (shutdown)"
    )
    server_key: str = Field("", description="CURVE secret key file of the server (tcp only)")
    clients_dir: str = Field(
        "", description="allowed client public keys in read/, control/, admin/ (tcp only)"
    )
    roots: list[str] = Field(
        default_factory=list,
        description="folders that path arguments (models, screenshots, jobs) must be inside",
    )


# display settings a running display takes (its "set" command), without a new window
DISPLAY_RUNTIME = (
    "overlay",
    "opacity",
    "contour_px",
    "sync",
    "status_line",
    "allow_quit",
    "inference_stopped_ms",
    "no_frames_ms",
    "frame_old_ms",
    "screenshot_dir",
    "heatmap",
    "heatmap_class",
    "classification_smoothing",
    "classification_hysteresis",
)

# every setting that may change while running -> the stage that applies it (its "set")
RUNTIME_SETTINGS: dict[str, str] = {
    "source.paused": "acquire",
    **{f"display.{k}": "sink" for k in DISPLAY_RUNTIME},
}


class DisplayConfig(Section):
    """The ``[display]`` settings."""

    fullscreen: bool = Field(True, description="fullscreen; false: a window of width x height")
    width: int = Field(1280, ge=64, le=16384, description="window width when not fullscreen")
    height: int = Field(800, ge=64, le=16384, description="window height when not fullscreen")
    vsync: bool = Field(True, description="swap buffers on the display's vertical blank")
    gl_api: Literal["auto", "gl33", "gles30"] = Field(
        "auto", description="'auto': OpenGL 3.3 core, else OpenGL ES 3.0; or force one"
    )
    overlay: Literal["filled", "contour", "off"] = Field(
        "filled", description="segmentation overlay at start (keys: o on/off, m filled/contour)"
    )
    opacity: float = Field(1.0, ge=0, le=1, description="scales the model card's class opacities")
    contour_px: float = Field(2.0, gt=0, le=32, description="contour line width in screen pixels")
    sync: Literal["latest", "synchronised"] = Field(
        "latest",
        description="'latest': newest frame with the latest overlay; 'synchronised': "
        "the frame the overlay was computed on (delayed by inference)",
    )
    sync_history: int = Field(
        64, ge=2, le=4096, description="frames kept to find a result's frame (synchronised)"
    )
    allow_quit: bool = Field(False, description="Esc / q / closing the window stops echod")
    status_line: bool = Field(True, description="show fps, latency, engine, model, warnings")
    inference_stopped_ms: float = Field(
        1000.0, gt=0, description="no result this long while frames flow: warn, hide the overlay"
    )
    no_frames_ms: float = Field(
        1000.0, gt=0, description="no frame this long: warn 'scanner disconnected'"
    )
    frame_old_ms: float = Field(
        250.0, gt=0, description="a frame older than this when read: warn 'frame old'"
    )
    screenshot_dir: str = Field(
        "", description="where the s key saves PNGs; empty = <state dir>/screenshots"
    )
    fallback: Literal["auto", "headless", "fail"] = Field(
        "auto",
        description="the display cannot open or died: 'headless' runs on without it (status "
        "lines), 'fail' stops echod (systemd restarts it); 'auto': fail under systemd (the "
        "appliance), headless elsewhere (development). Status, telemetry and the unit's "
        "STATUS say so either way",
    )
    heatmap: bool = Field(
        True, description="draw confidence outputs as a heatmap under the overlay (key h)"
    )
    heatmap_class: str = Field(
        "",
        description="the class whose confidence the heatmap shows; empty = the highest of "
        "the foreground classes (all but class 0)",
    )
    classification_smoothing: float = Field(
        0.7,
        ge=0,
        lt=1,
        description="class probabilities are smoothed over results: p = s * p_before + "
        "(1 - s) * p_new; 0 = the newest result alone",
    )
    classification_hysteresis: float = Field(
        0.1,
        ge=0,
        le=1,
        description="the class label changes only when another class's smoothed probability "
        "beats the shown one's by this much (no flicker between close classes)",
    )


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="log level (SIGHUP reloads it)"
    )
    format: Literal["auto", "text", "journal", "json"] = Field(
        "auto",
        description="'journal': <N> priority prefixes for journald; 'json': one object a line; "
        "'text': for a terminal; 'auto': journal when stderr is the journal, else text",
    )
    repeat_s: float = Field(
        10.0,
        ge=0,
        description="the same message (numbers aside) at most 5 times in this many seconds; "
        "the next after that says how many were left out (0: no limit)",
    )


class OfflineConfig(Section):
    workers: int = Field(
        1, ge=0, le=64, description="worker processes for offline jobs (0: accept none)"
    )
    nice: int = Field(10, ge=0, le=19, description="CPU priority of the workers (live stays first)")
    sched_idle: bool = Field(
        True,
        description="run the workers under SCHED_IDLE: they get a core only when the live "
        "stages leave it (stronger than nice; Linux)",
    )
    threads: int = Field(
        1,
        ge=0,
        description="CPU threads per worker for engines, OpenCV and BLAS (0: engine default);"
        " the live stages keep the other cores",
    )
    max_queued: int = Field(100, ge=1, description="jobs waiting at most; more are refused")
    max_input_gb: float = Field(20.0, gt=0, description="largest input accepted (file or folder)")
    max_attempts: int = Field(
        3, ge=1, description="a job whose worker dies this many times while running it fails"
    )
    heartbeat_timeout_s: float = Field(
        300.0, gt=0, description="a worker silent this long (one unit of work) is hung"
    )
    executor: str = Field(
        "local",
        pattern=r"^(local|dask(\+tls)?://[^/\s]+:\d+)$",
        description="where job units run: 'local' (the workers) or a Dask scheduler,"
        " 'dask://HOST:8786' ('dask+tls://': TLS from Dask's own config); pip install echod[dask]",
    )
    dask_paths: list[Annotated[str, Field(pattern=r"^/[^=]*=/.*$")]] = Field(
        default_factory=list,
        description="APPLIANCE_PREFIX=WORKER_PREFIX: where Dask workers see the shared storage"
        " that holds inputs and models (none: the same paths)",
    )
    dask_device: str = Field("", description="engine device on Dask workers ('': the job's)")
    dask_threads: int = Field(
        0, ge=0, description="CPU threads per model on Dask workers (0: offline.threads)"
    )


class MetricsConfig(Section):
    enabled: bool = Field(False, description="serve Prometheus metrics over HTTP at /metrics")
    host: str = Field(
        "127.0.0.1", description="interface to listen on ('0.0.0.0': all; no authentication)"
    )
    port: int = Field(9464, ge=0, le=65535, description="HTTP port (0: any free one, logged)")


class Config(Section):
    schema_version: int = Field(
        migrate.SCHEMA,
        ge=migrate.SCHEMA,
        le=migrate.SCHEMA,
        description="the file's format; files of earlier versions are migrated when read "
        "(`echod config migrate FILE` rewrites one)",
    )
    source: SourceConfig = Field(default_factory=SourceConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig()],
        alias="model",
        description="the model: one [model] table, or [[model]] tables for several models on "
        "the same frames (one infer stage each: infer, infer-1, ...; --set model.path is the "
        f"first, model.1.path the second); at most {MAX_MODELS}",
    )
    sink: SinkConfig = Field(default_factory=SinkConfig)
    record: RecordConfig = Field(default_factory=RecordConfig)
    igtl_out: IgtlOutConfig = Field(default_factory=IgtlOutConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)
    offline: OfflineConfig = Field(default_factory=OfflineConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    display: DisplayConfig = Field(default_factory=DisplayConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @field_validator("models", mode="before")
    @classmethod
    def _one_or_several(cls, value: Any) -> Any:
        """``[model]`` (one table) or ``[[model]]`` (1 to MAX_MODELS tables)."""
        if isinstance(value, dict | BaseModel):
            return [value]
        if isinstance(value, list) and not 1 <= len(value) <= MAX_MODELS:
            raise PydanticCustomError(
                "model_count",
                "lists {count} models: give 1 to {most} [[model]] tables (the frames ring "
                "has a reader entry for each)",
                {"count": len(value), "most": MAX_MODELS},
            )
        return value

    @model_serializer(mode="wrap")
    def _model_as_written(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Dumped as the file says it: ``model`` a table for one model, a list for several."""
        out: dict[str, Any] = {}
        for key, value in handler(self).items():
            if key in ("models", "model"):
                key, value = "model", value[0] if len(value) == 1 else value
            out[key] = value
        return out

    @property
    def model(self) -> ModelConfig:
        """The first (or only) model."""
        return self.models[0]


def _dir(value: str, env: str, default: Path) -> Path:
    # systemd's RuntimeDirectory= etc. may list several paths separated by ':'.
    chosen = Path(value) if value else Path(os.environ.get(env, "").split(":")[0] or default)
    return chosen.expanduser()


def load(
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    origins: Mapping[str, str] | None = None,
) -> Config:
    """Load ``path`` (default: the shipped ``config/echod.toml``) and apply dotted overrides.

    ``overrides`` maps dotted names (``"source.uri"``) to values, as the command
    line gives them; they are validated like the file. A mistake in one is
    blamed on its entry in ``origins`` (e.g. ``"--set source.fpss (command
    line)"``), never on the file.
    """
    data: dict[str, Any] = {}
    source = path or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if source is not None:
        data, _, notes = migrate.upgrade(_read_toml(Path(source)), str(source))
        for note in notes:
            log.warning("%s: `echod config migrate %s` rewrites the file", note, source)
    return _validated(data, overrides or {}, source, origins or {})


def _read_toml(source: Path) -> dict[str, Any]:
    """The tables of a TOML file; ConfigError (one line) for anything that is not one."""
    try:
        text = source.read_bytes().decode("utf-8")
        return tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"config file {source} not found: pass an existing --config") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {source} is a folder: pass a .toml file") from None
    except OSError as e:
        raise ConfigError(f"config file {source} cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {source} is not text (byte {e.start} is not UTF-8): pass a .toml file"
        ) from None
    except (tomllib.TOMLDecodeError, RecursionError) as e:
        why = e if isinstance(e, tomllib.TOMLDecodeError) else "nested too deeply"
        raise ConfigError(f"config file {source} is not valid TOML: {why}") from None


def validate_change(config: Config, key: str, value: Any) -> Config:
    """``config`` with one dotted setting changed, validated like the file."""
    return _validated(config.model_dump(), {key: value}, None, {})


def parse_value(key: str, raw: str) -> Any:
    """A setting's value as written on a command line (``--set KEY=RAW``, ``ctl config.set``).

    TOML (``30``, ``true``, ``'["a", "b"]'``), else the plain string. For a list
    setting, a value that is not a TOML list is its comma-separated items
    (``control.roots=/srv/a,/srv/b``; ``control.roots=`` is the empty list), each
    read as the list's items are typed.
    """
    value = toml_or_str(raw)
    item = _list_item_type(key)
    if item is None or isinstance(value, list):
        return value
    parts = [part.strip() for part in raw.split(",")]
    return [part if item is str else toml_or_str(part) for part in parts if part]


def toml_or_str(raw: str) -> Any:
    """``raw`` read as a TOML value, else the plain string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):  # validation says what is wrong
        return raw


def _list_item_type(key: str) -> Any:
    """The item type of the list (or tuple) setting ``key``; None for anything else."""
    model: Any = Config
    annotation: Any = None
    for name in [p for p in key.split(".") if not p.isdecimal()]:
        if model is None:
            return None
        try:
            annotation = _field(model, name).annotation
        except StopIteration:
            return None
        model = _table_type(annotation)
    if typing.get_origin(annotation) not in (list, tuple) or model is not None:
        return None  # not a list, or a list of tables (written as TOML)
    return typing.get_args(annotation)[0]


def _validated(
    data: dict[str, Any],
    overrides: Mapping[str, Any],
    source: Path | None,
    origins: Mapping[str, str],
) -> Config:
    """``data`` with the dotted ``overrides`` set, validated: the one way a Config is made."""
    if not isinstance(data.get("model"), list):  # [model]: the first of [[model]]
        data["model"] = [data.get("model", {})]  # (so --set model.1.path adds a second)
    for dotted, value in overrides.items():
        node: Any = data
        *parents, leaf = dotted.split(".")
        try:
            for p in parents:
                node = child(node, p, create=True)
            if isinstance(node, list) and not leaf.isdecimal():  # model.path: the first table's
                node = child(node, "0")
            if isinstance(node, list):  # model.1 = {...}
                child(node, leaf, create=True)
                node[int(leaf)] = value
            elif isinstance(node, dict):
                node[leaf] = value
            else:
                raise TypeError(f"'{parents[-1]}' is a value, not a table")
        except (LookupError, TypeError) as e:
            where = f"{origins[dotted]}: " if dotted in origins else ""
            raise ConfigError(f"{where}no setting '{dotted}': {e.args[0]}") from None
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        loc = [str(p) for p in e.errors()[0]["loc"]]
        if loc[:2] == ["model", "0"]:  # the first model is model.path, as --set names it
            del loc[1]
        raise ConfigError(_describe(e, loc, _blame(loc, overrides, source, origins))) from None


def child(node: Any, part: str, create: bool = False) -> Any:
    """The setting ``part`` inside ``node``: a table's key; in a list of tables (``[[model]]``)
    an index (``model.1``; with ``create``, the next index adds a table), or a key of the
    first table (``model.path``). LookupError or TypeError (with the reason) if none."""
    if isinstance(node, list):
        if part.isdecimal():
            index = int(part)
            if create and index == len(node):
                node.append({})
            if index >= len(node):
                more = f" (the next, {len(node)}, adds one)" if create else ""
                raise LookupError(f"index {index} is past the list's {len(node)}{more}")
            return node[index]
        if not node or not isinstance(node[0], dict):
            raise TypeError(f"'{part}' is not in a list of values")
        node = node[0]
    if not isinstance(node, dict):
        raise TypeError(f"'{part}' is inside a value, not a table")
    if create:
        made = node.setdefault(part, {})
        if not isinstance(made, dict | list):
            raise TypeError(f"'{part}' is a value, not a table")
        return made
    if part not in node:
        raise LookupError(f"no '{part}'")
    return node[part]


def _blame(
    loc: list[str],
    overrides: Mapping[str, Any],
    source: Path | None,
    origins: Mapping[str, str],
) -> str:
    """Where the first error came from: the override that set it, else the file."""
    given = [k for k in overrides if _overlap(k.split("."), loc)]
    if given:
        return origins.get(max(given, key=len), "")
    return str(source) if source else ""


def _overlap(key: list[str], loc: list[str]) -> bool:
    n = min(len(key), len(loc))
    return key[:n] == loc[:n]


def _describe_unknown(loc: list[str]) -> str:
    valid = _fields_at(loc[:-1])
    near = difflib.get_close_matches(loc[-1], valid, n=1)
    hint = (
        f"did you mean '{'.'.join([*loc[:-1], near[0]])}'?"
        if near
        else f"valid keys: {', '.join(valid)}"
    )
    return f"unknown setting '{'.'.join(loc)}': {hint}"


def _describe(e: ValidationError, loc: list[str], blame: str) -> str:
    """One line for the first error: where, what rule, what value, what to use instead."""
    err = e.errors()[0]
    field = ".".join(loc)
    where = f"{blame}: " if blame else ""
    if err["type"] == "extra_forbidden":
        return where + _describe_unknown(loc)
    value = err.get("input")
    if err["type"] == "model_count":
        return f"{where}setting '{field}' {err['msg']}"
    msg = f"{where}setting '{field}' {err['msg'].lower()} (got {value!r})"
    if err["type"] == "literal_error" and isinstance(value, str):
        choices = err.get("ctx", {}).get("expected", "")
        options = [c.strip(" '") for c in choices.replace(" or ", ",").split(",")]
        near = difflib.get_close_matches(value, options, n=1)
        if near:
            msg += f": did you mean '{near[0]}'?"
    return msg


def _fields_at(path: list[str]) -> list[str]:
    model: type[BaseModel] = Config
    for name in [p for p in path if not p.isdecimal()]:  # model.1.x: the tables are alike
        annotation = _table_type(_field(model, name).annotation)
        if annotation is None:
            return []
        model = annotation
    return [info.alias or name for name, info in model.model_fields.items()]


def _field(model: type[BaseModel], key: str) -> Any:
    """The field written ``key`` in the file (its alias, if it has one)."""
    return next(f for name, f in model.model_fields.items() if (f.alias or name) == key)


def _table_type(annotation: Any) -> type[BaseModel] | None:
    """The table type of a field: a section, or the item of a list of tables."""
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def to_toml(config: Config) -> str:
    """The documented default file, generated from the field descriptions (one source of truth)."""
    lines = ["# echod configuration. Every setting, its default and what it means.", ""]

    def emit(model: BaseModel, prefix: str) -> None:
        nested: list[tuple[str, BaseModel, list[str]]] = []  # name, table, its header lines
        for name, info in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                nested.append((name, value, [f"[{prefix}{name}]"]))
                continue
            if model is config and name == "models":  # [model], or [[model]] for several
                title = "[model]" if len(value) == 1 else "[[model]]"
                nested += [
                    ("model", m, [f"# {info.description}"] * (i == 0) + [title])
                    for i, m in enumerate(value)
                ]
                continue
            lines.append(f"# {info.description}")
            lines.append(f"{name} = {_toml_value(value)}")
        for name, value, header in nested:
            lines.extend(["", *header])
            emit(value, f"{prefix}{name}.")

    emit(config, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, BaseModel):  # a table in a list ([[dicom.routes]]): inline
        return _toml_value(value.model_dump())
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
