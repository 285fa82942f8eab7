from __future__ import annotations

import pytest

from snrmoe_dask.config import Config, ConfigError, config_dir, load_config


def test_defaults_load_and_match_model_defaults():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.catalog.snr_edges == [2.0, 4.0, 7.0]
    assert cfg.cluster.dashboard_address.startswith("127.0.0.1")
    # every shipped default equals the pydantic default: the YAML documents the code
    assert cfg.model_dump() == Config().model_dump()


def test_shipped_configs_validate():
    for path in sorted(config_dir().glob("*.yaml")):
        load_config(path)


def test_unknown_key_is_rejected_by_name(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("simulate:\n  nn: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'simulate\.nn'"):
        load_config(p)
    p.write_text("simulat:\n  n: 5\n")
    with pytest.raises(ConfigError, match="unknown key 'simulat'"):
        load_config(p)


def test_bad_values_are_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("catalog:\n  snr_edges: [4, 2]\n")
    with pytest.raises(ConfigError, match="snr_edges"):
        load_config(p)
    p.write_text("catalog:\n  split_fractions: {train: 0.9, val: 0.2, test: 0.1}\n")
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(p)
    p.write_text("simulate:\n  mag_min: 23\n  mag_max: 21\n")
    with pytest.raises(ConfigError, match="mag"):
        load_config(p)
    p.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_precedence_cli_over_file_over_default(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("simulate:\n  n: 123\n  seed: 9\n")
    cfg = load_config(p, {"simulate": {"n": 7, "seed": None}})
    assert cfg.simulate.n == 7          # CLI flag wins
    assert cfg.simulate.seed == 9       # unset flag does not clobber the file
    assert cfg.simulate.chunk_size == 2048  # default survives


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("section, values, key", [("audit", {"small_ridge_alphas": [1.0, -1.0]}, "small_ridge_alphas"),
                                                   ("audit", {"max_rows": 5}, "max_rows"),
                                                   ("fit", {"read_ahead": 0}, "read_ahead"),
                                                   ("gates", {"min_fit_rows": 1}, "min_fit_rows"),
                                                   ("gates", {"max_fit_rows": 1}, "max_fit_rows")])
def test_the_new_settings_refuse_bad_values_naming_the_key(section, values, key):
    with pytest.raises(ConfigError, match=key) as err:
        load_config(overrides={section: values})
    assert "\n" not in str(err.value)
