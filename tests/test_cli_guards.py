"""CLI guards: out-of-memory advice and interrupt handling give one line, no traceback."""
import pytest
import torch

from fewshot_nsl import cli


@pytest.mark.parametrize(
    "exc,code,fragment",
    [
        (torch.OutOfMemoryError("CUDA out of memory"), 3, "lower the meta-batch"),
        (KeyboardInterrupt(), 130, "run the same command again to resume"),
    ],
)
def test_oom_and_interrupt_end_with_one_line(monkeypatch, capsys, tmp_path, exc, code, fragment):
    def boom(*a, **k):
        raise exc

    monkeypatch.setattr("fewshot_nsl.grid.run_grid", boom)
    rc = cli.main(["--results-dir", str(tmp_path), "--no-progress", "--profile", "smoke"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == code and len(err) == 1 and fragment in err[0]
