"""scripts/gpu_check.sh --dry-run: every step of the GPU machine's check at tiny sizes, so it cannot rot."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_the_table(tmp_path):
    env = {**os.environ, "PYTHON_BIN": sys.executable, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--no-setup",
                             "--work", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    table = (tmp_path / "gpu-check.md").read_text()
    for row in ("README flow, 60-item demo catalog: training (s)", "README flow, 60-item demo catalog: epoch (s)",
                "README flow, 60-item demo catalog: mAP@50 shared / group view",
                "training, JPEG decoding", "training, HDF5 image cache", "embedding, JPEG decoding",
                "embedding, HDF5 image cache (img/s, EMB.h5 written)",
                "evaluation, N = 3,000", "IVF build, N = 20,000", "| mean |"):
        assert row in table, row
    assert "GPU tests" in result.stdout and "dry run" in table


def test_gpu_report_writes_the_table_after_each_row(tmp_path, monkeypatch, capsys):
    # a run stopped by a time limit keeps every row it finished: here the second evaluation size
    # is stopped after the training step and the first size, whose rows are in gpu-check.md and
    # were printed
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    sys.modules.pop("gpu_report", None)
    import gpu_report

    real = gpu_report.run_one

    def stopped_at_the_second_size(n, *args, **kwargs):
        if n == gpu_report.DRY["eval_sizes"][1]:
            raise KeyboardInterrupt
        return real(n, *args, **kwargs)

    monkeypatch.setattr(gpu_report, "run_one", stopped_at_the_second_size)
    try:
        gpu_report.main(["--dry-run", "--work", str(tmp_path), "--skip", "embed", "ivf"])
    except KeyboardInterrupt:
        pass
    table = (tmp_path / "gpu-check.md").read_text()
    assert "training, JPEG decoding" in table and "training, HDF5 image cache" in table
    assert "evaluation, N = 1,500" in table and "N = 3,000" not in table
    assert "embedding" not in table and "Full fine-tuning" not in table
    printed = capsys.readouterr().out
    assert "training, JPEG decoding" in printed and "evaluation, N = 1,500" in printed


def test_gpu_report_runs_without_faiss_where_the_ivf_step_is_skipped(tmp_path, monkeypatch):
    # a GPU machine without a FAISS wheel still measures training, embedding, evaluation and quality
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    for name in ("gpu_report", "bench_index", "bench_eval", "bench_train"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import gpu_report

    assert gpu_report.main(["--dry-run", "--work", str(tmp_path), "--skip", "train", "embed", "ivf", "quality"]) == 0
    assert "evaluation, N = 3,000" in (tmp_path / "gpu-check.md").read_text()


def test_gpu_check_installs_carried_wheels(tmp_path):
    # --wheels DIR (a GPU machine with torch but no package index): the wheels are installed into a
    # folder on PYTHONPATH, setup.sh is not run, and the check goes on with that python
    import zipfile

    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    info = "carried_probe-0.1.dist-info"
    with zipfile.ZipFile(wheels / "carried_probe-0.1-py3-none-any.whl", "w") as whl:
        whl.writestr("carried_probe/__init__.py", "CARRIED = True\n")
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: carried-probe\nVersion: 0.1\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    env = {**os.environ, "PYTHON_BIN": sys.executable, "WHEELS_TARGET": str(site), "OMP_NUM_THREADS": "2"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--wheels", str(wheels), "--dry-run",
                             "--work", str(tmp_path / "work"), "--skip", "flow", "train", "embed", "evaluate", "ivf",
                             "quality"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (site / "carried_probe" / "__init__.py").exists() and "Environment ready" not in result.stdout
    assert "GPU tests" in result.stdout and (tmp_path / "work" / "gpu-check.md").exists()
