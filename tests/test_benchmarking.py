"""The machine description every evaluation report carries."""

from opt.benchmarking import machine_summary, processor_name

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 49
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma

processor\t: 1
model name\t: something else
"""


def test_processor_name_names_family_model_and_widest_vector_unit(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert processor_name(path) == "AMD EPYC (family 23 model 49, avx2)"
    path.write_text(CPUINFO.replace("avx2 fma", "avx2 avx512f avx512_bf16"))
    assert processor_name(path) == "AMD EPYC (family 23 model 49, avx512_bf16)"
    path.write_text("model name\t: Plain CPU\nflags\t\t: sse2\n")
    assert processor_name(path) == "Plain CPU"


def test_machine_summary_measures_this_machine():
    summary = machine_summary()
    assert summary["cpus"] >= 1 and summary["torch_threads"] >= 1
    assert summary["fp32_matmul_gflops_per_s"] > 0 and summary["processor"]
