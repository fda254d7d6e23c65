"""Config loading: every shipped config validates; bad configs name the key; the CLI exits 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

from param_decomp_config import ConfigError, load_config
from param_decomp_config.smoke_siblings import smoke_text

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
TMS = REPO_ROOT / "configs" / "tms_5-2.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path):
    if "stories260k" in path.name and not (REPO_ROOT.parent / "shared" / "data" / "stories260K").exists():
        pytest.skip("needs ../shared/data")
    cfg = load_config(path)
    assert cfg.resolved_sites()


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.stem.endswith("_smoke")], ids=lambda p: p.name)
def test_smoke_siblings_are_in_sync(path: Path):
    if "stories260k" in path.name and not (REPO_ROOT.parent / "shared" / "data" / "stories260K").exists():
        pytest.skip("needs ../shared/data")
    sibling = path.with_name(f"{path.stem}_smoke.yaml")
    assert sibling.exists(), (
        f"missing {sibling.name}; run python -m param_decomp_config.smoke_siblings configs"
    )
    assert sibling.read_text() == smoke_text(path), f"{sibling.name} is stale; regenerate it"


BAD = [
    (["losses.0.coeff=-1"], "losses.0.coeff"),
    (["sites.0.name=linear9"], "sites.0.name"),
    (["losses.1.plan={type: chunks, k: 3}"], "losses.1.plan.k"),
    (["bogus_key=1"], "bogus_key: unknown key"),
    (["target.n_features=abc"], "target.n_features"),
    (["losses.1.routing={type: static_prob, p: 1.5}"], "losses.1.routing.p"),
    (["sites.0.C=0"], "sites.0.C"),
    (["ci_fn={type: shared_transformer, d_model: 30, n_blocks: 1, n_heads: 4, mlp_hidden: 8}"], "ci_fn"),
    (["run_id=run-1"], "run_id"),
    (["losses.2.name=stochastic_recon"], "losses.2.name"),
    (["data={type: tokens, train_path: x.parquet}"], "data.type"),
    (["components_optimizer.lr=0"], "components_optimizer.lr"),
    (["losses.0={type: persistent_pgd_recon, coeff: 1, scope: {type: nsc, n: 3}}"], "losses.0.scope.n"),
    (["target.pretrain.feature_probability=2"], "target.pretrain.feature_probability"),
    (["eval.dense_ci_blocks={linear9: 5}"], "eval.dense_ci_blocks.linear9"),
    (["eval.dense_ci_blocks={linear2: 21}"], "eval.dense_ci_blocks.linear2"),
    (["eval.dense_ci_blocks={linear2: 0}"], "eval.dense_ci_blocks.linear2"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[b[1] for b in BAD])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(TMS, overrides)
    assert key in str(err.value), str(err.value)


def test_yaml_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_dense_block_of_a_site_left_out_is_not_scored():
    """A config may declare blocks for sites a run does not decompose (`--set sites=...`)."""
    path = REPO_ROOT / "configs" / "resid_mlp_1l.yaml"
    cfg = load_config(path, ["sites=[{name: layers.0.mlp_in, C: 100}]"])
    assert cfg.eval.dense_ci_blocks == {"layers.*.mlp_out": 50}
    with pytest.raises(ConfigError, match="eval.dense_ci_blocks.layers.7.mlp_out"):
        load_config(path, ["eval.dense_ci_blocks={layers.7.mlp_out: 5}"])


def test_set_override_of_list_item_by_index():
    cfg = load_config(TMS, ["losses.2.coeff=0.5", "target.pretrain.seed=3"])
    assert cfg.losses[2].coeff == 0.5 and cfg.target.pretrain.seed == 3


def test_schemas_import_without_jax():
    code = "import sys, param_decomp_config; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_cli_exits_2_without_traceback(tmp_path: Path):
    raw = yaml.safe_load(TMS.read_text())
    raw["sites"][0]["name"] = "nonexistent"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "param_decomp_jax.cli.train", str(bad), "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 2
    assert "sites.0.name" in proc.stderr and "Traceback" not in proc.stderr


def test_narrow_layerwise_ci_warns_for_toys():
    """A layerwise CI MLP narrower than n_features cannot give each feature its own component."""
    with pytest.warns(UserWarning, match=r"ci_fn.hidden_dims: .* width 16 .* 40 features"):
        load_config(
            REPO_ROOT / "configs" / "tms_40-10.yaml", ["ci_fn={type: layerwise_mlp, hidden_dims: [16]}"]
        )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(REPO_ROOT / "configs" / "tms_40-10.yaml")  # [128] >= 40: fine
        load_config(REPO_ROOT / "configs" / "tms_5-2.yaml")  # [16] >= 5: fine
