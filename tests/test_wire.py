"""The wire format: tasks and updates round-trip exactly; anything malformed is refused."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from fedcare.federation.messages import (
    SiteUpdate,
    Task,
    TaskHeader,
    UpdateHeader,
    decode_task,
    decode_update,
    encode_task,
    encode_update,
)
from fedcare.models.wire import HEADER_KEY, PayloadError, decode, encode

HASH = "0123456789abcdef" * 4  # 64 lowercase hex characters


def update_header(**changes: Any) -> dict[str, Any]:
    header: dict[str, Any] = {
        "study_hash": HASH,
        "round": 3,
        "site": "st-marys",
        "n_samples": 250,
        "loss": 0.6931,
    }
    header.update(changes)
    return header


def make_update(delta: np.ndarray | None = None, **changes: Any) -> SiteUpdate:
    if delta is None:
        delta = np.array([0.5, -1.25, 3.0e-8, 0.0], np.float32)
    return SiteUpdate(header=UpdateHeader(**update_header(**changes)), delta=delta)


def raw_payload(tensors: dict[str, np.ndarray], header: dict[str, Any] | str | None) -> bytes:
    """A safetensors file built directly, bypassing fedcare's encoder."""
    if header is None:
        return save(tensors)
    text = header if isinstance(header, str) else json.dumps(header)
    return save(tensors, metadata={HEADER_KEY: text})


# --- round trips -------------------------------------------------------------------------


def test_task_round_trip_is_exact() -> None:
    params = np.array(
        [0.1, -0.0, 1e-45, np.finfo(np.float32).max, -3.4028e38, 123.456], dtype=np.float32
    )
    task = Task(
        header=TaskHeader(study_hash=HASH, round=7, seed=2**62 + 5, nonce="1" * 32), params=params
    )
    decoded = decode_task(encode_task(task), n_params=6)
    assert decoded.header == task.header
    assert decoded.header.seed == 2**62 + 5
    assert decoded.params.dtype == np.float32
    assert decoded.params.tobytes() == params.tobytes()  # bitwise, -0.0 and subnormals too


def test_update_round_trip_is_exact() -> None:
    update = make_update()
    decoded = decode_update(encode_update(update), n_params=4)
    assert decoded.header == update.header
    assert decoded.header.site == "st-marys"
    assert decoded.header.n_samples == 250
    assert decoded.header.loss == 0.6931
    assert decoded.delta.dtype == np.float32
    np.testing.assert_array_equal(decoded.delta, update.delta)
    assert decoded.delta.tobytes() == update.delta.tobytes()


def test_encoder_stores_float64_input_as_float32() -> None:
    delta = np.array([0.1, 0.2], dtype=np.float64)
    decoded = decode_update(encode_update(make_update(delta)), n_params=2)
    assert decoded.delta.dtype == np.float32
    np.testing.assert_array_equal(decoded.delta, delta.astype(np.float32))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=50),
    st.integers(min_value=1, max_value=10_000),
    st.integers(min_value=1, max_value=10**9),
)
def test_update_round_trip_property(values: list[float], round_: int, n_samples: int) -> None:
    delta = np.array(values, np.float32)
    update = make_update(delta, round=round_, n_samples=n_samples)
    decoded = decode_update(encode_update(update), n_params=len(values))
    assert decoded.header == update.header
    assert decoded.delta.tobytes() == delta.tobytes()


# --- refusals: the tensors ---------------------------------------------------------------


def test_wrong_vector_length_is_refused() -> None:
    data = encode_update(make_update())
    with pytest.raises(PayloadError, match=r"tensor 'delta' has shape \(4,\), expected \(5,\)"):
        decode_update(data, n_params=5)
    with pytest.raises(PayloadError, match=r"tensor 'delta' has shape \(4,\), expected \(3,\)"):
        decode_update(data, n_params=3)


