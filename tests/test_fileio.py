"""pgolf.fileio: a staged folder appears with the mode a plain mkdir gives (the umask's), not mkdtemp's 0700."""
from __future__ import annotations

import os
import stat

import pytest

from pgolf.fileio import staged_dir


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=["022", "077", "002"])
def test_staged_dir_mode_is_a_plain_mkdirs(tmp_path, umask):
    before = os.umask(umask)
    try:
        with staged_dir(tmp_path / "new") as tmp:
            (tmp / "f").write_text("x")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o777 & ~umask
    assert os.umask(before) == before  # the umask read back is put back


def test_staged_dir_keeps_the_mode_of_the_folder_it_replaces(tmp_path):
    (tmp_path / "old").mkdir(mode=0o750)
    os.chmod(tmp_path / "old", 0o750)
    with staged_dir(tmp_path / "old") as tmp:
        (tmp / "f").write_text("x")
    assert stat.S_IMODE((tmp_path / "old").stat().st_mode) == 0o750 and (tmp_path / "old" / "f").is_file()
