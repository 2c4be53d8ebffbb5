"""The free-form values runwire accepts from outside (event data, launch parameters, request bodies):
JSON-like and at most MAX_DEPTH levels deep, as types the decoders check while they read.

A decoder of `Any` recurses once per level of nesting, so a few kilobytes of `[[[[...` raise
RecursionError (not msgspec's DecodeError) and used to escape a service's task group. With these
types a value nested too deeply is an ordinary validation error at the level where it goes too deep,
found without ever recursing further: a bad message, line or body, refused with its path.
"""

from __future__ import annotations

from typing import Union

import msgspec

# Levels inside a free-form field: `data = {"a": {"b": [1]}}` uses 3. Every type below is built once;
# msgspec expands it as a tree, which doubles per level (8 levels: ~10 ms per decoder at import).
MAX_DEPTH = 8

Scalar = Union[str, int, float, bool, None]


def _nested(depth: int) -> object:
    value: object = Scalar
    for _ in range(depth):
        value = Union[str, int, float, bool, None, list[value], dict[str, value]]  # type: ignore[valid-type]
    return value


# A value of a free-form field, and such a field itself (an object of them): `Value` may itself be a
# list or an object, MAX_DEPTH levels counted from the field's own object.
Value = _nested(MAX_DEPTH - 1)
Object = dict[str, Value]  # type: ignore[valid-type]

# Launch parameters: scalars, or lists of scalars (shared.params checks them against their declaration).
ParamValue = Union[str, int, float, bool, list[Union[str, int, float, bool]]]
Params = dict[str, ParamValue]

# What decoding bytes from outside can raise. A typed decoder skips a field it does not know by walking
# it, recursively: a depth bomb in an unknown field still raises RecursionError, not DecodeError.
DECODE_ERRORS: tuple[type[Exception], ...] = (msgspec.DecodeError, RecursionError)

_object_json = msgspec.json.Decoder(Object)


def decode_json_object(buf: bytes) -> dict[str, object]:
    """A JSON object from outside (a request body, a client frame); msgspec.DecodeError when it is not
    one, is not JSON, or nests deeper than MAX_DEPTH."""
    try:
        return _object_json.decode(buf)  # type: ignore[no-any-return]
    except RecursionError as e:
        raise msgspec.DecodeError(f"nested deeper than {MAX_DEPTH} levels") from e
