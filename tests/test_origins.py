"""Origins: retries, per-prefix storage options, versions, and many ranged GETs in flight."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Background
from servers import RangeHTTPServer, S3Bucket, wait_for

from cachefs.errors import OriginUnavailableError
from cachefs.node.config import load_config
from cachefs.node.engine import Engine
from cachefs.node.origins.ranged_http import RangedHTTPClient
from cachefs.node.sinks import BufferSink

KIB = 1024
BLOCK = 64 * KIB
DATA = os.urandom(150 * KIB)  # three blocks: two full, one partial
BLOCK0 = (0, BLOCK - 1)
ATTEMPTS = 3


def make_engine(cache: Path, **overrides: Any) -> Engine:
    """An engine with 64 KiB blocks and quick retries, ``overrides`` on top."""
    settings: dict[str, Any] = {
        "cache_dir": str(cache),
        "block_size": "64KiB",
        "revalidate_after": 0,
        "retry": {"attempts": ATTEMPTS, "base_delay": 0.001, "max_delay": 0.01},
    }
    settings.update(overrides)
    return Engine(load_config(overrides=settings, environ={}))


@pytest.fixture
def engine(cache_dir: Path) -> Iterator[Engine]:
    """An engine on the test's cache directory (see ``make_engine``)."""
    eng = make_engine(cache_dir)
    yield eng
    eng.close()


def statuses(records: list[Any], path: str) -> list[int | None]:
    """Statuses of the object GETs of ``path`` (an S3 key's path or an HTTP path)."""
    return [r.status for r in records if r.object_get and r.path.endswith(path)]


# --------------------------------------------------------------- retries


@pytest.mark.parametrize(("status", "times"), [(503, 2), (500, 1), (429, 2)])
def test_s3_transient_errors_are_retried(
    s3: S3Bucket, engine: Engine, status: int, times: int
) -> None:
    """503 SlowDown, 500 InternalError, 429: retried, then the right bytes."""
    s3.put("m.bin", DATA)
    ref = engine.stat(s3.url("m.bin"))
    s3.fail_next(times, status, key="m.bin")
    assert engine.read_ref(ref, 100, 1000) == DATA[100:1000]
    assert s3.gets("m.bin") == [BLOCK0] * (times + 1)
    assert statuses(s3.requests, "/m.bin") == [status] * times + [206]
    assert engine.stats.snapshot()["origin_errors"] == {"TransientOriginError": times}


def test_http_connection_reset_is_retried(http_origin: RangeHTTPServer, engine: Engine) -> None:
    """A connection cut mid-body is retried on a new connection; no torn block is kept."""
    http_origin.put("/m.bin", DATA)
    http_origin.reset_connection_next(1, path="/m.bin", after=1000)
    assert engine.read(http_origin.url("/m.bin"), 0, 2000) == DATA[:2000]
    assert http_origin.gets("/m.bin") == [BLOCK0, BLOCK0]
    assert [r.aborted for r in http_origin.requests if r.object_get] == [True, False]
    (obj,) = engine.store.objects()
    assert engine.store.verify(obj) == []
    assert list(obj.present) == [0]


def test_http_transient_status_is_retried(http_origin: RangeHTTPServer, engine: Engine) -> None:
    """A plain HTTP origin's 502 is retried like S3's 5xx."""
    http_origin.put("/m.bin", DATA)
    ref = engine.stat(http_origin.url("/m.bin"))
    http_origin.fail_next(2, 502, path="/m.bin")
    assert engine.read_ref(ref, 0, 10) == DATA[:10]
    assert http_origin.gets("/m.bin") == [BLOCK0] * 3


@pytest.mark.parametrize("kind", ["s3", "http"])
@pytest.mark.parametrize(
    ("status", "error", "advice"),
    [
        (404, FileNotFoundError, "check the URL"),
        (403, PermissionError, "check the credentials"),
    ],
)
def test_client_errors_are_not_retried(
    kind: str,
    status: int,
    error: type[Exception],
    advice: str,
    s3: S3Bucket,
    http_origin: RangeHTTPServer,
    engine: Engine,
) -> None:
    """404 and 403 are final: exactly one request, a builtin error naming the URL."""
    if kind == "s3":
        s3.put("m.bin", DATA)
        url = s3.url("m.bin")
        ref = engine.stat(url)
        s3.fail_next(1, status, key="m.bin")
        gets: Callable[[], list[Any]] = lambda: s3.gets("m.bin")  # noqa: E731
    else:
        http_origin.put("/m.bin", DATA)
        url = http_origin.url("/m.bin")
        ref = engine.stat(url)
        http_origin.fail_next(1, status, path="/m.bin")
        gets = lambda: http_origin.gets("/m.bin")  # noqa: E731
    with pytest.raises(error) as info:
        engine.read_ref(ref, 0, 10)
    assert url in str(info.value) and advice in str(info.value)
    assert f"HTTP {status}" in str(info.value)
    assert gets() == [BLOCK0]
    assert engine.read_ref(ref, 0, 10) == DATA[:10]  # no fault left: the next read works


