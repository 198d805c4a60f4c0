#!/usr/bin/env python
"""A browser playground for a running SDXL Cog server, like the hosted model's web page.

    .venv-playground/bin/python -m tools.playground --server http://127.0.0.1:5000 [--train-server URL]

The form is built from the server's own /openapi.json (every input with its bounds, default, choices and
description; no second list here). It talks to the server only over HTTP, exactly as curl would: file inputs go
up as data: URIs, images come back as data: URIs and are shown with their seed, parameters and logs. It never
imports the model. It is a tool for trying a deployment, not a multi-user product: it binds to 127.0.0.1 unless
told otherwise and has no accounts (PLAYGROUND_AUTH=user:password turns on Gradio's login form).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import itertools
import mimetypes
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the playground talks to the server only

import gradio as gr  # noqa: E402
import requests  # noqa: E402

HEALTH_TIMEOUT_S = 5
SEED_IN_LOGS = re.compile(r"Using seed: (\d+)")
WRONG_MODE = "unexpected keyword argument"


# The form, from the server's schema --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One input of the server's schema, in the terms the form needs."""

    name: str
    kind: str  # "text", "integer", "number", "boolean", "choice" or "file"
    description: str = ""
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple = ()
    optional: bool = False

    def hint(self) -> str:
        """The description plus what is allowed, as the hosted model's page shows under each input."""
        parts = [self.description.rstrip(".")] if self.description else []
        if self.minimum is not None and self.maximum is not None:
            parts.append(f"{_number(self.minimum)} to {_number(self.maximum)}")
        elif self.minimum is not None:
            parts.append(f"at least {_number(self.minimum)}")
        elif self.maximum is not None:
            parts.append(f"at most {_number(self.maximum)}")
        if self.default not in (None, ""):
            parts.append(f"default {self.default}")
        elif self.optional:
            parts.append("optional")
        elif self.default is None:
            parts.append("required")
        return " · ".join(parts)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _resolve(prop: dict, schemas: dict) -> dict:
    """Inline `allOf: [{$ref}]` / `$ref` (how cog describes enums) so the property reads as one schema."""
    merged: dict = {}
    for part in prop.get("allOf", []) + ([prop] if "$ref" in prop else []):
        ref = part.get("$ref", "")
        if ref.startswith("#/components/schemas/"):
            merged.update(schemas[ref.rsplit("/", 1)[1]])
    merged.update({key: value for key, value in prop.items() if key not in ("allOf", "$ref")})
    return merged


def _kind(prop: dict) -> str:
    if "enum" in prop:
        return "choice"
    if prop.get("type") == "string" and prop.get("format") == "uri":
        return "file"
    return {"integer": "integer", "number": "number", "boolean": "boolean"}.get(prop.get("type"), "text")


def fields_of(openapi: dict, schema_name: str) -> list[Field]:
    """The inputs of `schema_name` (Input, TrainingInput) in the server's order (x-order)."""
    schemas = openapi.get("components", {}).get("schemas", {})
    schema = schemas.get(schema_name, {})
    required = set(schema.get("required", []))
    props = sorted(schema.get("properties", {}).items(), key=lambda item: item[1].get("x-order", 0))
    fields = []
    for name, raw in props:
        prop = _resolve(raw, schemas)
        fields.append(
            Field(
                name=name,
                kind=_kind(prop),
                description=prop.get("description", ""),
                default=prop.get("default"),
                minimum=prop.get("minimum"),
                maximum=prop.get("maximum"),
                choices=tuple(prop.get("enum", ())),
                optional=name not in required and "default" not in prop,
            )
        )
    return fields


