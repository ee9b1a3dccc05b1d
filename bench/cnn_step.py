"""Step time of the ``effnet_lite0_minilm`` preset by variant, image size, frozen stages and
amp (bench/README.md, "Real photos"): one line per setting ``variant:size:frozen:amp``.

    python bench/cnn_step.py denoising:160:5:bf16 mamo:160:3:bf16 denoising:160:3:off

Random weights (no packages read), batch 32, 24-token captions, HOG cells of 16 px, masked
blocks in the mean colour, 1 untimed + 3 timed steps on 2 threads
(:func:`dmp_core.benchmarks.step.bench_step`); prints the minimum and median s/step, the
peak RSS (MB, the process high-water mark), whether bf16 ran and the trainable parameters."""
import sys

import torch

from dmp_core.benchmarks.step import bench_step
from dmp_core.config import Config, config_from_dict

PRESET = "effnet_lite0_minilm"

if __name__ == "__main__":
    torch.set_num_threads(2)
    for spec in sys.argv[1:]:
        variant, size, freeze, amp = spec.split(":")
        raw = Config().model_dump(mode="json")
        raw["model"].update(preset=PRESET, image_freeze_stages=int(freeze), image_masking="zero")
        raw["data"].update(image_size=int(size), max_tokens=24)
        raw["targets"]["hog"]["cell"] = 16
        cfg = config_from_dict(raw, source="bench/cnn_step.py")
        r = bench_step(cfg, variant=variant, preset=PRESET, batch=32, steps=3, warmup=1, amp=amp, image_size=int(size))
        print(spec, r["s_per_step_min"], r["s_per_step_median"], r["peak_rss_mb"], r["bf16"], r["params_trainable"],
              flush=True)
