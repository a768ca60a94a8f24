"""Configuration: YAML, environment overrides, sizes, and rejection of bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cachefs.node.config import DEFAULT_BLOCK_SIZE, Config, load_config
from cachefs.units import format_size, parse_size


def _write(tmp_path: Path, text: str) -> Path:
    """A config file holding ``text``."""
    path = tmp_path / "cachefs.yaml"
    path.write_text(text)
    return path


def _load(
    tmp_path: Path,
    text: str | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Load a config from ``text`` (if any) with only ``environ`` as the environment."""
    path = _write(tmp_path, text) if text is not None else None
    return load_config(path, overrides=overrides, environ=environ or {})


def test_yaml_file_sets_every_key(tmp_path: Path) -> None:
    """Every documented key in a YAML file reaches the Config, sizes parsed."""
    config = _load(
        tmp_path,
        f"""
tiers:
  - name: ram
    path: {tmp_path}/ram
    medium: memory
    quota: 64MiB
  - name: ssd
    path: {tmp_path}/ssd
    quota: 2GiB
block_size: 64KiB
concurrency: 32
revalidate_after: 0
readahead_blocks: 8
group: "1234"
origins:
  - prefix: s3://models/
    options:
      anon: true
retry:
  attempts: 7
  base_delay: 0.5
  max_delay: 9
  timeout: 30
""",
    )
    assert [(t.name, t.medium, t.quota) for t in config.tiers] == [
        ("ram", "memory", 64 * 1024**2),
        ("ssd", "disk", 2 * 1024**3),
    ]
    assert config.tiers[0].path == tmp_path / "ram"
    assert config.block_size == 64 * 1024
    assert config.concurrency == 32
    assert config.revalidate_after == 0.0
    assert config.readahead_blocks == 8
    assert config.group == "1234"
    assert config.origins[0].prefix == "s3://models/"
    assert dict(config.origins[0].options) == {"anon": True}
    assert (config.retry.attempts, config.retry.base_delay) == (7, 0.5)
    assert (config.retry.max_delay, config.retry.timeout) == (9.0, 30.0)
    assert isinstance(config.retry.attempts, int)


def test_defaults_give_one_disk_tier(tmp_path: Path) -> None:
    """With nothing configured: one disk tier at cache_dir, default block size."""
    config = _load(tmp_path, overrides={"cache_dir": str(tmp_path / "c")})
    assert len(config.tiers) == 1
    assert (config.tiers[0].name, config.tiers[0].medium) == ("disk", "disk")
    assert config.tiers[0].path == tmp_path / "c"
    assert config.tiers[0].quota is None
    assert config.block_size == DEFAULT_BLOCK_SIZE
    assert config.concurrency == 16


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    """An empty YAML file is valid and means the defaults."""
    config = _load(tmp_path, "", environ={"CACHEFS_CACHE_DIR": str(tmp_path / "c")})
    assert config.tiers[0].path == tmp_path / "c"
    assert config.block_size == DEFAULT_BLOCK_SIZE


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    """CACHEFS_<KEY> and CACHEFS_<SECTION>__<KEY> override what the file says."""
    config = _load(
        tmp_path,
        "block_size: 1MiB\nretry:\n  attempts: 2\n  base_delay: 0.25\n",
        environ={
            "CACHEFS_BLOCK_SIZE": "128KiB",
            "CACHEFS_RETRY__ATTEMPTS": "9",
            "CACHEFS_CACHE_DIR": str(tmp_path / "env-cache"),
        },
    )
    assert config.block_size == 128 * 1024
    assert config.retry.attempts == 9
    assert config.retry.base_delay == 0.25  # untouched keys of the section remain
    assert config.tiers[0].path == tmp_path / "env-cache"


def test_explicit_overrides_beat_the_environment(tmp_path: Path) -> None:
    """Arguments beat environment variables, which beat the file."""
    config = _load(
        tmp_path,
        "concurrency: 4\n",
        environ={"CACHEFS_CONCURRENCY": "8"},
        overrides={"concurrency": 12, "cache_dir": str(tmp_path / "c")},
    )
    assert config.concurrency == 12


def test_config_path_from_environment(tmp_path: Path) -> None:
    """CACHEFS_CONFIG names the file when no path is passed."""
    path = _write(tmp_path, "block_size: 256KiB\n")
    config = load_config(environ={"CACHEFS_CONFIG": str(path)})
    assert config.block_size == 256 * 1024