def test_two_dimensional_tensor_is_refused() -> None:
    data = raw_payload({"delta": np.zeros((2, 2), np.float32)}, update_header())
    with pytest.raises(PayloadError, match=r"tensor 'delta' has shape \(2, 2\), expected \(4,\)"):
        decode_update(data, n_params=4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    delta = np.array([0.0, 1.0, bad, 2.0], np.float32)
    data = encode_update(make_update(delta))
    with pytest.raises(PayloadError, match=r"tensor 'delta' contains NaN or infinite values"):
        decode_update(data, n_params=4)


def test_float64_tensor_is_refused() -> None:
    data = raw_payload({"delta": np.zeros(4, np.float64)}, update_header())
    with pytest.raises(PayloadError, match=r"tensor 'delta' has dtype float64, expected float32"):
        decode_update(data, n_params=4)


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.uint8])
def test_other_dtypes_are_refused(dtype: type) -> None:
    data = raw_payload({"delta": np.zeros(4, dtype)}, update_header())
    with pytest.raises(PayloadError, match=r"tensor 'delta' has dtype .*, expected float32"):
        decode_update(data, n_params=4)


def test_extra_tensor_is_refused() -> None:
    tensors = {"delta": np.zeros(4, np.float32), "extra": np.zeros(1, np.float32)}
    data = raw_payload(tensors, update_header())
    with pytest.raises(
        PayloadError,
        match=r"payload holds tensors \['delta', 'extra'\], expected exactly \['delta'\]",
    ):
        decode_update(data, n_params=4)


def test_missing_tensor_is_refused() -> None:
    data = raw_payload({"params": np.zeros(4, np.float32)}, update_header())
    with pytest.raises(
        PayloadError, match=r"payload holds tensors \['params'\], expected exactly \['delta'\]"
    ):
        decode_update(data, n_params=4)
    empty = raw_payload({}, update_header())
    with pytest.raises(PayloadError, match=r"payload holds tensors \[\], expected exactly"):
        decode_update(empty, n_params=4)


# --- refusals: the header ----------------------------------------------------------------


def test_missing_fedcare_header_is_refused() -> None:
    data = raw_payload({"delta": np.zeros(4, np.float32)}, None)
    with pytest.raises(PayloadError, match=r"payload has no 'fedcare' header"):
        decode_update(data, n_params=4)
    other = save({"delta": np.zeros(4, np.float32)}, metadata={"format": "pt"})
    with pytest.raises(PayloadError, match=r"payload has no 'fedcare' header"):
        decode_update(other, n_params=4)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"site": "../etc/passwd"}, "site"),
        ({"site": "st marys"}, "site"),
        ({"site": ""}, "site"),
        ({"site": "a" * 65}, "site"),
        ({"n_samples": -5}, "n_samples"),
        ({"n_samples": 0}, "n_samples"),
        ({"round": 0}, "round"),
        ({"study_hash": "abc123"}, "study_hash"),
        ({"study_hash": HASH.upper()}, "study_hash"),
        ({"study_hash": "g" * 64}, "study_hash"),
        ({"study_hash": HASH + "0"}, "study_hash"),
        ({"extra_key": 1}, "extra_key"),
        ({"loss": float("nan")}, "loss"),
        ({"loss": "low"}, "loss"),
    ],
)
def test_invalid_update_header_is_refused(changes: dict[str, Any], field: str) -> None:
    data = raw_payload({"delta": np.zeros(4, np.float32)}, update_header(**changes))
    with pytest.raises(PayloadError, match=rf"payload header is invalid:(?s:.*){field}"):
        decode_update(data, n_params=4)


def test_header_missing_a_field_is_refused() -> None:
    header = update_header()
    del header["site"]
    data = raw_payload({"delta": np.zeros(4, np.float32)}, header)
    with pytest.raises(PayloadError, match=r"payload header is invalid:(?s:.*)site"):
        decode_update(data, n_params=4)


def test_header_that_is_not_json_is_refused() -> None:
    data = raw_payload({"delta": np.zeros(4, np.float32)}, "{not json")
    with pytest.raises(PayloadError, match=r"payload header is invalid"):
        decode_update(data, n_params=4)


def test_task_decoded_as_update_is_refused() -> None:
    task = Task(
        header=TaskHeader(study_hash=HASH, round=1, seed=0, nonce="2" * 32),
        params=np.zeros(4, "f4"),
    )
    with pytest.raises(PayloadError, match=r"payload header is invalid:(?s:.*)site"):
        decode_update(encode_task(task), n_params=4)


