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


@pytest.mark.parametrize(("datatype", "data", "named"), [
    (DataType.FP32, [True, 0.5], "element 0 is a boolean"),
    (DataType.FP64, [[0.5], [False]], "element 1 is a boolean"),
    (DataType.FP16, [0.5, True], "element 1 is a boolean"),
    (DataType.BF16, [0.5, True], "element 1 is a boolean"),
    (DataType.INT32, [1, True], "element 1 is a boolean"),
    (DataType.UINT8, [[False], [1]], "element 0 is a boolean"),
    (DataType.BOOL, [True, 1], "element 1 is an integer"),
    (DataType.BOOL, [[0.0], [True]], "element 0 is a number with a fraction"),
    (DataType.BYTES, ["a", True], "element 1 is a boolean"),
])
def test_a_value_of_the_wrong_kind_is_refused_in_any_position(
    datatype: DataType, data: list[object], named: str
) -> None:
    with pytest.raises(InvalidRequestError, match=named):
        from_json("x", datatype, (2, 1) if isinstance(data[0], list) else (2,), data)


@pytest.mark.parametrize(("shape", "data", "named"), [
    ((2, 2), [1, [2, 3], 4], "data holds 3 items where dimension 0 of the shape is 2"),
    ((2, 2), [[1, 2, 3, 4]], "data holds 1 items where dimension 0 of the shape is 2"),
    ((2, 2), [[1, 2], [3]], r"data\[1\] holds 1 items where dimension 1 of the shape is 2"),
    ((2, 2), [[1, 2], [3, [4]]], r"data\[1\]\[1\] is a list where a value was expected"),
    ((4,), [[1, 2, 3, 4]], "data holds 1 items where dimension 0 of the shape is 4"),
    ((1, 2), [[[1], [2]]], r"data\[0\]\[0\] is a list where a value was expected"),
    ((2, 1), [[1], 2], r"data\[1\] is an integer where a list was expected"),
])
def test_nested_data_must_follow_the_shape(
    shape: tuple[int, ...], data: list[object], named: str
) -> None:
    for datatype in (DataType.FP32, DataType.INT64, DataType.BYTES):
        with pytest.raises(InvalidRequestError, match=named):
            from_json("x", datatype, shape, data)


def test_flat_and_shape_nested_data_are_both_taken() -> None:
    flat = from_json("x", DataType.FP32, (2, 2), [1, 2, 3.5, 4])
    nested = from_json("x", DataType.FP32, (2, 2), [[1, 2], [3.5, 4]])
    assert flat.tolist() == nested.tolist() == [[1, 2], [3.5, 4]]
    assert from_json("x", DataType.BOOL, (1, 2), [[True, False]]).tolist() == [[True, False]]
