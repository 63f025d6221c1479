"""testovoe.ipynb runs top to bottom on the tiny preset (CPU, no network), parameters injected as NB_* variables."""
import os

import nbformat
from nbclient import NotebookClient

from conftest import ROOT
from pipeline import LORA_FILE


def test_notebook_runs_on_tiny_preset(tmp_path, monkeypatch):
    work = tmp_path / "nb_run"
    for name, value in dict(PRESET="tiny", INSTALL="0", WORK_DIR=str(work), REPO_DIR=ROOT, GEN_NUM="48",
                            TRAIN_STEPS="6", BATCH_SIZE="16", VAL_EVERY="3", VAL_SAMPLES="8", BENCH_PROMPTS="8",
                            LORA_RANK="4").items():  # the LoRA path: the full one is train.py's default, tested there
        monkeypatch.setenv(f"NB_{name}", value)  # the kernel inherits this environment
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    nb = nbformat.read(os.path.join(ROOT, "testovoe.ipynb"), as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit it with outputs cleared"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
    report = (work / "benchmark" / "report.md").read_text()
    for row in ("teacher 30 steps", "teacher 4 steps", "1 step", "4 steps"):
        assert row in report
    assert (work / "run" / "student_final.safetensors").is_file() and (work / "run" / LORA_FILE).is_file()
    assert "student = " + str(work / "run" / LORA_FILE) in report  # the adapter was benchmarked
    assert len(list((work / "run" / "val").glob("step_*.png"))) == 3  # steps 0, 3, 6
    shown = sum(o.output_type == "display_data" and "image/png" in o.data for c in nb.cells if c.cell_type == "code"
                for o in c.outputs)
    assert shown >= 5  # curves, first and last validation grid, the two benchmark grids
