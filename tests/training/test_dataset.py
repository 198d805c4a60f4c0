"""The training folder reader, token replacement, size conditioning and the per-step sampling."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl.training import sampling
from sdxl.training.dataset import DatasetError, read_examples, replace_token, size_conditioning
from tools.testing.training_support import make_dataset


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a photo of TOK, smiling", "a photo of <s0><s1>, smiling"),
        ("TOK", "<s0><s1>"),
        ("TOK and TOK.", "<s0><s1> and <s0><s1>."),
        ("a photo of TOK in tokyo, TOKYO tower", "a photo of <s0><s1> in tokyo, TOKYO tower"),
        ("MY_TOK TOK2 xTOK", "MY_TOK TOK2 xTOK"),
        ("(TOK)", "(<s0><s1>)"),
    ],
)
def test_token_replaced_as_whole_word_only(caption, expected):
    assert replace_token(caption, "TOK", "<s0><s1>") == expected


def test_reads_images_masks_and_captions(tmp_path):
    folder = make_dataset(tmp_path / "data", n=2, resolution=64, captions=["a photo of TOK", "TOK on tokyo street"])
    examples = read_examples(folder, 64, "TOK", "<s0><s1>")
    assert [e.caption for e in examples] == ["a photo of <s0><s1>", "<s0><s1> on tokyo street"]
    assert examples[0].pixels.shape == (3, 64, 64) and examples[0].mask.shape == (1, 64, 64)
    assert -1.0 <= examples[0].pixels.min() < examples[0].pixels.max() <= 1.0
    assert examples[0].mask[0, 0, 0] == 0 and examples[0].mask[0, 32, 32] == 1


def test_size_conditioning_is_the_real_resolution():
    assert size_conditioning(768) == (768, 768, 0, 0, 768, 768)


def test_wrong_size_is_an_error_not_a_resize(tmp_path):
    folder = make_dataset(tmp_path / "data", n=1, resolution=64)
    with pytest.raises(DatasetError, match="0000.src.png is 64x64; training at resolution 128 needs 128x128"):
        read_examples(folder, 128, "TOK", "<s0><s1>")


def test_too_few_images(tmp_path):
    folder = make_dataset(tmp_path / "data", n=1)
    with pytest.raises(DatasetError, match="holds 1 training image.*at least 2 needed"):
        read_examples(folder, 64, "TOK", "<s0><s1>", min_images=2)
    (folder / "captions.csv").write_text("image_file,mask_file,caption\n")
    with pytest.raises(DatasetError, match="holds 0 training image"):
        read_examples(folder, 64, "TOK", "<s0><s1>")


@pytest.mark.parametrize(
    "row, message",
    [
        ("../escape.png,,x", "must be a file name inside the folder"),
        ("/etc/passwd,,x", "must be a file name inside the folder"),
        ("missing.png,,x", "does not exist"),
        ("0000.src.png,missing.mask.png,x", "mask_file 'missing.mask.png' does not exist"),
    ],
)
def test_bad_rows_named(tmp_path, row, message):
    folder = make_dataset(tmp_path / "data", n=1)
    (folder / "captions.csv").write_text(f"image_file,mask_file,caption\n{row}\n")
    with pytest.raises(DatasetError, match=message):
        read_examples(folder, 64, "TOK", "<s0><s1>")


def test_missing_columns_and_file(tmp_path):
    folder = make_dataset(tmp_path / "data", n=1)
    (folder / "captions.csv").write_text("image,caption\n0000.src.png,x\n")
    with pytest.raises(DatasetError, match="lacks the column"):
        read_examples(folder, 64, "TOK", "<s0><s1>")
    (folder / "captions.csv").unlink()
    with pytest.raises(DatasetError, match="has no captions.csv"):
        read_examples(folder, 64, "TOK", "<s0><s1>")


def test_empty_mask_column_means_whole_image(tmp_path):
    folder = make_dataset(tmp_path / "data", n=1)
    (folder / "captions.csv").write_text("image_file,mask_file,caption\n0000.src.png,,TOK\n")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "0000.src.png")
    (example,) = read_examples(folder, 64, "TOK", "<s0><s1>")
    assert torch.all(example.mask == 1)


def test_batches_cover_each_epoch_and_split_between_processes():
    n, batch, processes = 5, 2, 2
    per_epoch = sampling.steps_per_epoch(n, batch, processes)
    assert per_epoch == 2
    epoch = [
        sampling.batch_indices(3, step, n, batch, processes, process)
        for step in range(per_epoch)
        for process in range(processes)
    ]
    assert set(torch.cat(epoch).tolist()) == set(range(n))  # every image once per epoch (the last batch wraps)
    assert not torch.equal(epoch[0], epoch[1])  # the processes take different slices
    again = sampling.batch_indices(3, 1, n, batch, processes, 1)
    assert torch.equal(again, epoch[3])  # a pure function of (seed, step, process): resumable
    other_seed = [sampling.batch_indices(4, s, n, batch, processes, 0) for s in range(4)]
    assert any(not torch.equal(a, b) for a, b in zip(other_seed, epoch))


def test_batch_shrinks_when_images_cannot_fill_it():
    assert sampling.per_process_batch(4, 3, 1) == 3
    assert sampling.per_process_batch(4, 3, 2) == 2
    assert sampling.per_process_batch(4, 10, 2) == 4
