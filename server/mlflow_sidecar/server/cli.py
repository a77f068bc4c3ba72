"""`mlflow-sidecar`: `serve` runs the sidecar; `health` probes one (exit 0 only when SERVING).

Every command reads the same configuration as `serve` (`--config`, `$MLFLOW_SIDECAR_CONFIG`,
`MLFLOW_SIDECAR__*`), so `health` and `spool status` find the sidecar that `serve` started."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from mlflow_sidecar.core.clock import utc_timestamp
from mlflow_sidecar.server.config import AppConfig, ConfigError, host_port, load_config
from mlflow_sidecar.server.grpc_core_logs import GRPC_VERBOSITY, set_grpc_verbosity

# grpc is imported where it is used, never here: `serve` sets GRPC_VERBOSITY first, which
# grpc's core reads once, at import (see grpc_core_logs).
if TYPE_CHECKING:
    import grpc

    from mlflow_sidecar.server.container import ServerContainer
    from mlflow_sidecar.server.spool.store import SpoolStore

EXIT_CONFIG = 2
EXIT_UNHEALTHY = 1
SERVER_EXTRA_HINT = "pip install 'mlflow-sidecar[server]'"
# Top-level modules of the `server` extra: missing, the install is a client-only one.
SERVER_EXTRA_MODULES = frozenset(
    {
        "mlflow",
        "numpy",
        "grpc_reflection",
        "yaml",
        "prometheus_client",
        "pythonjsonlogger",
        "opentelemetry",
    }
)

log = logging.getLogger("mlflow_sidecar.server.cli")


def _fail(message: str, log_format: str = "text") -> int:
    """Refuse in one line on stderr; under `log_format: json` (once the config is known) as
    one JSON object, as every log line of the sidecar is, so that a log pipeline parsing
    them keeps the one line that says why the sidecar did not start."""
    if log_format == "json":
        line = {
            "time": utc_timestamp(time.time()),
            "level": "CRITICAL",
            "logger": log.name,
            "message": f"mlflow-sidecar: {message}",
        }
        print(json.dumps(line), file=sys.stderr)
    else:
        print(f"mlflow-sidecar: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _load(args: argparse.Namespace, *, uses_mlflow: bool = True) -> AppConfig | None:
    try:
        return load_config(args.config, uses_mlflow=uses_mlflow)
    except ConfigError as exc:
        _fail(str(exc))
        return None


def _missing_extra(exc: ModuleNotFoundError, command: str, log_format: str = "text") -> int:
    if (exc.name or "").split(".")[0] not in SERVER_EXTRA_MODULES:
        raise exc  # not a client-only install: a real bug, with its traceback
    return _fail(f"{command} needs the server extra ({exc}): {SERVER_EXTRA_HINT}", log_format)


def _server_container(config: AppConfig) -> ServerContainer:
    """The server's object graph; its import brings in MLflow, which a client install lacks."""
    from mlflow_sidecar.server.container import ServerContainer

    return ServerContainer(config=config)


