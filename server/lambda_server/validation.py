"""Execute's params checked against a catalog function's JSON schema, validators compiled once."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import orjson
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from jsonschema.validators import validator_for

from lambda_server.domain import JSON
from lambda_server.errors import InternalError, InvalidParams

_MAX_MESSAGE = 300


def schema_key(schema: dict[str, JSON]) -> str:
    """A schema's identity: the SHA-256 of its canonical JSON."""
    return hashlib.sha256(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)).hexdigest()


class ParamsValidator:
    """Checks params against JSON schemas; a compiled validator is kept per schema (LRU)."""

    def __init__(self, max_schemas: int = 256) -> None:
        self._max = max_schemas
        self._validators: OrderedDict[str, Any] = OrderedDict()

    def prepare(self, schema: dict[str, JSON]) -> str:
        """Compile `schema` now (InternalError when it is no valid schema) and return its key."""
        key = schema_key(schema)
        self._validator(schema, key)
        return key

    def check(self, params: dict[str, JSON], schema: dict[str, JSON], key: str | None = None) -> None:
        """InvalidParams naming the first field (by jsonschema's best match) that does not fit."""
        validator = self._validator(schema, key or schema_key(schema))
        if validator.is_valid(params):  # the common case, without building errors
            return
        error = best_match(validator.iter_errors(params))
        if error is None:
            return
        field = _field(error)
        message = error.message
        if len(message) > _MAX_MESSAGE:
            message = message[:_MAX_MESSAGE] + "…"
        raise InvalidParams(f"{field}: {message}", field=field, rule=str(error.validator))

    def _validator(self, schema: dict[str, JSON], key: str) -> Any:
        validator = self._validators.get(key)
        if validator is not None:
            self._validators.move_to_end(key)
            return validator
        cls = validator_for(schema)
        try:
            cls.check_schema(schema)
        except SchemaError as exc:
            raise InternalError(
                f"the function's params schema is not a valid JSON schema: {exc.message}"
            ) from None
        validator = cls(schema)
        self._validators[key] = validator
        while len(self._validators) > self._max:
            self._validators.popitem(last=False)
        return validator


def _field(error: ValidationError) -> str:
    """The JSON path of the offending field under `params`, e.g. `params.a` or `params.rules[1]`.

    A missing required property is named itself (`params.b`), not the object missing it.
    """
    path = list(error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [name for name in error.validator_value if name not in error.instance]
        if missing:
            path.append(missing[0])
    text = "params"
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.isidentifier():
            text += f".{part}"
        else:
            text += f"[{orjson.dumps(part).decode()}]"
    return text
