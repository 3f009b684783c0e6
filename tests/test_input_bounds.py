"""The smaller input points: a settings file that is not UTF-8 or never ends, and durations or rates that
are infinite or vanishingly small, each refused with a typed error naming the value, in a settings file,
the environment, on the command line and through ``eplbctl config set`` on a running daemon."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from daemon_helpers import DaemonThread
from eplbd import errors
from eplbd.client.rpc import EplbClient
from eplbd.settings import MAX_CONFIG_FILE_BYTES, apply_update, load_settings

SERVE_TIMEOUT_S = 60  # `eplbd serve` imports torch (~2 s) before it reads the file


def _serve(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
    return subprocess.run([sys.executable, "-m", "eplbd.cli", "serve", "--rpc", "tcp://127.0.0.1:0", "--ingest",
                           "tcp://127.0.0.1:0", "--metrics-port", "-1", *args], capture_output=True, text=True,
                          timeout=SERVE_TIMEOUT_S, env=env)


def test_a_settings_file_that_is_not_utf8_is_a_config_error_naming_the_byte(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("window_size = 10\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(errors.ConfigError, match=r"latin1.toml' is not UTF-8 text \(byte 22: b'\\xe9'\)"):
        load_settings(config_file=path, env={})
    r = _serve("--config", str(path))
    assert r.returncode == 1 and "is not UTF-8 text" in r.stderr and "Traceback" not in r.stderr


def test_a_settings_file_that_never_ends_is_read_no_further_than_the_bound(tmp_path):
    with pytest.raises(errors.ConfigError, match=rf"'/dev/zero' is larger than {MAX_CONFIG_FILE_BYTES} bytes"):
        load_settings(config_file="/dev/zero", env={})
    r = _serve("--config", "/dev/zero")  # used to read forever
    assert r.returncode == 1 and "'/dev/zero' is larger than" in r.stderr
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * (MAX_CONFIG_FILE_BYTES // 10 + 1))
    with pytest.raises(errors.ConfigError, match="big.toml' is larger than"):
        load_settings(config_file=big, env={})


def test_eplbd_launch_reads_its_config_the_same_bounded_way(tmp_path):
    """``eplbd launch --config`` reads the file before it starts anything: same typed errors, no traceback."""
    latin = tmp_path / "latin1.toml"
    latin.write_bytes("window_size = 10\n# caf\xe9\n".encode("latin-1"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
    for path, says in ((str(latin), "is not UTF-8 text"), ("/dev/zero", "'/dev/zero' is larger than")):
        r = subprocess.run([sys.executable, "-m", "eplbd.cli", "launch", "--ranks", "2", "--steps", "10",
                            "--config", path], capture_output=True, text=True, timeout=SERVE_TIMEOUT_S, env=env)
        assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


_DURATIONS = ("heartbeat_timeout_s", "plan_timeout_s", "plan_stall_timeout_s")


@pytest.mark.parametrize("field", [*_DURATIONS, "transfer_gb_per_s"])
@pytest.mark.parametrize("value", [math.inf, 1e-300, 1e300])
def test_infinite_or_vanishing_durations_and_bandwidths_are_refused(field, value, tmp_path):
    needle = rf"{field}={re.escape(repr(value))}.*must be a finite number of"
    with pytest.raises(errors.ConfigError, match=needle):
        load_settings(env={}, cli={field: value})
    with pytest.raises(errors.ConfigError, match=field):
        load_settings(env={f"EPLBD_{field.upper()}": str(value)})
    (tmp_path / "s.toml").write_text(f"{field} = {'inf' if value == math.inf else repr(value)}\n")
    with pytest.raises(errors.ConfigError, match=needle):
        load_settings(config_file=tmp_path / "s.toml", env={})
    with pytest.raises(errors.ConfigError, match=rf"{field}='{re.escape(repr(value))}'.*must be a finite number of"):
        apply_update(load_settings(env={}), field, str(value))


def test_the_sane_range_still_holds():
    s = load_settings(env={}, cli={"heartbeat_timeout_s": 0.5, "plan_timeout_s": 3600.0, "plan_stall_timeout_s": 0.3,
                                   "transfer_gb_per_s": 1e-6})
    assert (s.heartbeat_timeout_s, s.transfer_gb_per_s) == (0.5, 1e-6)


def test_config_set_refuses_them_on_a_running_daemon():
    with DaemonThread() as d, EplbClient(d.rpc, timeout=5) as c:
        for field in (*_DURATIONS, "transfer_gb_per_s"):
            before = c.get_config().config[field]
            for value in ("inf", "1e-300", math.inf):
                with pytest.raises(errors.ConfigError, match=rf"{field}=.*must be a finite number"):
                    c.set_config(field, value)
            assert c.get_config().config[field] == before == getattr(d.daemon.settings, field)
        assert c.set_config("plan_timeout_s", "30").config["plan_timeout_s"] == 30.0
