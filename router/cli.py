"""The ``kvroute`` command: serve, check, demo, simulate."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from router.config import Config, ConfigError, load_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvroute", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the router on a config file")
    serve.add_argument("--config", required=True, help="YAML config file")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")

    check = sub.add_parser("check", help="validate a config file; exit 1 with every error")
    check.add_argument("file")

    sub.add_parser("schema", help="print the JSON Schema of the config file")

    demo = sub.add_parser("demo", help="the router in front of a simulated fleet")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument(
        "--sim-base-port", type=int, default=9101, help="first of the simulators' ports"
    )

    keys = sub.add_parser("keys", help="API keys: hash one, or mint a new one for a tenant")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_hash = keys_sub.add_parser(
        "hash", help="print the hash of a key read from stdin (or the argument)"
    )
    keys_hash.add_argument("key", nargs="?", help="the key (default: read from stdin)")
    keys_new = keys_sub.add_parser("new", help="mint a key; prints it once, and its config line")
    keys_new.add_argument("--tenant", required=True)

    from backends.sim.server import add_simulate_arguments

    simulate = sub.add_parser("simulate", help="run one simulated backend server")
    add_simulate_arguments(simulate)

    args = parser.parse_args(argv)
    if args.command == "check":
        return cmd_check(args.file)
    if args.command == "schema":
        print(json.dumps(Config.model_json_schema(), indent=2))
        return 0
    if args.command == "keys":
        return cmd_keys(args)
    if args.command == "serve":
        return cmd_serve(args.config, args.host, args.port)
    if args.command == "demo":
        from router.demo import run_demo

        return asyncio_run(run_demo(args.host, args.port, args.sim_base_port))
    from backends.sim.server import run_simulator

    return asyncio_run(run_simulator(args))


def asyncio_run(coro: Coroutine[Any, Any, int]) -> int:
    import uvloop

    try:
        return uvloop.run(coro)
    except KeyboardInterrupt:
        return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from router.config import TENANT_NAME
    from router.tenants import hash_key, new_key

    if args.keys_command == "hash":
        key = args.key if args.key is not None else sys.stdin.readline().strip()
        if not key:
            print("no key given (pass it on stdin, or as an argument)", file=sys.stderr)
            return 1
        print(hash_key(key))
        return 0
    if not TENANT_NAME.match(args.tenant):
        print("a tenant name is 1-64 of A-Z a-z 0-9 _ . -", file=sys.stderr)
        return 1
    key = new_key()
    print(f"key (shown once; give it to the tenant): {key}")
    print("config (add to the tenant's keys):")
    print(f'  tenants:\n    {args.tenant}:\n      keys: ["{hash_key(key)}"]')
    return 0


def cmd_check(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{path}: {line}", file=sys.stderr)
        print(f"{path}: {len(exc.errors)} error(s)", file=sys.stderr)
        return 1
    print(f"{path}: ok ({len(config.endpoints)} endpoints, {len(config.models)} models)")
    return 0


def cmd_serve(path: str, host: str | None, port: int | None) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{path}: {line}", file=sys.stderr)
        return 1
    server = config.server.model_copy(
        update={k: v for k, v in (("host", host), ("port", port)) if v is not None}
    )
    config = config.model_copy(update={"server": server})
    from router.serve import serve

    return asyncio_run(serve(config, config_path=path))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
