"""What a new user trips over on the client side: refused calls, wrong endpoints,
misspelt options, loader errors and the loader's reads."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import yaml
from daemon import TOKEN, run_cli
from servers import S3Bucket

from cachefs.client import NodeClient

KiB = 1024
BLOCK = 16 * KiB


# -- refused calls ---------------------------------------------------------------


def test_a_refused_call_is_logged_and_counted(start_node, monkeypatch) -> None:
    node = start_node()
    secret = "wrong-" + TOKEN
    monkeypatch.setenv("CACHEFS_TOKEN", secret)
    client = NodeClient(node.tcp_endpoint, timeout=10)
    try:
        with pytest.raises(PermissionError, match="token is wrong"):
            client.status()
        with pytest.raises(PermissionError, match="token is wrong"):
            client.ls("s3://bucket/prefix/")  # a streaming call
    finally:
        client.close()
    monkeypatch.delenv("CACHEFS_TOKEN")
    client = NodeClient(node.tcp_endpoint, timeout=10)
    try:
        with pytest.raises(PermissionError, match="no token"):
            client.status()
    finally:
        client.close()
    assert node.metric("cachefs_rpcs_total", method="Status", code="UNAUTHENTICATED") == 2
    assert node.metric("cachefs_rpcs_total", method="List", code="UNAUTHENTICATED") == 1
    refused = [r for r in node.records() if "refused" in str(r.get("msg", r.get("message")))]
    assert [r.get("method") for r in refused] == ["Status", "List", "Status"], node.lines
    assert all(secret not in line and TOKEN not in line for line in node.lines)


# -- endpoints -------------------------------------------------------------------


def test_the_metrics_port_as_endpoint_says_what_it_is(start_node) -> None:
    node = start_node()
    result = run_cli(
        "status", "--endpoint", node.serving["metrics_address"], env={"CACHEFS_TOKEN": TOKEN}
    )
    assert result.returncode != 0
    assert "not a cachefs node" in result.stderr, result.stderr
    assert "metrics" in result.stderr, result.stderr
    assert "Failed parsing HTTP/2" not in result.stderr, result.stderr


def test_a_socket_this_user_may_not_open_names_its_group(start_node, run_as_nobody) -> None:
    node = start_node(tcp=False, metrics=False)
    result = run_as_nobody(
        [*run_as_nobody.python, "-m", "cachefs.cli", "status", "--endpoint", node.unix_endpoint]
    )
    assert result.returncode != 0
    assert "Permission denied" in result.stderr, result.stderr
    assert "server.socket_group" in result.stderr, result.stderr


# -- storage options -------------------------------------------------------------


def test_a_misspelt_storage_option_is_an_error() -> None:
    with pytest.raises(TypeError) as raised:
        fsspec.filesystem("cachefs", endpont="unix:///nowhere.sock", skip_instance_cache=True)
    message = str(raised.value)
    assert "'endpont'" in message and "endpoint" in message and "local_reads" in message


def test_the_token_storage_option_reaches_a_tcp_node(start_node, s3: S3Bucket, monkeypatch) -> None:
    """``token=`` is presented to the node (no environment variable needed); a wrong one
    is refused without being quoted; a token without a node is an error."""
    s3.put("m.bin", b"m" * 5000)
    node = start_node()
    monkeypatch.delenv("CACHEFS_TOKEN", raising=False)
    monkeypatch.delenv("CACHEFS_TOKEN_FILE", raising=False)
    url = f"cachefs::{s3.url('m.bin')}"
    options = {"endpoint": node.tcp_endpoint, "skip_instance_cache": True}
    with fsspec.open(url, "rb", cachefs={**options, "token": TOKEN}) as f:
        assert f.read() == b"m" * 5000
    wrong = "wrong-" + TOKEN
    with pytest.raises(PermissionError) as refused:
        fsspec.filesystem("cachefs", **options, token=wrong).info(s3.url("m.bin"))
    assert "token is wrong" in str(refused.value) and wrong not in str(refused.value)
    with pytest.raises(ValueError, match="no node is named"):
        fsspec.filesystem("cachefs", token=TOKEN, skip_instance_cache=True).info(s3.url("m.bin"))
    with pytest.raises(ValueError, match="whitespace") as bad:
        fsspec.filesystem("cachefs", **options, token="two words").info(s3.url("m.bin"))
    assert "two words" not in str(bad.value)


# -- loaders ---------------------------------------------------------------------


def _options(tmp_path: Path, cache_dir: Path, **extra: object) -> dict[str, object]:
    config = tmp_path / "cachefs.yaml"
    config.write_text(yaml.safe_dump({"block_size": BLOCK}))
    return {
        "cache_dir": str(cache_dir),
        "config": str(config),
        "skip_instance_cache": True,
        **extra,
    }


def test_loader_errors_name_the_full_url(s3: S3Bucket, tmp_path: Path, cache_dir: Path) -> None:
    pytest.importorskip("torch")
    from cachefs.loaders import load_safetensors

    s3.put("models/other.bin", b"x")
    options = _options(tmp_path, cache_dir)
    sources = ("models/nope", "models/nope/", "models/", "models/nope.index.json")
    for source in (s3.url(name) for name in sources):
        with pytest.raises(FileNotFoundError) as raised:
            load_safetensors(f"cachefs::{source}", storage_options=options)
        assert source in str(raised.value), raised.value


def test_the_loader_honours_local_reads_false(
    s3: S3Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from cachefs.loaders import SafetensorsLoader

    tensors = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(77)}
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    s3.put("lr/model.safetensors", path.read_bytes())
    source = f"cachefs::{s3.url('lr/model.safetensors')}"
    warm = SafetensorsLoader(source, storage_options=_options(tmp_path, cache_dir))
    dict(warm)
    again = SafetensorsLoader(source, storage_options=_options(tmp_path, cache_dir))
    dict(again)
    assert again.stats.local_reads > 0 and again.stats.client_reads == 0
    remote = SafetensorsLoader(
        source, storage_options=_options(tmp_path, cache_dir, local_reads=False), mmap=True
    )
    loaded = dict(remote)
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)
    assert remote.stats.local_reads == 0 and remote.stats.client_reads > 0
    assert remote.stats.mapped_bytes == 0
