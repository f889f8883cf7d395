"""Record encoding (version 1) and config validation of the replication plugin: pure Python."""

from __future__ import annotations

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluice.plugins.replication.config import Config
from sluice.plugins.replication.records import (
    HEADER,
    MAGIC,
    RecordError,
    decode,
    decode_key,
    encode_key,
    encode_value,
)
from sluice.sessions import Session

pytestmark = pytest.mark.unit

owners = st.from_regex(r"[A-Za-z0-9_-]{1,16}", fullmatch=True)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=20))
attrs = st.dictionaries(st.text(max_size=10), json_scalars, max_size=5)


@given(owner=owners, key=st.binary(min_size=1, max_size=64), value=st.binary(max_size=256), attrs=attrs,
       node=st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True), event_ns=st.integers(0, 2**64 - 1))  # fmt: skip
def test_round_trip_keeps_every_field(owner, key, value, attrs, node, event_ns):
    session = Session(owner=owner, key=key, value=value, attrs=attrs)
    kv_key = encode_key(owner, key)
    record = decode(kv_key, encode_value(session, node, event_ns, written_ns=123))
    assert record.session == session
    assert (record.node_id, record.event_ns, record.written_ns) == (node, event_ns, 123)


def test_key_is_owner_dot_hex():
    assert encode_key("firewall", b"\x0a\x00\x00\x01") == "firewall.0a000001"
    assert decode_key("firewall.0a000001") == ("firewall", b"\x0a\x00\x00\x01")


@pytest.mark.parametrize("owner,key", [("fire.wall", b"k"), ("", b"k"), ("fw", b""), ("f w", b"k")])
def test_unencodable_keys_are_refused(owner, key):
    with pytest.raises(RecordError):
        encode_key(owner, key)


@pytest.mark.parametrize("kv_key", ["nodot", "fw.", "fw.abc", "fw.ZZ", "fw.0A", "a.b.00", ".00"])
def test_malformed_bucket_keys_are_bad_key(kv_key):
    with pytest.raises(RecordError) as err:
        decode(kv_key, encode_value(Session("fw", b"k", b"v"), "n", 0))
    assert err.value.reason == "bad-key"


def _valid() -> bytes:
    return encode_value(Session("fw", b"\x01", b"value", {"a": 1}), "node-a", 5)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "truncated"),
        (b"garbage", "truncated"),
        (b"XXXX" + _valid()[4:], "foreign"),
        (b'{"json": "from another tool"}', "foreign"),
        (_valid()[:4] + bytes([2]) + _valid()[5:], "version"),
        (_valid()[: HEADER.size + 3], "truncated"),
        (_valid() + b"\xff", "bad-body"),
        (_valid()[: HEADER.size + 6 + 5] + b"[1, 2]", "bad-body"),
    ],
)
def test_corrupt_values_name_their_reason(data, reason):
    with pytest.raises(RecordError) as err:
        decode("fw.01", data)
    assert err.value.reason == reason


@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_other_errors(data):
    try:
        decode("fw.01", MAGIC + data)
    except RecordError:
        pass


@pytest.mark.parametrize(
    "section",
    [
        {"user": "u"},
        {"user": "u", "password": "p", "token": "t"},
        {"tls_cert_file": "/c.pem"},
        {"nkey_seed_file": "/a", "credentials_file": "/b"},
        {"ttl": 30, "sync_interval": 60},
        {"servers": ["localhost:4222"]},
        {"bucket": "has.dot"},
        {"debounce": -1},
        {"unknown": 1},
    ],
)
def test_bad_config_is_one_clear_error(section):
    with pytest.raises(pydantic.ValidationError):
        Config.model_validate(section)


def test_defaults_run_embedded_with_a_500ms_window():
    cfg = Config()
    assert cfg.embedded and cfg.debounce == 0.5 and cfg.node
