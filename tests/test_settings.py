import argparse
import logging

import pytest
from pydantic import ValidationError

from eplbd.config import EplbConfig
from eplbd.errors import ConfigError
from eplbd.settings import (
    RUNTIME_MUTABLE,
    DaemonSettings,
    add_settings_arguments,
    apply_update,
    load_settings,
    settings_doc,
    settings_from_args,
)


def _toml(tmp_path, text):
    path = tmp_path / "eplbd.toml"
    path.write_text(text)
    return path


def test_defaults():
    s = load_settings(env={})
    assert (s.rpc, s.ingest) == ("tcp://127.0.0.1:7450", "tcp://127.0.0.1:7451")
    assert (s.metrics_host, s.metrics_port, s.state_dir) == ("127.0.0.1", 7452, None)
    assert (s.commit_interval_steps, s.max_frame_bytes, s.log_level) == (16, 64 << 20, "INFO")
    assert s.window_size == EplbConfig().window_size


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path):
    path = _toml(tmp_path, "window_size = 10\nstep_interval = 20\nmin_gain = 0.5\n")
    env = {"EPLBD_STEP_INTERVAL": "30", "EPLBD_MIN_GAIN": "0.25", "PATH": "/bin"}
    s = load_settings(config_file=path, env=env, cli={"min_gain": 0.125})
    assert s.window_size == 10          # file
    assert s.step_interval == 30        # env beats file
    assert s.min_gain == 0.125          # cli beats env and file
    assert s.plan_timeout_s == 60.0     # default


@pytest.mark.parametrize("source", ["file", "env", "cli"])
@pytest.mark.parametrize("field,value,shown", [
    ("window_size", 0, "0"),
    ("metrics_port", 70000, "70000"),
    ("initial_placement", "diagonal", "diagonal"),
    ("rpc", "tcp://localhost", "tcp://localhost"),
    ("log_level", "LOUD", "LOUD"),
])
def test_bad_value_names_field_value_and_source(tmp_path, source, field, value, shown):
    kwargs: dict = {"env": {}}
    if source == "file":
        text = f'{field} = "{value}"' if isinstance(value, str) else f"{field} = {value}"
        path = _toml(tmp_path, text + "\n")
        kwargs["config_file"] = path
        where = f"(from {path})"
    elif source == "env":
        kwargs["env"] = {f"EPLBD_{field.upper()}": str(value)}
        where = f"(from env EPLBD_{field.upper()})"
    else:
        kwargs["cli"] = {field: value}
        where = f"(from --{field.replace('_', '-')})"
    with pytest.raises(ConfigError) as ei:
        load_settings(**kwargs)
    msg = str(ei.value)
    assert field in msg and shown in msg and where in msg, msg


def test_cross_field_error_names_both_sources(tmp_path):
    path = _toml(tmp_path, 'communicator = "torch_nccl"\n')
    with pytest.raises(ConfigError) as ei:
        load_settings(config_file=path, env={"EPLBD_USE_ASYNC": "true"})
    msg = str(ei.value)
    assert "use_async from env EPLBD_USE_ASYNC" in msg and f"communicator from {path}" in msg


def test_unknown_toml_key_names_key_and_file(tmp_path):
    path = _toml(tmp_path, "window_sise = 5\n")
    with pytest.raises(ConfigError, match=r"window_sise.*eplbd\.toml.*did you mean 'window_size'"):
        load_settings(config_file=path, env={})


def test_toml_accepts_flag_spelling(tmp_path):
    assert load_settings(config_file=_toml(tmp_path, "window-size = 7\n"), env={}).window_size == 7


