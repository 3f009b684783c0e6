"""The layers settings come from (CLI flags > ``EPLBD_*`` env > TOML file > defaults), merged and then
validated once with errors naming field, value and layer; also the ``--flags`` themselves, run-time
updates (``apply_update``) and the table the example settings file is generated from."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from eplbd.errors import ConfigError
from eplbd.settings.model import FIELDS, RUNTIME_MUTABLE, DaemonSettings

log = logging.getLogger("eplbd.settings")

ENV_PREFIX = "EPLBD_"
# EPLBD_* names that are not settings but are still ours; they must not be
# reported as typos.
CONFIG_ENV = "EPLBD_CONFIG"
# EPLBD_CURVE_CLIENT_KEY / _SERVER_KEY: a client's key files (eplbd.proto.sockets.CurveKeys.from_env).
_NON_SETTING_ENV = frozenset({CONFIG_ENV, "EPLBD_CURVE_CLIENT_KEY", "EPLBD_CURVE_SERVER_KEY"})
MAX_CONFIG_FILE_BYTES = 1 << 20  # a settings file is a few KiB; --config /dev/zero must not read forever


def env_name(field: str) -> str:
    """Returns: the environment variable that sets ``field`` (``EPLBD_WINDOW_SIZE``)."""
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    """Returns: the command-line flag that sets ``field`` (``--window-size``)."""
    return "--" + field.replace("_", "-")


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, FIELDS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe_errors(exc: ValidationError, sources: Mapping[str, str]) -> str:
    """One line per error: field, bad value, where it came from, what is wrong."""
    parts = []
    for err in exc.errors():
        loc = err.get("loc", ())
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        if loc:
            field = str(loc[0])
            src = sources.get(field, "default")
            parts.append(f"{field}={err.get('input')!r} (from {src}): {msg}")
        else:
            # A cross-field rule: its message quotes the values; add where each
            # field it mentions came from.
            named = [f for f in FIELDS if f in sources and re.search(rf"\b{f}\b", msg)]
            where = ", ".join(f"{f} from {sources[f]}" for f in named)
            parts.append(f"{msg}" + (f" ({where})" if where else ""))
    return "; ".join(parts)


def _validate(raw: Mapping[str, Any], sources: Mapping[str, str], what: str) -> DaemonSettings:
    try:
        return DaemonSettings.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(f"invalid {what}: " + _describe_errors(exc, sources)) from None


def _none_if_empty(field: str, value: Any) -> Any:
    # The environment and a shell flag cannot say "unset"; an empty string does.
    if value == "" and DaemonSettings.model_fields[field].default is None:
        return None
    return value


def read_settings_file(path: Path) -> dict[str, Any]:
    """The settings in a TOML file (field -> value), read bounded (``MAX_CONFIG_FILE_BYTES``).

    Raises:
        ConfigError: unreadable, too large, not UTF-8, not TOML, or an unknown key (each named).
    """
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_FILE_BYTES + 1)  # bounded: a device or a huge file is refused, not read
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {str(path)!r}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(f"settings file {str(path)!r} is larger than {MAX_CONFIG_FILE_BYTES} bytes; "
                          "a settings file is a few KiB")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"settings file {str(path)!r} is not UTF-8 text (byte {exc.start}: "
                          f"{raw[exc.start:exc.start + 1]!r}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML in settings file {str(path)!r}: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        # Accept the flag spelling too (window-size), as people copy from --help.
        field = key.replace("-", "_")
        if field not in DaemonSettings.model_fields:
            raise ConfigError(f"unknown setting {key!r} in {str(path)!r}{_suggest(field)}")
        if field in out:
            raise ConfigError(f"setting {field!r} is given twice in {str(path)!r}")
        out[field] = value
    return out


def load_settings(*, config_file: str | Path | None = None, env: Mapping[str, str] | None = None,
                  cli: Mapping[str, Any] | None = None) -> DaemonSettings:
    """Build the settings from defaults, a TOML file, the environment and CLI values.

    Args:
        config_file: a flat TOML file of ``field = value`` lines, or None for none.
        env: the environment to read ``EPLBD_<FIELD>`` strings from (default ``os.environ``).
            Unknown ``EPLBD_*`` names are logged as warnings, not rejected, since
            other tools may share the prefix.
        cli: field name -> value given on the command line (only flags the user gave).

    Returns:
        The validated settings.

    Raises:
        ConfigError: an unreadable or malformed file, an unknown key in the file or
            in ``cli``, or a bad value; the message names field, value and source.
    """
    env = os.environ if env is None else env
    cli = {} if cli is None else cli
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}

    if config_file is not None:
        path = Path(config_file)
        for field, value in read_settings_file(path).items():
            raw[field], sources[field] = value, str(path)

    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in _NON_SETTING_ENV:
            continue
        field = name[len(ENV_PREFIX):].lower()
        if field not in DaemonSettings.model_fields:
            log.warning("ignoring environment variable %s: not an eplbd setting%s", name, _suggest(field))
            continue
        raw[field], sources[field] = _none_if_empty(field, value), f"env {name}"

    for key, value in cli.items():
        field = key.replace("-", "_")
        if field not in DaemonSettings.model_fields:
            raise ConfigError(f"unknown setting {key!r} (from {flag_name(field)}){_suggest(field)}")
        raw[field], sources[field] = _none_if_empty(field, value), flag_name(field)

    return _validate(raw, sources, "settings")


def _arg_kwargs(field: str) -> dict[str, Any]:
    info = DaemonSettings.model_fields[field]
    ann = info.annotation
    kwargs: dict[str, Any] = {"dest": field, "default": argparse.SUPPRESS}
    default = "unset" if info.default is None else info.default
    # argparse %-formats help strings.
    desc = (info.description or "").replace("%", "%%")
    kwargs["help"] = f"{desc} [env {env_name(field)}; default {default}]"
    if ann is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(ann) is Literal:
        kwargs["choices"] = list(typing.get_args(ann))
    elif ann in (int, float):
        kwargs["type"] = ann
        kwargs["metavar"] = ann.__name__.upper()
    else:
        # str, str | None, and anything else: pydantic coerces the string.
        kwargs["type"] = str
    return kwargs


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--field-name`` flag per settings field, plus ``--config``.

    Flags default to ``argparse.SUPPRESS``, so only flags the user gave appear
    in the namespace and the lower layers (env, file, defaults) still count.
    Booleans get ``--flag/--no-flag``.

    Args:
        parser: the parser (or subparser) to add the flags to.
    """
    if "--config" not in parser._option_string_actions:
        parser.add_argument("--config", default=None, metavar="PATH",
                            help=f"TOML settings file [env {CONFIG_ENV}]")
    group = parser.add_argument_group("settings", "each also settable as EPLBD_<NAME> or in the TOML file")
    for field in FIELDS:
        group.add_argument(flag_name(field), **_arg_kwargs(field))


