"""Credentials never leak, and never reach a cache key.

Secrets here: the S3 access and secret keys, a password in a URL's userinfo (which
cachefs refuses: credentials belong in the config or the environment) and the
signature, credential and token of a presigned URL. They must not appear in log
records (every logger at DEBUG), in exception messages or reprs (the whole chain),
in CLI output, or in any byte of any file under the cache root. URLs are named by
their canonical form, so the same object gets the same id whoever asks and with
whatever credentials.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
from servers import TEST_ACCESS_KEY, TEST_SECRET_KEY, RangeHTTPServer, S3Bucket

from cachefs.errors import OriginUnavailableError, VersionChangedError
from cachefs.node.config import load_config
from cachefs.node.engine import Engine
from cachefs.urls import object_id, parse_url

DATA = bytes(range(256)) * 700  # 175 KiB: three 64 KiB blocks
BLOCK = "64KiB"
FAST_RETRY = {"attempts": 2, "base_delay": 0.01, "max_delay": 0.02}
REPO_ROOT = Path(__file__).resolve().parents[1]

USER = "alice"
PASSWORD = "pw-cachefs-7c2e91"
SIGNATURE = "sig0cachefs0d41f7"
CREDENTIAL = "cred-cachefs-83aa"
TOKEN = "tok-cachefs-5b60"
PRESIGNED_QUERY = (
    f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={CREDENTIAL}"
    f"&X-Amz-Security-Token={TOKEN}&X-Amz-Signature={SIGNATURE}"
)
HTTP_SECRETS = (PASSWORD, SIGNATURE, CREDENTIAL, TOKEN)
# Names that only a signed URL carries: none may be printed or stored either.
SIGNED_NAMES = ("X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token")
SECRETS = (TEST_ACCESS_KEY, TEST_SECRET_KEY, *HTTP_SECRETS, *SIGNED_NAMES)
# The AWS SDK's own DEBUG records show request signing (the access key id and each
# signature): that is botocore's documented behaviour, outside cachefs's control. Even
# there the secret key and the HTTP origin's secrets must not appear.
SDK_LOGGERS = ("botocore", "aiobotocore")
SDK_FORBIDDEN = (TEST_SECRET_KEY, *HTTP_SECRETS)


def leaks(text: str | bytes, secrets: tuple[str, ...] = SECRETS) -> list[str]:
    """The secrets that ``text`` contains."""
    if isinstance(text, bytes):
        return [s for s in secrets if s.encode() in text]
    return [s for s in secrets if s in text]


def with_userinfo(url: str) -> str:
    """``url`` with the test user and password in it."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{USER}:{PASSWORD}@{rest}"


def presigned(url: str) -> str:
    """``url`` with a presigned query string."""
    return f"{url}?{PRESIGNED_QUERY}"


class _Records(logging.Handler):
    """Keeps every record, formatted with its traceback, and its logger name."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, self.format(record)))


@pytest.fixture
def debug_logs() -> Iterator[_Records]:
    """Every logger at DEBUG, every record kept, for the duration of the test."""
    handler = _Records()
    root = logging.getLogger()
    loggers = [root] + [
        logger
        for logger in logging.root.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    levels = [(logger, logger.level, logger.disabled) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.disabled = False
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
    for logger, level, disabled in levels:
        logger.setLevel(level)
        logger.disabled = disabled


def assert_logs_clean(handler: _Records) -> None:
    """No record names a secret (the SDK's own signing records: no secret key)."""
    assert handler.records, "nothing was logged: the capture is not working"
    for name, text in handler.records:
        sdk = name.split(".")[0] in SDK_LOGGERS
        found = leaks(text, SDK_FORBIDDEN if sdk else SECRETS)
        assert not found, f"logger {name} leaked {found}: {text[:300]}"


def exception_texts(exc: BaseException) -> list[str]:
    """str and repr of ``exc`` and of every exception chained to it."""
    texts: list[str] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        texts += [str(current), repr(current), *map(str, current.args)]
        todo += [current.__cause__, current.__context__]
    return texts


def expect_failure(
    call: Callable[[], Any], error: type[BaseException] | tuple[type[BaseException], ...]
) -> BaseException:
    """Run ``call``: it must raise ``error``, with no secret anywhere in the chain."""
    with pytest.raises(error) as info:
        call()
    for text in exception_texts(info.value):
        assert not leaks(text), f"{type(info.value).__name__} leaked {leaks(text)}: {text}"
    return info.value


def assert_cache_clean(root: Path) -> None:
    """No file under the cache root (data, meta, pins) holds a secret."""
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "meta" for p in files), "the cache holds no object"
    assert any(p.parent.name == "pins" for p in files), "the cache holds no pin"
    for path in files:
        found = leaks(path.read_bytes())
        assert not found, f"{path.relative_to(root)} holds {found}"
        assert not leaks(str(path.relative_to(root)))


