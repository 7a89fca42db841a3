"Shared test helpers."
from pathlib import Path

import pytest


@pytest.fixture
def damage_shard():
    "Corrupt a TFRecord shard in place: `truncate` it to two thirds, or `flip` 32 bytes in its middle."
    def damage(shard: Path, how: str):
        data = bytearray(shard.read_bytes())
        if how == "truncate":
            data = data[: len(data) * 2 // 3]
        else:
            mid = len(data) // 2
            data[mid: mid + 32] = bytes(b ^ 0xFF for b in data[mid: mid + 32])
        shard.write_bytes(bytes(data))
    return damage
