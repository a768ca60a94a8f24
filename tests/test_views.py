"""Views: a holder's source as hard links under origin names, built by a real node."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from cachefs.client import NodeClient

BLOCK = 64 * 1024


@pytest.fixture
def node(start_node, tmp_path, s3):
    cache = tmp_path / "cache"
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"cache_dir": str(cache), "block_size": BLOCK}))
    return start_node(cache, config=config, tcp=False, metrics=False)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


def test_a_view_links_complete_objects_under_their_origin_names(node, s3) -> None:
    model = {
        "llama/config.json": b'{"layers": 2}',
        "llama/weights/model-00001.safetensors": os.urandom(3 * BLOCK + 5),
        "llama/weights/model-00002.safetensors": os.urandom(BLOCK),
    }
    for key, data in model.items():
        s3.put(key, data)
    client = NodeClient(node.unix_endpoint)
    path = Path(client.view("csi:vol-1", [s3.url("llama/")]).path)

    assert _files(path) == {key.removeprefix("llama/"): data for key, data in model.items()}
    assert client.status().pins == {"csi:vol-1": 3}
    for entry in client.cached():
        assert entry.complete and entry.pinned_by == ("csi:vol-1",)
    linked = path / "weights" / "model-00001.safetensors"
    assert linked.stat().st_nlink == 2  # the view's link and the object's data file
    assert stat.S_IMODE(linked.stat().st_mode) == 0o644
    assert stat.S_IMODE((path / "weights").stat().st_mode) == 0o755
    assert stat.S_IMODE(path.stat().st_mode) == 0o755

    # Asked again, the same view comes back without a rebuild.
    inode = path.stat().st_ino
    assert Path(client.view("csi:vol-1", [s3.url("llama/")]).path) == path
    assert path.stat().st_ino == inode

    # Unpinning the holder removes its view; the objects stay cached, unpinned.
    assert client.unpin("csi:vol-1") == 3
    assert not path.exists()
    assert client.status().pins == {}
    assert len(client.cached()) == 3


def test_a_single_object_view_and_two_holders(node, s3) -> None:
    s3.put("m/model.safetensors", b"w" * 1000)
    client = NodeClient(node.unix_endpoint)
    first = Path(client.view("job:a", [s3.url("m/model.safetensors")]).path)
    second = Path(client.view("job:b", [s3.url("m/model.safetensors")]).path)
    assert first != second
    assert _files(first) == _files(second) == {"model.safetensors": b"w" * 1000}
    client.unpin("job:a")
    assert not first.exists() and _files(second) == {"model.safetensors": b"w" * 1000}


def test_a_view_whose_names_collide_is_refused(node, s3) -> None:
    s3.put("a/model.bin", b"1")
    s3.put("b/model.bin", b"2")
    client = NodeClient(node.unix_endpoint)
    with pytest.raises(ValueError, match=r"model\.bin"):
        client.view("job:x", [s3.url("a/model.bin"), s3.url("b/model.bin")])
    with pytest.raises(ValueError, match="holder"):
        client.view("", [s3.url("a/model.bin")])
    with pytest.raises(FileNotFoundError):
        client.view("job:y", [s3.url("missing/")])
