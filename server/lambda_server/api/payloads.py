"""Params and results converted once per call, bounded in nodes and depth, in slices the loop runs between.

Params are read from the wire bytes of their google.protobuf.Struct, here, rather
than parsed by protobuf and then walked again: protobuf's parse of a 4 MiB Struct
(180,000 keys) holds the GIL for about 0.4 s in C, and no thread or slice can
interrupt it. Params sent as JSON text (params_json) are parsed by json_text
in one piece, which no slice interrupts either (orjson: about 12 ms a MiB, so up
to 50 ms for the largest message), and then measured in slices; a text past
PARSED_AT_ONCE waits for its owner's turn first, as a large Struct does.
Results are built into the response's Value as before. The walks count nodes and depth as they go (past a
bound they stop at once), estimate the JSON size for the request log, and yield
every SLICE_NODES nodes: a caller that awaits between slices keeps each stall of
the loop to about a millisecond.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, struct_pb2
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from lambda_server.domain import JSON

# Nodes converted between two pauses: about a millisecond of work (measured 1.5 to 3
# us a node on a loaded 2-core box; see bench/README, "Event loop").
SLICE_NODES = 250
# A large conversion rests between slices REST_FACTOR times as long as the slice took
# (up to REST_CEILING): it takes its owner longer, and leaves the loop's thread, and its
# share of the CPU, to the other calls. Without a rest (sleep(0)), another tenant's
# Execute took +15 ms under the attack of tests/test_fairness_api.py; with one, +5 ms.
REST_FACTOR = 3.0
# params_json bytes parsed as the first slice (about a millisecond with orjson); a larger
# text is parsed in its owner's turn, and its owner rests after it.
PARSED_AT_ONCE = 64 * 1024
REST_CEILING = 0.01
_MAX_SAFE = 2**53
_DOUBLE = struct.Struct("<d").unpack_from

Steps = Generator[None, None, Any]


class PastBound(Exception):
    """A payload has more nodes, or deeper nesting, than its bound allows."""

    def __init__(self, setting: str, limit: int, what: str) -> None:
        super().__init__(f"{what} past {setting} ({limit})")
        self.setting = setting
        self.limit = limit
        self.what = what


class Malformed(Exception):
    """The bytes are not a valid google.protobuf.Struct."""


@dataclass
class Tally:
    """What one conversion has counted so far, against its bounds."""

    max_nodes: int
    max_depth: int
    nodes: int = 0
    size: int = 0  # the JSON text's bytes, about: what the request log is bounded by

    def count(self) -> bool:
        """One more node; True when it is time to pause."""
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise PastBound("MAX_JSON_NODES", self.max_nodes, f"more than {self.max_nodes} values")
        return self.nodes % SLICE_NODES == 0

    def enter(self, depth: int) -> None:
        if depth > self.max_depth:
            raise PastBound(
                "MAX_JSON_DEPTH", self.max_depth, f"nested more than {self.max_depth} levels deep"
            )


def run(steps: Steps) -> Any:
    """Run a conversion to its end without pausing (a small payload, or a test)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


