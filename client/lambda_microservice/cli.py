"""lambda-cli: call lambda-microservice from a shell; prints JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn

from google.protobuf import json_format
from google.protobuf.message import Message

from lambda_microservice.client import DEFAULT_TARGET, LambdaClient
from lambda_microservice.errors import LambdaError, from_status
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_microservice.values import execution_options, result

# What each exit status means; --help shows this too.
EXIT_CODES = """exit status:
  0  success
  1  the script failed (the answer's `error` is set; for batch: an item's error or
     status), or health is not SERVING
  2  bad usage or input (an unknown option, a missing file, JSON that does not parse)
  3  the service refused or failed the call (a gRPC status; one JSON line on stderr)"""
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line (its own way prints the usage too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lambda-cli",
        description=__doc__,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target",
        default=None,
        help=f"server address (default: $LAMBDA_TARGET when set, else {DEFAULT_TARGET})",
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
    init.add_argument(
        "--options",
        default=None,
        help='a JSON object of execution options, e.g. {"timeout": 5, "memory_mb": 128, '
        '"max_processes": 8, "cache_ttl": 60} (seconds for timeout and cache_ttl)',
    )
    init.add_argument(
        "--dependency",
        action="append",
        default=[],
        help="a package the script imports (repeat for more): python-slugify==8.0.4, dayjs@1.11.13",
    )
    execute = commands.add_parser("exec", help="run a session's script (Execute)")
    execute.add_argument("request_id")
    execute.add_argument("--params", default="{}", help="a JSON object")
    execute.add_argument("--cache-control", default="", help="no-cache, no-store or max-age=SECONDS")
    execute.add_argument(
        "--follow",
        action="store_true",
        help="print the script's output as it comes (ExecuteStream): its stdout on stdout, its "
        "stderr on stderr; then the answer, without its logs (printed already)",
    )
    batch = commands.add_parser(
        "batch",
        help="run a session's script once per line of a file (ExecuteBatch); prints one JSON line per item",
    )
    batch.add_argument("request_id")
    batch.add_argument(
        "--params-file", required=True, help="one JSON object (an item's params) a line, or - for stdin"
    )
    batch.add_argument("--cache-control", default="", help="no-cache, no-store or max-age=SECONDS")
    session = commands.add_parser("session", help="show a session (GetSession)")
    session.add_argument("request_id")
    functions = commands.add_parser(
        "functions", help="list the whole function catalog (ListFunctions, every page)"
    )
    functions.add_argument("--language", default="", help="only this language, e.g. python")
    function = commands.add_parser("function", help="show one function of the catalog (GetFunction)")
    function.add_argument("language_title")
    return parser


class _InputError(Exception):
    """A mistake in what the user gave lambda-cli: reported in one line, exit 2."""


def _json_object(text: str, name: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _InputError(f"{name} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _InputError(f"{name} must be a JSON object")
    return value


def _script(path: str | None) -> str:
    if path is None:
        return ""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError as exc:
        raise _InputError(f"cannot read --script {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _InputError(f"--script {path} is not UTF-8 text") from None


def _items(path: str) -> list[dict[str, Any]]:
    """The items of --params-file: a JSON object a line (blank lines skipped)."""
    try:
        if path == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(path, encoding="utf-8") as file:
                lines = file.read().splitlines()
    except OSError as exc:
        raise _InputError(f"cannot read --params-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _InputError(f"--params-file {path} is not UTF-8 text") from None
    return [
        _json_object(line, f"line {number} of --params-file")
        for number, line in enumerate(lines, 1)
        if line.strip()
    ]


def _batch_item(response: pb.ExecuteResponse) -> dict[str, Any]:
    """One item's line: its answer as `exec` prints it, or, for an item that did not run,
    its status as lambda-cli prints a refused call (`{"error": {code, reason, message}}`)."""
    if not response.HasField("status"):
        return _executed(response)
    error = from_status(response.status)
    failure: dict[str, Any] = {"code": error.code.name, "reason": error.reason, "message": error.message}
    if error.metadata:
        failure["metadata"] = error.metadata
    return {"status": failure}


def _print(message: Message) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _as_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _executed(response: pb.ExecuteResponse) -> dict[str, Any]:
    """The answer as JSON, its `result` exact (from result_json: integers of any size, `1`
    apart from `1.0`) where the protobuf Value would print every number as a double."""
    answer = _as_json(response)
    answer.pop("result_json", None)
    if "result" in answer:
        answer["result"] = result(response)
    return answer


def _follow(
    client: LambdaClient, request_id: str, params: dict[str, Any], cache_control: str
) -> pb.ExecuteResponse:
    """ExecuteStream: each chunk of output printed, and flushed, as it comes; the response."""
    response = pb.ExecuteResponse()
    for event in client.execute_stream(request_id, params, cache_control=cache_control):
        if isinstance(event, pb.OutputChunk):
            out = sys.stderr if event.stream == pb.OUTPUT_STREAM_STDERR else sys.stdout
            out.write(event.text)
            out.flush()
        else:
            response = event
    return response


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status is one of EXIT_CODES."""
    args = _parser().parse_args(argv)  # bad usage: argparse exits 2 with one line
    target = args.target or os.environ.get("LAMBDA_TARGET") or DEFAULT_TARGET
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    digits = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # an exact result is printed whole, however long
    try:
        with LambdaClient(target, timeout=args.timeout, metadata=metadata) as client:
            return _run(client, args)
    except _InputError as error:
        print(f"lambda-cli: {error}", file=sys.stderr)
        return EXIT_USAGE
    except LambdaError as error:
        failure: dict[str, Any] = {"code": error.code.name, "reason": error.reason, "message": error.message}
        if error.metadata:
            failure["metadata"] = error.metadata
        print(json.dumps({"error": failure}), file=sys.stderr)  # one line, for people and scripts
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lambda-cli ... | head`: the reader stopped, as it may
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's last flush is quiet too
        return EXIT_OK
    finally:
        sys.set_int_max_str_digits(digits)


def _run(client: LambdaClient, args: argparse.Namespace) -> int:
    if args.command == "health":
        health = client.health()
        _print(health)
        return EXIT_OK if health.status == pb.HEALTH_STATUS_SERVING else EXIT_FAILED
    if args.command == "init":
        script = _script(args.script)
        context = _json_object(args.context, "--context")
        options = _json_object(args.options, "--options") if args.options is not None else None
        try:
            request_options = execution_options(options)
        except ValueError as exc:
            raise _InputError(f"--options: {exc}") from None
        _print(
            client.initialize(
                args.language_title,
                script,
                context=context,
                request_id=args.request_id,
                options=request_options,
                dependencies=args.dependency,
            )
        )
    elif args.command == "exec":
        params = _json_object(args.params, "--params")
        if args.follow:
            response = _follow(client, args.request_id, params, args.cache_control)
        else:
            response = client.execute(args.request_id, params, cache_control=args.cache_control)
        answer = _executed(response)
        if args.follow:
            answer.pop("logs", None)  # the output went out as it came: printed once
        _print_json(answer)
        return EXIT_FAILED if response.HasField("error") else EXIT_OK
    elif args.command == "batch":
        responses = client.execute_batch(
            args.request_id, _items(args.params_file), cache_control=args.cache_control
        )
        for response in responses:
            print(json.dumps(_batch_item(response), ensure_ascii=False, separators=(",", ":")))
        failed = any(response.HasField("error") or response.HasField("status") for response in responses)
        return EXIT_FAILED if failed else EXIT_OK
    elif args.command == "session":
        _print(client.get_session(args.request_id))
    elif args.command == "functions":
        functions = client.iter_functions(language=args.language, page_size=100)
        _print_json({"functions": [_as_json(function) for function in functions]})
    elif args.command == "function":
        _print(client.get_function(args.language_title))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
