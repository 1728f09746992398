"""Atomic writes leave files and directories with the permissions a plain write would give, replace only
what they write, and say so in one line when the disk is full."""

import errno
import os
import re
import shutil
import stat

import pytest

from soralib.errors import DiskFull, InputError
from soralib.io import atomic_dir, atomic_write_text, disk_full


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_get_the_umask_permissions_not_the_temporaries_owner_only_ones(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "metrics.json", "{}")
        with atomic_dir(tmp_path / "adapter") as staging:
            (staging / "adapter_config.json").write_text("{}")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "metrics.json") == 0o644
    assert _mode(tmp_path / "adapter") == 0o755  # readable by a serving account, as `mkdir` would make it
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == "{}"


def test_atomic_dir_refuses_to_replace_a_directory_holding_what_it_does_not_write(tmp_path):
    target = tmp_path / "adapter"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "data.csv").write_text("mine")
    (target / "NOTES.txt").write_text("mine")
    (target / "adapter_config.json").write_text("old")
    with pytest.raises(InputError, match=re.escape(f"{target} holds NOTES.txt, sub/, which soralib does not write")):
        with atomic_dir(target) as staging:
            (staging / "adapter_config.json").write_text("new")
    assert (target / "adapter_config.json").read_text() == "old"
    assert (target / "NOTES.txt").read_text() == "mine" and (target / "sub" / "data.csv").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # the staging copy is gone


def test_atomic_dir_replaces_the_target_of_a_symlink_and_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.json").write_text("old")
    (tmp_path / "link").symlink_to("real")
    with atomic_dir(tmp_path / "link") as staging:
        (staging / "a.json").write_text("new")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "a.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
], ids=["oserror", "safetensors"])
def test_a_write_into_a_full_disk_raises_disk_full_naming_the_path_and_leaves_nothing(tmp_path, monkeypatch, failure):
    def full(*args, **kwargs):
        raise failure

    with pytest.raises(DiskFull, match=re.escape(f"no space left on device at {tmp_path / 'adapter'}")):
        with atomic_dir(tmp_path / "adapter") as staging:
            full(staging)
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFull, match=re.escape(f"no space left on device at {tmp_path / 'metrics.json'}")):
        atomic_write_text(tmp_path / "metrics.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_torch_save_failing_without_errno_counts_as_disk_full_only_when_the_disk_is_nearly_full(tmp_path,
                                                                                               monkeypatch):
    # what torch.save raised when a 256 KiB tmpfs filled up (torch 2.13)
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert disk_full(err, tmp_path) is None  # plenty of space here: some other failure, left as it is
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    assert str(disk_full(err, tmp_path / "run")) == f"no space left on device at {tmp_path / 'run'}"
    assert disk_full(RuntimeError("something else"), tmp_path) is None