class Pacer:
    """Runs conversions on the event loop: a small one at once, a large one a slice at a
    time, and at most one large one per owner at once, so that an owner's large payloads
    wait for each other (it pays for them in its own latency) and another owner's call
    waits for one slice at most."""

    def __init__(self) -> None:
        self._owners: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    async def run(self, steps: Steps, owner: str) -> Any:
        try:
            next(steps)  # the first slice: most payloads end within it
            await asyncio.sleep(0)
        except StopIteration as done:
            return done.value
        lock, users = self._owners.setdefault(owner, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                while True:
                    started = time.perf_counter()
                    try:
                        next(steps)
                    except StopIteration as done:
                        return done.value
                    rest = REST_FACTOR * (time.perf_counter() - started)
                    await asyncio.sleep(min(REST_CEILING, rest))  # whoever else is ready runs now
        finally:
            steps.close()
            users[0] -= 1
            if not users[0]:
                del self._owners[owner]

    @property
    def owners(self) -> int:
        """Owners with a large conversion running or waiting."""
        return len(self._owners)


def raw_twin(message_class: type[Message], field: str) -> type[Message]:
    """A message class like `message_class` whose Struct `field` is kept as its wire bytes,
    for decode_struct, with presence (HasField says whether it was sent, even empty); a
    repeated one as a list of each Struct's bytes. The other fields are parsed by protobuf
    as usual."""
    descriptor = message_class.DESCRIPTOR
    file = descriptor_pb2.FileDescriptorProto(
        name=f"lambda_server/raw/{descriptor.full_name}.proto", package="lambda_server.raw", syntax="proto3"
    )
    message = file.message_type.add()
    descriptor.CopyToProto(message)
    for each in message.field:
        if each.type == descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE and each.name != field:
            raise ValueError(f"{descriptor.full_name}.{each.name}: only {field} may be a message")
        if each.name == field and each.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
            each.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            each.ClearField("type_name")
        elif each.name == field:
            each.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            each.ClearField("type_name")
            each.proto3_optional = True  # a message field has presence: keep it
            each.oneof_index = len(message.oneof_decl)
            message.oneof_decl.add(name=f"_{field}")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return GetMessageClass(pool.FindMessageTypeByName(f"lambda_server.raw.{descriptor.name}"))


# Params: google.protobuf.Struct wire bytes -> dict


def decode_struct(data: bytes, tally: Tally) -> Steps:
    """The dict a Struct's wire bytes hold. Malformed or PastBound when they do not fit."""
    try:
        tally.count()
        return (yield from _struct(data, 0, len(data), tally, 1))
    except (IndexError, ValueError, struct.error) as exc:  # truncated, or not UTF-8
        raise Malformed(f"params are not a valid google.protobuf.Struct: {exc}") from None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    byte = data[pos]
    if byte < 0x80:
        return byte, pos + 1
    result, shift = byte & 0x7F, 7
    while True:
        pos += 1
        byte = data[pos]
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos + 1
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def _length(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The span of a length-delimited field's payload that starts at `pos`."""
    size, pos = _varint(data, pos)
    stop = pos + size
    if stop > end:
        raise ValueError("a field runs past its message")
    return pos, stop


def _skip(data: bytes, pos: int, tag: int, end: int) -> int:
    """Past an unknown field (protobuf keeps those; JSON has no place for them)."""
    kind = tag & 7
    if kind == 0:
        return _varint(data, pos)[1]
    if kind == 1:
        pos += 8
    elif kind == 2:
        pos = _length(data, pos, end)[1]
    elif kind == 5:
        pos += 4
    else:  # groups: deprecated, and never in a Struct
        raise ValueError(f"wire type {kind} in a Struct")
    if pos > end:
        raise ValueError("a field runs past its message")
    return pos


def _tag(data: bytes, pos: int) -> tuple[int, int]:
    tag = data[pos]
    return (tag, pos + 1) if tag < 0x80 else _varint(data, pos)


def _struct(data: bytes, pos: int, end: int, tally: Tally, depth: int) -> Steps:
    tally.enter(depth)
    out: dict[str, JSON] = {}
    while pos < end:
        tag, pos = _tag(data, pos)
        if tag != 0x0A:  # fields: map<string, Value> = 1
            pos = _skip(data, pos, tag, end)
            continue
        pos, stop = _length(data, pos, end)
        key, value = "", None
        while pos < stop:  # one map entry: key = 1, value = 2, in either order
            tag, pos = _tag(data, pos)
            if tag == 0x0A:
                start, pos = _length(data, pos, stop)
                key = data[start:pos].decode()
            elif tag == 0x12:
                start, pos = _length(data, pos, stop)
                value = yield from _value(data, start, pos, tally, depth)
            else:
                pos = _skip(data, pos, tag, stop)
        if pos > stop:
            raise ValueError("a map entry runs past its length")
        tally.size += len(key) + 4
        out[key] = value
    return out


def _list(data: bytes, pos: int, end: int, tally: Tally, depth: int) -> Steps:
    tally.enter(depth)
    out: list[JSON] = []
    while pos < end:
        tag, pos = _tag(data, pos)
        if tag == 0x0A:  # values: repeated Value = 1
            start, pos = _length(data, pos, end)
            out.append((yield from _value(data, start, pos, tally, depth)))
        else:
            pos = _skip(data, pos, tag, end)
    return out


def _value(data: bytes, pos: int, end: int, tally: Tally, depth: int) -> Steps:
    """One Value: the last kind set wins, and a message kind set twice merges, as in protobuf."""
    if tally.count():
        yield
    tally.size += 8
    result: JSON = None
    while pos < end:
        tag, pos = _tag(data, pos)
        if tag == 0x11:  # number_value = 2 (double)
            number = _DOUBLE(data, pos)[0]
            pos += 8
            result = int(number) if number.is_integer() and -_MAX_SAFE <= number <= _MAX_SAFE else number
        elif tag == 0x1A:  # string_value = 3
            start, pos = _length(data, pos, end)
            result = data[start:pos].decode()
            tally.size += pos - start
        elif tag == 0x20:  # bool_value = 4
            flag, pos = _varint(data, pos)
            result = flag != 0
        elif tag == 0x08:  # null_value = 1
            pos = _varint(data, pos)[1]
            result = None
        elif tag == 0x2A:  # struct_value = 5
            start, pos = _length(data, pos, end)
            inner = yield from _struct(data, start, pos, tally, depth + 1)
            result = {**result, **inner} if isinstance(result, dict) else inner
        elif tag == 0x32:  # list_value = 6
            start, pos = _length(data, pos, end)
            items = yield from _list(data, start, pos, tally, depth + 1)
            result = result + items if isinstance(result, list) else items
        else:
            pos = _skip(data, pos, tag, end)
    if pos > end:
        raise ValueError("a value runs past its length")
    return result


# Params as JSON text: the parsed value, measured


def measure(data: JSON, tally: Tally) -> Steps:
    """Count a parsed value's nodes and depth against the tally's bounds (PastBound), as
    decode_struct counts a Struct's: the value itself is a node, and an object at the top is
    at depth 1."""
    tally.count()
    if isinstance(data, dict | list):
        yield from _measure(data, tally, 1)


def _measure(container: dict[str, JSON] | list[JSON], tally: Tally, depth: int) -> Steps:
    tally.enter(depth)
    for item in container.values() if isinstance(container, dict) else container:
        if tally.count():
            yield
        if isinstance(item, dict | list):
            yield from _measure(item, tally, depth + 1)


# Results: a JSON value (as decoded from a worker's answer) -> google.protobuf.Value


def fill_value(data: JSON, target: struct_pb2.Value, tally: Tally) -> Steps:
    """Fill `target` with `data`; PastBound, TypeError for what is not JSON, OverflowError for
    an integer past a double's range, UnicodeEncodeError for a string that is not valid Unicode
    (json_text refuses the last two before they get here: these are the second line)."""
    return _fill(data, target, tally, 0)


def _fill(data: JSON, target: struct_pb2.Value, tally: Tally, depth: int) -> Steps:
    if tally.count():
        yield
    tally.size += 8
    if data is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        target.bool_value = data
    elif isinstance(data, int | float):
        target.number_value = float(data)
    elif isinstance(data, str):
        target.string_value = data
        tally.size += len(data)
    elif isinstance(data, dict):
        tally.enter(depth + 1)
        fields = target.struct_value.fields
        if not data:
            target.struct_value.SetInParent()
        for key, item in data.items():
            key = str(key)
            tally.size += len(key) + 4
            yield from _fill(item, fields[key], tally, depth + 1)
    elif isinstance(data, list):
        tally.enter(depth + 1)
        values = target.list_value.values
        if not data:
            target.list_value.SetInParent()
        for item in data:
            yield from _fill(item, values.add(), tally, depth + 1)
    else:
        raise TypeError(f"{type(data).__name__} is not a JSON value")
