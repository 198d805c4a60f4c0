"""The training report in trained_model.tar (report/): the files exist and parse, the plot holds exactly the logged
losses and learning rates, report.json says where each caption came from, and the sample grid's last column is what
the predictor draws with the exported tar (through replicate_weights, downloaded from a loopback server)."""

import json
import tarfile

import numpy as np
import pytest
from cog._inspector import check_input, create_predictor
from PIL import Image

import predict
from sdxl.preprocess import preprocess
from sdxl.training import report_plots
from sdxl.training.loop import train
from sdxl.training.report import ReportSettings
from sdxl.training.samples import SampleSettings
from tools.testing.archives import astronaut, cat, encode, make_tar
from tools.testing.file_server import FileServer
from tools.testing.training_support import Recorder, small_config

SAMPLES = SampleSettings(
    prompts=("a photo of {token}", "{token} on a beach"), seeds=(3, 4), points=3, num_inference_steps=3, size=64
)
STEPS = 4


@pytest.fixture(scope="module")
def run(tiny_weights_dir, tmp_path_factory):
    """Preprocess a real upload (one caption from caption.csv, one by BLIP, face masks), train, read the tar."""
    folder = tmp_path_factory.mktemp("run")
    upload = make_tar(
        folder / "upload.tar",
        {
            "me/astronaut.png": encode(astronaut(), "PNG"),
            "cat.png": encode(cat(), "PNG"),
            "caption.csv": b'image_file,caption\ncat.png,"a photo of TOK, my cat"\n',
        },
    )
    dataset = preprocess(
        upload, folder / "dataset", resolution=64, use_face_detection_instead=True, models_dir=tiny_weights_dir
    )
    recorder = Recorder()
    config = small_config(max_train_steps=STEPS)
    result = train(
        config, dataset, tiny_weights_dir, folder / "out", on_step=recorder, report=ReportSettings(samples=SAMPLES)
    )
    extracted = folder / "tar"
    with tarfile.open(result.tar_path) as tar:
        tar.extractall(extracted, filter="data")
    return result.tar_path, extracted / "report", recorder


@pytest.mark.heavy
def test_report_files_exist_and_parse(run):
    _, report, _ = run
    assert sorted(p.name for p in report.iterdir()) == ["loss.png", "report.json", "samples.png"]
    with Image.open(report / "loss.png") as plot:
        assert plot.format == "PNG" and plot.size == (700, 400)
    with Image.open(report / "samples.png") as grid:
        assert grid.size == (3 * 64, 2 * 64)  # columns: steps 0, 2, 4; rows: the two prompts
    summary = json.loads((report / "report.json").read_text())
    assert summary["steps"] == {"total": STEPS, "resumed_from": 0, "done": STEPS}
    assert summary["samples"]["columns_steps"] == [0, 2, 4]
    assert summary["samples"]["rows_prompts"] == ["a photo of TOK", "TOK on a beach"]
    assert summary["inputs"]["max_train_steps"] == STEPS and summary["inputs"]["seed"] == 7
    assert summary["seconds"]["training"] > 0
    assert summary["peak_memory"]["process_peak_resident_bytes"] > 100 << 20


def test_plot_holds_the_logged_losses_and_learning_rates(run):
    _, report, recorder = run
    summary = json.loads((report / "report.json").read_text())
    plotted = summary["loss_plot"]  # read back from the figure's Line2D objects before it was saved
    assert plotted["x"] == recorder.steps == list(range(1, STEPS + 1))
    assert plotted["lines"]["loss"] == summary["losses"] == recorder.losses
    assert plotted["lines"]["loss (EMA 0.9)"] == pytest.approx(report_plots.smoothed(recorder.losses))
    assert plotted["lines"]["learning rate"] == [lrs[0] for lrs in recorder.lrs]
    assert summary["learning_rates"] == recorder.lrs
    assert plotted["lines"]["learning rate"][:2] == [0.0, 0.005]  # linear warmup over 2 steps to lora_lr 1e-2


def test_report_says_where_captions_and_masks_came_from(run):
    _, report, _ = run
    images = json.loads((report / "report.json").read_text())["dataset"]["images"]
    by_source = {row["source_file"]: row for row in images}
    assert set(by_source) == {"me/astronaut.png", "cat.png"}
    assert by_source["cat.png"]["caption_source"] == "caption.csv"
    assert by_source["cat.png"]["caption"] == "a photo of <s0><s1>, my cat"
    assert by_source["me/astronaut.png"]["caption_source"] == "BLIP"
    assert by_source["me/astronaut.png"]["caption"].startswith("a photo of <s0><s1>")
    assert by_source["me/astronaut.png"]["mask"] == "faces"  # a real face photo: the detector finds the face
    assert 0 < by_source["me/astronaut.png"]["mask_coverage"] < 1


@pytest.mark.heavy
def test_last_column_is_what_the_predictor_draws_with_the_tar(run, tiny_weights_dir, tmp_path, monkeypatch):
    tar_path, report, _ = run
    monkeypatch.setenv("SDXL_WEIGHTS_DIR", str(tiny_weights_dir))
    monkeypatch.setenv("SDXL_WEIGHTS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SDXL_ALLOW_LOOPBACK_HTTP", "1")
    grid = np.asarray(Image.open(report / "samples.png").convert("RGB"), dtype=np.int16)
    server = FileServer()
    try:
        url = server.serve("/trained_model.tar", tar_path.read_bytes())
        runner = predict.Runner()
        runner.setup()
        info = create_predictor("predict", "Runner")
        for row, (prompt, seed) in enumerate(zip(SAMPLES.prompt_texts("TOK"), SAMPLES.seeds)):
            inputs = dict(prompt=prompt, seed=seed, width=64, height=64, num_inference_steps=3, guidance_scale=7.5)
            inputs.update(replicate_weights=url, lora_scale=1.0, apply_watermark=False, scheduler=SAMPLES.scheduler)
            drawn = np.asarray(Image.open(runner.run(**check_input(info.inputs, inputs))[0]).convert("RGB"))
            tile = grid[row * 64 : (row + 1) * 64, 2 * 64 : 3 * 64]
            assert np.abs(tile - drawn.astype(np.int16)).max() <= 1  # measured: 0
            first = grid[row * 64 : (row + 1) * 64, 0:64]
            assert np.abs(first - tile).max() > 10  # training changed what the token draws
    finally:
        server.close()