def component_for(field: Field, images: bool, id_prefix: str) -> gr.components.Component:
    """The Gradio input for one field. Bounds are shown, not enforced: the server is the judge (its 422 is shown)."""
    common = dict(label=field.name, info=field.hint(), elem_id=f"{id_prefix}{field.name}")
    if field.kind == "choice":
        return gr.Dropdown(choices=list(field.choices), value=field.default, **common)
    if field.kind == "boolean":
        return gr.Checkbox(value=bool(field.default), **common)
    if field.kind in ("integer", "number") and field.default is None:
        # An empty gr.Number is sent as 0; an optional number must be able to stay empty ("server's choice").
        return gr.Textbox(value="", placeholder="empty: left to the server", **common)
    if field.kind in ("integer", "number"):
        return gr.Number(value=field.default, precision=0 if field.kind == "integer" else None, **common)
    if field.kind == "file" and images:
        # image_mode=None and type=filepath: the uploaded file is passed on byte for byte, never re-encoded.
        return gr.Image(
            type="filepath",
            image_mode=None,
            format="png",
            height=200,
            sources=["upload", "clipboard"],
            **_no_info(common),
        )
    if field.kind == "file":
        return gr.File(type="filepath", **_no_info(common))
    return gr.Textbox(value=field.default or "", lines=1, max_lines=8, **common)


def _inputs_in_rows(fields: list[Field], images: bool, id_prefix: str) -> dict[str, gr.components.Component]:
    """The inputs in schema order; neighbouring file uploads (image and mask) share a row."""
    components = {}
    for is_file, group in itertools.groupby(fields, key=lambda field: field.kind == "file"):
        group = list(group)
        with gr.Row() if is_file and len(group) > 1 else contextlib.nullcontext():
            components.update({field.name: component_for(field, images, id_prefix) for field in group})
    return components


def _no_info(common: dict) -> dict:
    """Image and File take no `info`: the hint goes into the label."""
    label = f"{common['label']} ({common['info']})" if common["info"] else common["label"]
    return {"label": label, "elem_id": common["elem_id"]}


def request_inputs(fields: list[Field], values: list) -> dict:
    """The JSON `input` for the server: empty optional values are left out, files become data: URIs."""
    inputs = {}
    for field, value in zip(fields, values):
        if value is None or (value == "" and field.optional):
            continue
        if field.kind == "file":
            value = data_uri(Path(value))
        elif field.kind in ("integer", "number"):
            value = _as_number(value, field.kind)
            if value == "":
                continue
        inputs[field.name] = value
    return inputs


def _as_number(value, kind: str):
    """A number typed as text (or given by gr.Number); text that is not a number goes as it is, for the server's 422."""
    if isinstance(value, str):
        value = value.strip()
        try:
            return int(value) if kind == "integer" else float(value)
        except ValueError:
            return value
    return int(value) if kind == "integer" else value


def data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def shown_inputs(inputs: dict) -> dict:
    """The request as shown next to the images: data: URIs shortened to their type and size."""
    return {key: _short(value) for key, value in inputs.items()}


def _short(value):
    if isinstance(value, str) and value.startswith("data:"):
        header, _, data = value.partition(",")
        return f"{header},… ({len(data) * 3 // 4 // 1024} KiB)"
    return value


# Talking to the server ---------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """What came back for one request: the HTTP answer, or why there was none."""

    server: str
    status_code: int | None = None
    body: Any = None
    problem: str | None = None  # no answer: unreachable, not READY, still busy
    skipped: list[str] = dataclasses.field(default_factory=list)  # servers passed over on the way to this one


