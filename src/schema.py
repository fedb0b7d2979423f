"""The JSON Schema (draft 2020-12) of the job payload, generated from the pydantic models.

``make schema`` writes it to ``docs/job.schema.json``; a test fails when that file is stale.
Each family's ``config`` and ``metadata`` models apply through an ``if``/``then`` on ``type``; the
``*_enhanced`` types take their base type's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic.json_schema import models_json_schema

from src.contract import JobRequest
from src.families import REGISTRY, family_class
from src.prompt.enhance import ENHANCED_TYPES

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "job.schema.json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def job_schema() -> dict[str, Any]:
    """The payload's schema: the top level, then each family's sections by job type."""
    families = [family_class(name) for name in REGISTRY]
    families = [family for family in families if family.job_types]  # not ``prompt``: it generates nothing
    models = [JobRequest, *(m for family in families for m in (family.config_model, family.metadata_model))]
    pairs = [(model, "validation") for model in models]
    keyed, top = models_json_schema(pairs, ref_template="#/$defs/{model}")
    defs = top["$defs"]
    request = defs.pop(JobRequest.__name__)
    job_types = sorted([*(job_type for family in families for job_type in family.job_types), *ENHANCED_TYPES])
    request["properties"]["type"]["enum"] = job_types
    request["required"].remove("id")  # RunPod's job id stands in when the payload has none
    rules = []
    for family in families:
        rules.append(
            {
                "if": {"properties": {"type": {"enum": sorted(types_of(family.job_types))}}},
                "then": {
                    "properties": {
                        "config": keyed[(family.config_model, "validation")],
                        "metadata": keyed[(family.metadata_model, "validation")],
                    }
                },
            }
        )
    return {
        "$schema": DRAFT,
        "$id": "job.schema.json",
        **request,
        "title": "Job payload (RunPod's input)",
        "allOf": rules,
        "$defs": defs,
    }


def types_of(job_types: frozenset[str]) -> set[str]:
    """A family's job types and the enhanced types based on them."""
    return {*job_types, *(enhanced for enhanced, base in ENHANCED_TYPES.items() if base in job_types)}


def render() -> str:
    """The schema as the file holds it."""
    return json.dumps(job_schema(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    SCHEMA_PATH.write_text(render())
    print(f"wrote {SCHEMA_PATH}", file=sys.stderr)