def settings_from_args(ns: argparse.Namespace, *, env: Mapping[str, str] | None = None) -> DaemonSettings:
    """Load settings for a namespace parsed with ``add_settings_arguments``' flags.

    Args:
        ns: the parsed namespace; ``ns.config`` (or ``$EPLBD_CONFIG`` when it is
            None) names the TOML file.
        env: the environment (default ``os.environ``).

    Returns:
        The validated settings.
    """
    env = os.environ if env is None else env
    config_file = getattr(ns, "config", None) or env.get(CONFIG_ENV) or None
    given = vars(ns)
    cli = {f: given[f] for f in FIELDS if f in given}
    return load_settings(config_file=config_file, env=env, cli=cli)


def apply_update(settings: DaemonSettings, key: str, value: Any) -> DaemonSettings:
    """Change one run-time mutable setting.

    Args:
        settings: the current settings; never modified.
        key: a name in ``RUNTIME_MUTABLE``.
        value: the new value; a string (from eplbctl) is coerced like an env value.

    Returns:
        A new validated ``DaemonSettings``.

    Raises:
        ConfigError: unknown key, a key not changeable at run time, or a bad value.
    """
    if key not in DaemonSettings.model_fields:
        raise ConfigError(f"unknown setting {key!r} (value {value!r}){_suggest(key)}")
    if key not in RUNTIME_MUTABLE:
        raise ConfigError(f"setting {key!r} cannot be changed at run time (value {value!r}); "
                          f"mutable: {', '.join(sorted(RUNTIME_MUTABLE))}")
    raw = settings.model_dump()
    raw[key] = _none_if_empty(key, value)
    return _validate(raw, {key: "update"}, "update")


def settings_doc() -> list[tuple[str, Any, str, str]]:
    """Returns:
        ``(name, default, env_name, description)`` for every field, in declaration order.
    """
    return [(f, info.default, env_name(f), info.description or "")
            for f, info in DaemonSettings.model_fields.items()]
