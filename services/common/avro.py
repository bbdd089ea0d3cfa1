"""Avro codec for every topic payload, using Avro single-object encoding:
``C3 01`` + 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema + the Avro body.

Readers resolve any known writer version to the newest version of the same schema, so producers
and consumers can be upgraded independently."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
MAGIC = b"\xc3\x01"
_FILE = re.compile(r"^(?P<name>[A-Za-z]+)\.v(?P<version>\d+)\.avsc$")


class DecodeError(ValueError):
    """A record that is not a Postbus Avro record (bad framing, unknown schema, corrupt body)."""


@dataclass(frozen=True)
class SchemaVersion:
    name: str
    version: int
    parsed: dict[str, Any]
    fingerprint: bytes


def _load(schema_dir: Path) -> dict[str, list[SchemaVersion]]:
    out: dict[str, list[SchemaVersion]] = {}
    for path in sorted(schema_dir.glob("*.avsc")):
        m = _FILE.match(path.name)
        if not m:
            raise ValueError(f"schema file name must be <Name>.v<N>.avsc: {path.name}")
        # each file is parsed on its own: named types of one version must not leak into another
        parsed = parse_schema(json.loads(path.read_text()), named_schemas={})
        canonical = to_parsing_canonical_form(parsed)
        fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))[::-1]  # spec: little-endian
        out.setdefault(m["name"], []).append(
            SchemaVersion(m["name"], int(m["version"]), parsed, fp)
        )
    for versions in out.values():
        versions.sort(key=lambda v: v.version)
    return out


class Codec:
    def __init__(self, schema_dir: Path = SCHEMA_DIR) -> None:
        self.schemas = _load(schema_dir)
        self._by_fp = {v.fingerprint: v for vs in self.schemas.values() for v in vs}
        # writer versions whose first two fields are strings, the second one ``type`` (events,
        # command envelopes): peek_type reads it without decoding the record
        self._typed = {v.fingerprint: v.name for vs in self.schemas.values() for v in vs if _type_second(v.parsed)}

    def latest(self, name: str) -> SchemaVersion:
        try:
            return self.schemas[name][-1]
        except KeyError:
            raise KeyError(f"unknown schema {name!r}") from None

    def encode(self, name: str, record: dict[str, Any]) -> bytes:
        schema = self.latest(name)
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(schema.fingerprint)
        schemaless_writer(buf, schema.parsed, record)
        return buf.getvalue()

    def peek_type(self, data: bytes | None, expect: str) -> str | None:
        """The ``type`` field of an ``expect`` record (a DeliveryEvent, a CommandEnvelope) read
        straight from its bytes, so a consumer that wants a few types skips the others without
        decoding them; None when the record cannot be read that way (not Postbus Avro, another
        schema, a truncated body): decode it to find out."""
        if not data or len(data) < 12 or data[:2] != MAGIC or self._typed.get(data[2:10]) != expect:
            return None
        try:
            n, i = read_long(data, 10)
            n, i = read_long(data, i + n)
            if n < 0 or i + n > len(data):
                return None
            return data[i:i + n].decode()
        except (IndexError, UnicodeDecodeError):
            return None

    def decode(self, data: bytes | None, expect: str | None = None) -> tuple[str, dict[str, Any]]:
        """Returns (schema name, record read with the newest version of that schema)."""
        if not data or len(data) < 10 or data[:2] != MAGIC:
            raise DecodeError("not an Avro single-object record")
        writer = self._by_fp.get(data[2:10])
        if writer is None:
            raise DecodeError(f"unknown writer schema fingerprint {data[2:10].hex()}")
        if expect is not None and writer.name != expect:
            raise DecodeError(f"expected a {expect} record, got {writer.name}")
        reader = self.latest(writer.name)
        try:
            record = schemaless_reader(
                io.BytesIO(data[10:]),
                writer.parsed,
                reader.parsed if reader is not writer else None,
            )
        except Exception as exc:  # fastavro raises several types on corrupt bodies
            raise DecodeError(f"corrupt {writer.name} body: {exc}") from exc
        return writer.name, record  # type: ignore[return-value]


def _type_second(parsed: dict[str, Any]) -> bool:
    """A record whose first field is a string and whose second is the string ``type``."""
    f = parsed.get("fields", [])
    return len(f) >= 2 and f[0]["type"] == "string" and (f[1]["name"], f[1]["type"]) == ("type", "string")


def read_long(b: bytes, i: int) -> tuple[int, int]:
    """Avro long (zig-zag varint) at ``i`` -> (value, next index)."""
    shift = result = 0
    while True:
        byte = b[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (result >> 1) ^ -(result & 1), i
        shift += 7


_codec: Codec | None = None


def codec() -> Codec:
    global _codec
    if _codec is None:
        _codec = Codec()
    return _codec