def test_update_decoded_as_task_is_refused() -> None:
    with pytest.raises(PayloadError, match=r"payload header is invalid"):
        decode_task(encode_update(make_update()), n_params=4)


# --- refusals: the bytes -----------------------------------------------------------------


def test_oversized_payload_is_refused_before_parsing() -> None:
    data = encode_update(make_update())
    size = len(data)
    with pytest.raises(PayloadError, match=rf"payload is {size} bytes, the limit is {size - 1}"):
        decode_update(data, n_params=4, max_bytes=size - 1)
    # exactly at the limit is fine
    assert decode_update(data, n_params=4, max_bytes=size).header.site == "st-marys"
    # the size check comes first, even for garbage
    with pytest.raises(PayloadError, match=r"payload is 100 bytes, the limit is 10"):
        decode(b"\xff" * 100, UpdateHeader, {"delta": 4}, max_bytes=10)


def test_truncated_payload_is_refused() -> None:
    data = encode_update(make_update())
    with pytest.raises(PayloadError, match=r"payload is not a valid safetensors file"):
        decode_update(data[:-4], n_params=4)  # tensor data cut short
    with pytest.raises(PayloadError, match=r"header length runs past the end"):
        decode_update(data[:40], n_params=4)  # header cut short
    with pytest.raises(PayloadError, match=r"too short to be a safetensors file"):
        decode_update(data[:5], n_params=4)
    with pytest.raises(PayloadError, match=r"too short to be a safetensors file"):
        decode_update(b"", n_params=4)


def test_header_length_past_the_end_is_refused() -> None:
    data = struct.pack("<Q", 1000) + b'{"__metadata__": {}}'
    with pytest.raises(
        PayloadError, match=r"payload header length runs past the end of the payload"
    ):
        decode_update(data, n_params=4)
    huge = struct.pack("<Q", 2**64 - 1) + b"{}"
    with pytest.raises(PayloadError, match=r"header length runs past the end"):
        decode_update(huge, n_params=4)


def test_header_that_is_not_a_json_object_is_refused() -> None:
    for body in (b"[1, 2]", b'"text"', b"{broken", b"\xff\xfe\xfd"):
        data = struct.pack("<Q", len(body)) + body
        with pytest.raises(PayloadError, match=r"not a valid safetensors file"):
            decode_update(data, n_params=4)


def test_random_garbage_is_refused() -> None:
    rng = np.random.default_rng(1234)
    for size in (8, 9, 64, 1000):
        with pytest.raises(PayloadError):
            decode_update(rng.bytes(size), n_params=4)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_either_decode_or_raise_payload_error(data: bytes) -> None:
    with pytest.raises(PayloadError):
        decode_update(data, n_params=4)


VALID = encode_update(make_update())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=len(VALID) - 1), st.integers(min_value=1, max_value=255))
def test_corrupted_byte_either_decodes_cleanly_or_raises_payload_error(
    position: int, flip: int
) -> None:
    data = bytearray(VALID)
    data[position] ^= flip
    try:
        update = decode_update(bytes(data), n_params=4)
    except PayloadError:
        return
    # if it decoded, everything the decoder promises holds
    assert update.delta.dtype == np.float32
    assert update.delta.shape == (4,)
    assert np.all(np.isfinite(update.delta))
    UpdateHeader.model_validate(update.header.model_dump())


