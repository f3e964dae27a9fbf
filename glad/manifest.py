"""The manifest of a model directory: what it is, checked without loading torch.

Services that only need to know which model a version is (the registry, the dashboard) read it
here, so they do not pay for importing torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from glad.errors import ModelFileError

SCHEMA = "glad-model"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def read_manifest(path: Path) -> dict:
    """The manifest of the model at `path`, checked for schema and version."""
    file = path / MANIFEST
    if not path.exists():
        raise ModelFileError(f"{path}: no such model")
    if not file.is_file():
        raise ModelFileError(f"{path}: not a GLAD model directory (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{file}: corrupt manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise ModelFileError(f"{file}: not a GLAD model manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ModelFileError(
            f"{path}: model schema version {version} is not supported by this glad-stream "
            f"(it reads version {SCHEMA_VERSION}); refit the model or use a matching release"
        )
    return manifest
