"""fdfo.atomic: a failed write leaves the previous file or directory as it was, and no debris."""

import os

import pytest

from fdfo import atomic


def test_write_file_replaces_only_on_success(tmp_path):
    path = tmp_path / "sub" / "model.bin"
    first = os.urandom(64)
    atomic.write_file(path, lambda tmp: open(tmp, "wb").write(first))
    assert path.read_bytes() == first
    plain = tmp_path / "plain"
    plain.write_bytes(first)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkstemp's 0600

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

    # A crash between the two renames leaves only "epoch_0002.old": the next save cleans it up.
    os.replace(final, tmp_path / "epoch_0002.old")
    (tmp_path / "epoch_0002.tmp").mkdir()
    atomic.replace_dir(tmp_path / "epoch_0002.tmp", final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0002", "latest"]


def test_replace_dir_gives_files_the_umask_mode(tmp_path):
    """safetensors writes its files 0600; a directory moved into place follows the umask like a plain write."""
    import stat

    import torch
    from safetensors.torch import save_file

    tmp = tmp_path / "out.tmp"
    (tmp / "sub").mkdir(parents=True)
    save_file({"w": torch.randn(3)}, str(tmp / "sub" / "w.safetensors"))
    (tmp / "plain.txt").write_text("x")
    old = os.umask(0o027)
    try:
        atomic.replace_dir(tmp, tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert modes == {"w.safetensors": 0o640, "plain.txt": 0o640}
