"""Write .cog/openapi_schema.json from the code: the file `cog build` would write (Cog's CLI is a Go binary, absent here).

The Cog server (python -m cog.server.http) reads this file for input validation (422 answers) and /openapi.json.
cog's own Python inspector (cog._inspector.create_predictor) reads the signatures named in cog.yaml; this script lays
them out as cog 0.23's generator does: one OpenAPI 3.0.2 document with /predictions (Input, Output) and, once train.py
exists, /trainings (TrainingInput, TrainingOutput) merged in. Without train.py the training part is skipped.

  python scripts/make_openapi_schema.py            # (re)write .cog/openapi_schema.json
  python scripts/make_openapi_schema.py --check    # exit 1 when the committed file differs from the code
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from cog import _adt as adt
from cog._inspector import create_predictor

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / ".cog" / "openapi_schema.json"
REF = "#/components/schemas/"

# What differs between the predict and the train halves of the document.
MODES = {
    "predict": dict(
        route="/predictions",
        id_name="prediction_id",
        request="PredictionRequest",
        response="PredictionResponse",
        input="Input",
        output="Output",
        summary="Predict",
        description="Run a single prediction on the model",
        operation="predict_predictions_post",
    ),
    "train": dict(
        route="/trainings",
        id_name="training_id",
        request="TrainingRequest",
        response="TrainingResponse",
        input="TrainingInput",
        output="TrainingOutput",
        summary="Train",
        description="Run a single training on the model",
        operation="train_trainings_post",
    ),
}


def _title(name: str) -> str:
    return name.replace("_", " ").title()


def _number(value: float) -> int | float:
    """The inspector stores bounds as floats; write 64 rather than 64.0 where the bound is whole."""
    return int(value) if float(value).is_integer() else value


def _input_property(field) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One input's JSON schema, and the enum component its choices need (or None)."""
    prop: dict[str, Any] = {"x-order": field.order}
    enum = None
    if field.choices is not None:
        enum = {"title": field.name, "description": "An enumeration.", "enum": list(field.choices)}
        enum.update(field.type.primitive.json_type())
        prop["allOf"] = [{"$ref": REF + field.name}]
    else:
        prop["title"] = _title(field.name)
        prop.update(field.type.json_type())
    if field.default is not None:
        prop["default"] = field.type.json_encode(field.type.normalize(field.default))
    if field.type.repetition in (adt.Repetition.OPTIONAL, adt.Repetition.OPTIONAL_REPEATED):
        prop["nullable"] = True
    optional = {
        "description": field.description,
        "minimum": None if field.ge is None else _number(field.ge),
        "maximum": None if field.le is None else _number(field.le),
        "minLength": field.min_length,
        "maxLength": field.max_length,
        "pattern": field.regex,
        "deprecated": field.deprecated or None,
    }
    prop.update({key: value for key, value in optional.items() if value is not None})
    return prop, enum


def _input_schema(info, title: str) -> tuple[dict[str, Any], dict[str, Any]]:
    properties, enums, required = {}, {}, []
    for name, field in info.inputs.items():
        properties[name], enum = _input_property(field)
        if enum is not None:
            enums[name] = enum
        if field.default is None and field.type.repetition in (adt.Repetition.REQUIRED, adt.Repetition.REPEATED):
            required.append(name)
    schema: dict[str, Any] = {"title": title, "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def _json_response(ref: str | None = None) -> dict[str, Any]:
    schema = {"$ref": REF + ref} if ref else {}
    return {"description": "Successful Response", "content": {"application/json": {"schema": schema}}}


VALIDATION_ERROR_RESPONSE = {
    "description": "Validation Error",
    "content": {"application/json": {"schema": {"$ref": REF + "HTTPValidationError"}}},
}


def _paths(m: dict[str, str]) -> dict[str, Any]:
    return {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": _json_response()}}},
        "/health-check": {
            "get": {
                "summary": "Healthcheck",
                "operationId": "healthcheck_health_check_get",
                "responses": {"200": _json_response()},
            }
        },
        m["route"]: {
            "post": {
                "summary": m["summary"],
                "description": m["description"],
                "operationId": m["operation"],
                "requestBody": {"content": {"application/json": {"schema": {"$ref": REF + m["request"]}}}},
                "responses": {"200": _json_response(m["response"]), "422": VALIDATION_ERROR_RESPONSE},
            }
        },
        f"{m['route']}/{{{m['id_name']}}}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": f"cancel_{m['route'].strip('/')}__{m['id_name']}__cancel_post",
                "parameters": [
                    {
                        "required": True,
                        "schema": {"title": _title(m["id_name"]), "type": "string"},
                        "name": m["id_name"],
                        "in": "path",
                    }
                ],
                "responses": {"200": _json_response(), "422": VALIDATION_ERROR_RESPONSE},
            }
        },
    }


