import pathlib
import subprocess
import sys

from eplbd.offline import example_config
from eplbd.settings import load_settings, settings_doc

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_example_toml_is_current_and_loads():
    path = REPO / "deploy" / "eplbd.example.toml"
    assert path.read_text() == example_config.render(), "regenerate: python -m eplbd.offline.example_config"
    s = load_settings(config_file=path, env={}, cli={})
    for name, default, env, _ in settings_doc():
        assert env in path.read_text()
        assert getattr(s, name) == default


def test_worker_side_imports_stay_light():
    code = ("import sys, eplbd.client.worker, eplbd.client.rpc, eplbd.client.reporter, eplbd.proto; "
            "heavy = [m for m in ('uvloop', 'pydantic', 'prometheus_client', 'eplbd.policy', 'eplbd.daemon', "
            "'eplbd.daemon.server', 'eplbd.daemon.state', 'eplbd.refengine', 'numba') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_console_scripts_exist():
    bindir = pathlib.Path(sys.executable).parent
    for name in ("eplbd", "eplbctl"):
        assert (bindir / name).exists(), name
    out = subprocess.run([str(bindir / "eplbd"), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "replay" in out.stdout and "serve" in out.stdout