def test_s3_denied_stat_is_clear(s3: S3Bucket, engine: Engine) -> None:
    """A 403 on the metadata request: PermissionError naming the URL, not retried."""
    s3.put("m.bin", DATA)
    s3.fail_next(1, 403, key="m.bin", methods=("HEAD",))
    with pytest.raises(PermissionError) as info:
        engine.stat(s3.url("m.bin"))
    assert s3.url("m.bin") in str(info.value) and "check the credentials" in str(info.value)
    assert s3.heads("m.bin") == 1
    assert engine.stat(s3.url("m.bin")).size == len(DATA)


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_gives_up_after_attempts(
    kind: str, s3: S3Bucket, http_origin: RangeHTTPServer, engine: Engine
) -> None:
    """After ``attempts`` transient failures: OriginUnavailableError saying what happened."""
    if kind == "s3":
        s3.put("m.bin", DATA)
        url = s3.url("m.bin")
        ref = engine.stat(url)
        s3.fail_next(ATTEMPTS, 503, key="m.bin")
        gets: Callable[[], list[Any]] = lambda: s3.gets("m.bin")  # noqa: E731
    else:
        http_origin.put("/m.bin", DATA)
        url = http_origin.url("/m.bin")
        ref = engine.stat(url)
        http_origin.fail_next(ATTEMPTS, 503, path="/m.bin")
        gets = lambda: http_origin.gets("/m.bin")  # noqa: E731
    with pytest.raises(OriginUnavailableError) as info:
        engine.read_ref(ref, 0, 10)
    message = str(info.value)
    assert isinstance(info.value, ConnectionError)
    assert url in message
    assert f"after {ATTEMPTS} attempts" in message
    assert "HTTP 503" in message
    assert "retry later" in message
    assert gets() == [BLOCK0] * ATTEMPTS
    assert engine.store.get(ref.id) is None or 0 not in engine.store.get(ref.id).present
    assert engine.read_ref(ref, 0, 10) == DATA[:10]  # nothing poisoned: a retry works


def test_prefetch_fails_whole_after_attempts(s3: S3Bucket, engine: Engine) -> None:
    """A prefetch whose block keeps failing raises OriginUnavailableError, not a partial OK."""
    s3.put("m.bin", DATA)
    s3.fail_next(3 * ATTEMPTS, 503, key="m.bin")  # every attempt of all three blocks
    ref = engine.stat(s3.url("m.bin"))
    with pytest.raises(OriginUnavailableError):
        engine.prefetch([s3.url("m.bin")])
    # The other blocks' fills run on after the first failure: let them end.
    wait_for(lambda: not engine._flights, message="every fill finished")
    assert len(s3.gets("m.bin")) == 3 * ATTEMPTS
    assert not engine.store.get(ref.id).present
    result = engine.prefetch([s3.url("m.bin")])
    assert result.bytes == len(DATA)
    assert engine.read(s3.url("m.bin")) == DATA


# ------------------------------------------------------ storage options


