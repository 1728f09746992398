"""Atomic writes leave files and directories with the permissions a plain write would give."""

import os
import stat

from soralib.io import atomic_dir, atomic_write_text


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
