"""The CRDs in crds/ are what the models say, and read well in `kubectl explain`."""

from __future__ import annotations

from typing import Any

import yaml

from controller import crds


def test_crd_files_match_the_models() -> None:
    assert crds.main(["--check"]) == 0, "crds/ is stale: run `make crds`"


def walk(schema: dict[str, Any], path: str) -> list[str]:
    missing = [] if schema.get("description") or path.endswith("metadata") else [path]
    for name, sub in schema.get("properties", {}).items():
        missing += walk(sub, f"{path}.{name}")
    if "items" in schema and "properties" in schema["items"]:
        missing += walk(schema["items"], f"{path}[]")
    return missing


def test_every_field_has_a_description() -> None:
    for text in crds.rendered().values():
        crd = yaml.safe_load(text)
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert walk(schema, crd["spec"]["names"]["kind"]) == []


def test_crds_stay_small_enough_for_client_side_apply() -> None:
    for text in crds.rendered().values():
        assert len(text.encode()) < 64 * 1024  # the last-applied annotation limit is 256 KiB