def _envelopes(m: dict[str, str]) -> dict[str, Any]:
    """The fixed request/response envelopes and error schemas around the model's own Input and Output."""
    string = {"type": "string"}
    time = {"type": "string", "format": "date-time"}
    return {
        m["request"]: {
            "title": m["request"],
            "type": "object",
            "properties": {"id": {"title": "Id", **string}, "input": {"$ref": REF + m["input"]}},
        },
        m["response"]: {
            "title": m["response"],
            "type": "object",
            "properties": {
                "input": {"$ref": REF + m["input"]},
                "output": {"$ref": REF + m["output"]},
                **{name: {"title": _title(name), **string} for name in ("id", "version")},
                **{name: {"title": _title(name), **time} for name in ("created_at", "started_at", "completed_at")},
                **{name: {"title": _title(name), **string} for name in ("status", "error", "logs")},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {
            "title": "Status",
            "description": "An enumeration.",
            "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
            "type": "string",
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {"detail": {"title": "Detail", "type": "array", "items": {"$ref": REF + "ValidationError"}}},
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {"title": "Location", "type": "array", "items": {"anyOf": [string, {"type": "integer"}]}},
                "msg": {"title": "Message", **string},
                "type": {"title": "Error Type", **string},
            },
        },
    }


def document(info, mode: str) -> dict[str, Any]:
    """The OpenAPI document for one mode, from the inspector's PredictorInfo."""
    m = MODES[mode]
    input_schema, enums = _input_schema(info, m["input"])
    output_schema = {**info.output.json_type(), "title": m["output"]}
    schemas = {m["input"]: input_schema, m["output"]: output_schema, **enums, **_envelopes(m)}
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": _paths(m),
        "components": {"schemas": schemas},
    }


def merge(predict: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    """As cog does: the predict document, plus the train document's paths and schemas it does not already have."""
    for key, value in train["paths"].items():
        predict["paths"].setdefault(key, value)
    for key, value in train["components"]["schemas"].items():
        predict["components"]["schemas"].setdefault(key, value)
    return predict


def _inspect(root: Path, ref: str):
    """Run cog's inspector on `file.py:Name`, the module loaded from that file under `root` (once per process)."""
    file, name = ref.split(":", 1)
    module_name = Path(file).stem
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, root / file)
        sys.modules[module_name] = module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return create_predictor(module_name, name)


def build(root: Path = ROOT) -> dict[str, Any]:
    config = yaml.safe_load((root / "cog.yaml").read_text())
    schema = document(_inspect(root, config["predict"]), "predict")
    train_ref = config.get("train")
    if train_ref and (root / train_ref.split(":", 1)[0]).exists():
        schema = merge(schema, document(_inspect(root, train_ref), "train"))
    else:
        print(f"no {train_ref or 'train entry'}: the training schema is skipped", file=sys.stderr)
    return schema


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    parser.add_argument("--output", type=Path, default=SCHEMA_PATH, help=f"default: {SCHEMA_PATH.relative_to(ROOT)}")
    args = parser.parse_args()
    text = render(build())
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current == text:
            print(f"{args.output} is up to date")
            return 0
        diff = difflib.unified_diff(current.splitlines(), text.splitlines(), "committed", "from the code", lineterm="")
        print("\n".join(diff), file=sys.stderr)
        print(f"{args.output} is stale: run python scripts/make_openapi_schema.py and commit it", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
