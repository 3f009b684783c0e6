"""deploy/ files checked against each other and against the code: Kubernetes manifests (parse, required
fields, ports and probes against the settings in the ConfigMap, selectors against labels), the
Containerfile, the systemd unit and environment file, and the example TOML."""

import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from eplbd.settings import FIELDS, DaemonSettings, env_name, load_settings, settings_doc

REPO = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
CLIENT_ENV = {"EPLBD_CONFIG", "EPLBD_CURVE_CLIENT_KEY", "EPLBD_CURVE_SERVER_KEY"}  # read, but not settings


# -- helpers ---------------------------------------------------------------------------------------
def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]


def one(name: str, kind: str) -> dict:
    found = [d for d in docs(name) if d["kind"] == kind]
    assert len(found) == 1, f"{name}: {len(found)} {kind}s"
    return found[0]


def settings_of(configmap: dict, tmp_path: pathlib.Path) -> DaemonSettings:
    """Load the ConfigMap's eplbd.toml exactly as the daemon would (file layer only)."""
    path = tmp_path / "eplbd.toml"
    path.write_text(configmap["data"]["eplbd.toml"])
    return load_settings(config_file=path, env={}, cli={})


def host_port(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


def ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def probe_port(container: dict, probe: str) -> tuple[str, int]:
    get = container[probe]["httpGet"]
    port = get["port"]
    return get["path"], ports(container)[port] if isinstance(port, str) else port


def config_path(container: dict, pod: dict) -> pathlib.PurePosixPath:
    """The --config file of an `eplbd serve` container, checked to come from a mounted ConfigMap key."""
    cmd = container["command"]
    assert cmd[:2] == ["eplbd", "serve"] and "--config" in cmd
    path = pathlib.PurePosixPath(cmd[cmd.index("--config") + 1])
    mount = mount_for(container, path)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return path, volume["configMap"]["name"], str(path.relative_to(mount["mountPath"]))


def mount_for(container: dict, path: pathlib.PurePosixPath) -> dict:
    hits = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    assert hits, f"{path} is on no volume of {container['name']}"
    return max(hits, key=lambda m: len(m["mountPath"]))


def is_subset(small: dict, big: dict) -> bool:
    return all(big.get(k) == v for k, v in small.items())


# -- Kubernetes ------------------------------------------------------------------------------------
def test_every_manifest_parses_with_the_required_fields():
    names = sorted(p.name for p in K8S.glob("*.yaml"))
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == [n for n in names if n != "kustomization.yaml" and ".example." not in n
                                         and n != "sidecar-example.yaml"]
    for name in names:
        if name == "kustomization.yaml":
            continue
        for d in docs(name):
            assert d["apiVersion"] and d["kind"] and d["metadata"]["name"], (name, d)
            if d["kind"] in ("Deployment", "Service", "ServiceMonitor", "PodMonitor", "ConfigMap"):
                assert d.get("spec") or d.get("data"), (name, d["kind"])


def test_daemon_deployment_matches_its_configmap(tmp_path):
    cm, dep = one("configmap.yaml", "ConfigMap"), one("deployment.yaml", "Deployment")
    s = settings_of(cm, tmp_path)
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    # In a pod the daemon binds every interface, and then CURVE is on.
    assert host_port(s.rpc)[0] == host_port(s.ingest)[0] == s.metrics_host == "0.0.0.0"
    assert s.curve_enabled
    assert ports(c) == {"rpc": host_port(s.rpc)[1], "ingest": host_port(s.ingest)[1], "metrics": s.metrics_port}
    assert probe_port(c, "startupProbe") == probe_port(c, "livenessProbe") == ("/healthz", s.metrics_port)
    assert probe_port(c, "readinessProbe") == ("/readyz", s.metrics_port)
    path, cm_name, key = config_path(c, pod)
    assert cm_name == cm["metadata"]["name"] and key in cm["data"]
    assert mount_for(c, pathlib.PurePosixPath(s.state_dir))["mountPath"] == s.state_dir
    # One daemon per group, never two at once; the selector picks the template's pods.
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert is_subset(dep["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
    assert pod["enableServiceLinks"] is False  # else EPLBD_<SERVICE>_* variables reach the settings loader
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]


def test_curve_keys_come_from_the_secret(tmp_path):
    s = settings_of(one("configmap.yaml", "ConfigMap"), tmp_path)
    pod = one("deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    daemon_secret = next(d for d in docs("secret.example.yaml") if d["metadata"]["name"] == "eplbd-ep0-curve")
    mounted: dict[str, str] = {}  # path in the container -> Secret key
    for f in (s.curve_secret_key_file, s.curve_worker_keys_dir, s.curve_operator_keys_dir):
        m = mount_for(c, pathlib.PurePosixPath(f))
        vol = next(v for v in pod["volumes"] if v["name"] == m["name"])["secret"]
        assert vol["secretName"] == daemon_secret["metadata"]["name"] and m["readOnly"]
        mounted |= {f"{m['mountPath']}/{i['path']}": i["key"] for i in vol["items"]}
    assert set(mounted.values()) == set(daemon_secret["stringData"])
    assert s.curve_secret_key_file in mounted
    for d, suffix in ((s.curve_worker_keys_dir, ".key"), (s.curve_operator_keys_dir, ".key")):
        assert any(p.startswith(d + "/") and p.endswith(suffix) for p in mounted), d  # at least one key there


def test_service_and_servicemonitor_select_the_daemon():
    dep, svc = one("deployment.yaml", "Deployment"), one("service.yaml", "Service")
    mon = one("servicemonitor.yaml", "ServiceMonitor")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert is_subset(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
    assert svc["spec"]["publishNotReadyAddresses"] is True  # ranks register before /readyz can pass
    assert {p["name"]: (p["port"], ports(c)[p["targetPort"]]) for p in svc["spec"]["ports"]} == \
        {name: (port, port) for name, port in ports(c).items()}
    assert mon["apiVersion"] == "monitoring.coreos.com/v1"
    assert is_subset(mon["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert [(e["port"], e["path"]) for e in mon["spec"]["endpoints"]] == [("metrics", "/metrics")]


def test_sidecar_example_wires_the_engine_to_its_daemon(tmp_path):
    from eplbd.refengine.rank import build_parser

    cm = one("sidecar-example.yaml", "ConfigMap")
    dep, mon = one("sidecar-example.yaml", "Deployment"), one("sidecar-example.yaml", "PodMonitor")
    s = settings_of(cm, tmp_path)
    pod = dep["spec"]["template"]["spec"]
    (side,) = pod["initContainers"]
    (engine,) = pod["containers"]
    assert side["restartPolicy"] == "Always"  # a native sidecar, not a run-to-completion init container
    assert probe_port(side, "startupProbe") == ("/healthz", s.metrics_port)
    assert ports(side)["metrics"] == s.metrics_port
    assert config_path(side, pod)[1] == cm["metadata"]["name"]
    assert host_port(s.rpc)[0] == host_port(s.ingest)[0] == "127.0.0.1" and not s.curve_enabled
    env = {e["name"]: e["value"] for e in engine["env"]}
    assert env[env_name("rpc")] == s.rpc and env[env_name("ingest")] == s.ingest
    assert int(env[env_name("commit_interval_steps")]) == s.commit_interval_steps
    cmd = engine["command"]
    i = cmd.index("-m", cmd.index("torch.distributed.run") + 1)
    assert cmd[i + 1] == "eplbd.refengine"
    args = build_parser().parse_args(cmd[i + 2:])  # real flags of the reference engine
    ranks = int(cmd[cmd.index("--nproc-per-node") + 1])
    assert (args.num_logical + args.num_redundant) % ranks == 0
    assert is_subset(mon["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
    assert [e["port"] for e in mon["spec"]["podMetricsEndpoints"]] == ["metrics"]


# -- Containerfile ---------------------------------------------------------------------------------
def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_containerfile_copies_what_exists_and_runs_the_daemon_like_the_deployment():
    inst = _instructions((DEPLOY / "Containerfile").read_text())
    copies = [shlex.split(arg)[:-1] for op, arg in inst if op == "COPY" and not arg.startswith("--from")]
    sources = [src.rstrip("/") for srcs in copies for src in srcs]
    assert all((REPO / src).exists() for src in sources), sources
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for package_dir in pyproject["tool"]["setuptools"]["package-dir"].values():  # every package is copied
        assert any(package_dir == src or package_dir.startswith(src + "/") for src in sources), package_dir
    assert pyproject["project"]["readme"] in sources
    ignore = (DEPLOY / "Containerfile.dockerignore").read_text().splitlines()
    assert all(f"!{src}" in ignore or f"!{src}/" in ignore for src in sources)
    entry = next(arg for op, arg in inst if op == "ENTRYPOINT")
    dep = one("deployment.yaml", "Deployment")
    assert yaml.safe_load(entry) == dep["spec"]["template"]["spec"]["containers"][0]["command"]
    exposed = {int(p) for op, arg in inst if op == "EXPOSE" for p in arg.split()}
    defaults = DaemonSettings()
    assert exposed == {host_port(defaults.rpc)[1], host_port(defaults.ingest)[1], defaults.metrics_port}
    user = next(arg for op, arg in inst if op == "USER")
    assert user.split(":")[0] == str(dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) != "0"
    torch_pin = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)[1]
    run = " ".join(arg for op, arg in inst if op == "RUN")
    assert f"torch=={torch_pin}" in run and "-c constraints.txt" in run
    version = next(arg for op, arg in inst if op == "ARG" and arg.startswith("PYTHON_VERSION="))
    assert tuple(map(int, version.split("=")[1].split("."))) >= (3, 11)  # tomllib


# -- systemd ---------------------------------------------------------------------------------------
def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """``(section, key, value)`` for every assignment (systemd allows repeated keys)."""
    out, section = [], ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            out.append((section, key, value))
    return out


def test_systemd_unit_is_type_notify_hardened_and_names_real_settings():
    text = (DEPLOY / "systemd" / "eplbd.service").read_text()
    entries = unit_entries(text)
    svc = {k: v for s, k, v in entries if s == "Service"}
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    argv = shlex.split(svc["ExecStart"])
    assert argv[0].endswith("/eplbd") and argv[1:3] == ["serve", "--config"]
    assert argv[3] == "%E/" + svc["ConfigurationDirectory"] + "/eplbd.toml"
    envs = dict(v.split("=", 1) for s, k, v in entries if k == "Environment")
    assert envs[env_name("state_dir")] == "%S/" + svc["StateDirectory"]
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(svc["RestrictAddressFamilies"].split())  # AF_UNIX: sd_notify
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "MemoryDenyWriteExecute", "DynamicUser"):
        assert svc[key] == "yes", key
    assert svc["ProtectSystem"] == "strict" and svc["EnvironmentFile"].lstrip("-").endswith("/eplbd.env")
    known = {env_name(f) for f in FIELDS} | CLIENT_ENV
    named = set(re.findall(r"\bEPLBD_[A-Z0-9_]+", text)) | \
        set(re.findall(r"\bEPLBD_[A-Z0-9_]+", (DEPLOY / "systemd" / "eplbd.env").read_text()))
    assert named <= known, named - known  # commented CURVE lines included


def test_systemd_env_file_loads():
    env = {}
    for line in (DEPLOY / "systemd" / "eplbd.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), line
            env[key] = value
    assert env, "the env file sets nothing"
    s = load_settings(config_file=None, env=env, cli={})
    assert s.log_json is True


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_accepts_the_unit(tmp_path):
    exe = pathlib.Path(sys.executable).parent / "eplbd"  # verify checks the command is executable
    exe = exe if exe.exists() else pathlib.Path(sys.executable)
    text = (DEPLOY / "systemd" / "eplbd.service").read_text().replace("/opt/eplbd/bin/eplbd", str(exe))
    unit = tmp_path / "eplbd.service"
    unit.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip() and not out.stdout.strip(), out.stdout + out.stderr
    # Exposure 0-10 as `systemd-analyze security` prints it (x10 here): the unit keeps it "OK" (< 2).
    sec = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
                         capture_output=True, text=True, timeout=60)
    assert sec.returncode == 0, sec.stdout[-2000:] + sec.stderr


# -- example TOML ----------------------------------------------------------------------------------
def test_example_toml_documents_every_setting_with_default_and_env_name():
    text = (DEPLOY / "eplbd.example.toml").read_text()
    blocks = {}
    for block in text.split("\n\n"):
        lines = block.strip().splitlines()
        m = re.fullmatch(r"#? ?([a-z_0-9]+) = (.*)", lines[-1]) if lines else None
        if m:
            blocks[m[1]] = (lines[:-1], lines[-1], m[2])
    assert set(blocks) == set(FIELDS)
    loaded = load_settings(config_file=DEPLOY / "eplbd.example.toml", env={}, cli={})
    for name, default, env, _ in settings_doc():
        comments, line, value = blocks[name]
        assert any(f"env {env}" in c for c in comments), name
        if default is None:
            assert line.startswith("# ") and value == "(unset)", name
        else:
            assert tomllib.loads(line)[name] == default and getattr(loaded, name) == default, name


def test_the_containerfile_copy_set_builds_a_complete_wheel(tmp_path):
    """What the image's `pip install .` sees (only the COPY sources) is enough to build eplbd with every module."""
    import zipfile

    pytest.importorskip("setuptools", reason="building without isolation needs setuptools in this venv")
    inst = _instructions((DEPLOY / "Containerfile").read_text())
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for op, arg in inst:
        if op == "COPY" and not arg.startswith("--from"):
            for src in shlex.split(arg)[:-1]:
                src = src.rstrip("/")
                copy = shutil.copytree if (REPO / src).is_dir() else shutil.copy
                copy(REPO / src, ctx / src, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                              if (REPO / src).is_dir() else {}))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "dist"), str(ctx)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("eplbd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for package, src in pyproject["tool"]["setuptools"]["package-dir"].items():
        if package in pyproject["tool"]["setuptools"]["packages"]:
            for module in (REPO / src).glob("*.py"):
                assert f"{package.replace('.', '/')}/{module.name}" in names, module