class Servers:
    """One or more Cog servers (or one load balancer) of the same model, tried in turn."""

    def __init__(self, urls: list[str], busy_wait_s: float, request_timeout_s: float):
        self.urls = [url.rstrip("/") for url in urls]
        self.busy_wait_s = busy_wait_s
        self.request_timeout_s = request_timeout_s

    def openapi(self, wait_s: float) -> dict:
        """The schema of the first server that has one, waiting up to `wait_s` while servers start. Coglet serves it
        (503 until then) once setup succeeded: when every server's setup failed there is no form to build."""
        deadline, said = time.monotonic() + wait_s, set()
        while True:
            states = []
            for url in self.urls:
                try:
                    response = requests.get(f"{url}/openapi.json", timeout=HEALTH_TIMEOUT_S)
                    if response.ok:
                        return response.json()
                except requests.RequestException:
                    pass
                states.append(self.health(url))
            for _, why in states:
                if why and why not in said:
                    print(f"playground: {why}", file=sys.stderr)
                    said.add(why)
            if all(status in ("SETUP_FAILED", "DEFUNCT") for status, _ in states):
                raise SystemExit("playground: no server can run predictions; fix the server and start again")
            if time.monotonic() >= deadline:
                raise SystemExit(f"playground: no server served /openapi.json within {wait_s:.0f} s")
            time.sleep(1)

    def health(self, url: str) -> tuple[str, str]:
        """(status, explanation) from /health-check; the explanation is empty when the server can take work."""
        try:
            health = requests.get(f"{url}/health-check", timeout=HEALTH_TIMEOUT_S).json()
        except (requests.RequestException, ValueError) as error:
            return "UNREACHABLE", f"{url} cannot be reached ({type(error).__name__})"
        status = health.get("status", "UNKNOWN")
        if status in ("READY", "BUSY"):
            return status, ""
        if status == "STARTING":
            return status, f"{url} is still starting (loading weights): waiting for READY"
        logs = (health.get("setup") or {}).get("logs") or ""
        return status, f"{url} is {status}, not READY; its setup logs end with:\n{logs[-1500:]}"

    def post(self, path: str, inputs: dict) -> Iterator[str | Answer]:
        """POST {"input": inputs} to the first server that takes it. Yields progress lines while servers are busy
        (409) or starting, then the Answer. Coglet runs one prediction at a time and frees its slot just after it
        answers, so a 409 is waited out and retried, for up to busy_wait_s."""
        started = time.monotonic()
        while True:
            waiting, problems = [], []
            for url in self.urls:
                status, why = self.health(url)
                if why:
                    (waiting if status == "STARTING" else problems).append(why)
                    continue
                try:
                    response = requests.post(f"{url}{path}", json={"input": inputs}, timeout=self.request_timeout_s)
                except requests.RequestException as error:
                    problems.append(f"{url} did not answer: {error}")
                    continue
                if response.status_code == 409:
                    waiting.append(f"{url} is busy with another request (409)")
                    continue
                yield _answer(url, response, skipped=problems + waiting)
                return
            elapsed = time.monotonic() - started
            if not waiting or elapsed > self.busy_wait_s:
                gave_up = [f"still waiting after {elapsed:.0f} s (--busy-wait): try again later"] if waiting else []
                yield Answer(server=", ".join(self.urls), problem="\n".join(problems + waiting + gave_up))
                return
            yield f"{'; '.join(waiting)}: waiting and retrying ({elapsed:.0f} s of {self.busy_wait_s:.0f} s)"
            time.sleep(1)


def _answer(url: str, response: requests.Response, skipped: list[str]) -> Answer:
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return Answer(server=url, status_code=response.status_code, body=body, skipped=skipped)


def explain_refusal(answer: Answer) -> str | None:
    """A clear message for everything but a success; None for a succeeded request."""
    if answer.problem is not None:
        return f"**No server took the request.**\n\n```\n{answer.problem}\n```"
    body = answer.body if isinstance(answer.body, dict) else {}
    if answer.status_code == 422:
        lines = [f"- **{_field_of(item)}**: {item.get('msg', '')}" for item in body.get("detail", [])]
        return "**The server refused the input (422).**\n\n" + ("\n".join(lines) or str(answer.body))
    if answer.status_code != 200:
        return f"**The server answered HTTP {answer.status_code}.**\n\n```\n{str(answer.body)[:2000]}\n```"
    if body.get("status") == "succeeded":
        return None
    message = f"**The request {body.get('status', 'failed')}.**\n\n```\n{body.get('error') or 'no error given'}\n```"
    if WRONG_MODE in str(body.get("error")):
        message += (
            "\n\nThis server runs the other kind of work: predictions need a server started normally, trainings one"
            " started with `--x-mode train` (give it to the playground with `--train-server`)."
        )
    return message


