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
    for row in ("training, JPEG decoding", "training, HDF5 image cache", "embedding, JPEG decoding",
                "embedding, HDF5 image cache (img/s, EMB.h5 written)",
                "evaluation, N = 3,000", "IVF build, N = 20,000", "| mean |"):
        assert row in table, row
    assert "GPU tests" in result.stdout and "dry run" in table


def test_gpu_report_writes_the_table_after_each_step(tmp_path, monkeypatch, capsys):
    # a run stopped by a time limit keeps every step it finished: here the quality step fails
    # after the training step, and the training rows are in gpu-check.md and were printed
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    sys.modules.pop("gpu_report", None)
    import gpu_report

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_report, "quality_section", stopped)
    try:
        gpu_report.main(["--dry-run", "--work", str(tmp_path), "--skip", "embed", "evaluate", "ivf"])
    except KeyboardInterrupt:
        pass
    table = (tmp_path / "gpu-check.md").read_text()
    assert "training, JPEG decoding" in table and "training, HDF5 image cache" in table
    assert "embedding" not in table and "Full fine-tuning" not in table
    assert "training, JPEG decoding" in capsys.readouterr().out
