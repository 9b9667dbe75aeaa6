"""fdfo.atomic: a failed write leaves the previous file or directory as it was, and no debris."""

import os

import pytest

from fdfo import atomic


def test_write_file_replaces_only_on_success(tmp_path):
    path = tmp_path / "sub" / "model.bin"
    first = os.urandom(64)
    atomic.write_file(path, lambda tmp: open(tmp, "wb").write(first))
    assert path.read_bytes() == first

    def failing(tmp):
        open(tmp, "wb").write(os.urandom(32))  # half written, then the disk fills up
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic.write_file(path, failing)
    assert path.read_bytes() == first
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.bin"]


def test_write_text_and_replace_dir(tmp_path):
    atomic.write_text(tmp_path / "latest", "epoch_0002")
    assert (tmp_path / "latest").read_text() == "epoch_0002"

    final = tmp_path / "epoch_0002"
    for content in ("old", "new"):
        tmp = tmp_path / "epoch_0002.tmp"
        (tmp / "state").mkdir(parents=True)
        (tmp / "state" / "weights").write_text(content)
        atomic.replace_dir(tmp, final)
        assert (final / "state" / "weights").read_text() == content and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0002", "latest"]