def _field_of(item: dict) -> str:
    loc = [str(part) for part in item.get("loc", [])]
    return ".".join(loc[2:] if loc[:2] == ["body", "input"] else loc) or "request"


# Results ------------------------------------------------------------------------------------------------------------


def seed_of(logs: str) -> int | None:
    found = SEED_IN_LOGS.search(logs or "")
    return int(found.group(1)) if found else None


def save_output(value: str, path: Path) -> str:
    """A data: URI output written to `path` (its bytes as sent); an URL output is shown as it is."""
    if not value.startswith("data:"):
        return value
    try:
        path.write_bytes(base64.b64decode(value.split(",", 1)[1], validate=True))
    except (IndexError, binascii.Error) as error:
        raise ValueError(f"the server sent an output that is not a valid data: URI ({error})") from error
    return str(path)


class TrainedFiles:
    """Serves the trained tars on the playground's own loopback port, so a predictions server on this machine
    (started with SDXL_ALLOW_LOOPBACK_HTTP=1) can fetch one as `replicate_weights`. Only those tars, nothing else."""

    NAME = re.compile(r"^/trained/([0-9a-f]{32})/trained_model\.tar$")

    def __init__(self, directory: Path, port: int = 0):
        self.directory = directory
        files = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                match = files.NAME.match(self.path)
                path = files.directory / match.group(1) / "trained_model.tar" if match else None
                if path is None or not path.is_file():
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Content-Length", str(path.stat().st_size))
                self.end_headers()
                with open(path, "rb") as source:
                    while chunk := source.read(1 << 20):
                        self.wfile.write(chunk)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def keep(self, value: str) -> tuple[str, str]:
        """(local file, URL for replicate_weights) of a training's `weights` output."""
        if not value.startswith("data:"):
            return value, value  # the server uploaded it somewhere already
        key = uuid.uuid4().hex
        (self.directory / key).mkdir(parents=True)
        path = save_output(value, self.directory / key / "trained_model.tar")
        return path, f"http://127.0.0.1:{self.httpd.server_address[1]}/trained/{key}/trained_model.tar"


# The page ------------------------------------------------------------------------------------------------------------

LOOPBACK_NOTE = (
    "A predictions server fetches `replicate_weights` only from **https** URLs. The `http://127.0.0.1` URL below is"
    " the playground's own loopback file route: it works only for a predictions server on this machine started with"
    " `SDXL_ALLOW_LOOPBACK_HTTP=1` (as `scripts/playground.sh` does). For any other server, upload the tar to https"
    " storage and paste that URL into `replicate_weights`."
)


