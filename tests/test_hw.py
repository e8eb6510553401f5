"""hw: the machine's fingerprint (CPU, ISA, RAM, an Apple chip from recorded sysctl, a Pi from its device tree)."""
import json
import shutil

import pytest
from helpers import invoke



def test_pi5_identity_from_cpuinfo_and_device_tree(monkeypatch):
    from helpers import REPO
    from edgeqwen.measure import hw
    info = hw.cpu_info((REPO / "tools/arm64/pi5-cpuinfo").read_text(), "aarch64", "Raspberry Pi 5 Model B Rev 1.0\0")
    assert info == {"cpu": "Cortex-A76", "arch": "aarch64", "isa": ["dotprod", "fp16", "neon"],
                    "device": "Raspberry Pi 5 Model B Rev 1.0"}
    monkeypatch.delenv("EDGEQWEN_EMULATED", raising=False)
    kernel = hw._read("/proc/sys/kernel/arch")
    if kernel:   # a guest machine on this kernel is what qemu-user looks like from inside
        monkeypatch.setattr(hw.platform, "machine", lambda: "aarch64" if kernel != "aarch64" else "x86_64")
        assert hw.emulation().startswith("qemu-user")
        monkeypatch.setattr(hw.platform, "machine", lambda: kernel)
        assert hw.emulation() is None


def test_hw_fingerprint_cli():
    r = invoke("hw", "--json", "--no-bandwidth")
    assert r.returncode == 0
    fp = json.loads(r.stdout)
    assert {"cpu", "arch", "isa", "device", "physical_cores", "logical_cores", "ram_total", "os", "versions",
            "device_id"} <= set(fp)
    assert fp["physical_cores"] >= 1 and fp["ram_total"] > 2**30 and fp["versions"]["edgeqwen"]


def _recorded_sysctl(name):
    """A Mac's sysctl answers, from a fixture written from Apple's documented keys and public dumps (not
    recorded on a Mac here: see each file's header)."""
    from helpers import REPO
    pairs = {}
    for line in (REPO / "tests" / "data" / "sysctl" / name).read_text().splitlines():
        if line and not line.startswith("#"):
            k, v = line.split(":", 1)
            pairs[k.strip()] = v.strip()
    return lambda key: pairs.get(key, "")


@pytest.mark.parametrize("fixture,chip,perf,eff,gib,bw", [
    ("macbookair-m1-8gb.txt", "Apple M1", 4, 4, 8, 68.25),
    ("macmini-m2-16gb.txt", "Apple M2", 4, 4, 16, 100),
    ("macbookpro16-m3max-48gb.txt", "Apple M3 Max", 12, 4, 48, 400),   # the full chip, not the 10P bin
    ("macmini-m4-16gb.txt", "Apple M4", 4, 6, 16, 120),
])
def test_hw_reads_apple_chips_from_sysctl(fixture, chip, perf, eff, gib, bw):
    from edgeqwen.measure.hw import apple_info
    a = apple_info(_recorded_sysctl(fixture))
    assert a["chip"] == chip and a["performance_cores"] == perf and a["efficiency_cores"] == eff
    assert a["unified_memory"] == gib << 30 and a["gpu"] and a["bandwidth_published_gbs"] == bw
    assert a["bandwidth_source"].startswith("https://")


def test_hw_tells_binned_apple_chips_apart_and_ignores_other_machines():
    from edgeqwen.measure.hw import apple_info
    binned = {"machdep.cpu.brand_string": "Apple M4 Max", "hw.perflevel0.physicalcpu": "10",
              "hw.perflevel1.physicalcpu": "4", "hw.memsize": str(36 << 30)}
    a = apple_info(lambda k: binned.get(k, ""))
    assert a["chip"] == "Apple M4 Max (14-core CPU, 32-core GPU)" and a["bandwidth_published_gbs"] == 410
    assert apple_info(lambda k: {"machdep.cpu.brand_string": "Intel(R) Core(TM) i7-9750H"}.get(k, "")) is None


def test_apple_chip_table_is_sourced():
    from edgeqwen.measure.hw import apple_chips
    chips = apple_chips()
    assert len(chips) >= 15
    for name, c in chips.items():
        assert c["bandwidth_gbs"] > 0 and c["source"].startswith("https://"), name
        assert c["source_kind"] in ("apple-via-press", "secondary"), name


def test_rows_say_what_measured_them_and_how_hot_it_was(tmp_path):
    """Provenance in the fingerprint every row carries: edgeqwen's commit (in a checkout), llama.cpp's own version
    and commit (libggml-base's ggml_version/ggml_commit), and the thermal state where Linux shows it."""
    from helpers import REPO

    from edgeqwen.measure.hw import THROTTLED_NOW, thermal, versions
    v = versions()
    if (REPO / ".git").exists() and shutil.which("git"):
        assert len(v["edgeqwen_commit"].removesuffix("-dirty")) == 40
    if "llama_cpp_python" in v:
        assert v["ggml"].count(".") == 2 and v["ggml_commit"]
    # A recorded tree, marked as such: the files a Raspberry Pi 5 under load shows (Raspberry Pi OS, 6.6 kernel),
    # get_throttled 50005 = under-voltage and throttled now, and both since boot (vcgencmd's documented bits).
    sys_ = tmp_path / "sys"
    zone = sys_ / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("81650\n")
    freq = sys_ / "devices" / "system" / "cpu" / "cpu0" / "cpufreq"
    freq.mkdir(parents=True)
    for name, value in (("scaling_governor", "ondemand"), ("scaling_cur_freq", "1500000"),
                        ("cpuinfo_max_freq", "2400000")):
        (freq / name).write_text(value + "\n")
    fw = sys_ / "devices" / "platform" / "soc" / "soc:firmware"
    fw.mkdir(parents=True)
    (fw / "get_throttled").write_text("50005\n")
    t = thermal(sys_)
    assert t == {"temps_c": {"cpu-thermal": 81.65}, "governor": "ondemand", "cur_mhz": 1500, "max_mhz": 2400,
                 "throttled": 0x50005} and t["throttled"] & THROTTLED_NOW
    assert thermal(tmp_path / "nothing") == {}   # a VM shows none of it: absent, never guessed
