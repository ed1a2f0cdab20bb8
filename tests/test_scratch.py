"""Scratch folders in shared places are owner-only: made 0700, refused when another user could reach them."""
import os

import pytest

from kvblend.scratch import owner_only_dir


def test_a_missing_folder_is_made_owner_only(tmp_path):
    folder = owner_only_dir(tmp_path / "a" / "scratch")
    assert folder.is_dir() and folder.stat().st_mode & 0o777 == 0o700
    assert owner_only_dir(folder) == folder  # ours, closed: used again


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o777, 0o701])
def test_a_folder_open_to_others_is_refused(tmp_path, mode):
    folder = tmp_path / "wide"
    folder.mkdir()
    folder.chmod(mode)
    with pytest.raises(PermissionError, match="open to other users"):
        owner_only_dir(folder)


def test_a_folder_of_another_user_or_a_link_is_refused(tmp_path):
    real = owner_only_dir(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(PermissionError, match="is a link"):
        owner_only_dir(link)
    if os.geteuid() != 0:
        pytest.skip("making a folder of another owner needs root")
    os.chown(real, 54321, -1)
    with pytest.raises(PermissionError, match="belongs to uid 54321"):
        owner_only_dir(real)


def test_the_store_bench_scratch_folder_is_owner_only(tmp_path):
    from kvblend.eval.bench_store import bench_store

    folder = tmp_path / "bench"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    with pytest.raises(PermissionError, match="open to other users"):
        bench_store(folder, total_bytes=1 << 20, repeats=1)
