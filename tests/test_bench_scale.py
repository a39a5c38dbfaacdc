"""scripts/bench_scale.py: the synthetic catalogue and embeddings, the measuring of child processes,
and the whole benchmark end to end at N = 2,000 (every stage through the real CLI)."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from retrieval.data.catalog import read_catalog
from retrieval.data.embfile import read_embeddings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # scripts/ is no package; its modules import each other

import bench_scale  # noqa: E402
import bench_scale_data as data  # noqa: E402
import bench_scale_run as run  # noqa: E402


def test_synthetic_catalogue_has_the_corpus_shape_and_clustered_embeddings(tmp_path):
    catalog_dir, emb_path = data.generate(tmp_path, 1000)
    catalog = read_catalog(catalog_dir)  # labels.csv valid, every image file present
    assert len(catalog) == 1000 and len(catalog.groups) == 24
    assert sum(len(v) for v in catalog.vocab.values()) == 830
    sizes = sorted(len(v) for v in catalog.vocab.values())
    assert sizes[0] == 2 and sizes[-1] == 188
    assert set(catalog.multi_label_groups()) == set(data.make_spec().multi_label)
    test_share = len(catalog.split_items("test")) / len(catalog)
    assert 0.2 < test_share < 0.35
    labelled = [sum(bool(it.labels[g]) for it in catalog.items) / len(catalog) for g in catalog.groups]
    assert min(labelled) < 0.5 and max(labelled) == 1.0  # missing cells, one group always known
    emb = read_embeddings(emb_path)
    assert emb.vectors.shape == (1000, 256) and emb.paths == [it.image for it in catalog.items]
    assert np.allclose(np.linalg.norm(emb.vectors, axis=1), 1, atol=1e-5)
    assert {g: v.shape[1] for g, v in emb.group_vectors.items()} == {g: len(v) for g, v in catalog.vocab.items()}
    assert sorted(emb.sigmoid_groups) == sorted(catalog.multi_label_groups())
    # clustered by label: the nearest label mean gives the always-known group's label far above chance
    group = catalog.groups[0]
    y = np.array([catalog.vocab[group].index(it.labels[group][0]) for it in catalog.items])
    means = np.stack([emb.vectors[y == c].mean(axis=0) for c in range(len(catalog.vocab[group]))])
    assert np.bincount(y).max() / len(y) < 0.75 < 0.9 < ((emb.vectors @ means.T).argmax(axis=1) == y).mean()


def test_generated_data_is_reused_for_the_same_size_and_seed(tmp_path):
    _, emb_path = data.generate(tmp_path, 300)
    written = emb_path.stat().st_mtime_ns
    assert data.generate(tmp_path, 300)[1].stat().st_mtime_ns == written
    data.generate(tmp_path, 400)
    assert len(read_embeddings(emb_path).ids) == 400


def test_growth_exponent_is_the_log_log_slope():
    assert abs(run.growth_exponent([(1000, 1.0), (2000, 4.0), (4000, 16.0)]) - 2.0) < 1e-9
    assert abs(run.growth_exponent([(1000, 3.0), (10_000, 30.0)]) - 1.0) < 1e-9
    assert run.growth_exponent([(1000, 3.0)]) is None


def test_stage_peak_memory_is_the_stage_own_not_the_benchmark_process(tmp_path):
    ballast = np.ones(300_000_000 // 8)  # 300 MB held by this process while the children start
    small = run.run_stage([sys.executable, "-c", "pass"], 60, tmp_path / "small.log")
    big = run.run_stage([sys.executable, "-c", "b = bytearray(400_000_000); b[::4096] = b'x' * len(b[::4096])"],
                        60, tmp_path / "big.log")
    assert small.status == big.status == "ok"
    assert small.peak_gb < 0.1 < 0.4 < big.peak_gb < 0.6
    assert 0 < small.cpu_s < small.seconds * 2 and big.cpu_s > 0
    assert ballast.sum() > 0


def test_failed_and_overlong_stages_are_reported_not_raised(tmp_path):
    failed = run.run_stage([sys.executable, "-c", "import sys; sys.exit(3)"], 60, tmp_path / "f.log")
    assert failed.status.startswith("failed (exit 3") and failed.cell() == failed.status
    slow = run.run_stage([sys.executable, "-c", "import time; time.sleep(60)"], 1, tmp_path / "s.log")
    assert slow.status == "timeout > 1 s" and slow.seconds is None


def test_benchmark_runs_every_stage_end_to_end(tmp_path):
    bench = ROOT / "scripts" / "bench_scale.py"
    result = subprocess.run([sys.executable, str(bench), "--sizes", "2000", "--out", str(tmp_path), "--requests", "5",
                             "--timeout", "300"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    assert table == (tmp_path / "bench_scale.md").read_text()
    module = bench_scale
    expected = [module.ROW_NAMES[s] for s in module.STAGES] + [row for r in module.REQUESTS.values() for row in r]
    for row in expected + [bench_scale.RATIO_ROW]:
        line = next((ln for ln in table.splitlines() if ln.startswith(f"| {row} |")), None)
        assert line is not None, f"{row!r} missing from\n{table}"
        cell = line.split("|")[2].strip()
        number = r"\d+\.\d+"
        pattern = rf"{number} (s( \(cpu {number} s\))?(, {number} GB)?|ms)|{number}x"
        assert re.fullmatch(pattern, cell), f"{row}: {cell!r}"
    for stage in ("catalog-info", "evaluate", "index-flat", "serve-flat"):
        assert f"| {module.ROW_NAMES[stage]} | " in table and " GB |" in next(
            ln for ln in table.splitlines() if ln.startswith(f"| {module.ROW_NAMES[stage]} |"))
