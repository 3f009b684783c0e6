import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.fail(f"../shared/data not found beside the checkout (looked in {path})")
    return path
