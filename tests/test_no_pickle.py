"""No pickle anywhere: not on the wire, not when reading files a peer or an operator hands the daemon.

Checked on the syntax tree of every module in ``proto/``, ``client/`` and ``eplbd/`` (so a docstring that
says "never pickle" is fine): no pickle-family import, no pyzmq object sockets, ``torch.load`` only with
``weights_only=True``, ``np.load`` never with ``allow_pickle=True``.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("proto", "client", "eplbd")
BANNED_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal", "copyreg", "jsonpickle"}
BANNED_METHODS = {"send_pyobj", "recv_pyobj", "send_serialized", "recv_serialized"}


def _sources() -> list[pathlib.Path]:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 20, "the packages were not found"
    return files


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def pickle_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for every way ``tree`` could unpickle or send a pickle."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Attribute) and node.attr in BANNED_METHODS:
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            if (owner, node.func.attr) == ("torch", "load") and not _is_const(_kw(node, "weights_only"), True):
                found.append((node.lineno, "torch.load without weights_only=True"))
            if (owner, node.func.attr) in (("np", "load"), ("numpy", "load")) and \
                    not (_kw(node, "allow_pickle") is None or _is_const(_kw(node, "allow_pickle"), False)):
                found.append((node.lineno, "np.load with allow_pickle"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
            if node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in BANNED_MODULES:
                found.append((node.lineno, f"__import__({node.args[0].value!r})"))
    return found


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_pickle_in(path):
    assert pickle_uses(ast.parse(path.read_text(), str(path))) == []


@pytest.mark.parametrize("snippet", [
    "import pickle", "import cloudpickle as cp", "from pickle import loads", "sock.recv_pyobj()",
    "sock.send_pyobj(x)", "torch.load(f)", "torch.load(f, weights_only=False)", "np.load(f, allow_pickle=True)",
    "__import__('pickle')",
])
def test_the_check_catches(snippet):
    assert pickle_uses(ast.parse(snippet)), snippet


@pytest.mark.parametrize("snippet", [
    "torch.load(f, map_location='cpu', weights_only=True)", "np.load(f, allow_pickle=False)", "np.load(f)",
    "'''never pickle'''", "msgspec.msgpack.decode(b)",
])
def test_the_check_allows(snippet):
    assert pickle_uses(ast.parse(snippet)) == []


def test_the_codec_refuses_what_would_need_pickle():
    from eplbd.errors import InvalidArgumentError
    from eplbd.proto import ConfigReply, Encoder

    class Custom:
        pass

    with pytest.raises(InvalidArgumentError, match="never pickle"):
        Encoder().encode(ConfigReply(config={"x": Custom()}))
