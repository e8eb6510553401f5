"""What `make setup` alone gives a new user: every module imports, every command's --help works,
and the default ONNX precision (int4, whose k-quant search imports onnx_ir) builds."""
import importlib
import os
import pkgutil

import pytest
from click.testing import CliRunner
from helpers import run_cli

import edgeqwen
from edgeqwen.cli import cli


@pytest.mark.parametrize("name", sorted(m.name for m in pkgutil.walk_packages(edgeqwen.__path__, "edgeqwen.")
                                         if not m.name.endswith("__main__")))
def test_every_module_imports(name):
    importlib.import_module(name)


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_has_help_with_an_example(command):
    r = CliRunner().invoke(cli, [command, "--help"])
    assert r.exit_code == 0, r.output
    assert f"edgeqwen {command}" in r.output.replace("edgeqwen  ", "edgeqwen ")


def test_packaged_data_is_found_through_the_package():
    from edgeqwen.measure.claims import load_claims
    from edgeqwen.measure.evaluate import load_text
    from edgeqwen.measure.plan import load_devices
    from edgeqwen.resources import recipe_files
    assert {"qwen2-0.5b.toml", "qwen2-7b.toml"} <= {p.name for p in recipe_files()}
    assert "raspberry-pi-5-8gb" in load_devices() and load_claims()
    assert len(load_text("zh")[1]) > 1000


def test_int4_onnx_build_works_on_the_setup_install(tiny_ckpt, tmp_path):
    """The README's default ONNX precision; it once needed a package only `make reference` installed."""
    r = run_cli("build", "tiny", "int4", "--source", tiny_ckpt, "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr[-800:]
    assert (tmp_path / "b" / "model.onnx").exists()


def test_build_output_is_quiet_and_generated_text_is_clean_utf8(tiny_ckpt, tmp_path):
    """No libllama per-tensor log lines; a random model's bytes reach stdout as valid UTF-8 without controls."""
    r = run_cli("build", "tiny", "q4_k_m", "--source", tiny_ckpt, "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert "converting to" not in r.stderr and "llama_model_quantize" not in r.stderr
    assert len(r.stderr.splitlines()) <= 6, r.stderr
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "edgeqwen.cli", "run", str(tmp_path / "b"), "Hello", "-n", "48", "-t", "0"]
    p = subprocess.run(cmd, capture_output=True)
    assert p.returncode == 0, p.stderr
    text = p.stdout.decode("utf-8")   # strict: raises on invalid UTF-8
    assert not any(ord(c) < 32 and c not in "\n\t" for c in text)


@pytest.mark.parametrize("arch,target,want,absent,system", [
    # Apple Silicon: Metal with its shaders embedded, no x86 flags (clang is asked, as on a Mac)
    ("arm64", None, ["system=Darwin", "-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON", "-DGGML_RPC=ON"],
     ["-fno-tree-dse", "GGML_CPU_ARM_ARCH", "GGML_METAL=OFF"], "Darwin"),
    # an Intel Mac: CPU and Accelerate, no Metal
    ("x86_64", None, ["system=Darwin", "-DGGML_METAL=OFF", "-DGGML_BLAS_VENDOR=Apple"], ["GGML_METAL=ON"], "Darwin"),
    # a Pi building for itself: -mcpu=native through GGML_NATIVE, no x86-only flags, RPC on
    ("aarch64", None, ["cross=0", "-DGGML_NATIVE=ON", "-DGGML_RPC=ON"], ["-fno-tree-dse", "GGML_CPU_ARM_ARCH"],
     "Linux"),
    # x86 with gcc: the AMX-safe flags
    ("x86_64", None, ["cross=0", "-DGGML_NATIVE=ON"], ["GGML_CPU_ARM_ARCH", "GGML_METAL"], "Linux"),
    # cross for a Pi 5 from x86: Debian's cross gcc, no native tuning, the A76's dotprod and fp16
    ("x86_64", "aarch64", ["cross=1", "aarch64-linux-gnu-gcc", "-DGGML_NATIVE=OFF",
                           "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16", "-DGGML_RPC=ON"], ["-fno-tree-dse"], "Linux"),
])
def test_install_script_flags_per_arch(arch, target, want, absent, system):
    import shutil
    import subprocess
    from helpers import REPO
    if target and not shutil.which("aarch64-linux-gnu-gcc"):
        pytest.skip("gcc-aarch64-linux-gnu is not installed")
    env = dict(os.environ, EDGEQWEN_UNAME_M=arch, EDGEQWEN_UNAME_S=system, CC="clang" if system == "Darwin" else "gcc")
    args = ["bash", str(REPO / "tools/install-llama-cpp.sh"), "--print-flags"]
    args += ["--target", target] if target else []
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=True).stdout
    assert all(w in out for w in want) and not any(a in out for a in absent), out
    if arch == "x86_64" and not target and system == "Linux":
        assert "-fno-tree-dse -fno-dse" in out