@dataclass
class Playground:
    predict: Servers
    train: Servers | None
    openapi: dict
    outputs: Path
    trained: TrainedFiles | None
    requests_sent: Iterator[int] = dataclasses.field(default_factory=lambda: itertools.count(1))

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="SDXL playground", analytics_enabled=False) as page:
            gr.Markdown(
                f"## SDXL playground\nPredictions: `{', '.join(self.predict.urls)}`"
                + (f" · trainings: `{', '.join(self.train.urls)}`" if self.train else "")
                + "\n\nThe form is the server's own schema (/openapi.json); the server checks every value."
            )
            with gr.Tab("Predict"):
                predict_inputs = self._predict_tab()
            if self.train:
                with gr.Tab("Train"):
                    self._train_tab(predict_inputs)
        return page

    def _predict_tab(self) -> dict[str, gr.components.Component]:
        fields = fields_of(self.openapi, "Input")
        with gr.Row():
            with gr.Column():
                components = _inputs_in_rows(fields, images=True, id_prefix="input-")
            with gr.Column():
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(
                    label="images", elem_id="gallery", columns=2, buttons=["download", "fullscreen"], format="png"
                )
                with gr.Row():
                    reuse_seed = gr.Button("Reuse this seed", elem_id="reuse-seed", size="sm")
                    use_init = gr.Button("Use as init image", elem_id="use-init", size="sm")
                files = gr.File(label="download", file_count="multiple", elem_id="downloads")
                params = gr.JSON(label="generation parameters (as sent)", elem_id="params")
                logs = gr.Textbox(label="logs", lines=8, max_lines=30, elem_id="logs", autoscroll=True)
        results = gr.State([])
        selected = gr.State(0)

        def generate(*values):
            yield from self._generate(fields, list(values))

        run.click(generate, list(components.values()), [status, gallery, files, params, logs, results, selected])
        gallery.select(_selected_index, None, selected)
        if "seed" in components:
            reuse_seed.click(_seed_at, [results, selected], components["seed"])
        if "image" in components:
            use_init.click(_path_at, [results, selected], components["image"])
        return components

    def _generate(self, fields: list[Field], values: list) -> Iterator[tuple]:
        keep, tag = gr.skip(), f"**#{next(self.requests_sent)}** · "  # tells one request's status from the last
        try:
            inputs = request_inputs(fields, values)
        except OSError as error:
            yield (f"{tag}**Could not read an uploaded file:** {error}", keep, keep, keep, "", keep, keep)
            return
        yield (f"{tag}Sending to the server…", keep, keep, shown_inputs(inputs), "", keep, keep)
        for event in self.predict.post("/predictions", inputs):
            if isinstance(event, str):
                yield (f"{tag}⏳ {event}", keep, keep, keep, keep, keep, keep)
                continue
            body = event.body if isinstance(event.body, dict) else {}
            refusal = explain_refusal(event)
            if refusal:
                yield (tag + refusal, [], None, shown_inputs(inputs), body.get("logs", ""), [], 0)
                return
            status, *shown = self._show_images(event, inputs, body)
            yield (tag + status, *shown)

    def _show_images(self, answer: Answer, inputs: dict, body: dict) -> tuple:
        seed = seed_of(body.get("logs", ""))
        folder = self.outputs / (body.get("id") or uuid.uuid4().hex)
        folder.mkdir(parents=True, exist_ok=True)
        outputs = body.get("output") or []
        paths = [save_output(value, folder / f"out-{i}.png") for i, value in enumerate(outputs)]
        gallery = [(path, f"seed {seed} · image {i + 1} of {len(paths)}") for i, path in enumerate(paths)]
        results = [{"path": path, "seed": seed} for path in paths]
        took = (body.get("metrics") or {}).get("predict_time")
        status = f"**Done** on `{answer.server}`: {len(paths)} image(s), seed {seed}" + (
            f", {took:.1f} s" if took else ""
        )
        if answer.skipped:
            status += "\n\nPassed over:\n```\n" + "\n".join(answer.skipped) + "\n```"
        local = [path for path in paths if not path.startswith(("http://", "https://"))]
        return status, gallery, local or None, {**shown_inputs(inputs), "seed": seed}, body.get("logs", ""), results, 0

    def _train_tab(self, predict_inputs: dict) -> None:
        fields = fields_of(self.openapi, "TrainingInput")
        with gr.Row():
            with gr.Column():
                components = list(_inputs_in_rows(fields, images=False, id_prefix="train-input-").values())
            with gr.Column():
                run = gr.Button("Train", variant="primary", elem_id="train")
                status = gr.Markdown(elem_id="train-status")
                tar = gr.File(label="trained_model.tar", elem_id="trained-tar")
                gr.Markdown(LOOPBACK_NOTE)
                url = gr.Textbox(label="URL for replicate_weights", elem_id="trained-url", buttons=["copy"])
                use = gr.Button("Use in the next prediction", elem_id="use-trained")
                logs = gr.Textbox(label="training logs", lines=8, max_lines=30, elem_id="train-logs")

        def train(*values):
            yield from self._train(fields, list(values))

        run.click(train, components, [status, tar, url, logs])
        if "replicate_weights" in predict_inputs:
            use.click(lambda value: value, url, predict_inputs["replicate_weights"])

    def _train(self, fields: list[Field], values: list) -> Iterator[tuple]:
        keep, tag = gr.skip(), f"**#{next(self.requests_sent)}** · "
        try:
            inputs = request_inputs(fields, values)
        except OSError as error:
            yield (f"{tag}**Could not read an uploaded file:** {error}", keep, keep, "")
            return
        yield (f"{tag}Training… (the logs appear when it ends)", keep, keep, "")
        for event in self.train.post("/trainings", inputs):
            if isinstance(event, str):
                yield (f"{tag}⏳ {event}", keep, keep, keep)
                continue
            body = event.body if isinstance(event.body, dict) else {}
            refusal = explain_refusal(event)
            if refusal:
                yield (tag + refusal, None, "", body.get("logs", ""))
                return
            weights = (body.get("output") or {}).get("weights") if isinstance(body.get("output"), dict) else None
            if not weights:
                yield (f"{tag}**The training returned no weights.**", None, "", body.get("logs", ""))
                return
            path, url = self.trained.keep(weights)
            yield (f"{tag}**Done** on `{event.server}`: trained_model.tar", path, url, body.get("logs", ""))


