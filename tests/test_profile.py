"""profile_train_step: a real trace of a tiny train step, summed per XLA op and named from the HLO."""

import json

import pytest

from experiments.benchmarks import profile_train_step
from grassjax.bench import profile

HLO = """HloModule jit_train_step

%fused_computation.3 (param_0: f32[12,64], param_1: f32[64,8]) -> f32[12,8] {
  %param_0 = f32[12,64]{1,0} parameter(0)
  %param_1 = f32[64,8]{1,0} parameter(1)
  %dot.1 = f32[12,8]{1,0} dot(f32[12,64]{1,0} %param_0, f32[64,8]{1,0} %param_1), lhs_contracting_dims={1}
  ROOT %tanh.2 = f32[12,8]{1,0} tanh(f32[12,8]{1,0} %dot.1)
}

ENTRY %main.9 (Arg_0.1: f32[12,64], Arg_1.2: f32[64,8]) -> (f32[12,8], f32[8]) {
  %Arg_0.1 = f32[12,64]{1,0} parameter(0)
  %Arg_1.2 = f32[64,8]{1,0} parameter(1)
  %fusion.3 = f32[12,8]{1,0} fusion(f32[12,64]{1,0} %Arg_0.1, f32[64,8]{1,0} %Arg_1.2), kind=kOutput, calls=%fused_computation.3, metadata={op_name="jit(train_step)/jvp()/dot_general"}
  %reduce.4 = f32[8]{0} reduce(f32[12,8]{1,0} %fusion.3, f32[] %c), dimensions={0}, to_apply=%add
  ROOT %tuple.5 = (f32[12,8]{1,0}, f32[8]{0}) tuple(f32[12,8]{1,0} %fusion.3, f32[8]{0} %reduce.4)
}
"""


def test_describe_ops_names_a_fusion_by_what_it_calls_and_its_source():
    described = profile.describe_ops(HLO)
    assert described["fusion.3"] == "fusion[dot+tanh] f32[12,8] <jvp()/dot_general>"
    assert described["reduce.4"] == "reduce f32[8]"
    assert described["tuple.5"] == "tuple (f32[12,8], f32[8])"
    assert "param_0" in described  # instructions inside fused computations are named too


def test_profile_of_a_tiny_train_step(tmp_path):
    cfg = profile_train_step()
    cfg.model.update(num_layers=1, d_model=16, num_heads=2, d_ff=32, rank=4, offsets=(1, 2))
    cfg.bench.update(seq_len=16, batch_size=2, steps=2, warmup=1, top=5)
    out = profile.run_profile(cfg, workdir=tmp_path, exp_name="profile_train_step")
    assert [r["mixer"] for r in out["results"]] == ["attention", "grassmann"]
    for r in out["results"]:
        assert r["step_ms"] > 0 and r["op_ms_per_step"] > 0 and len(r["ops"]) > 5
        assert sum(op["share"] for op in r["ops"]) == pytest.approx(1.0)
        assert [op["ms_per_step"] for op in r["ops"]] == sorted((op["ms_per_step"] for op in r["ops"]), reverse=True)
        assert sum(bool(op["what"]) for op in r["ops"][:5]) == 5  # every top op found in the compiled HLO
        assert r["page_faults_per_step"] >= 0 and r["kernel_ms_per_step"] >= 0
    assert any("dot" in op["what"] for op in out["results"][0]["ops"])
    report = (tmp_path / "profile.md").read_text()
    assert "### grassmann LM, T = 16, batch 2" in report and "| 1 | `" in report and "page faults" in report
    assert json.loads((tmp_path / "results.json").read_text())["results"][1]["mixer"] == "grassmann"
    assert list((tmp_path / "trace" / "grassmann").glob("**/*.trace.json.gz"))
