"""The committed .cog/openapi_schema.json is what the code says, and says what the API contract says."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tools.testing.cog_server import ROOT

SCHEMA_FILE = ROOT / ".cog" / "openapi_schema.json"
SCHEDULERS = ["DDIM", "DPMSolverMultistep", "HeunDiscrete", "KarrasDPM", "K_EULER_ANCESTRAL", "K_EULER", "PNDM"]
REFINERS = ["no_refiner", "expert_ensemble_refiner", "base_image_refiner"]

# ../shared/reference/api-contract.md, predictor inputs: name -> (JSON type, default, choices, minimum, maximum).
# Absent defaults are None; width/height/refine_steps carry the bounds the contract lets us add.
CONTRACT = {
    "prompt": ("string", "An astronaut riding a rainbow unicorn", None, None, None),
    "negative_prompt": ("string", "", None, None, None),
    "image": ("string", None, None, None, None),
    "mask": ("string", None, None, None, None),
    "width": ("integer", 1024, None, 64, 2048),
    "height": ("integer", 1024, None, 64, 2048),
    "num_outputs": ("integer", 1, None, 1, 4),
    "scheduler": ("string", "K_EULER", SCHEDULERS, None, None),
    "num_inference_steps": ("integer", 50, None, 1, 500),
    "guidance_scale": ("number", 7.5, None, 1, 50),
    "prompt_strength": ("number", 0.8, None, 0, 1),
    "seed": ("integer", None, None, 0, 2**32 - 1),
    "refine": ("string", "no_refiner", REFINERS, None, None),
    "high_noise_frac": ("number", 0.8, None, 0, 1),
    "refine_steps": ("integer", None, None, 1, 500),
    "apply_watermark": ("boolean", True, None, None, None),
    "lora_scale": ("number", 0.6, None, 0, 1),
    "replicate_weights": ("string", None, None, None, None),
    "disable_safety_checker": ("boolean", False, None, None, None),
}


def _load_script():
    spec = importlib.util.spec_from_file_location("make_openapi_schema", ROOT / "scripts" / "make_openapi_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def generated(script):
    return script.render(script.build())


def test_committed_schema_is_fresh(generated):
    assert SCHEMA_FILE.read_text() == generated, "stale: run python scripts/make_openapi_schema.py and commit it"


def test_check_mode_fails_on_a_stale_file(script, generated, tmp_path, monkeypatch, capsys):
    stale = tmp_path / "openapi_schema.json"
    stale.write_text(generated.replace('"default": 50', '"default": 30'))
    monkeypatch.setattr(script, "build", lambda: json.loads(generated))
    monkeypatch.setattr("sys.argv", ["make_openapi_schema.py", "--check", "--output", str(stale)])
    assert script.main() == 1
    diff = capsys.readouterr().err.splitlines()
    assert any(line.startswith("-") and '"default": 30' in line for line in diff)
    assert any(line.startswith("+") and '"default": 50' in line for line in diff)
    stale.write_text(generated)
    assert script.main() == 0


# Inputs beyond the hosted model: each has a default that keeps old clients' behaviour.
EXTRA_INPUTS = {
    "loras": ("string", ""),
    "prompt_weighting": ("boolean", False),
    "output_format": (None, "png"),  # a choice: its type is in the enum's own schema
    "output_quality": ("integer", 80),
    "controlnet": (None, "none"),
    "control_image": ("string", None),
    "controlnet_conditioning_scale": ("number", 0.5),
    "control_guidance_start": ("number", 0.0),
    "control_guidance_end": ("number", 1.0),
    "control_preprocess": ("boolean", True),
    "inpaint_model": (None, "base"),
    "ip_adapter_image": ("string", None),  # a file input: no image prompt unless sent
    "ip_adapter_scale": ("number", 0.6),
}


def test_inputs_match_the_contract_in_order():
    schema = json.loads(SCHEMA_FILE.read_text())["components"]["schemas"]
    properties = schema["Input"]["properties"]
    assert list(properties) == list(CONTRACT) + list(EXTRA_INPUTS)
    for name, (json_type, default) in EXTRA_INPUTS.items():
        assert (properties[name].get("type"), properties[name].get("default")) == (json_type, default), name
    assert schema["output_format"] == {
        "title": "output_format",
        "description": "An enumeration.",
        "enum": ["png", "webp", "jpg"],
        "type": "string",
    }
    assert (properties["output_quality"]["minimum"], properties["output_quality"]["maximum"]) == (1, 100)
    assert schema["inpaint_model"]["enum"] == ["base", "inpainting"]
    assert properties["ip_adapter_image"]["format"] == "uri"
    assert (properties["ip_adapter_scale"]["minimum"], properties["ip_adapter_scale"]["maximum"]) == (0, 1)
    assert "required" not in schema["Input"]  # every input has a default: old clients may send any subset
    for order, (name, (json_type, default, choices, minimum, maximum)) in enumerate(CONTRACT.items()):
        prop = properties[name]
        assert prop["x-order"] == order
        if choices:
            assert prop["allOf"] == [{"$ref": f"#/components/schemas/{name}"}], name
            assert schema[name]["enum"] == choices and schema[name]["type"] == json_type, name
        else:
            assert prop["type"] == json_type, name
        assert prop.get("default") == default, name
        assert (prop.get("minimum"), prop.get("maximum")) == (minimum, maximum), name
        assert prop.get("nullable", False) == (default is None), name


def test_outputs_are_a_list_of_files():
    output = json.loads(SCHEMA_FILE.read_text())["components"]["schemas"]["Output"]
    assert output == {"title": "Output", "type": "array", "items": {"type": "string", "format": "uri"}}


def test_training_schema_is_merged_when_a_trainer_exists(script, tmp_path):
    """train.py is another engineer's; a stand-in trainer shows the script writes /trainings when it appears."""
    (tmp_path / "cog.yaml").write_text('predict: "predict.py:Runner"\ntrain: "train.py:train"\n')
    (tmp_path / "predict.py").write_text(
        "from cog import BaseRunner, Input\n\n"
        "class Runner(BaseRunner):\n"
        "    def run(self, prompt: str = Input(default='x')) -> str:\n"
        "        return prompt\n"
    )
    (tmp_path / "train.py").write_text(
        "from cog import Input, Path\n\n"
        "def train(input_images: Path = Input(description='zip'), lr_scheduler: str = Input(default='constant',"
        " choices=['constant', 'linear'])) -> Path:\n"
        "    return input_images\n"
    )
    saved = {name: sys.modules.pop(name, None) for name in ("predict", "train")}  # import the stand-ins
    try:
        schema = script.build(tmp_path)
    finally:
        for name, module in saved.items():
            sys.modules.pop(name, None)
            if module is not None:
                sys.modules[name] = module

    schemas = schema["components"]["schemas"]
    assert {"/predictions", "/trainings", "/trainings/{training_id}/cancel"} <= set(schema["paths"])
    assert list(schemas["Input"]["properties"]) == ["prompt"]
    assert list(schemas["TrainingInput"]["properties"]) == ["input_images", "lr_scheduler"]
    assert schemas["TrainingInput"]["required"] == ["input_images"]
    assert schemas["lr_scheduler"]["enum"] == ["constant", "linear"]
    assert schemas["TrainingOutput"]["format"] == "uri"
