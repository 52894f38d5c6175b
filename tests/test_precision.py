"""Issue 27, item 2 and 3: ``precision: fp32 | bf16 | fp16`` (autocast of training, validation and evaluation, part
of the identity and of a row's key) and the CUDA fast mode (recorded, turned off by ``--deterministic``)."""
from pathlib import Path

import pandas as pd
import pytest
import torch

import fewshot_nsl
from fewshot_nsl.cli import main
from fewshot_nsl.config import resolve_config
from fewshot_nsl.errors import ConfigError
from fewshot_nsl.precision import autocast, configure_backends, fast_mode_text
from fewshot_nsl.registry import list_methods

PLUGINS = Path(__file__).parent / "plugins"
BUILTINS = ["dynamic_nsn", "finetune", "l2l_metasgd", "maml", "matchingnet", "meta_static_nsn", "nearest_neighbor",
            "protonet", "relationnet", "static_nsn"]


def _cells(tmp_path, methods, precision, **extra):
    return fewshot_nsl.benchmark(method=methods, shots=2, dataset="tiny", plugins=[PLUGINS], profile="smoke",
                                 precision=precision, image_size=16, backbone_options={"filters": 4}, device="cpu",
                                 eval={"episodes": 3, "queries": 3}, results_dir=str(tmp_path / "results"),
                                 cache_dir=str(tmp_path / "cache"), **extra)


def test_bf16_runs_every_builtin_methods_smoke_cell_on_cpu(tmp_path):
    assert set(BUILTINS) <= set(list_methods())
    rows = _cells(tmp_path, BUILTINS, "bf16")
    assert sorted(rows["method"]) == sorted(BUILTINS)
    assert set(rows["precision"]) == {"bf16"} and rows["accuracy"].notna().all()
    assert (rows["episodes_failed"] == 0).all()


def test_precision_is_part_of_the_identity_and_of_the_row_key(tmp_path):
    base = {"method": "protonet", "profile": "smoke"}
    assert resolve_config({**base, "precision": "bf16"}).hash() != resolve_config(base).hash()
    assert resolve_config({**base, "compile": "off"}).hash() == resolve_config(base).hash()  # compile is not
    _cells(tmp_path, "protonet", "fp32")
    _cells(tmp_path, "protonet", "bf16")
    board = pd.read_csv(tmp_path / "results" / "leaderboard.csv")
    assert sorted(board["precision"]) == ["bf16", "fp32"]  # two experiments, two rows; neither replaced
    assert len({*board["run_id"]}) == 2
    table = (tmp_path / "results" / "table6.md").read_text()
    assert "bf16" in table


def test_training_and_evaluation_run_under_autocast(tmp_path, monkeypatch):
    """The backbone's outputs are bf16 in the training loops and in evaluation (autocast is on)."""
    from fewshot_nsl import backbones

    dtypes = []
    real_forward = backbones.CNN4.forward

    def spy(self, x):
        out = real_forward(self, x)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(backbones.CNN4, "forward", spy)
    _cells(tmp_path, "protonet", "bf16", episodic={"steps": 2, "queries": 2})
    assert dtypes and set(dtypes) == {torch.bfloat16}
    dtypes.clear()
    _cells(tmp_path / "b", "protonet", "fp32", episodic={"steps": 2, "queries": 2})
    assert set(dtypes) == {torch.float32}


def test_bad_precision_is_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        resolve_config({"method": "protonet", "precision": "fp8"})
    with pytest.raises(SystemExit) as exit_:
        main(["--precision", "fp8", "--profile", "smoke", "--results-dir", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_autocast_context():
    cpu = torch.device("cpu")
    with autocast("fp32", cpu):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_fast_mode_on_cuda_only_and_off_when_deterministic():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        assert configure_backends(torch.device("cpu"), False) == {"cudnn_benchmark": False, "tf32": False,
                                                                  "channels_last": False}
        fast = configure_backends(torch.device("cuda"), False)  # flags only: no CUDA call is made
        assert all(fast.values()) and torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        assert fast_mode_text(fast) == "cudnn.benchmark+tf32+channels_last"
        off = configure_backends(torch.device("cuda"), True)
        assert not any(off.values()) and not torch.backends.cudnn.benchmark
        assert fast_mode_text(off) == "off"
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved


def test_row_records_precision_and_fast_mode(tmp_path):
    row = _cells(tmp_path, "nearest_neighbor", "bf16").iloc[0]
    assert row["precision"] == "bf16" and row["fast_mode"] == "off"  # a CPU run: no CUDA fast mode


def test_transductive_rows_are_recorded_and_marked(tmp_path):
    """MAML (BN with the query batch's statistics) and RelationNet with test_bn: batch are transductive rows,
    marked in table6.md; ProtoNet and RelationNet with running statistics are not."""
    rows = _cells(tmp_path, ["maml", "protonet"], "fp32", episodic={"steps": 1, "queries": 2})
    by = dict(zip(rows["method"], rows["transductive"]))
    assert by == {"maml": True, "protonet": False}
    from fewshot_nsl.registry import get_method_class

    rn = get_method_class("relationnet")
    assert rn.is_transductive({"test_bn": "batch"}) and not rn.is_transductive({})
    ms = get_method_class("meta_static_nsn")
    assert ms.is_transductive({}) and not ms.is_transductive({"batch_norm": "running"})
    table = (tmp_path / "results" / "table6.md").read_text()
    maml_line = next(line for line in table.splitlines() if "maml" in line.lower() and "±" in line)
    assert "†" in maml_line and "transductive" in table


def test_pretraining_cache_is_keyed_by_precision(tiny_store):
    """A bf16 cell never reuses an fp32 pretraining (the pretraining runs under the run's autocast)."""
    from fewshot_nsl.training_state import pretrain_key
    from fewshot_nsl.registry import get_method_class

    base = {"method": "finetune", "profile": "smoke", "dataset": "tiny", "image_size": 16}
    cls = get_method_class("finetune")
    keys = {p: pretrain_key(resolve_config({**base, "precision": p}), tiny_store, {}, cls) for p in ("fp32", "bf16")}
    assert keys["fp32"] != keys["bf16"]