def test_malformed_toml_names_path_and_error(tmp_path):
    path = _toml(tmp_path, "window_size = = 3\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(config_file=path, env={})
    assert str(path) in str(ei.value) and "line 1" in str(ei.value)


def test_missing_toml_names_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml"):
        load_settings(config_file=tmp_path / "nope.toml", env={})


def test_unknown_cli_key_rejected():
    with pytest.raises(ConfigError, match="windowsize"):
        load_settings(env={}, cli={"windowsize": 3})


def test_unknown_env_is_logged_not_raised(caplog):
    with caplog.at_level(logging.WARNING, logger="eplbd.settings"):
        s = load_settings(env={"EPLBD_WINDOW_SIZ": "3", "EPLBD_CONFIG": "x.toml", "OTHER_X": "1"})
    assert s.window_size == 1000
    assert len(caplog.records) == 1
    assert "EPLBD_WINDOW_SIZ" in caplog.text and "window_size" in caplog.text


@pytest.mark.parametrize("good", [
    "tcp://127.0.0.1:0", "tcp://*:7450", "tcp://host-1.example:65535", "tcp://[::1]:5", "tcp://127.0.0.1:*",
    "ipc:///tmp/eplbd.sock", "inproc://eplbd",
])
def test_endpoint_accepted(good):
    assert load_settings(env={}, cli={"rpc": good}).rpc == good


@pytest.mark.parametrize("bad", [
    "tcp://127.0.0.1:65536", "tcp://127.0.0.1", "tcp://:80", "http://127.0.0.1:80", "ipc://", "inproc://",
    "127.0.0.1:7450", "tcp://a b:1",
])
def test_endpoint_rejected(bad):
    with pytest.raises(ConfigError) as ei:
        load_settings(env={}, cli={"ingest": bad})
    assert "ingest" in str(ei.value) and repr(bad) in str(ei.value)


@pytest.mark.parametrize("text,expected", [
    ("true", True), ("1", True), ("True", True), ("false", False), ("0", False), ("no", False),
])
def test_bool_env(text, expected):
    assert load_settings(env={"EPLBD_LOG_JSON": text}).log_json is expected


def test_bool_env_rejects_garbage():
    with pytest.raises(ConfigError, match=r"log_json='maybe' \(from env EPLBD_LOG_JSON\)"):
        load_settings(env={"EPLBD_LOG_JSON": "maybe"})


def test_empty_env_unsets_optional():
    s = load_settings(env={"EPLBD_STATE_DIR": ""})
    assert s.state_dir is None
    assert load_settings(env={"EPLBD_STATE_DIR": "/var/lib/eplbd"}).state_dir == "/var/lib/eplbd"


def test_argparse_round_trip(tmp_path):
    path = _toml(tmp_path, "log_json = true\nwindow_size = 11\n")
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    ns = parser.parse_args(["--config", str(path), "--no-log-json", "--step-interval", "42",
                            "--initial-placement", "round_robin", "--log-balancedness", "--min-gain", "0.5",
                            "--state-dir", "/tmp/s"])
    # Flags not given stay out of the namespace, so lower layers still count.
    assert not hasattr(ns, "window_size") and not hasattr(ns, "rpc")
    s = settings_from_args(ns, env={"EPLBD_RPC": "tcp://127.0.0.1:9"})
    assert s.log_json is False and s.window_size == 11 and s.step_interval == 42
    assert s.initial_placement == "round_robin" and s.log_balancedness is True and s.min_gain == 0.5
    assert s.state_dir == "/tmp/s" and s.rpc == "tcp://127.0.0.1:9"


def test_argparse_bad_value_names_flag():
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    with pytest.raises(ConfigError, match=r"window_size=0 \(from --window-size\)"):
        settings_from_args(parser.parse_args(["--window-size", "0"]), env={})


def test_config_file_from_env(tmp_path):
    path = _toml(tmp_path, "window_size = 13\n")
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    assert settings_from_args(parser.parse_args([]), env={"EPLBD_CONFIG": str(path)}).window_size == 13


def test_every_field_has_a_flag():
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    for name, _default, env_name, description in settings_doc():
        assert f"--{name.replace('_', '-')}" in parser._option_string_actions
        assert env_name == "EPLBD_" + name.upper() and description


def test_settings_doc_lists_defaults():
    doc = {name: (default, env) for name, default, env, _ in settings_doc()}
    assert doc["metrics_port"] == (7452, "EPLBD_METRICS_PORT")
    assert doc["state_dir"] == (None, "EPLBD_STATE_DIR")
    assert set(doc) == set(DaemonSettings.model_fields)


def test_eplb_config_part():
    s = load_settings(env={}, cli={"window_size": 5, "rpc": "inproc://x"})
    c = s.eplb_config()
    assert type(c) is EplbConfig and c.window_size == 5
    assert set(c.model_dump()) == set(EplbConfig.model_fields)


def test_apply_update_mutable_returns_new_object():
    s = load_settings(env={})
    t = apply_update(s, "window_size", "500")
    assert t.window_size == 500 and s.window_size == 1000 and t is not s
    assert apply_update(s, "log_balancedness", "true").log_balancedness is True
    assert apply_update(s, "min_gain", 0.2).min_gain == 0.2


@pytest.mark.parametrize("key", ["rpc", "state_dir", "num_redundant_experts", "communicator"])
def test_apply_update_immutable(key):
    s = load_settings(env={})
    with pytest.raises(ConfigError, match=f"'{key}' cannot be changed at run time"):
        apply_update(s, key, "x")


def test_apply_update_unknown_key():
    with pytest.raises(ConfigError, match=r"unknown setting 'windowsize'.*'500'"):
        apply_update(load_settings(env={}), "windowsize", "500")


@pytest.mark.parametrize("key,value", [("window_size", "-3"), ("min_gain", 7), ("policy", "nosuch")])
def test_apply_update_invalid_value_leaves_input(key, value):
    s = load_settings(env={})
    before = s.model_dump()
    with pytest.raises(ConfigError) as ei:
        apply_update(s, key, value)
    assert key in str(ei.value) and repr(value) in str(ei.value)
    assert s.model_dump() == before


def test_settings_are_frozen():
    s = load_settings(env={})
    with pytest.raises(ValidationError, match="frozen"):
        s.window_size = 5  # type: ignore[misc]
    assert s.window_size == 1000


def test_runtime_mutable_excludes_bound_resources():
    assert {"rpc", "ingest", "state_dir", "num_redundant_experts", "communicator"}.isdisjoint(RUNTIME_MUTABLE)
    assert RUNTIME_MUTABLE <= set(DaemonSettings.model_fields)