def _serve(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    grpc_core_quiet = set_grpc_verbosity(config.log_level, config.log_format)
    from mlflow_sidecar.server.config import check_data_dir, check_ports

    try:
        check_data_dir(config)
        check_ports(config)
    except ConfigError as exc:
        return _fail(str(exc), config.log_format)
    from mlflow_sidecar.server.data_dir_lock import DataDirLock, DataDirLockError

    # Before anything touches the data dir: a second sidecar must not clean up (staging)
    # or deliver (spool) what the first one is working on.
    lock = DataDirLock(config.data_dir)
    try:
        lock.acquire()
    except DataDirLockError as exc:
        return _fail(str(exc), config.log_format)
    try:
        code = _serve_locked(config, grpc_core_quiet)
    finally:
        lock.release()
    if code == 0:
        _end_process()
    return code


def _end_process() -> NoReturn:
    """End a sidecar that has drained and stopped. What is durable is on disk; what is
    left is the interpreter's teardown, where grpc's core alone takes about 2 s, past
    `server.grace_s`, which orchestrators count on."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve_locked(config: AppConfig, grpc_core_quiet: bool) -> int:
    from mlflow_sidecar.server.config import describe
    from mlflow_sidecar.server.otel_propagators import propagators_refusal

    # Before anything imports OpenTelemetry, which refuses a bad name with a traceback.
    refusal = propagators_refusal(os.environ)
    if refusal is not None:
        return _fail(refusal, config.log_format)
    try:
        from mlflow_sidecar.server.database_file import DatabaseFileError
        from mlflow_sidecar.server.grpc_server import BindError
        from mlflow_sidecar.server.logs import configure_logging
        from mlflow_sidecar.server.mlflow_gateway.embedded_store import EmbeddedStoreError
        from mlflow_sidecar.server.mlflow_gateway.environment import MlflowSettingError
        from mlflow_sidecar.server.spool.store import SpoolVersionError
        from mlflow_sidecar.server.tracing import TracingConfigError

        # Imported after config validation so a bad config fails fast, before MLflow loads.
        container = _server_container(config)
    except ModuleNotFoundError as exc:
        return _missing_extra(exc, "serve", config.log_format)
    # First, so that whatever is logged from here on (OpenTelemetry's SDK while tracing is
    # set up, the embedded store's migrations) is in the configured format.
    configure_logging(config.log_level, config.log_format)
    try:
        container.tracing()  # a bad OTEL_* variable fails before anything is touched
    except TracingConfigError as exc:
        return _fail(str(exc), config.log_format)
    if not grpc_core_quiet:
        log.warning(
            "grpc was imported before serve read log_level and log_format: its core writes"
            " to stderr as GRPC_VERBOSITY says (%s); run serve in a process of its own",
            os.environ.get("GRPC_VERBOSITY", "unset"),
        )
    try:
        # Before the signal handlers: a stop while the embedded store is created ends the
        # process at once, and leaves no half-made store (see embedded_store).
        container.gateway().open()
        if not config.embedded:
            _refuse_other_servers(container)
        server = container.server()  # binds the gRPC and metrics ports
    except (
        BindError,
        DatabaseFileError,
        EmbeddedStoreError,
        MlflowSettingError,
        SpoolVersionError,
    ) as exc:
        return _fail(str(exc), config.log_format)
    log.info("%s", describe(config))
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if not stopping.is_set():
            stopping.set()
            logging.getLogger(__name__).info("received %s", signal.Signals(signum).name)
            threading.Thread(target=server.stop, name="drain", daemon=True).start()

    # SIGHUP too: a closed terminal would otherwise end the process with no drain at all.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    if config.embedded:
        container.gateway().ping()  # the embedded store answers before SERVING
    server.start()
    # In short waits: Python runs a signal's handler in the main thread only, between its
    # bytecodes, and the kernel may hand SIGTERM to any other thread of the process; a
    # main thread blocked for good would never run it, and the sidecar would not stop.
    while not server.wait(_SIGNAL_CHECK_S):
        pass
    return 0


def _refuse_other_servers(container: ServerContainer) -> None:
    """Raise NotMlflowError when what answers at the tracking URI answers OK as no MLflow
    tracking server does (the sidecar would take every write and keep none). An MLflow
    that is down, or slow to answer, is no reason not to start: the sidecar waits for
    it (the `mlflow` health service says so)."""
    answered: list[BaseException | None] = []
    done = threading.Event()

    def ping() -> None:
        try:
            container.gateway().ping(retry=False)
            answered.append(None)
        except Exception as exc:  # noqa: BLE001 - handed to the main thread
            answered.append(exc)
        finally:
            done.set()

    threading.Thread(target=ping, name="mlflow-identity", daemon=True).start()
    if done.wait(_IDENTITY_WAIT_S) and answered:
        from mlflow_sidecar.server.mlflow_gateway.environment import NotMlflowError

        if isinstance(answered[0], NotMlflowError):
            raise answered[0]


# How long a start waits for the tracking server's first answer before it goes on.
_IDENTITY_WAIT_S = 5.0

# How often the main thread, waiting for the server to stop, looks for a signal.
_SIGNAL_CHECK_S = 0.2


def probe_target(config: AppConfig) -> str:
    """Where a local probe reaches the sidecar that `config` describes (a wildcard listen
    address is probed on loopback)."""
    host = config.server.host  # bare: the config takes `::1` and `[::1]` alike
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host_port(host, config.server.port)


def _probe_channel(args: argparse.Namespace, config: AppConfig) -> grpc.Channel:
    """The probe's channel; ConfigError for a flag whose file cannot be used."""
    import grpc

    # grpc's core aborts the whole process on a certificate without its key (or the
    # reverse), so a half pair is refused before grpc sees it.
    if bool(args.cert_file) != bool(args.key_file):
        given, missing = (
            ("--cert-file", "--key-file") if args.cert_file else ("--key-file", "--cert-file")
        )
        raise ConfigError(f"{given} needs {missing}: a client certificate goes with its key")
    # TLS when the sidecar's config, --ca-file or a client certificate (which only TLS
    # presents) says so; without --ca-file the system's trust roots verify the sidecar's.
    if not (args.ca_file or args.cert_file or config.tls.enabled):
        return grpc.insecure_channel(args.target)
    # grpc directly, not the trainer client: the probe runs often and must stay cheap.
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_optional(args.ca_file, "--ca-file"),
        private_key=_read_optional(args.key_file, "--key-file"),
        certificate_chain=_read_optional(args.cert_file, "--cert-file"),
    )
    return grpc.secure_channel(args.target, credentials)


