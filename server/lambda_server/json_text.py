"""JSON text read and written exactly: integers of any size stay ints, and what JSON cannot carry is refused.

orjson is the fast path both ways, but it reads an integer past 64 bits as a
float (silently: 2**64 comes back as 1.8446744073709552e19) and refuses to
write one. Text that may hold such an integer (a run of 19 digits or more,
found by bytes.translate and find: about 1 ms a MiB, against 10 for a regular
expression and 5 for orjson's parse) is read by the standard library instead,
and a value orjson will not write is written by it.

Refused, by both readers: text that is not JSON or not UTF-8; NaN and
Infinity; a number past a double's range (1e400, 10**400), which no double
holds and protobuf clients and JavaScript cannot read; a string that is not
valid Unicode (a lone surrogate, `"\\ud800"`). An integer within a double's
range but past 2**53 is kept exactly.
"""

from __future__ import annotations

import json
import re

import orjson

from lambda_server.domain import JSON

# 2**63 has 19 digits: a shorter integer is within orjson's 64 bits. Digits become "0",
# everything else " ", and a run of 19 zeros is looked for.
_LONG_DIGITS = 19
_DIGITS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_DIGIT_RUN = b"0" * _LONG_DIGITS
# A \u escape of a surrogate: only text holding one may read into a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Every integer of 309 digits or more is at least 10**308; below that, float() never overflows.
_DOUBLE_DIGITS = 309


class Refused(ValueError):
    """The text is not JSON, or holds what JSON cannot carry exactly."""


class TooDeep(Refused):
    """The text is nested deeper than the parser follows (about 1000 levels)."""


def loads(data: bytes) -> JSON:
    """The value the UTF-8 JSON text `data` holds, integers exact; Refused (or TooDeep) when it
    is not carried."""
    if len(data) < _LONG_DIGITS or data.translate(_DIGITS).find(_DIGIT_RUN) < 0:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # not JSON, or past orjson's nesting limit: the standard library says which
    try:
        value = json.loads(
            data.decode(),  # strict: bytes that are not UTF-8, or encode a surrogate, are refused
            parse_constant=_no_constant,
            parse_float=_finite_float,
            parse_int=_double_int,
        )
    except RecursionError:
        raise TooDeep("nested too deep to read") from None
    except UnicodeDecodeError:
        raise Refused("it is not valid UTF-8") from None
    except ValueError as exc:  # json.JSONDecodeError is one
        raise Refused(str(exc)) from None
    if _SURROGATE_ESCAPE.search(data) is not None:
        _check_strings(value)
    return value


def dumps(value: JSON, sort_keys: bool = False) -> bytes:
    """Compact JSON text of `value` (keys sorted when asked); integers of any size kept."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except TypeError:  # orjson.JSONEncodeError: an integer past 64 bits, or not JSON at all
        text = json.dumps(
            value, ensure_ascii=False, allow_nan=False, sort_keys=sort_keys, separators=(",", ":")
        )
        return text.encode()


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if number - number != 0:  # infinite: past a double's range
        raise ValueError(f"the number {text[:40]} is past a double's range")
    return number


def _double_int(text: str) -> int:
    number = int(text)  # ValueError past the interpreter's 4300 digits
    if len(text) >= _DOUBLE_DIGITS:
        try:
            float(number)
        except OverflowError:
            raise ValueError(f"the integer {text[:40]}... is past a double's range") from None
    return number


def _check_strings(value: JSON) -> None:
    """Refused when a string or key of `value` holds a lone surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item) is not None:
                raise Refused("a string is not valid Unicode (it holds a lone surrogate)")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
