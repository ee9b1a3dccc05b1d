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
