import pytest

from fewshot_nsl.config import resolve_config
from fewshot_nsl.errors import ConfigError


def test_precedence_defaults_profile_file_cli(tmp_path):
    cfg = resolve_config({"method": "protonet", "profile": "smoke"})
    assert cfg.image_size == 32 and cfg.pretrain.max_steps == 8  # from the smoke profile
    f = tmp_path / "c.yaml"
    f.write_text("image_size: 24\nshots: 3\nepisodic: {steps: 7}\n")
    cfg = resolve_config({"method": "protonet", "profile": "smoke", "shots": 1}, str(f))
    assert cfg.image_size == 24  # file beats profile
    assert cfg.shots == 1  # CLI beats file
    assert cfg.episodic.steps == 7 and cfg.episodic.queries == 5  # nested merge keeps profile keys


def test_includes_and_per_method_sections(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 3\nways: 4\n")
    f = tmp_path / "c.yaml"
    f.write_text("include: base.yaml\nways: 3\nmethods: {protonet: {seed: 9}}\n")
    cfg = resolve_config({"method": "protonet", "profile": "smoke"}, str(f))
    assert (cfg.ways, cfg.seed) == (3, 9)


def test_paper_profile_has_method_specific_protocol():
    cfg = resolve_config({"method": "protonet", "profile": "paper"})
    assert cfg.image_size == 84 and cfg.eval.episodes == 600 and cfg.episodic.ways == 20


@pytest.mark.parametrize(
    "text,match",
    [
        ("imagesize: 3\n", "unknown config key.*imagesize"),
        ("pretrain: {epoch: 3}\n", r"unknown config key.*epoch.*config.pretrain|unknown config key\(s\) epoch"),
        ("shots: five\n", "shots must be int"),
        ("ways: 1\n", "ways must be at least 2"),
        ("[unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_files_get_one_clear_line(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        resolve_config({"profile": "smoke"}, str(f))
    assert "\n" not in str(info.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config({}, "/nonexistent/c.yaml")
