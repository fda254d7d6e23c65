"""Fine-tuning from a parent run (`resume_provenance`, SPEC FT1).

One parent (TMS 5-2 smoke + a persistent-PGD term, so there are sources to keep fresh) is trained
on 4 simulated devices in a subprocess; one child fine-tunes from it on this process's 1 device.
Both are module fixtures so the suite pays for two short trainings only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT

from param_decomp_config import ConfigError, ExperimentConfig, build_config, dump_config
from param_decomp_jax.runtime import mesh as mesh_lib
from param_decomp_jax.runtime import provenance
from param_decomp_jax.runtime.checkpoint import CheckpointStore
from param_decomp_jax.runtime.trainer import Trainer

SMOKE = REPO_ROOT / "configs" / "tms_5-2_smoke.yaml"
PARENT_ID, CHILD_ID = "p-0000a001", "p-0000c001"
SUBPROCESS_TIMEOUT_S = 150
CACHE = os.environ["JSP_TEST_COMPILE_CACHE"]


def base_raw() -> dict[str, Any]:
    raw = yaml.safe_load(SMOKE.read_text())
    raw.pop("smoke", None)
    raw["losses"].append({"type": "persistent_pgd_recon", "name": "ppgd", "coeff": 0.5})
    raw["eval"]["eval_every"] = 0  # only the final eval: keeps the runs short
    raw["runtime"]["compile_cache_dir"] = CACHE  # the suite's cache, not a per-out_dir one
    return raw


def make_cfg(raw: dict[str, Any], out_dir: Path, run_id: str, overrides: list[str] = ()) -> ExperimentConfig:
    return build_config(raw, "test", list(overrides), out_dir=str(out_dir), run_id=run_id)


def child_raw(parent_dir: Path, step: int | str = 3) -> dict[str, Any]:
    raw = base_raw()
    # Non-structural fields differ from the parent on purpose: they may.
    raw.update(steps=4, batch_size=128)
    raw["checkpoint"]["save_every"] = 2
    raw["components_optimizer"]["lr"] = 0.002
    raw["losses"][0]["coeff"] = 0.01
    raw["resume_provenance"] = {"run_dir": str(parent_dir), "step": step}
    return raw


def restore_full(trainer: Trainer, run_dir: Path, step: int) -> dict[str, Any]:
    abstract = jax.eval_shape(trainer.exp.fresh_state)
    target = mesh_lib.with_shardings(abstract, trainer._shardings(abstract))
    with CheckpointStore(run_dir, read_only=True) as store:
        return jax.device_get(store.restore(step, target))


def parent_subtree(parent_dir: Path, step: int) -> dict[str, Any]:
    """The parent's components/CI/sources, read off its own metadata onto this process's device."""
    with CheckpointStore(parent_dir, read_only=True) as store:
        keys = ["components", "ci_params", "adversaries"]
        meta = store.abstract_from_metadata(step, mesh_lib.replicated(mesh_lib.make_mesh()), keys=keys)
        return jax.device_get(store.restore_subtree(step, meta))


def assert_trees_equal(a: Any, b: Any) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def trees_differ(a: Any, b: Any) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ---- fixtures: a 4-device parent, a 1-device child -------------------------------------------
_PARENT_MAIN = """
import sys, jax
assert jax.device_count() == 4, jax.devices()
from param_decomp_jax.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prov") / "runs"


@pytest.fixture(scope="module")
def parent_dir(runs: Path) -> Path:
    raw = base_raw()
    raw.update(steps=6)
    raw["checkpoint"]["save_every"] = 3
    cfg_path = runs.parent / "parent.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _PARENT_MAIN,
            str(cfg_path),
            "--out-dir",
            str(runs),
            "--run-id",
            PARENT_ID,
            "--no-progress",
        ],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent = runs / PARENT_ID
    with CheckpointStore(parent, read_only=True) as store:
        assert store.all_steps() == [0, 3, 6]
    return parent


