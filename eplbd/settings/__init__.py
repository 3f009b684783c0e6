"""Daemon settings and the layers they come from.

``DaemonSettings`` is flat: it subclasses ``EplbConfig`` (so a vLLM
``--eplb-config`` carries over unchanged and keeps its validation) and adds the
daemon's own fields. Values come from four layers, highest first::

    CLI flags (--window-size)  >  EPLBD_WINDOW_SIZE env  >  TOML file  >  defaults

Raw values from all layers are merged first and validated once, so a value
that is only valid together with another one (``use_async`` with a
``communicator``) is judged on the final combination. Every error names the
field, the bad value and the layer it came from.

``model`` holds ``DaemonSettings`` and its checks; ``loading`` the layers (the TOML file, the
``EPLBD_*`` environment, the ``--flags``), run-time updates and the settings' documentation.
"""

from eplbd.settings.loading import (CONFIG_ENV, ENV_PREFIX, MAX_CONFIG_FILE_BYTES, add_settings_arguments,
                                    apply_update, env_name, flag_name, load_settings, read_settings_file,
                                    settings_doc, settings_from_args)
from eplbd.settings.model import CURVE_FIELDS, FIELDS, RUNTIME_MUTABLE, DaemonSettings, parse_ranks

__all__ = ["CONFIG_ENV", "CURVE_FIELDS", "ENV_PREFIX", "FIELDS", "MAX_CONFIG_FILE_BYTES", "RUNTIME_MUTABLE",
           "DaemonSettings", "add_settings_arguments", "apply_update", "env_name", "flag_name", "load_settings",
           "parse_ranks", "read_settings_file", "settings_doc", "settings_from_args"]
