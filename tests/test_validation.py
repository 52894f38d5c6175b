"""Issue 26, item 6: a validation stage for pretraining and episodic training (curves, best-checkpoint selection,
early stopping), resumable, not perturbing training; the paper profile selects as each source does."""
import pytest
import torch
import yaml

from fewshot_nsl import training
from fewshot_nsl.config import resolve_config
from fewshot_nsl.errors import ConfigError
from fewshot_nsl.runner import build_method, load_store
from fewshot_nsl.training import meta_train, set_seed

CPU = torch.device("cpu")


def _cfg(tmp_path, method="protonet", **sections):
    f = tmp_path / "v.yaml"
    base = {"episodic": {"steps": 6, "queries": 2, "checkpoint_every": 100},
            "pretrain": {"epochs": 1, "batch_size": 30, "augment": False, "max_steps": 6}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    f.write_text(yaml.safe_dump(base))
    return resolve_config({"method": method, "profile": "smoke", "dataset": "tiny", "image_size": 16, "shots": 1,
                           "backbone_options": {"filters": 4}, "device": "cpu", "results_dir": str(tmp_path / "r")},
                          str(f))


def _train(cfg, ckpt, **kw):
    set_seed(0)
    method = build_method(cfg)
    curve = []
    info = meta_train(method, load_store(cfg), cfg, CPU, ckpt, progress=False, curve=curve, **kw)
    return method, info, curve


def test_episodic_validation_rows_and_record(tmp_path):
    cfg = _cfg(tmp_path, episodic={"val_every": 2, "val_episodes": 3})
    _, info, curve = _train(cfg, tmp_path / "a.pt")
    val = [r for r in curve if r["stage"] == "episodic-val"]
    assert [r["step"] for r in val] == [2, 4, 6]
    assert all(0 <= r["accuracy"] <= 1 and r["loss"] > 0 for r in val)
    v = info["validation"]
    assert v["validations"] == 3 and v["selected_step"] == 6 and v["list"].startswith("val_5w1s")
    assert v["list_hash"] and v["stopped_early_at"] is None


def test_validation_does_not_change_training(tmp_path):
    """The validation runs in a forked RNG state: the trained weights are those of a run without it."""
    plain, _, _ = _train(_cfg(tmp_path), tmp_path / "a.pt")
    validated, _, _ = _train(_cfg(tmp_path, episodic={"val_every": 2, "val_episodes": 2}), tmp_path / "b.pt")
    for (k, a), b in zip(plain.state_dict().items(), validated.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_best_selection_loads_the_best_validation_weights(tmp_path, monkeypatch):
    """With a scripted validation history, val_select: best ends with the weights of the best step."""
    from fewshot_nsl import validation

    scores = iter([0.2, 0.9, 0.4])  # best at step 4
    monkeypatch.setattr(validation.StageValidator, "measure", lambda self: {"accuracy": next(scores), "loss": 1.0})
    snapshots = {}
    real_validate = validation.StageValidator.validate

    def spy(self, step, rows):
        snapshots[step] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return real_validate(self, step, rows)

    monkeypatch.setattr(validation.StageValidator, "validate", spy)
    cfg = _cfg(tmp_path, episodic={"val_every": 2, "val_episodes": 1, "val_select": "best"})
    method, info, _ = _train(cfg, tmp_path / "a.pt")
    assert info["validation"]["selected_step"] == 4 and info["validation"]["best_step"] == 4
    for k, v in method.state_dict().items():
        torch.testing.assert_close(v, snapshots[4][k], msg=k)
    assert any(not torch.equal(v, snapshots[6][k]) for k, v in method.state_dict().items())


def test_patience_stops_early_and_a_resumed_run_stays_stopped(tmp_path, monkeypatch):
    from fewshot_nsl import validation

    monkeypatch.setattr(validation.StageValidator, "measure", lambda self: {"accuracy": 0.5, "loss": 1.0})
    cfg = _cfg(tmp_path, episodic={"steps": 20, "val_every": 1, "val_episodes": 1, "val_patience": 2,
                                   "val_select": "best"})
    _, info, curve = _train(cfg, tmp_path / "a.pt")
    # step 1 is the best; steps 2, 3 do not improve (wait 2), step 4 makes wait 3 > patience 2: stop (Snell)
    assert info["validation"]["stopped_early_at"] == 4 and info["steps"] == 4
    assert info["validation"]["selected_step"] == 1
    assert max(r["step"] for r in curve if r["stage"] == "episodic") == 4
    _, again, _ = _train(cfg, tmp_path / "a.pt")  # resumes from the checkpoint of the stop: no more steps
    assert again["steps"] == 4 and again["validation"]["stopped_early_at"] == 4


def test_pretraining_validation_and_best_selection(tmp_path, monkeypatch):
    from fewshot_nsl import validation

    scores = iter([0.9, 0.1, 0.2])
    monkeypatch.setattr(validation.StageValidator, "measure", lambda self: {"accuracy": next(scores), "loss": 1.0})
    cfg = _cfg(tmp_path, "finetune", pretrain={"val_every": 2, "val_episodes": 1, "val_select": "best"})
    set_seed(0)
    method = build_method(cfg)
    curve = []
    info = training.pretrain(method, load_store(cfg), cfg, CPU, {}, tmp_path / "cache", progress=False, curve=curve)
    assert info["validation"]["selected_step"] == 2 and info["validation"]["validations"] == 3
    assert [r["step"] for r in curve if r["stage"] == "pretrain-val"] == [2, 4, 6]
    cached = training.pretrain(build_method(cfg), load_store(cfg), cfg, CPU, {}, tmp_path / "cache", progress=False)
    assert cached["cached"] and cached["validation"]["selected_step"] == 2


def test_pretraining_validation_measures_prototype_accuracy(tmp_path):
    cfg = _cfg(tmp_path, "finetune", pretrain={"val_every": 3, "val_episodes": 2})
    set_seed(0)
    info = training.pretrain(build_method(cfg), load_store(cfg), cfg, CPU, {}, tmp_path / "cache", progress=False)
    last = info["validation"]["last"]
    assert 0 <= last["accuracy"] <= 1 and last["loss"] > 0 and info["validation"]["validations"] == 2


@pytest.mark.parametrize("section, match", [
    ({"val_every": 0}, "val_every must be at least 1"),
    ({"val_select": "best"}, "need validation"),
    ({"val_patience": 3}, "need validation"),
    ({"val_every": 5, "val_metric": "f1"}, "val_metric must be one of"),
    ({"val_every": 5, "val_select": "first"}, "val_select must be one of"),
    ({"val_every": 5, "val_episodes": 0}, "val_episodes must be at least 1"),
])
def test_bad_validation_settings_are_refused(section, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config({"method": "protonet", "profile": "smoke", "episodic": section})


def test_too_many_validation_episodes_is_refused(tmp_path):
    cfg = _cfg(tmp_path, episodic={"val_every": 2, "val_episodes": 601})
    with pytest.raises(ConfigError, match="val_episodes is 601"):
        _train(cfg, tmp_path / "a.pt")


@pytest.mark.parametrize("method, stage, expected", [
    ("protonet", "episodic", {"val_every": 100, "val_episodes": 100, "val_metric": "loss", "val_select": "best",
                              "val_patience": 200}),
    ("relationnet", "episodic", {"val_every": 5000, "val_episodes": 600, "val_metric": "accuracy",
                                 "val_select": "best", "val_patience": None}),
    ("maml", "episodic", {"val_every": None, "val_select": "last"}),
    ("matchingnet", "episodic", {"val_every": None, "val_select": "last"}),
    ("finetune", "pretrain", {"val_every": None, "val_select": "last"}),
])
def test_paper_profile_selects_as_each_source(method, stage, expected):
    section = getattr(resolve_config({"method": method, "profile": "paper"}), stage)
    assert {k: getattr(section, k) for k in expected} == expected


def test_the_validation_list_is_part_of_the_identity_and_of_the_pretraining_key(tmp_path, tiny_store):
    """Selection and early stopping read the validation list: another list (same settings) is another run."""
    from fewshot_nsl.data.episodes import episode_list_for_store
    from fewshot_nsl.registry import get_method_class
    from fewshot_nsl.runner import run_identity
    from fewshot_nsl.training_state import pretrain_key
    from fewshot_nsl.validation import validation_list, validation_list_hash

    cfg = _cfg(tmp_path, "protonet", episodic={"val_every": 2, "val_episodes": 2},
               pretrain={"val_every": 2, "val_episodes": 2})
    (tmp_path / "off").mkdir()
    assert validation_list_hash(_cfg(tmp_path / "off"), tiny_store, "episodic") is None
    lst = validation_list(cfg, tiny_store)
    before = (run_identity(cfg, tiny_store), pretrain_key(cfg, tiny_store, {}, get_method_class("finetune")))
    other = episode_list_for_store(tiny_store, "val", cfg.ways, cfg.shots, cfg.eval.queries, 600, 1)
    other.save(lst.path)  # the same file name, other episodes
    after = (run_identity(cfg, tiny_store), pretrain_key(cfg, tiny_store, {}, get_method_class("finetune")))
    assert before[0].config_hash != after[0].config_hash and before[0].digest() != after[0].digest()
    assert before[1] != after[1]