def _read_optional(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror or exc}") from exc


def _health(args: argparse.Namespace) -> int:
    # The probe's answer is its one line, which names grpc's reason for a failure: the
    # core's own INFO lines about it (a failed handshake) would only come before it. Set
    # only before grpc is imported, when the core reads it (`health` as a process of its
    # own), so that a process calling `main` again keeps its own environment.
    if "grpc" not in sys.modules:
        os.environ.setdefault(GRPC_VERBOSITY, "ERROR")
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    config = _load(args, uses_mlflow=False)
    if config is None:
        return EXIT_CONFIG
    if not args.target:
        if not config.server.port:
            # Port 0 has the sidecar pick a free port at start, which no config names.
            return _fail(
                "server.port is 0 (the sidecar picks a free port at start): pass --target"
                " HOST:PORT of the port it serves on"
            )
        args.target = probe_target(config)
    # Health needs no token, but a probe that sends one keeps working if that changes.
    tokens = config.auth.load_tokens() if config.auth.enabled else ()
    metadata = (("authorization", f"Bearer {tokens[0]}"),) if tokens else None
    try:
        channel = _probe_channel(args, config)
    except ConfigError as exc:
        return _fail(str(exc))
    try:
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.timeout,
                metadata=metadata,
            )
    except grpc.RpcError as exc:
        # The code first, as a probe's log is read; then grpc's word on why (a refused
        # connection, a certificate the probe does not trust), on the same line.
        code = exc.code().name if isinstance(exc, grpc.Call) else "ERROR"
        details = " ".join((exc.details() or "").split()) if isinstance(exc, grpc.Call) else ""
        print(f"{args.target}: {code}" + (f" ({details})" if details else ""), file=sys.stderr)
        return EXIT_UNHEALTHY
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_UNHEALTHY


def _spool_status(args: argparse.Namespace) -> int:
    config = _load(args, uses_mlflow=False)
    if config is None:
        return EXIT_CONFIG
    opened = _open_spool(config, "spool status")
    if isinstance(opened, int):
        return opened
    store = opened
    try:
        status = store.status()
    finally:
        store.close()
    if args.json:
        print(
            json.dumps(
                {
                    "spool": str(config.spool_path),
                    "pending_points": status.pending_points,
                    "pending_runs": status.pending_runs,
                    "max_points": status.max_points,
                    "oldest_age_s": round(status.oldest_age_s, 3),
                    "dead_letter_points": status.dead_letter_points,
                    "dead_letters": [
                        {"run_id": g.run_id, "reason": g.reason, "points": g.points}
                        for g in status.dead_letters
                    ],
                    "dead_letter_groups_unlisted": status.unlisted_groups,
                    "held_run_ends": [
                        {
                            "run_id": end.run_id,
                            "status": end.status,
                            "end_time_ms": end.end_time_ms,
                            "reason": end.held,
                        }
                        for end in status.held_ends
                    ],
                }
            )
        )
        return 0
    print(f"spool:              {config.spool_path}")
    print(f"pending points:     {status.pending_points} of {status.max_points}")
    print(f"pending runs:       {status.pending_runs}")
    print(f"oldest pending:     {status.oldest_age_s:.1f}s")
    print(f"dead-letter points: {status.dead_letter_points}")
    for group in status.dead_letters:
        print(f"  run {group.run_id}: {group.points} points: {group.reason}")
    if status.unlisted_groups:
        print(
            f"  and {status.unlisted_groups} more runs and reasons, not listed:"
            " mlflow-sidecar spool export prints every dead-lettered point"
        )
    print(f"held run ends:      {len(status.held_ends)}")
    for end in status.held_ends:
        print(f"  run {end.run_id}: {end.status} at {end.end_time_ms} ms: {end.held}")
    return 0