def run_cli(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a child with the current (credentialed) environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
    return subprocess.run(
        [sys.executable, "-m", "cachefs.cli", "--cache-dir", str(cache), *args],
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_cli_clean(result: subprocess.CompletedProcess[str], code: int) -> None:
    """The run exited with ``code`` and printed no secret."""
    assert result.returncode == code, result.stderr
    for stream in (result.stdout, result.stderr):
        assert not leaks(stream), f"CLI output leaked {leaks(stream)}: {stream}"


def make_engine(cache: Path, **options: Any) -> Engine:
    """An engine with small blocks and quick retries; ``options`` are storage options."""
    config = load_config(
        overrides={"cache_dir": str(cache), "block_size": BLOCK, "retry": FAST_RETRY},
        environ={},
    )
    return Engine(config, options or None)


@pytest.fixture
def engine(cache_dir: Path) -> Iterator[Engine]:
    """An engine on the test's cache directory."""
    eng = make_engine(cache_dir)
    yield eng
    eng.close()


# ------------------------------------------------------------------ S3


def test_s3_credentials_do_not_leak(
    s3: S3Bucket, engine: Engine, cache_dir: Path, debug_logs: _Records
) -> None:
    """S3 keys and presigned signatures stay out of logs, errors, files and CLI output."""
    s3.put("model.bin", DATA)
    s3.put("gone.bin", DATA)
    s3.put("dir/a.bin", DATA[:1000])
    url = s3.url("model.bin")
    assert engine.read(url) == DATA
    engine.prefetch([s3.url("dir/")], pin="job:train")
    assert engine.open_local(url).read_bytes() == DATA

    ref = engine.stat(s3.url("gone.bin"))
    s3.fail_next(1, 403, key="gone.bin")
    expect_failure(lambda: engine.read_ref(ref, 0, 10), PermissionError)
    s3.fail_next(1, 404, key="gone.bin")
    expect_failure(lambda: engine.read_ref(ref, 0, 10), FileNotFoundError)
    s3.fail_next(2, 503, key="gone.bin")
    expect_failure(lambda: engine.read_ref(ref, 0, 10), OriginUnavailableError)
    s3.fail_next(1, 403, key="gone.bin", methods=("HEAD",))
    expect_failure(lambda: make_engine(cache_dir).stat(s3.url("gone.bin")), PermissionError)
    s3.put("gone.bin", DATA[::-1])
    expect_failure(lambda: engine.read_ref(ref, 0, 10), VersionChangedError)
    expect_failure(lambda: engine.read(s3.url("missing.bin")), FileNotFoundError)
    expect_failure(lambda: engine.prefetch(["s3://cachefs-no-such-bucket-1/x"]), OSError)

    fs = fsspec.filesystem(
        "cachefs",
        cache_dir=str(cache_dir),
        target_protocol="s3",
        target_options={"key": TEST_ACCESS_KEY, "secret": TEST_SECRET_KEY},
        skip_instance_cache=True,
    )
    assert fs.cat_file(f"{s3.name}/model.bin", 10, 20) == DATA[10:20]
    assert fs.ukey(f"{s3.name}/model.bin") == engine.stat(url).id
    expect_failure(lambda: fs.cat_file(f"{s3.name}/missing.bin"), FileNotFoundError)

    assert_logs_clean(debug_logs)
    assert_cache_clean(cache_dir)
    for obj in engine.store.objects():
        assert obj.header.url.startswith(f"s3://{s3.name}/")

    assert_cli_clean(run_cli(cache_dir, "prefetch", "--json", "--pin", url), 0)
    assert_cli_clean(run_cli(cache_dir, "prefetch", s3.url("missing.bin")), 1)
    s3.fail_next(10, 503)
    assert_cli_clean(run_cli(cache_dir, "prefetch", "--json", s3.url("dir/")), 0)
    assert_cli_clean(run_cli(cache_dir, "ls", "--json"), 0)
    assert_cli_clean(run_cli(cache_dir, "status", "--json"), 0)
    assert_cache_clean(cache_dir)


def test_s3_storage_options_do_not_change_keys(s3: S3Bucket, cache_dir: Path) -> None:
    """Different credentials (storage options) name the same cached object."""
    s3.put("model.bin", DATA)
    url = s3.url("model.bin")
    plain = make_engine(cache_dir)
    keyed = make_engine(
        cache_dir, s3={"key": "AKIAOTHERTESTKEY0000", "secret": "other-secret-for-keys"}
    )
    try:
        assert plain.stat(url).id == keyed.stat(url).id
        assert keyed.stat(url.replace("s3://", "s3a://")).id == plain.stat(url).id
        assert keyed.read(url, 0, 100) == DATA[:100]
        assert [o.id for o in plain.store.objects()] == []  # its index is per engine
        assert plain.read(url, 0, 100) == DATA[:100]
        assert len({o.id for o in plain.store.objects()}) == 1
        assert s3.gets("model.bin") == [(0, 65535)]  # the second engine reused the block
    finally:
        plain.close()
        keyed.close()
    fs_a = fsspec.filesystem(
        "cachefs", cache_dir=str(cache_dir), target_protocol="s3", skip_instance_cache=True
    )
    fs_b = fsspec.filesystem(
        "cachefs",
        cache_dir=str(cache_dir),
        target_protocol="s3",
        target_options={"key": TEST_ACCESS_KEY, "secret": TEST_SECRET_KEY},
        skip_instance_cache=True,
    )
    assert fs_a.ukey(f"{s3.name}/model.bin") == fs_b.ukey(f"{s3.name}/model.bin")


# ---------------------------------------------------------------- HTTP


def test_http_presigned_query_does_not_leak(
    http_origin: RangeHTTPServer, engine: Engine, cache_dir: Path, debug_logs: _Records
) -> None:
    """A presigned query never surfaces, whatever happens; it reaches the origin as given."""
    http_origin.put("/model.bin", DATA)
    http_origin.put("/other.bin", DATA[:5000])
    http_origin.put("/dir/a.bin", DATA[:3000])
    url = presigned(http_origin.url("/model.bin"))
    assert engine.read(url) == DATA
    assert engine.read(presigned(http_origin.url("/other.bin"))) == DATA[:5000]
    engine.prefetch([presigned(http_origin.url("/dir/"))], pin="job:eval")
    assert all(r.query == PRESIGNED_QUERY for r in http_origin.requests if r.path == "/model.bin")

    http_origin.put("/fail.bin", DATA[:5000])
    ref = engine.stat(presigned(http_origin.url("/fail.bin")))
    http_origin.fail_next(1, 403, path="/fail.bin")
    expect_failure(lambda: engine.read_ref(ref, 0, 1), PermissionError)
    http_origin.fail_next(1, 404, path="/fail.bin")
    expect_failure(lambda: engine.read_ref(ref, 0, 1), FileNotFoundError)
    http_origin.fail_next(2, 503, path="/fail.bin")
    expect_failure(lambda: engine.read_ref(ref, 0, 1), OriginUnavailableError)
    http_origin.reset_connection_next(2, path="/fail.bin")
    expect_failure(lambda: engine.read_ref(ref, 0, 4000), OriginUnavailableError)
    http_origin.put("/fail.bin", DATA[:5000][::-1])
    expect_failure(lambda: engine.read_ref(ref, 0, 1), VersionChangedError)
    expect_failure(lambda: engine.read(presigned(http_origin.url("/none.bin"))), FileNotFoundError)
    expect_failure(lambda: engine.prefetch([presigned(http_origin.url("/nodir/"))]), OSError)
    http_origin.fail_next(2, 503, path="/flaky.bin", methods=("HEAD",))
    expect_failure(lambda: engine.stat(presigned(http_origin.url("/flaky.bin"))), OSError)

    fs = fsspec.filesystem("cachefs", cache_dir=str(cache_dir), skip_instance_cache=True)
    assert fs.cat_file(url, 5, 10) == DATA[5:10]
    assert fs.info(url)["url"] == http_origin.url("/model.bin")
    expect_failure(lambda: fs.cat_file(presigned(http_origin.url("/none.bin"))), OSError)
    with fsspec.open(f"cachefs::{url}", cache_dir=str(cache_dir)) as f:
        assert f.read(7) == DATA[:7]

    assert_logs_clean(debug_logs)
    assert_cache_clean(cache_dir)
    for obj in engine.store.objects():
        assert "@" not in obj.header.url and "?" not in obj.header.url

    assert_cli_clean(run_cli(cache_dir, "prefetch", "--json", "--pin", url), 0)
    assert_cli_clean(run_cli(cache_dir, "prefetch", url), 0)
    assert_cli_clean(run_cli(cache_dir, "prefetch", presigned(http_origin.url("/none"))), 1)
    http_origin.fail_next(10, 503)
    assert_cli_clean(run_cli(cache_dir, "prefetch", url), 0)  # cached: no GET
    assert_cli_clean(run_cli(cache_dir, "ls", "--json", url), 0)
    assert_cli_clean(run_cli(cache_dir, "ls", url), 0)
    assert_cli_clean(run_cli(cache_dir, "evict", url), 1)  # pinned
    assert_cli_clean(run_cli(cache_dir, "unpin", "--holder", "job:eval", url), 0)
    assert_cache_clean(cache_dir)


def test_userinfo_is_refused_without_leaking(
    http_origin: RangeHTTPServer,
    s3: S3Bucket,
    engine: Engine,
    cache_dir: Path,
    debug_logs: _Records,
) -> None:
    """``user:password@`` in a URL is refused before any request, by every interface,
    with a message that says where credentials go and never shows them."""
    http_origin.put("/model.bin", DATA)
    s3.put("model.bin", DATA)
    fs = fsspec.filesystem("cachefs", cache_dir=str(cache_dir), skip_instance_cache=True)
    for url in (
        with_userinfo(http_origin.url("/model.bin")),
        presigned(with_userinfo(http_origin.url("/model.bin"))),
        with_userinfo(http_origin.url("/")),
        f"s3://{TEST_ACCESS_KEY}:{TEST_SECRET_KEY}@{s3.name}/model.bin",
    ):
        for call in (
            lambda url=url: engine.read(url),
            lambda url=url: engine.prefetch([url], pin="job:x"),
            lambda url=url: fs.cat_file(url),
            lambda url=url: fs.info(url),
        ):
            error = expect_failure(call, ValueError)
            for fragment in ("credentials in a URL are not accepted", "origins:"):
                assert fragment in str(error), str(error)
        result = run_cli(cache_dir, "prefetch", url)
        assert_cli_clean(result, 1)
        assert "credentials in a URL are not accepted" in result.stderr
    assert http_origin.requests == [] and s3.requests == []
    assert_logs_clean(debug_logs)


# ------------------------------------------------------- canonical keys


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        (f"https://Example.COM/x?{PRESIGNED_QUERY}", "https://example.com/x"),
        ("https://example.com:443/x", "https://example.com/x"),
        ("http://example.com:80/x", "http://example.com/x"),
        ("http://example.com:8080/x", "http://example.com:8080/x"),
        (
            f"https://h/x?X-Goog-Signature={SIGNATURE}&X-Goog-Credential={CREDENTIAL}",
            "https://h/x",
        ),
        (f"https://h/x?sv=2022&se=2030&sp=r&sig={SIGNATURE}", "https://h/x"),
        (f"https://h/x?access_token={TOKEN}&b=2&a=1", "https://h/x?a=1&b=2"),
        (f"https://h/x?Signature={SIGNATURE}&AWSAccessKeyId=AKIA&Expires=1", "https://h/x"),
        (f"s3://bucket/key?X-Amz-Signature={SIGNATURE}&versionId=7", "s3://bucket/key?versionId=7"),
        ("s3a://bucket/key", "s3://bucket/key"),
    ],
)
def test_canonical_url_drops_secrets(given: str, canonical: str) -> None:
    """Signing parameters never reach the canonical URL (or its repr)."""
    url = parse_url(given)
    assert url.canonical == canonical
    assert str(url) == canonical
    assert not leaks(repr(url)) and not leaks(url.canonical)


def test_credentialed_and_plain_urls_share_an_object(
    http_origin: RangeHTTPServer, engine: Engine, cache_dir: Path
) -> None:
    """``https://host/x?X-Amz-Signature=..`` and ``https://host/x``: one object id."""
    http_origin.put("/x.bin", DATA)
    plain = http_origin.url("/x.bin")
    secret = presigned(plain)
    assert parse_url(secret).canonical == parse_url(plain).canonical == plain
    ref = engine.stat(secret)
    assert ref.id == object_id(plain, ref.version)
    assert engine.read(secret, 0, 1000) == DATA[:1000]
    gets = len(http_origin.gets("/x.bin"))
    fresh = make_engine(cache_dir)  # another engine: only the store is shared
    try:
        assert fresh.stat(plain).id == ref.id
        assert fresh.read(plain, 0, 1000) == DATA[:1000]
    finally:
        fresh.close()
    assert len(http_origin.gets("/x.bin")) == gets  # served from the same cached block
    assert [o.header.url for o in engine.store.objects()] == [plain]