def test_reserved_environment_names_are_not_keys(tmp_path: Path) -> None:
    """CACHEFS_CONFIG and friends are not taken for (unknown) config keys."""
    config = _load(
        tmp_path,
        environ={
            "CACHEFS_TOKEN": "t",
            "CACHEFS_ENDPOINT": "unix:///x",
            "CACHEFS_CACHE_DIR": str(tmp_path),
        },
    )
    assert config.tiers[0].path == tmp_path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("64KiB", 64 * 1024),
        ("64 kib", 64 * 1024),
        ("8MiB", 8 * 1024**2),
        ("1.5GiB", int(1.5 * 1024**3)),
        ("40G", 40 * 1000**3),
        ("2TB", 2 * 1000**4),
        ("10k", 10_000),
    ],
)
def test_size_strings(text: str, expected: int) -> None:
    """Sizes accept binary and decimal units, any case, optional space."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "MiB", "12 parsecs", "-4KiB", "1e3", "four"])
def test_bad_size_strings_are_rejected(bad: str) -> None:
    """A size that cannot be parsed is a ValueError naming it, with an example."""
    with pytest.raises(ValueError, match="not a size") as info:
        parse_size(bad)
    assert repr(bad) in str(info.value)
    assert "MiB" in str(info.value)


def test_negative_and_boolean_sizes_are_rejected() -> None:
    """Integers pass through, but not negative ones or booleans."""
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="negative"):
        parse_size(-1)
    with pytest.raises(ValueError, match="not a size"):
        parse_size(True)


def test_format_size() -> None:
    """Sizes print with binary units."""
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 * 1024**3) == "3.0 GiB"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("blokc_size: 1MiB\nconcurency: 3\n", ["blokc_size", "concurency"]),
        ("retry:\n  atempts: 3\n", ["atempts"]),
    ],
)
def test_unknown_keys_are_rejected_by_name(tmp_path: Path, text: str, names: list[str]) -> None:
    """A misspelt key is an error that names it, not a silently ignored setting."""
    with pytest.raises(ValueError, match="unknown config key") as info:
        _load(tmp_path, text)
    for name in names:
        assert name in str(info.value)


def test_unknown_tier_and_origin_keys_are_rejected(tmp_path: Path) -> None:
    """Typos inside a tier or origin entry are rejected too, naming the key."""
    with pytest.raises(ValueError, match="qouta"):
        _load(tmp_path, f"tiers:\n  - path: {tmp_path}/a\n    qouta: 1GiB\n")
    with pytest.raises(ValueError, match="option"):
        _load(tmp_path, "origins:\n  - prefix: s3://b/\n    option: {anon: true}\n")


def test_unknown_environment_key_is_rejected(tmp_path: Path) -> None:
    """A misspelt CACHEFS_ variable is named in the error."""
    with pytest.raises(ValueError, match="blok_size"):
        _load(tmp_path, environ={"CACHEFS_BLOK_SIZE": "1MiB"})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("block_size: 5000\n", "multiple of 4 KiB"),
        ("block_size: 1KiB\n", "multiple of 4 KiB"),
        ("block_size: 0\n", "multiple of 4 KiB"),
        ("block_size: huge\n", "not a size"),
        ("concurrency: 0\n", "concurrency must be between 1 and 256"),
        ("concurrency: 1000\n", "concurrency must be between 1 and 256"),
        ("tiers:\n  - path: /x\n    medium: tape\n", "medium must be one of"),
        ("tiers:\n  - path: /a\n  - path: /b\n", "tier names must be unique"),
        ("tiers:\n  - name: a\n    path: /a\n  - name: a\n    path: /b\n", "unique"),
        ("tiers:\n  - name: nopath\n", "needs at least a path"),
        ("tiers:\n  - path: /a\n    quota: lots\n", "not a size"),
        ("retry: 3\n", "'retry' must be a mapping"),
        ("retry: {min_rate: 0}\n", "retry.min_rate must be at least 1, not 0"),
        ("retry: {attempts: 0}\n", "(CACHEFS_RETRY__ATTEMPTS)"),
        ("retry: {breaker_cooldown: -1}\n", "retry.breaker_cooldown must be at least 0"),
        ("origin_connections: 0\n", "origin_connections must be between 1 and 4096"),
        ("origins:\n  - options: {anon: true}\n", "origins[0] needs at least a prefix"),
        ("- a\n- b\n", "must hold a mapping"),
        ("block_size: [1\n", "not valid YAML"),
    ],
)
def test_invalid_values_are_rejected(tmp_path: Path, text: str, fragment: str) -> None:
    """Each invalid value is a ValueError saying what is wrong with it."""
    with pytest.raises(ValueError) as info:
        _load(tmp_path, text)
    assert fragment in str(info.value)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    """A config path that does not exist is named in the error."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match="cannot read config file") as info:
        load_config(missing, environ={})
    assert str(missing) in str(info.value)


def test_cache_dir_and_tiers_together_in_a_file_are_rejected(tmp_path: Path) -> None:
    """cache_dir means the single default tier: with explicit tiers it is ambiguous."""
    with pytest.raises(ValueError, match="either cache_dir or tiers"):
        _load(tmp_path, f"cache_dir: {tmp_path}/c\ntiers:\n  - path: {tmp_path}/t\n")


def test_explicit_tiers_win_over_cache_dir_environment(tmp_path: Path) -> None:
    """CACHEFS_CACHE_DIR (a default) does not fight tiers configured in the file."""
    config = _load(
        tmp_path,
        f"tiers:\n  - name: fast\n    path: {tmp_path}/t\n",
        environ={"CACHEFS_CACHE_DIR": str(tmp_path / "env")},
    )
    assert [(t.name, t.path) for t in config.tiers] == [("fast", tmp_path / "t")]