class _TouchOnUnpickle:
    """Unpickling this opens (creates) a file: proof that the bytes were unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def test_pickle_payload_is_refused_without_being_unpickled(tmp_path: Path) -> None:
    control = tmp_path / "control-marker"
    marker = tmp_path / "marker"
    # control: these bytes really do create their file when unpickled
    pickle.loads(pickle.dumps({"delta": _TouchOnUnpickle(control)})).get("delta").close()
    assert control.exists()

    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        payload = pickle.dumps(
            {"delta": _TouchOnUnpickle(marker), "header": update_header()}, protocol=protocol
        )
        with pytest.raises(PayloadError):
            decode_update(payload, n_params=4)
        with pytest.raises(PayloadError):
            decode_task(payload, n_params=4)
    assert not marker.exists()


def test_encode_and_decode_generic_names() -> None:
    header = TaskHeader(study_hash=HASH, round=2, seed=9, nonce="3" * 32)
    vectors = {"a": np.arange(3, dtype=np.float32), "b": np.array([7.5], np.float32)}
    parsed, out = decode(encode(vectors, header), TaskHeader, {"a": 3, "b": 1})
    assert parsed == header
    assert set(out) == {"a", "b"}
    np.testing.assert_array_equal(out["a"], [0, 1, 2])
    np.testing.assert_array_equal(out["b"], [7.5])
    with pytest.raises(PayloadError, match=r"tensor 'b' has shape \(1,\), expected \(2,\)"):
        decode(encode(vectors, header), TaskHeader, {"a": 3, "b": 2})


def test_payload_error_is_a_value_error() -> None:
    assert issubclass(PayloadError, ValueError)


@pytest.mark.parametrize("depth", [5, 2000, 100_000])
def test_a_deeply_nested_header_is_refused_before_it_is_parsed(depth: int) -> None:
    """Issue 21, point 5: 2,000 levels made Python's JSON parser raise RecursionError
    (an HTTP 500) on both the update and the masked-input upload."""
    from fedcare.privacy.secagg.wire import decode_masked

    body = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    data = struct.pack("<Q", len(body)) + body
    with pytest.raises(PayloadError, match=rf"nests {depth + 1} levels deep, the limit is 4"):
        decode_update(data, n_params=4)
    with pytest.raises(PayloadError, match=r"levels deep"):
        decode_masked(data, length=4, bits=32)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    from fedcare.models.wire import json_depth

    assert json_depth(b'{"a": "[[[[{{{{\\"[[["}') == 1
    assert json_depth(VALID[8 : 8 + struct.unpack("<Q", VALID[:8])[0]]) == 3


def test_an_oversized_header_is_refused() -> None:
    body = b'{"a": "' + b"x" * (1024 * 1024) + b'"}'
    with pytest.raises(PayloadError, match=r"header is 1048585 bytes, the limit is 1048576"):
        decode_update(struct.pack("<Q", len(body)) + body, n_params=4)


def _depth_byte_by_byte(text: bytes) -> int:
    """The nesting depth by the definition: a state machine over every byte."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in text:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"a", b"\n", b":"])))
def test_the_depth_is_the_byte_by_byte_definition_s(parts: list[bytes]) -> None:
    from fedcare.models.wire import json_depth

    text = b"".join(parts)
    assert json_depth(text) == _depth_byte_by_byte(text)


def test_one_task_object_is_decoded_once_and_no_site_can_change_it() -> None:
    """Every simulated site gets the same bytes object for a round's task: it is checked
    once, its parameters are read-only, and other bytes are always decoded afresh."""
    header = TaskHeader(study_hash="ab" * 32, round=3, seed=11, nonce="c" * 32)
    payload = encode_task(Task(header, np.arange(6, dtype=np.float32)))
    first = decode_task(payload, n_params=6)
    assert decode_task(payload, n_params=6) is first
    with pytest.raises(ValueError, match="read-only"):
        first.params[0] = 99.0
    # Equal bytes in another object, a changed payload, another size: decoded, checked.
    again = decode_task(bytes(bytearray(payload)), n_params=6)
    assert again is not first
    np.testing.assert_array_equal(again.params, first.params)
    with pytest.raises(PayloadError, match="expected"):
        decode_task(payload, n_params=5)
    with pytest.raises(PayloadError, match="limit"):
        decode_task(payload, n_params=6, max_bytes=len(payload) - 1)
    bad = encode_task(Task(header, np.array([1, 2, np.nan, 4, 5, 6], dtype=np.float32)))
    with pytest.raises(PayloadError, match="NaN"):
        decode_task(bad, n_params=6)
    with pytest.raises(PayloadError, match="NaN"):
        decode_task(bad, n_params=6)
