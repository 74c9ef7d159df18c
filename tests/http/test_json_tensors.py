"""The JSON tensor converter's refusals that need no server: strings JSON can carry but
UTF-8 cannot encode are bad input, not a server fault."""

from __future__ import annotations

import json

import pytest

from gateway.errors import InvalidRequestError
from gateway.http.json_tensors import from_json
from model_store.datatypes import DataType


def test_a_lone_surrogate_in_bytes_data_is_invalid_input() -> None:
    # The standard library's parser (the fallback for what orjson refuses) accepts it.
    data = json.loads('["ok", "\\ud800"]')
    with pytest.raises(InvalidRequestError, match="BYTES element 1 is not valid Unicode"):
        from_json("text", DataType.BYTES, (2,), data)


def test_bytes_data_round_trips_as_utf8() -> None:
    array = from_json("text", DataType.BYTES, (1, 2), [["é", "ok"]])
    assert array.shape == (1, 2) and array[0, 0] == "é".encode()
