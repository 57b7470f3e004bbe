"""A minimal Flower App, built into real app bundles (FABs) by the approval and runtime tests."""

from pathlib import Path

TINY_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "1.0.0"
description = "an app for medfed's tests"
license = "Apache-2.0"
dependencies = ["flwr==1.41.0"]

[tool.flwr.app]
publisher = "hospital-tests"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"
"""


def tiny_app(root: Path, client_code: str = "app = None\n") -> Path:
    """A minimal Flower App folder."""
    (root / "tinyapp").mkdir(parents=True)
    (root / "pyproject.toml").write_text(TINY_PYPROJECT)
    (root / "tinyapp" / "__init__.py").write_text("")
    (root / "tinyapp" / "server.py").write_text("app = None\n")
    (root / "tinyapp" / "client.py").write_text(client_code)
    return root
