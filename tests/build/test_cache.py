"""Tests of the content-addressed compile cache and the project's one hashing helper."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from joblib import Parallel, delayed

from furiosa_build.cache import CompileCache, cache_key, canonical_json

PROGRAM_INPUT = {
    "graph": "embedding",
    "bucket": [1, 128, 0],
    "shape": (1, 128),
    "scale": 0.125,
    "dtype": "bfloat16",
    "name": "blöck",
}
OPTIONS = {"fuse": ["rmsnorm", "rope"], "tp": 2, "eps": np.float32(1e-5)}
PAYLOAD = b'{"instructions":[{"op":"matmul"}]}'

# Computed once and hard-coded: if these change, every cached program is invalidated.
# Change them only on purpose, together with the key derivation.
PINNED_KEY = "d7f77b825ed4ff79241ee43d0bf8084cfca0695b21cac885ff6c75f058584b32"
PINNED_EMPTY_KEY = "d5651c3d12a7d4379af950e6d5b947b947d5580417f0c669b3a685afa138c10a"

KEY = cache_key(PROGRAM_INPUT, OPTIONS, "0.1.0")
OTHER_KEY = cache_key(PROGRAM_INPUT, OPTIONS, "0.2.0")


def _one_warning_about(key: str, caught: list[warnings.WarningMessage]) -> str:
    """Return the message of the single corruption warning recorded for ``key``."""
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"compile cache entry {key} is corrupted (")
    assert messages[0].endswith("); recompiling")
    return messages[0]


# ------------------------------------------------------------------ canonical_json / key


def test_cache_key_digests_are_pinned() -> None:
    assert cache_key(PROGRAM_INPUT, OPTIONS, "0.1.0") == PINNED_KEY
    assert cache_key({}, {}, "0") == PINNED_EMPTY_KEY


def test_cache_key_changes_with_options_and_compiler_version() -> None:
    base = cache_key(PROGRAM_INPUT, OPTIONS, "0.1.0")
    assert cache_key(PROGRAM_INPUT, {**OPTIONS, "tp": 4}, "0.1.0") != base
    assert cache_key(PROGRAM_INPUT, OPTIONS, "0.1.1") != base
    assert cache_key({**PROGRAM_INPUT, "bucket": [1, 128, 127]}, OPTIONS, "0.1.0") != base


def test_canonical_json_ignores_dict_key_order() -> None:
    a = {"b": 1, "a": {"y": [1, 2], "x": None}}
    b = {"a": {"x": None, "y": [1, 2]}, "b": 1}
    assert canonical_json(a) == canonical_json(b) == b'{"a":{"x":null,"y":[1,2]},"b":1}'
    assert cache_key(a, {}, "v") == cache_key(b, {}, "v")


def test_canonical_json_normalises_tuples_numpy_scalars_and_unicode() -> None:
    value = {"t": (1, 2), "i": np.int64(3), "f": np.float64(0.1), "ok": np.bool_(True), "s": "é"}
    assert canonical_json(value) == '{"f":0.1,"i":3,"ok":true,"s":"é","t":[1,2]}'.encode()


def test_canonical_json_describes_arrays_by_dtype_shape_and_bytes() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)  # (2, 3)
    digest = hashlib.sha256(array.tobytes()).hexdigest()
    assert json.loads(canonical_json(array)) == {
        "__ndarray__": {"dtype": "float32", "shape": [2, 3], "sha256": digest}
    }
    big_endian = array.astype(">f4")
    assert canonical_json(big_endian) == canonical_json(array)
    assert canonical_json(array.T) != canonical_json(array)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1: "int key"}, {1, 2}, b"bytes"])
def test_canonical_json_rejects_values_without_one_spelling(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        canonical_json(bad)


# ------------------------------------------------------------------ CompileCache


def test_round_trip_and_layout(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path / "cache")
    assert not cache.contains(KEY)
    assert cache.get(KEY) is None

    cache.put(KEY, PAYLOAD)

    assert cache.contains(KEY)
    assert cache.get(KEY) == PAYLOAD
    path = tmp_path / "cache" / "programs" / KEY[:2] / f"{KEY}.json"
    assert cache.entry_path(KEY) == path
    header_line, payload = path.read_bytes().split(b"\n", 1)
    assert json.loads(header_line) == {
        "key": KEY,
        "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
        "size": len(PAYLOAD),
    }
    assert payload == PAYLOAD
    assert (cache.stats.hits, cache.stats.misses, cache.stats.writes) == (1, 1, 1)


def test_empty_payload_round_trips(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path)
    cache.put(KEY, b"")
    assert cache.get(KEY) == b""


def test_root_is_created_lazily_and_tilde_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cache = CompileCache(Path("~/furiosa-cache"))
    assert cache.root == tmp_path / "furiosa-cache"

    assert cache.get(KEY) is None
    assert not cache.contains(KEY)
    assert not (tmp_path / "furiosa-cache").exists()

    cache.put(KEY, PAYLOAD)
    assert cache.get(KEY) == PAYLOAD


def test_disabled_cache_misses_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cache = CompileCache(None)
    cache.put(KEY, PAYLOAD)
    assert not cache.enabled
    assert cache.get(KEY) is None
    assert not cache.contains(KEY)
    assert cache.stats.writes == 0 and cache.stats.misses == 1
    assert list(tmp_path.iterdir()) == []


def test_invalid_key_is_rejected(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path)
    for bad in ["../../etc/passwd", KEY.upper(), KEY[:-1]]:
        with pytest.raises(ValueError, match="64 lowercase hex"):
            cache.put(bad, PAYLOAD)


def test_flipped_byte_is_detected_and_entry_removed(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path)
    cache.put(KEY, PAYLOAD)
    path = cache.entry_path(KEY)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.get(KEY) is None

    assert "sha256" in _one_warning_about(KEY, caught)
    assert not path.exists()
    assert cache.stats.corrupted == 1
    # The caller recompiles and stores again: the cache heals.
    cache.put(KEY, PAYLOAD)
    assert cache.get(KEY) == PAYLOAD


@pytest.mark.parametrize("keep", [5, 40, -1])
def test_truncated_entry_is_a_miss(tmp_path: Path, keep: int) -> None:
    cache = CompileCache(tmp_path)
    cache.put(KEY, PAYLOAD)
    path = cache.entry_path(KEY)
    path.write_bytes(path.read_bytes()[:keep])

    with pytest.warns(UserWarning, match=f"compile cache entry {KEY} is corrupted"):
        assert cache.get(KEY) is None
    assert not path.exists()


def test_entry_of_another_key_is_rejected(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path)
    cache.put(OTHER_KEY, PAYLOAD)
    cache.entry_path(KEY).parent.mkdir(parents=True, exist_ok=True)
    cache.entry_path(KEY).write_bytes(cache.entry_path(OTHER_KEY).read_bytes())

    with pytest.warns(UserWarning, match="header names key"):
        assert cache.get(KEY) is None
    assert cache.get(OTHER_KEY) == PAYLOAD


def _hammer(root: str, key: str, payload: bytes, rounds: int) -> list[bool]:
    """Put the same entry ``rounds`` times, reading it back between writes."""
    cache = CompileCache(Path(root))
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corrupted read must fail the worker
        for _ in range(rounds):
            cache.put(key, payload)
            seen.append(cache.get(key) == payload)
    return seen


def test_concurrent_writers_of_one_key_leave_one_valid_entry(tmp_path: Path) -> None:
    payload = PAYLOAD * 1000  # large enough that a torn write would be visible
    results = Parallel(n_jobs=4, backend="loky")(
        delayed(_hammer)(str(tmp_path), KEY, payload, 20) for _ in range(4)
    )

    assert all(all(seen) for seen in results)
    cache = CompileCache(tmp_path)
    assert cache.get(KEY) == payload
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files == [cache.entry_path(KEY)]  # no temp files left behind


# ------------------------------------------------------------------ damage and write failures


def _warnings_of(action) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught]


def test_decode_hook_rejects_a_payload_with_a_valid_digest(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path)
    cache.put(KEY, b"\x00 not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.get(KEY, decode=json.loads) is None
    assert "payload cannot be decoded: " in _one_warning_about(KEY, caught)
    assert not cache.entry_path(KEY).exists()

    cache.put(KEY, PAYLOAD)
    assert cache.get(KEY, decode=json.loads) == {"instructions": [{"op": "matmul"}]}
    assert cache.get(KEY) == PAYLOAD


def test_an_entry_that_is_a_folder_is_removed(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path)
    cache.entry_path(KEY).mkdir(parents=True)
    (cache.entry_path(KEY) / "x").write_text("x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.get(KEY) is None
    assert "it is a folder" in _one_warning_about(KEY, caught)
    cache.put(KEY, PAYLOAD)
    assert cache.get(KEY) == PAYLOAD


def test_a_shard_that_is_a_file_is_removed_and_recreated(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path)
    shard = cache.entry_path(KEY).parent
    shard.parent.mkdir(parents=True)
    shard.write_text("not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.get(KEY) is None
    assert f"programs/{KEY[:2]} is a file" in _one_warning_about(KEY, caught)
    cache.put(KEY, PAYLOAD)
    assert cache.get(KEY) == PAYLOAD


def test_a_shard_that_is_a_file_met_by_put_is_replaced(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path)
    shard = cache.entry_path(KEY).parent
    shard.parent.mkdir(parents=True)
    shard.write_text("not a folder")
    assert len(_warnings_of(lambda: cache.put(KEY, PAYLOAD))) == 1
    assert cache.get(KEY) == PAYLOAD


@pytest.mark.parametrize("where", ["root", "programs"])
def test_a_file_where_the_layout_wants_a_folder_turns_the_cache_off_once(tmp_path: Path, where: str) -> None:
    root = tmp_path / "cache"
    blocker = root if where == "root" else root / "programs"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("the user's file")
    cache = CompileCache(root)

    def use() -> None:
        for key in (KEY, OTHER_KEY):
            assert cache.get(key) is None
            cache.put(key, PAYLOAD)
            assert not cache.contains(key)

    messages = _warnings_of(use)
    assert len(messages) == 1, messages
    assert messages[0] == f"compile cache {root} is unusable ({blocker} is not a folder); building without it"
    assert blocker.read_text() == "the user's file"  # not ours to delete


def test_a_write_failure_warns_once_and_reads_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    import furiosa_build.cache as cache_module

    cache = CompileCache(tmp_path)
    cache.put(KEY, PAYLOAD)

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_module, "atomic_write", full)
    messages = _warnings_of(lambda: [cache.put(OTHER_KEY, PAYLOAD) for _ in range(3)])
    assert len(messages) == 1 and messages[0].endswith(": no space left on device); building without storing to it")
    assert f"compile cache {tmp_path} cannot be written ({cache.entry_path(OTHER_KEY)}" in messages[0]
    assert cache.stats.writes == 1
    assert cache.get(KEY) == PAYLOAD
    assert cache.get(OTHER_KEY) is None


def test_an_unreadable_entry_is_a_miss_and_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = CompileCache(tmp_path)
    cache.put(KEY, PAYLOAD)
    real = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == cache.entry_path(KEY):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    messages = _warnings_of(lambda: cache.get(KEY))
    assert messages == [f"compile cache entry {KEY} cannot be read (permission denied); recompiling"]
    assert cache.entry_path(KEY).exists()


def test_put_sweeps_dead_writers_scratch_files_from_its_shard(tmp_path: Path) -> None:
    import subprocess

    from furiosa_build.scratch import ScratchName, make_scratch

    cache = CompileCache(tmp_path)
    shard = cache.entry_path(KEY).parent
    shard.mkdir(parents=True)
    child = subprocess.Popen(["true"])
    child.wait()
    live = make_scratch(shard, f"{KEY}.json")
    mine = ScratchName.parse(live.name)
    assert mine is not None
    dead = shard / f".{KEY}.json.furiosa-tmp.{mine.host}.{child.pid}.{mine.start}.0dead0"
    for path in (live, dead, shard / "README"):
        path.write_bytes(b"x")

    cache.put(KEY, PAYLOAD)

    assert not dead.exists()
    assert live.exists() and (shard / "README").exists()