def _selected_index(evt: gr.SelectData) -> int:
    return evt.index


def _seed_at(results: list, index: int):
    seed = results[index]["seed"] if 0 <= index < len(results) else None
    return gr.skip() if seed is None else str(seed)


def _path_at(results: list, index: int):
    return results[index]["path"] if 0 <= index < len(results) else gr.skip()


# Entry ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", action="append", required=True, help="a predictions server (repeatable)")
    parser.add_argument("--train-server", action="append", help="a server started with --x-mode train (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--files-port", type=int, default=0, help="loopback port serving trained tars (0: any)")
    parser.add_argument("--output-dir", type=Path, help="where images and trained tars are kept (default: a temp dir)")
    parser.add_argument("--busy-wait", type=float, default=600, help="seconds to wait out busy (409) servers")
    parser.add_argument("--request-timeout", type=float, default=3600, help="seconds a request may take")
    parser.add_argument("--schema-wait", type=float, default=300, help="seconds to wait for a server's schema")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    predict = Servers(args.server, args.busy_wait, args.request_timeout)
    train = Servers(args.train_server, args.busy_wait, args.request_timeout) if args.train_server else None
    openapi = predict.openapi(args.schema_wait)
    outputs = args.output_dir or Path(tempfile.mkdtemp(prefix="sdxl-playground-"))
    offers_trainings = "/trainings" in openapi.get("paths", {}) and train is not None
    trained = TrainedFiles(outputs / "trained", args.files_port) if offers_trainings else None
    page = Playground(predict, train if offers_trainings else None, openapi, outputs / "images", trained).build()
    auth = os.environ.get("PLAYGROUND_AUTH")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not auth:
        print(f"warning: listening on {args.host} with no login; set PLAYGROUND_AUTH=user:password", file=sys.stderr)
    print(f"playground for {', '.join(predict.urls)} on http://{args.host}:{args.port} (files in {outputs})")
    page.queue(default_concurrency_limit=4).launch(
        server_name=args.host,
        server_port=args.port,
        auth=tuple(auth.split(":", 1)) if auth else None,
        ssr_mode=False,
        show_error=True,
        quiet=True,
        footer_links=[],
    )


if __name__ == "__main__":
    main()