@pytest.fixture(scope="module")
def child(runs: Path, parent_dir: Path) -> dict[str, Any]:
    cfg = make_cfg(child_raw(parent_dir, step=3), runs, CHILD_ID)
    trainer = Trainer(cfg, progress=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = trainer.run_training()
    assert result.exit_code == 0 and result.final_step == 4
    return {
        "cfg": cfg,
        "trainer": trainer,
        "result": result,
        "dir": runs / CHILD_ID,
        "stdout": out.getvalue(),
    }


# ---- fine-tune -------------------------------------------------------------------------------
def test_fine_tune_from_4_device_parent_keeps_only_components_and_ci(parent_dir, child):
    trainer, child_dir = child["trainer"], child["dir"]
    with CheckpointStore(child_dir, read_only=True) as store:
        assert store.all_steps() == [0, 2, 4]  # step 0 saved by the trainer right after init
    at0 = restore_full(trainer, child_dir, 0)
    parent3 = parent_subtree(parent_dir, 3)
    fresh = jax.device_get(trainer.exp.fresh_state())

    # V/U and the CI fn are the parent's at the chosen step (3, not the latest 6), bitwise; had
    # the faithfulness warmup (5 steps in this config) run, the components would differ.
    assert_trees_equal(at0["components"], parent3["components"])
    assert_trees_equal(at0["ci_params"], parent3["ci_params"])
    assert trees_differ(parent3["components"], parent_subtree(parent_dir, 6)["components"])
    assert trees_differ(at0["components"], fresh["components"])
    assert child["result"].summary["warmup_faithfulness"] is None

    # Everything else is the child's own fresh state: step 0, optimizers, sources, RNG.
    assert int(at0["step"]) == 0
    for key in ("components_opt", "ci_opt", "adversaries", "rng"):
        assert_trees_equal(at0[key], fresh[key])
    moments = 0
    for key in ("components_opt", "ci_opt"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(at0[key])[0]:
            name = jax.tree_util.keystr(path)
            if ".mu" in name or ".nu" in name or "count" in name:
                moments += 1
                assert not np.any(np.asarray(leaf)), name
    assert moments > 0
    # The parent's sources moved during its training; the child's are the fresh draw, not those.
    assert at0["adversaries"]["ppgd"]["sources"] and trees_differ(
        at0["adversaries"]["ppgd"]["sources"], parent3["adversaries"]["ppgd"]["sources"]
    )

    # One provenance line on stdout, then in the summary (file and return value) and in the config wandb receives.
    note = [line for line in child["stdout"].splitlines() if line.startswith("resume_provenance:")]
    assert len(note) == 1 and f"parent {PARENT_ID} step 3" in note[0]
    summary = json.loads((child_dir / "summary.json").read_text())
    rec = summary["resume_provenance"]
    assert rec["parent_run_id"] == PARENT_ID and rec["parent_step"] == 3
    assert rec["parent_run_dir"] == str(parent_dir.absolute())
    wandb_cfg = child["cfg"].model_dump(mode="json")
    assert wandb_cfg["resume_provenance"] == {"run_dir": str(parent_dir), "step": 3}


def test_restart_resumes_from_own_checkpoint_not_parent(parent_dir, child, tmp_path, monkeypatch):
    # A copy of the child that "crashed" after saving step 2 (its step-4 checkpoint is gone).
    out = tmp_path / "runs"
    shutil.copytree(child["dir"], out / CHILD_ID)
    shutil.rmtree(out / CHILD_ID / "ckpts" / "4")
    (out / CHILD_ID / "summary.json").unlink()

    def refuse(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a run with checkpoints of its own must not read the parent")

    monkeypatch.setattr(provenance, "init_from_parent", refuse)
    cfg = child["cfg"].model_copy(update={"out_dir": str(out)})
    trainer = Trainer(cfg, progress=False, target_cache=Path(child["cfg"].out_dir) / ".target_cache")
    with CheckpointStore(out / CHILD_ID) as store:
        state, _, resumed = trainer._initial_state(store)
    assert resumed and int(state["step"]) == 2
    assert trees_differ(jax.device_get(state["components"]), parent_subtree(parent_dir, 3)["components"])

    result = trainer.run_training()
    assert result.exit_code == 0 and result.final_step == 4
    # Same trajectory as the uninterrupted child (same program, same device count: bitwise).
    first = restore_full(child["trainer"], child["dir"], 4)
    again = restore_full(trainer, out / CHILD_ID, 4)
    assert_trees_equal(again, first)
    assert result.summary["resume_provenance"]["parent_step"] == 3


# ---- refusals --------------------------------------------------------------------------------
def _sites_only_linear1(raw: dict[str, Any]) -> None:
    raw["sites"] = [{"name": "linear1", "C": 20}]


def _set(path: str, value: Any):
    def apply(raw: dict[str, Any]) -> None:
        node = raw
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[keys[-1]] = value

    return apply


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            _sites_only_linear1,
            r"sites: parent \['linear1', 'linear2'\], this run \['linear1'\] "
            r"\(only in parent: \['linear2'\]\)",
        ),
        (_set("sites.0.C", 30), r"sites\.linear1\.C: parent 20, this run 30"),
        (_set("ci_fn.hidden_dims", [32]), r"ci_fn\.hidden_dims: parent \[16\], this run \[32\]"),
        (_set("ci_fn.type", "shared_mlp"), r"ci_fn\.type: parent 'layerwise_mlp', this run 'shared_mlp'"),
        (_set("use_delta_component", False), r"use_delta_component: parent True, this run False"),
        (_set("target.pretrain.seed", 1), r"target\.pretrain\.seed: parent 0, this run 1"),
    ],
    ids=["site_set", "C", "ci_width", "ci_type", "delta", "target"],
)
def test_structural_mismatch_is_refused(tmp_path, change, message):
    # Compatibility is decided from the parent's pinned config alone, before any checkpoint read.
    parent = make_cfg(base_raw(), tmp_path, PARENT_ID)
    (tmp_path / PARENT_ID).mkdir()
    (tmp_path / PARENT_ID / "config.yaml").write_text(dump_config(parent))
    raw = child_raw(tmp_path / PARENT_ID)
    change(raw)
    cfg = make_cfg(raw, tmp_path, CHILD_ID)
    with pytest.raises(ConfigError, match=message) as err:
        provenance.init_from_parent(cfg, None, None)
    assert f"resume_provenance: parent {PARENT_ID}" in str(err.value)
    assert str(err.value).count("\n  ") == 1  # exactly the one changed field is named


