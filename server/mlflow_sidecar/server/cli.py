"""`mlflow-sidecar`: `serve` runs the sidecar; `health` probes one (exit 0 only when SERVING)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_CONFIG = 2
EXIT_UNHEALTHY = 1


def _serve(args: argparse.Namespace) -> int:
    from mlflow_sidecar.server.config import ConfigError, load_config
    from mlflow_sidecar.server.grpc_server import BindError

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"mlflow-sidecar: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Imported after config validation so a bad config fails fast, before MLflow loads.
    from mlflow_sidecar.server.container import ServerContainer

    container = ServerContainer(config=config)
    try:
        server = container.server()
    except BindError as exc:
        print(f"mlflow-sidecar: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if not stopping.is_set():
            stopping.set()
            logging.getLogger(__name__).info("received %s", signal.Signals(signum).name)
            threading.Thread(target=server.stop, name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if config.embedded:
        container.gateway().ping()  # create the embedded store's tables before SERVING
    server.start()
    server.wait()
    return 0


def _health(args: argparse.Namespace) -> int:
    try:
        with grpc.insecure_channel(args.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        code = exc.code().name if isinstance(exc, grpc.Call) else "ERROR"
        print(f"{args.target}: {code}", file=sys.stderr)
        return EXIT_UNHEALTHY
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_UNHEALTHY


def build_parser() -> argparse.ArgumentParser:
    """The command line of `mlflow-sidecar`."""
    parser = argparse.ArgumentParser(prog="mlflow-sidecar", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the sidecar until SIGTERM/SIGINT")
    serve.add_argument(
        "--config", help="YAML config file (default: $MLFLOW_SIDECAR_CONFIG); env vars override it"
    )
    serve.set_defaults(func=_serve)
    health = commands.add_parser("health", help="exit 0 only when the sidecar answers SERVING")
    health.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the sidecar")
    health.add_argument("--service", default="", help="service name; empty: the whole server")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds")
    health.set_defaults(func=_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