def _open_spool(config: AppConfig, command: str, *, upgrade: bool = False) -> SpoolStore | int:
    """The spool the config names, or the exit code after saying why not; an older spool
    is upgraded only with `upgrade` (by a command that holds the data dir's lock)."""
    try:
        from mlflow_sidecar.server.database_file import DatabaseFileError
        from mlflow_sidecar.server.spool.store import SpoolStore, SpoolVersionError
    except ModuleNotFoundError as exc:
        return _missing_extra(exc, command)
    if not config.spool_path.exists():
        print(f"no spool at {config.spool_path}", file=sys.stderr)
        return EXIT_UNHEALTHY
    try:
        return SpoolStore(config.spool_path, max_points=config.spool.max_points, upgrade=upgrade)
    except (DatabaseFileError, SpoolVersionError) as exc:
        return _fail(str(exc))


def _spool_requeue(args: argparse.Namespace) -> int:
    config = _load(args, uses_mlflow=False)
    if config is None:
        return EXIT_CONFIG
    from mlflow_sidecar.server.data_dir_lock import (
        DataDirBusyError,
        DataDirLock,
        DataDirLockError,
    )

    if not config.spool_path.exists():  # checked before the lock, which makes the data dir
        print(f"no spool at {config.spool_path}", file=sys.stderr)
        return EXIT_UNHEALTHY
    try:
        # A serving sidecar keeps counts of the spool in memory: rows moved behind its
        # back would not be delivered until it restarts, so requeue waits for it to stop.
        # Locked before the spool is opened: opening upgrades an older spool, which the
        # older sidecar serving it could then not open again.
        with DataDirLock(config.data_dir):
            opened = _open_spool(config, "spool requeue", upgrade=True)
            if isinstance(opened, int):
                return opened
            try:
                moved = opened.requeue(args.run or "")
            finally:
                opened.close()
    except DataDirBusyError as exc:
        return _fail(f"{exc}; stop it before requeueing")
    except DataDirLockError as exc:
        return _fail(str(exc))
    which = f"run {args.run}" if args.run else "all runs"
    print(f"requeued {moved.points} dead-lettered points and {moved.ends} held run ends of {which}")
    return 0


def _spool_export(args: argparse.Namespace) -> int:
    config = _load(args, uses_mlflow=False)
    if config is None:
        return EXIT_CONFIG
    opened = _open_spool(config, "spool export")
    if isinstance(opened, int):
        return opened
    store = opened
    try:
        letters = store.dead_letters()
        # Points of damaged rows cannot be read back, so they cannot be printed either.
        unreadable = store.dead_letter_count() - len(letters)
    finally:
        store.close()
    if unreadable:
        print(
            f"{unreadable} dead-lettered points are in spool rows damaged beyond reading and"
            " are not printed; mlflow-sidecar spool status lists them with their run and key",
            file=sys.stderr,
        )
    print(
        json.dumps(
            [
                {
                    "run_id": letter.run_id,
                    "key": letter.metric.key,
                    "value": _json_double(letter.metric.value),
                    "step": letter.metric.step,
                    "timestamp_ms": letter.metric.timestamp_ms,
                    "reason": letter.reason,
                    "dead_ms": letter.dead_ms,
                }
                for letter in letters
            ],
            allow_nan=False,
        )
    )
    return 0


def _json_double(value: float) -> float | str:
    """A value as proto3's JSON mapping writes a double: NaN and the infinities as the
    strings "NaN", "Infinity" and "-Infinity", which strict JSON parsers read, where
    Python's bare NaN and Infinity are no JSON at all."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def package_version() -> str:
    """The installed distribution's version (pyproject's `version`), as `--version` prints it."""
    from importlib.metadata import version

    return version("mlflow-sidecar")


def _probe_timeout(text: str) -> float:
    """`--timeout` of `health`: a number of seconds a probe can wait (argparse names the
    flag when this refuses)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < seconds <= 3600:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 and at most 3600")
    return seconds