def test_missing_parent_pieces_name_the_key(tmp_path, parent_dir):
    def attempt(run_dir: Path, step: int | str = "latest") -> str:
        cfg = make_cfg(child_raw(run_dir, step), tmp_path, CHILD_ID)
        with pytest.raises(ConfigError) as err:
            provenance.init_from_parent(cfg, None, None)
        return str(err.value)

    assert "resume_provenance.run_dir" in attempt(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "resume_provenance.run_dir" in attempt(tmp_path / "empty")
    (tmp_path / "no_ckpts").mkdir()
    shutil.copy(parent_dir / "config.yaml", tmp_path / "no_ckpts" / "config.yaml")
    assert "resume_provenance.run_dir" in attempt(tmp_path / "no_ckpts")
    msg = attempt(parent_dir, 5)
    assert "resume_provenance.step" in msg and "available: 0, 3, 6" in msg


def test_cli_refuses_mismatch_with_exit_code_2(runs, parent_dir, tmp_path, capsys):
    from param_decomp_jax.cli.train import main

    cfg_path = tmp_path / "child.yaml"
    cfg_path.write_text(yaml.safe_dump(child_raw(parent_dir)))
    code = main(
        [
            str(cfg_path),
            "--out-dir",
            str(runs),
            "--run-id",
            "p-0000c002",
            "--no-progress",
            "--set",
            "sites.1.C=25",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "sites.linear2.C: parent 20, this run 25" in err and "Traceback" not in err
