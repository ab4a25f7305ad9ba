"""JSON values in and out of protobuf: params as a Struct, results back as Python, exactly."""

from __future__ import annotations

import decimal
import json
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

from lambda_microservice.v1 import lambda_service_pb2 as pb

# Integers longer than this are read through Decimal: int() refuses strings past Python's
# limit on integer string conversion (4300 digits by default).
_INT_DIGITS = 4000


def to_struct(data: Mapping[str, Any] | None) -> struct_pb2.Struct:
    """A google.protobuf.Struct from a JSON-like mapping."""
    struct = struct_pb2.Struct()
    if data:
        struct.update(data)
    return struct


_EXACT_IN_A_DOUBLE = 2**53


def needs_exact_json(value: Any) -> bool:
    """Whether a JSON-like value holds an integer that a double (a Struct's number) would
    round: such params go as params_json."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -_EXACT_IN_A_DOUBLE <= value <= _EXACT_IN_A_DOUBLE
    if isinstance(value, Mapping):
        return any(needs_exact_json(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(needs_exact_json(item) for item in value)
    return False


def to_python(value: struct_pb2.Value | struct_pb2.Struct | struct_pb2.ListValue) -> Any:
    """The JSON value (dict, list, str, int, float, bool or None) held by a Value, Struct or
    ListValue. A number with no fraction is an int: a Value holds only doubles, so `1.0` and
    `1` both come back as `1`, and integers past 2**53 as the nearest double; `result()`
    gives an Execute's exact result."""
    if isinstance(value, struct_pb2.Struct):
        return {key: to_python(item) for key, item in value.fields.items()}
    if isinstance(value, struct_pb2.ListValue):
        return [to_python(item) for item in value.values]
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return to_python(value.struct_value)
    if kind == "list_value":
        return to_python(value.list_value)
    return None  # null_value, or unset


def result(response: pb.ExecuteResponse) -> Any:
    """The script's result, exactly: parsed from `response.result_json` when the server sent
    it (integers of any size, `1` apart from `1.0`), else `to_python(response.result)`.
    None when the script failed (`response.error` is set)."""
    if response.result_json:
        return json.loads(response.result_json, parse_int=_exact_int)
    return to_python(response.result)


def _exact_int(digits: str) -> int:
    return int(digits) if len(digits) <= _INT_DIGITS else int(decimal.Decimal(digits))


# ExecutionOptions as keyword names a caller writes: seconds for the two Durations.
OPTION_NAMES = ("timeout", "memory_mb", "max_processes", "cache_ttl")


def execution_options(options: pb.ExecutionOptions | Mapping[str, Any] | None) -> pb.ExecutionOptions | None:
    """An InitializeRequest's `options` from an ExecutionOptions, or from a mapping with any of
    `timeout` and `cache_ttl` (seconds, a number) and `memory_mb` and `max_processes`
    (integers); an option left out takes the server's default."""
    if options is None or isinstance(options, pb.ExecutionOptions):
        return options
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown execution options {unknown}: use {', '.join(OPTION_NAMES)}")
    message = pb.ExecutionOptions()
    for name in ("timeout", "cache_ttl"):
        seconds = options.get(name)
        if seconds is not None:
            if isinstance(seconds, bool) or not isinstance(seconds, int | float):
                raise ValueError(f"options[{name!r}] must be a number of seconds, not {seconds!r}")
            getattr(message, name).FromNanoseconds(round(seconds * 1e9))
    for name in ("memory_mb", "max_processes"):
        value = options.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"options[{name!r}] must be an integer, not {value!r}")
            setattr(message, name, value)
    return message
