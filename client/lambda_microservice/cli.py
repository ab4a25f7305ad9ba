"""lambda-cli: call lambda-microservice from a shell; prints JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from lambda_microservice.client import DEFAULT_TARGET, LambdaClient
from lambda_microservice.errors import LambdaError
from lambda_microservice.v1 import lambda_service_pb2 as pb


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lambda-cli", description=__doc__)
    parser.add_argument(
        "--target",
        default=os.environ.get("LAMBDA_TARGET", DEFAULT_TARGET),
        help="server address (default: $LAMBDA_TARGET or %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    parser.add_argument(
        "--token",
        default=os.environ.get("LAMBDA_TOKEN"),
        help="a JWT sent as `authorization: Bearer` (default: $LAMBDA_TOKEN)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("health", help="the service's health; exit 1 unless SERVING")
    init = commands.add_parser("init", help="create a session (Initialize)")
    init.add_argument("--language-title", required=True, help="e.g. nodejs-calculator")
    init.add_argument(
        "--script", default=None, help="the script's file, or - for stdin; none: the catalog's function"
    )
    init.add_argument("--context", default="{}", help="a JSON object")
    init.add_argument("--request-id", default=None, help="a UUID, to make retries safe")
    execute = commands.add_parser("exec", help="run a session's script (Execute)")
    execute.add_argument("request_id")
    execute.add_argument("--params", default="{}", help="a JSON object")
    execute.add_argument("--cache-control", default="", help="no-cache, no-store or max-age=SECONDS")
    session = commands.add_parser("session", help="show a session (GetSession)")
    session.add_argument("request_id")
    functions = commands.add_parser("functions", help="list the function catalog (ListFunctions)")
    functions.add_argument("--language", default="", help="only this language, e.g. python")
    function = commands.add_parser("function", help="show one function of the catalog (GetFunction)")
    function.add_argument("language_title")
    return parser


def _json_object(text: str, name: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"lambda-cli: {name} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"lambda-cli: {name} must be a JSON object")
    return value


def _print(message: Message) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    with LambdaClient(args.target, timeout=args.timeout, metadata=metadata) as client:
        try:
            if args.command == "health":
                health = client.health()
                _print(health)
                return 0 if health.status == pb.HEALTH_STATUS_SERVING else 1
            if args.command == "init":
                if args.script is None:
                    script = ""
                elif args.script == "-":
                    script = sys.stdin.read()
                else:
                    with open(args.script, encoding="utf-8") as file:
                        script = file.read()
                _print(
                    client.initialize(
                        args.language_title,
                        script,
                        context=_json_object(args.context, "--context"),
                        request_id=args.request_id,
                    )
                )
            elif args.command == "exec":
                params = _json_object(args.params, "--params")
                _print(client.execute(args.request_id, params, cache_control=args.cache_control))
            elif args.command == "session":
                _print(client.get_session(args.request_id))
            elif args.command == "functions":
                _print(client.list_functions(language=args.language, page_size=100))
            elif args.command == "function":
                _print(client.get_function(args.language_title))
        except LambdaError as error:
            failure = {"code": error.code.name, "reason": error.reason, "message": error.message}
            if error.metadata:
                failure["metadata"] = error.metadata  # type: ignore[assignment]
            print(json.dumps({"error": failure}, indent=2), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