@pytest.mark.parametrize("env_endpoint", ["unusable", "unset"])
def test_per_prefix_storage_options(
    env_endpoint: str, s3: S3Bucket, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Options of the longest matching prefix reach s3fs: they, not the env, pick the endpoint."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        if env_endpoint == "unset":
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    s3.put("m.bin", DATA)
    unreachable = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    origins = [
        {"prefix": "s3://", "options": unreachable},
        {"prefix": f"s3://{s3.name}/", "options": {"client_kwargs": {"endpoint_url": s3.endpoint}}},
    ]
    engine = make_engine(cache_dir, origins=origins)
    try:
        assert engine.read(s3.url("m.bin")) == DATA
    finally:
        engine.close()
    assert s3.heads("m.bin") >= 1
    assert sorted(r for r in s3.gets("m.bin") if r is not None) == [
        (0, BLOCK - 1),
        (BLOCK, 2 * BLOCK - 1),
        (2 * BLOCK, len(DATA) - 1),
    ]


def test_storage_options_from_config_file(
    s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same through a YAML config file's ``origins`` section."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    s3.put("m.bin", DATA)
    config = tmp_path / "cachefs.yaml"
    config.write_text(
        f"cache_dir: {tmp_path / 'cache'}\nblock_size: 64KiB\norigins:\n"
        f"  - prefix: s3://{s3.name}/\n"
        f"    options:\n      client_kwargs:\n        endpoint_url: {s3.endpoint}\n"
    )
    engine = Engine(load_config(config, environ={}))
    try:
        assert engine.read(s3.url("m.bin"), 1000, 10) == DATA[1000:1010]
    finally:
        engine.close()
    assert s3.gets("m.bin") == [BLOCK0]


# -------------------------------------------------------------- versions


def test_s3_version_is_the_etag(s3: S3Bucket, engine: Engine) -> None:
    """An S3 object's version is its ETag, and every ranged GET is conditional on it."""
    etag = s3.put("m.bin", DATA)
    ref = engine.stat(s3.url("m.bin"))
    assert (ref.version, ref.etag, ref.size) == (f"etag:{etag}", etag, len(DATA))
    engine.read(s3.url("m.bin"))
    gets = [r for r in s3.requests if r.object_get]
    assert len(gets) == 3 and all(r.if_match == etag for r in gets)
    new_etag = s3.put("m.bin", DATA[::-1])
    assert new_etag != etag
    fresh = engine.stat(s3.url("m.bin"))
    assert fresh.version == f"etag:{new_etag}" and fresh.id != ref.id


def test_http_version_is_the_strong_etag(http_origin: RangeHTTPServer, engine: Engine) -> None:
    """A strong ETag is the version, and GETs carry If-Match with it."""
    etag = http_origin.put("/m.bin", DATA)
    ref = engine.stat(http_origin.url("/m.bin"))
    assert (ref.version, ref.etag, ref.size) == (f"etag:{etag}", etag, len(DATA))
    assert engine.read(http_origin.url("/m.bin"), 0, 100) == DATA[:100]
    assert [r.if_match for r in http_origin.requests if r.object_get] == [etag]
    http_origin.put("/m.bin", DATA[::-1])
    assert engine.stat(http_origin.url("/m.bin")).id != ref.id


def test_http_version_without_etag(http_origin: RangeHTTPServer, engine: Engine) -> None:
    """Without an ETag the version is size + Last-Modified, and GETs are unconditional."""
    http_origin.send_etag = False
    http_origin.put("/m.bin", DATA)
    ref = engine.stat(http_origin.url("/m.bin"))
    last_modified = http_origin.last_modified("/m.bin")
    assert ref.version == f"size:{len(DATA)}:last-modified:{last_modified}"
    assert ref.etag is None
    assert engine.read(http_origin.url("/m.bin"), 0, 100) == DATA[:100]
    assert [r.if_match for r in http_origin.requests if r.object_get] == [None]
    http_origin.put("/m.bin", DATA[::-1])  # same size, later Last-Modified
    changed = engine.stat(http_origin.url("/m.bin"))
    assert changed.version != ref.version and changed.id != ref.id
    assert engine.read(http_origin.url("/m.bin"), 0, 100) == DATA[::-1][:100]


def test_file_version_is_size_and_mtime(tmp_path: Path, engine: Engine) -> None:
    """A local file's version is its size and mtime: a touch makes a new version."""
    path = tmp_path / "m.bin"
    path.write_bytes(DATA)
    os.utime(path, (1_700_000_000.5, 1_700_000_000.5))
    url = f"file://{path}"
    ref = engine.stat(url)
    assert ref.version.startswith(f"size:{len(DATA)}:mtime:")
    assert "1700000000.5" in ref.version
    assert engine.stat(url).version == ref.version
    assert engine.read(url, 10, 20) == DATA[10:30]
    os.utime(path, (1_700_000_100.0, 1_700_000_100.0))
    touched = engine.stat(url)
    assert touched.version != ref.version and touched.id != ref.id
    path.write_bytes(DATA[:1000])
    assert engine.stat(url).version.startswith("size:1000:mtime:")


# ------------------------------------------------- ranged GETs in flight


def test_prefetch_keeps_many_gets_in_flight(s3: S3Bucket, cache_dir: Path) -> None:
    """With the default concurrency (16) a 32-block prefetch has >= 8 GETs in flight."""
    data = os.urandom(32 * 4 * KIB)
    s3.put("big.bin", data)
    engine = make_engine(cache_dir, block_size="4KiB")
    assert engine.config.concurrency == 16
    try:
        with s3.hold_gets("big.bin") as gate:
            job = Background(lambda: engine.prefetch([s3.url("big.bin")]))
            gate.wait_held(count=8, timeout=20)
            assert gate.held >= 8
        result = job.join()
        assert result.fetched_bytes == len(data)
        assert engine.read(s3.url("big.bin")) == data
    finally:
        engine.close()
    assert len(s3.gets("big.bin")) == 32
    assert not gate.timed_out


def test_concurrency_limit_is_never_exceeded(http_origin: RangeHTTPServer, cache_dir: Path) -> None:
    """With concurrency 2, at most 2 GETs are ever in flight; releasing one admits one."""
    blocks, block = 32, 4 * KIB
    data = os.urandom(blocks * block)
    http_origin.put("/big.bin", data)
    gates = [
        http_origin.hold_gets(
            "/big.bin", lambda r, i=i: r.byte_range is not None and r.byte_range[0] == i * block
        )
        for i in range(blocks)
    ]
    engine = make_engine(cache_dir, block_size="4KiB", concurrency=2)
    try:
        job = Background(lambda: engine.prefetch([http_origin.url("/big.bin")]))
        most = 0
        for released in range(blocks):
            waiting = min(2, blocks - released)
            wait_for(
                lambda waiting=waiting: (
                    sum(1 for g in gates if g.held and not g.released) >= waiting
                ),
                timeout=20,
                message=f"{waiting} GETs held after {released} released",
            )
            arrived = sum(g.hits for g in gates)
            assert arrived - released <= 2, f"{arrived} GETs arrived, {released} finished"
            most = max(most, arrived - released)
            next(g for g in gates if g.held and not g.released).release()
        result = job.join()
    finally:
        for gate in gates:
            gate.release()
        engine.close()
    assert most == 2
    assert result.fetched_bytes == len(data)
    assert len(http_origin.gets("/big.bin")) == blocks


def test_s3_metadata_errors_use_cachefs_retries(s3: S3Bucket, cache_dir: Path) -> None:
    """A HEAD answered 503 is retried by cachefs's policy (not the SDK's), and when
    it keeps failing the error names the URL."""
    s3.put("meta.bin", DATA)
    engine = make_engine(cache_dir)
    try:
        s3.fail_next(ATTEMPTS - 1, 503, key="meta.bin", methods=("HEAD",))
        assert engine.stat(s3.url("meta.bin")).size == len(DATA)
        assert s3.heads("meta.bin") == ATTEMPTS
        s3.reset_requests()
        s3.fail_next(ATTEMPTS, 503, key="meta.bin", methods=("HEAD",))
        with pytest.raises(OriginUnavailableError, match=s3.url("meta.bin")):
            engine.stat(s3.url("meta.bin"))
        assert s3.heads("meta.bin") == ATTEMPTS
    finally:
        engine.close()


def test_an_etag_has_one_spelling_whether_head_or_a_listing_gave_it() -> None:
    from cachefs.node.origins.s3 import quoted_etag

    # rclone's S3 server quotes ETags in HEAD answers but not in listings.
    assert quoted_etag("810c05c3") == quoted_etag('"810c05c3"') == '"810c05c3"'
    assert quoted_etag('W/"weak"') == 'W/"weak"'
    assert quoted_etag(' "x" ') == '"x"'
    assert quoted_etag("") is None and quoted_etag(None) is None


def test_an_error_answer_keeps_its_connection(http_origin: RangeHTTPServer) -> None:
    """An error answer read to its end leaves the connection usable: a peer's "not
    cached here" or an origin's 404 costs no new connection (nor TLS handshake)."""
    http_origin.put("/m/a.bin", DATA)
    client = RangedHTTPClient()
    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            client.get_range(http_origin.url("/m/missing.bin"), 0, 10, BufferSink(10), "missing")
        sink = BufferSink(10)
        client.get_range(http_origin.url("/m/a.bin"), 5, 15, sink, "a.bin")
        assert sink.buffer == DATA[5:15]
    assert http_origin.connections_opened == 1
