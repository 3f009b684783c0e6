import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_sessionstart(session):
    """The suite runs on the real routing data in ../shared (CI has it beside the clone): without it, say so
    once instead of letting every trace-driven test fail on its own."""
    from eplbd.refengine.demo import DEFAULT_TRACE

    if not DEFAULT_TRACE.is_file():
        pytest.exit(f"the routing trace {DEFAULT_TRACE} is missing: put shared/ beside the checkout", returncode=1)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.fail(f"../shared/data not found beside the checkout (looked in {path})")
    return path
