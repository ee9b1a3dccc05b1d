"""``pretrain.amp: auto`` picks bf16 on a CPU only where the ISA computes it natively and the
preset is one where it was measured to pay; explicit values always win."""
from __future__ import annotations

import torch

from dmp_core.training.loop import cpu_has_native_bf16, use_bf16

CPU = torch.device("cpu")


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\nflags\t\t: fpu {flags}\n")
    return path


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, "avx512f avx512_bf16"))
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, "amx_tile amx_bf16"))
    assert not cpu_has_native_bf16(_cpuinfo(tmp_path, "avx512f avx512_vnni"))
    assert not cpu_has_native_bf16(tmp_path / "absent")


def test_auto_needs_the_isa_and_a_preset_that_gains(monkeypatch):
    import dmp_core.training.loop as loop

    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    assert use_bf16("auto", CPU, "minilm_small") and not use_bf16("auto", CPU, "tiny")
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    assert not use_bf16("auto", CPU, "minilm_small")
    assert use_bf16("bf16", CPU, "tiny") and not use_bf16("off", torch.device("cuda"), "tiny")
    assert use_bf16("auto", torch.device("cuda"), "tiny")


def test_similarities_stay_float32_inside_bf16_autocast():
    """The loop's validation runs inside its autocast region: the ITC similarities (and so the
    ranks behind every recall) must be the float32 ones, not bf16 products."""
    import numpy as np

    from dmp_core.evaluation.retrieval import EncodedSplit, itc_similarity
    from dmp_core.training.loop import itc_recall

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(32, 8, generator=g), dim=-1)
    txt2img = np.repeat(np.arange(16), 2)
    enc = EncodedSplit(image_states=torch.zeros(16, 1, 4), image_emb=img, text_states=torch.zeros(32, 1, 4),
                       text_mask=torch.ones(32, 1, dtype=torch.long), text_emb=txt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim, recall = itc_similarity(enc), itc_recall(img, txt, txt2img)
    assert sim.dtype == np.float32
    np.testing.assert_array_equal(sim, itc_similarity(enc))
    assert recall == itc_recall(img, txt, txt2img)