def test_cache_dir_argument_replaces_configured_tiers(tmp_path: Path) -> None:
    """An explicit cache_dir argument (--cache-dir) asks for the single default tier."""
    config = _load(
        tmp_path,
        f"tiers:\n  - name: fast\n    path: {tmp_path}/t\n",
        overrides={"cache_dir": str(tmp_path / "arg")},
    )
    assert [(t.name, t.path) for t in config.tiers] == [("disk", tmp_path / "arg")]


def test_tier_name_defaults_to_its_medium(tmp_path: Path) -> None:
    """A tier without a name is called after its medium."""
    config = _load(
        tmp_path,
        f"tiers:\n  - path: {tmp_path}/m\n    medium: memory\n  - path: {tmp_path}/d\n",
    )
    assert [t.name for t in config.tiers] == ["memory", "disk"]


def test_options_for_picks_the_longest_prefix(tmp_path: Path) -> None:
    """Storage options come from the longest origin prefix that matches the URL."""
    config = _load(
        tmp_path,
        """
origins:
  - prefix: s3://
    options: {anon: true}
  - prefix: s3://models/
    options: {anon: false, requester_pays: true}
  - prefix: s3://models/private/
    options: {profile: ops}
""",
    )
    assert config.options_for("s3://models/a") == {"anon": False, "requester_pays": True}
    assert config.options_for("s3://models/private/x") == {"profile": "ops"}
    assert config.options_for("s3://other/x") == {"anon": True}
    assert config.options_for("gs://b/x") == {}
    config.options_for("s3://models/a")["anon"] = True  # a copy: the config is unchanged
    assert config.options_for("s3://models/a")["anon"] is False


def test_server_section_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "server:\n  socket: /run/x.sock\n  socket_mode: '0640'\n  address: 0.0.0.0:7070\n"
        "  max_request_bytes: 1MiB\n  shutdown_grace: 5\n"
    )
    config = load_config(path, environ={"CACHEFS_SERVER__METRICS_ADDRESS": "0.0.0.0:9090"})
    assert config.server.socket == "/run/x.sock"
    assert config.server.socket_mode == 0o640
    assert config.server.address == "0.0.0.0:7070"
    assert config.server.metrics_address == "0.0.0.0:9090"
    assert config.server.max_request_bytes == 1024 * 1024
    assert config.server.shutdown_grace == 5.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server:\n  socket_mode: '0666'\n", "others"),
        ("server:\n  socket_mode: 660\n", "octal"),
        ("server:\n  listen: x\n", "server.listen"),
        ("server: 3\n", "mapping"),
    ],
)
def test_bad_server_section_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path, environ={})


def test_cluster_section(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "cluster:\n  membership: static\n  peers: [10.0.0.1:7070, 10.0.0.2:7070]\n"
        "  peer_timeout: 5\n  backoff: 10\n"
    )
    cluster = load_config(path, environ={}).cluster
    assert cluster.peers == ("10.0.0.1:7070", "10.0.0.2:7070")
    assert cluster.peer_timeout == 5.0 and cluster.backoff == 10.0
    env = {"CACHEFS_CLUSTER__MEMBERSHIP": "dns", "CACHEFS_CLUSTER__DNS_NAME": "cachefs.ns.svc"}
    assert load_config(environ=env).cluster.dns_name == "cachefs.ns.svc"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cluster:\n  membership: gossip\n", "membership"),
        ("cluster:\n  membership: static\n", "peers"),
        ("cluster:\n  membership: dns\n", "dns_name"),
        ("cluster:\n  membership: static\n  peers: [nohost]\n", "host:port"),
        ("cluster:\n  peer: x\n", "cluster.peer"),
    ],
)
def test_bad_cluster_section_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path, environ={})


def test_service_link_variables_are_not_config(tmp_path: Path) -> None:
    """Kubernetes injects these for a Service named cachefs or cachefs-metrics."""
    links = {
        "CACHEFS_PORT": "tcp://10.0.0.1:9090",
        "CACHEFS_SERVICE_HOST": "10.0.0.1",
        "CACHEFS_SERVICE_PORT": "9090",
        "CACHEFS_METRICS_SERVICE_PORT_HTTP": "9090",
        "CACHEFS_METRICS_PORT_9090_TCP": "tcp://10.0.0.2:9090",
        "CACHEFS_METRICS_PORT_9090_TCP_ADDR": "10.0.0.2",
        "CACHEFS_METRICS_PORT_9090_TCP_PROTO": "tcp",
    }
    assert _load(tmp_path, environ={**links, "CACHEFS_CONCURRENCY": "4"}).concurrency == 4


def test_an_unknown_variable_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CACHEFS_PORTS names no config key"):
        _load(tmp_path, environ={"CACHEFS_PORTS": "1"})


def test_client_variables_are_not_config_keys(tmp_path: Path) -> None:
    """The CLI reads the pod token file itself; the config never sees it."""
    from daemon import run_cli

    env = {"CACHEFS_POD_TOKEN_FILE": str(tmp_path / "token"), "CACHEFS_CACHE_DIR": str(tmp_path)}
    result = run_cli("ls", env=env)
    assert result.returncode == 0, result.stderr
