"""Run the predictor without Docker, the way `cog predict` does, and write its images to files.

  python scripts/cog_predict.py -i prompt="a photo of an astronaut" -i seed=42
  python scripts/cog_predict.py -i image=@photo.png -i prompt_strength=0.6 -o out/

Files are given as `-i name=@path` (a local file: the shell's user is trusted with the server's files), or as an
https:// URL or a data: URI, which run() fetches under the same network policy as over HTTP (sdxl.inputs.file_inputs).
The other inputs are checked and completed with their defaults by cog's own inspector, as the Cog server does, so
Runner.run() sees what it would see behind HTTP. Weights come from SDXL_WEIGHTS_DIR (default ./weights).
(Not named predict.py: that would shadow the predictor's module.)
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from cog import _adt as adt  # noqa: E402
from cog._inspector import check_input, create_predictor  # noqa: E402

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_pairs(pairs: list[str], fields: dict) -> dict:
    """-i name=value strings -> raw input values: `@path` for local files (a pathlib.Path, which only a trusted caller
    can pass), true/false for booleans, the rest as text (cog's check_input turns "42" into 42 for integer inputs)."""
    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"-i {pair!r}: expected name=value")
        field = fields.get(name)
        if field is None:
            raise ValueError(f"-i {name}: no such input; inputs are {', '.join(fields)}")
        if field.type.primitive is adt.PrimitiveType.PATH and value.startswith("@"):
            value = Path(value[1:]).expanduser()
            if not value.is_file():
                raise ValueError(f"{name}: {value} is not a file")
        elif field.type.primitive is adt.PrimitiveType.BOOL:
            if value.lower() not in TRUE + FALSE:
                raise ValueError(f"{name}: {value!r} is not a boolean; use true or false")
            value = value.lower() in TRUE
        values[name] = value
    return values


def resolve_inputs(pairs: list[str], module: str = "predict", name: str = "Runner") -> dict:
    """The keyword arguments the Cog server would pass to run(): validated and completed with defaults. File inputs
    are kept out of cog's check_input, which would download URLs itself (unchecked); run() fetches them."""
    info = create_predictor(module, name)
    values = parse_pairs(pairs, info.inputs)
    files = {key: value for key, value in values.items() if info.inputs[key].type.primitive is adt.PrimitiveType.PATH}
    kwargs = check_input(info.inputs, {key: value for key, value in values.items() if key not in files})
    return {**kwargs, **files}


def save_outputs(paths: list[Path], out_dir: Path) -> list[Path]:
    """Copy the predictor's files out of its temporary folder under names that do not overwrite earlier runs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    saved = []
    for index, path in enumerate(paths):
        target = out_dir / f"sdxl-{stamp}-{index}{Path(path).suffix}"
        shutil.copyfile(path, target)
        saved.append(target)
    return saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", action="append", default=[], metavar="NAME=VALUE", help="a run() input")
    parser.add_argument("-o", "--output", type=Path, default=Path("outputs"), help="folder for the images")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # 1. Validate and complete the inputs before loading anything, so a typo fails in seconds.
    try:
        kwargs = resolve_inputs(args.input)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    # 2. Setup and one run, as the server's worker does them.
    from predict import Runner
    from sdxl.errors import InputError

    runner = Runner()
    runner.setup()
    try:
        outputs = runner.run(**kwargs)
    except InputError as error:  # the client's mistake: say which input, without a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2

    # 3. Keep the images.
    for path in save_outputs(outputs, args.output):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
