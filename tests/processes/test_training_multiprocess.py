"""Scale-out: the same training in 2 data-parallel processes (accelerate launch, gloo on CPU) writes exactly one tar."""

import tarfile

from sdxl.training.launch import TrainingRun, run_processes
from tools.testing.training_support import files_under, make_dataset, small_config


def test_two_process_run_writes_one_tar(tiny_weights_dir, tmp_path, capfd):
    data = make_dataset(tmp_path / "data", n=4, resolution=64)
    output = tmp_path / "out"
    config = small_config(train_batch_size=1, max_train_steps=2, checkpointing_steps=1)
    run_processes(TrainingRun(config, data, tiny_weights_dir, output), num_processes=2, timeout=300)

    logs = capfd.readouterr()
    text = logs.out + logs.err
    assert "batch 1 x 2 process(es)" in text  # both processes joined one data-parallel run
    assert "checkpoint at step 1" in text  # a checkpoint written jointly by both processes
    assert files_under(output) == ["trained_model.tar"]  # one tar, checkpoints cleaned, nothing else
    with tarfile.open(output / "trained_model.tar") as tar:
        names = tar.getnames()
        assert names[:4] == ["lora.safetensors", "embeddings.pti", "special_params.json", "training_params.json"]
        assert names[4:] == ["lora_kohya.safetensors", "embeddings_sdxl.safetensors", "report/loss.png",
                             "report/report.json", "report/samples.png"]  # fmt: skip


def test_launch_arguments_carry_every_input_and_a_fixed_seed(tmp_path):
    config = small_config(seed=11, mask_target_prompts=None, caption_prefix=" TOK ")  # spaces survive argv
    arguments = TrainingRun(config, tmp_path / "d", tmp_path / "w", tmp_path / "o").arguments()
    for name, value in config.to_dict().items():
        index = arguments.index(f"--{name}")
        assert arguments[index + 1] == ("none" if value is None else str(value))
