"""The server secret: SECRET_KEY when set, else one generated once in DATA_DIR (0600) and shared by every process."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from isolation.config import BaseServiceSettings, get_base_settings
from isolation.secret import SECRET_FILE_NAME, UnsafeSecretError, check_secret_key, secret_from_data_dir

PUBLIC_DEV_SECRET = "maitenant-development-secret-change-me"  # the default of earlier versions
ROOT = Path(__file__).resolve().parents[2]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_fresh_data_dir_gets_a_random_owner_only_secret_that_is_kept(tmp_path):
    data_dir = tmp_path / "data"
    first = secret_from_data_dir(data_dir)
    path = data_dir / SECRET_FILE_NAME
    assert _mode(path) == 0o600 and _mode(data_dir) == 0o700
    assert path.stat().st_uid == os.geteuid()
    assert len(first) == 64 and first != PUBLIC_DEV_SECRET
    assert path.read_text().strip() == first
    assert secret_from_data_dir(data_dir) == first  # the next start reads it back
    assert [p.name for p in data_dir.iterdir()] == [SECRET_FILE_NAME]  # no temporary file left behind
    assert secret_from_data_dir(tmp_path / "other") != first  # random, not derived from anything


def test_an_existing_data_dir_is_used_as_it_is(tmp_path):
    tmp_path.chmod(0o755)
    value = secret_from_data_dir(tmp_path)
    assert _mode(tmp_path) == 0o755 and _mode(tmp_path / SECRET_FILE_NAME) == 0o600
    assert BaseServiceSettings(_env_file=None, secret_key="", data_dir=tmp_path).server_secret() == value


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_secret_file_others_can_read_is_refused(tmp_path, mode):
    path = tmp_path / SECRET_FILE_NAME
    path.write_text("x" * 64)
    path.chmod(mode)
    with pytest.raises(UnsafeSecretError, match=f"mode {mode:04o}: others may read it.*chmod 600") as refused:
        secret_from_data_dir(tmp_path)
    assert "x" * 64 not in str(refused.value)


def test_a_secret_file_owned_by_someone_else_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    path = tmp_path / SECRET_FILE_NAME
    path.write_text("y" * 64)
    path.chmod(0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(UnsafeSecretError, match="owned by uid 65534, not by this user"):
        secret_from_data_dir(tmp_path)


def test_symlinks_directories_short_and_unreadable_secret_files_are_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("z" * 64)
    target.chmod(0o600)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / SECRET_FILE_NAME).symlink_to(target)
    with pytest.raises(UnsafeSecretError, match="cannot read the secret file"):
        secret_from_data_dir(linked)
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / SECRET_FILE_NAME).symlink_to(tmp_path / "missing")
    with pytest.raises(UnsafeSecretError, match="cannot read the secret file"):
        secret_from_data_dir(dangling)
    folder = tmp_path / "folder"
    (folder / SECRET_FILE_NAME).mkdir(parents=True, mode=0o700)
    with pytest.raises(UnsafeSecretError, match="not a regular file"):
        secret_from_data_dir(folder)
    short = tmp_path / "short"
    short.mkdir()
    (short / SECRET_FILE_NAME).write_text("too-short\n")
    (short / SECRET_FILE_NAME).chmod(0o600)
    with pytest.raises(UnsafeSecretError, match="fewer than 32 characters"):
        secret_from_data_dir(short)


def test_a_data_dir_that_cannot_be_created_says_what_to_do(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UnsafeSecretError, match=r"cannot create the secret file .*set SECRET_KEY or make DATA_DIR"):
        secret_from_data_dir(blocker / "data")


def test_secret_key_when_set_wins_and_is_checked():
    settings = BaseServiceSettings(_env_file=None, secret_key="s" * 20, data_dir="/nonexistent")
    assert settings.server_secret() == "s" * 20
    for environment in ("development", "production"):
        with pytest.raises(ValidationError, match="public development value"):
            BaseServiceSettings(_env_file=None, secret_key=PUBLIC_DEV_SECRET, environment=environment)
    with pytest.raises(ValidationError, match="ENVIRONMENT=production needs a SECRET_KEY of at least 32"):
        BaseServiceSettings(_env_file=None, secret_key="s" * 20, environment="production")
    with pytest.raises(UnsafeSecretError, match="MaiTenant needs a SECRET_KEY of at least 16"):
        check_secret_key("short")
    with pytest.raises(UnsafeSecretError, match="ENVIRONMENT=production needs a SECRET_KEY of at least 32"):
        check_secret_key("s" * 20, "production")
    assert check_secret_key("p" * 32, "production") == "p" * 32


def test_the_base_settings_read_the_environment_once(tmp_path, monkeypatch):
    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    get_base_settings.cache_clear()
    try:
        value = get_base_settings().server_secret()
        assert value == (tmp_path / SECRET_FILE_NAME).read_text().strip()
        monkeypatch.setenv("SECRET_KEY", "changed-later-0123456789abcdef")
        assert get_base_settings().server_secret() == value
        assert "changed-later" not in repr(BaseServiceSettings())  # never in a log line
    finally:
        get_base_settings.cache_clear()


_RACER = """
import os, sys, time
from pathlib import Path
go = Path(sys.argv[2])
from isolation.secret import secret_from_data_dir
Path(f"{go}.ready.{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.001)
print(secret_from_data_dir(sys.argv[1]))
"""


def test_concurrent_first_starts_agree_on_one_secret(tmp_path):
    data_dir, go = tmp_path / "data", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(data_dir), str(go)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(8)
    ]
    deadline = time.monotonic() + 60  # every racer imported and waiting on the flag: release them together
    while len(list(tmp_path.glob("go.ready.*"))) < len(racers) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outputs = [racer.communicate(timeout=60)[0].strip() for racer in racers]
    assert [racer.returncode for racer in racers] == [0] * 8
    assert len(set(outputs)) == 1 and len(outputs[0]) == 64
    assert (data_dir / SECRET_FILE_NAME).read_text().strip() == outputs[0]
    assert sorted(p.name for p in data_dir.iterdir()) == [SECRET_FILE_NAME]