def _config_argument(text: str) -> str:
    """`--config` of every command: a file. An empty one (a script's unset variable) would
    otherwise read as no `--config` at all, and serve the defaults' embedded store."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "an empty path names no config file; leave --config out to read"
            " $MLFLOW_SIDECAR_CONFIG, or none"
        )
    return text


def _file_argument(text: str) -> str:
    """`--ca-file`, `--cert-file`, `--key-file` of `health`: a file. An empty one (a
    script's unset variable) would otherwise read as the flag left out: a probe in
    plaintext, or without its client certificate."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "an empty path names no file; leave the flag out if it is not meant"
        )
    return text


def _target_argument(text: str) -> str:
    """`--target` of `health`: a target grpc reaches as written (a port past 65535 would be
    probed modulo 65536, another port, whose answer would stand for the sidecar's)."""
    from mlflow_sidecar.core.grpc_targets import check_target

    if not text.strip():
        # A script's unset variable: read as no --target, it probed another sidecar.
        raise argparse.ArgumentTypeError(
            f"{text!r}: an empty target names no sidecar; leave --target out to probe"
            " server.host:server.port of the config"
        )
    try:
        return check_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run_argument(text: str) -> str:
    """`--run` of `spool requeue`: a run id. An empty one (a script's unset variable) would
    otherwise read as no `--run` at all and requeue every run's dead letters."""
    from mlflow_sidecar.core import names
    from mlflow_sidecar.core.errors import InvalidArgumentError

    try:
        return names.run_id("--run", text)
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(
            f"{exc.problem}; leave --run out to requeue the dead letters of every run"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of `mlflow-sidecar`."""
    parser = argparse.ArgumentParser(prog="mlflow-sidecar", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the sidecar until SIGTERM/SIGINT/SIGHUP")
    serve.add_argument(
        "--config",
        type=_config_argument,
        help="YAML config file (default: $MLFLOW_SIDECAR_CONFIG); env vars override it",
    )
    serve.set_defaults(func=_serve)
    health = commands.add_parser("health", help="exit 0 only when the sidecar answers SERVING")
    health.add_argument("--config", type=_config_argument, help="YAML config file, as for serve")
    health.add_argument(
        "--target",
        type=_target_argument,
        help="HOST:PORT of the sidecar (default: server.host/port of the config)",
    )
    health.add_argument(
        "--service",
        default="",
        help="service name; empty: the whole server; 'mlflow': MLflow's reachability",
    )
    health.add_argument(
        "--timeout", type=_probe_timeout, default=3.0, help="seconds (more than 0, at most 3600)"
    )
    health.add_argument(
        "--ca-file", type=_file_argument, help="speak TLS, trusting this PEM CA bundle"
    )
    health.add_argument(
        "--cert-file",
        type=_file_argument,
        help="client certificate for mTLS (speaks TLS, as --ca-file does)",
    )
    health.add_argument("--key-file", type=_file_argument, help="key of the client certificate")
    health.set_defaults(func=_health)
    spool = commands.add_parser("spool", help="inspect the metric spool")
    spool_commands = spool.add_subparsers(dest="spool_command", required=True)
    status = spool_commands.add_parser(
        "status", help="pending points, oldest age, dead letters (works while serving)"
    )
    status.add_argument("--config", type=_config_argument, help="YAML config file, as for serve")
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.set_defaults(func=_spool_status)
    requeue = spool_commands.add_parser(
        "requeue",
        help="move dead letters back to the pending points (refused while a sidecar serves"
        " this data dir)",
    )
    requeue.add_argument("--config", type=_config_argument, help="YAML config file, as for serve")
    requeue.add_argument("--run", type=_run_argument, help="only this run's dead letters")
    requeue.set_defaults(func=_spool_requeue)
    export = spool_commands.add_parser(
        "export", help="every dead-lettered point with its reason (works while serving)"
    )
    export.add_argument("--config", type=_config_argument, help="YAML config file, as for serve")
    export.add_argument(
        "--json", action="store_true", required=True, help="a JSON array (the only format)"
    )
    export.set_defaults(func=_spool_export)
    return parser


# As shells report a process that SIGINT ended: 128 + the signal's number.
EXIT_INTERRUPTED = 128 + 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        # Ctrl-C before serve's own handler is in place (while it loads and opens its
        # stores): nothing was served, so nothing is left to drain.
        print("mlflow-sidecar: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
