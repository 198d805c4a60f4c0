"""Fine-tuning SDXL: a UNet LoRA (or the whole UNet) plus textual inversion of new tokens, on accelerate.

  config.py      the validated trainer inputs            dataset.py   the preprocessed folder -> examples
  models.py      loading the base modules                tokens.py    new tokens, their learned rows only
  conditioning   SDXL text conditioning                  sampling.py  batches and noise from (seed, step, process)
  trainer.py     a run's state, loss and step            loop.py      the run, as numbered steps
  checkpoints    save / resume through accelerate        progress.py  step, loss, steps/s, ETA
  export.py      trained_model.tar, atomically           launch.py    one process or several (accelerate launch)
  budget.py      image cap, memory estimate before start job.py       archive -> preprocessing -> training -> tar
  interop.py     kohya LoRA + SDXL embedding files       report.py    report/: loss.png, samples.png, report.json
  samples.py     sample images during a run              report_plots the loss figure and the sample grid

`python -m sdxl.training --help` runs it from a shell, in one process or several (`--num-processes`).
"""
