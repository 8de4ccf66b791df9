"""Cluster manifests from a recipe: the launcher's YAML validates against Ray's own cluster-config
schema, holds every gang of the recipe (or the command names the gang it cannot hold), carries no
secret, and the shipped examples are what the command writes today."""
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import validate_config
from typer.testing import CliRunner

from pipelines.cli import app
from tests.conftest import REPO

runner = CliRunner()
RECIPE = REPO / "recipes" / "cluster.yaml"
SHIPPED = REPO / "cluster" / "manifests"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def manifest(*args, env=None) -> tuple[int, str]:
    res = runner.invoke(app, ["cluster", "manifest", str(RECIPE), *args], env={"COLUMNS": "300", **(env or {})})
    return res.exit_code, res.output


@pytest.mark.parametrize("preset", ["a100-80g-x8", "h100-80g-x8"])
@pytest.mark.parametrize("provider", ["aws", "gcp"])
def test_the_launcher_config_validates_against_rays_schema(preset, provider):
    code, text = manifest("--preset", preset, "--nodes", "2", "--provider", provider)
    assert code == 0, text
    config = yaml.safe_load(text)
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    validate_config(config)  # Ray's own check: the schema and the node types' consistency
    [gpu] = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert gpu["min_workers"] == gpu["max_workers"] == 2 and gpu["resources"]["GPU"] == 8
    assert "-v /shared:/shared" in config["docker"]["run_options"]  # where the recipe's runs_dir lies


def test_a_gang_the_nodes_cannot_hold_is_named():
    code, text = manifest("--nodes", "1", "--set", "sft.gang.num_workers=16")
    assert code == 2 and "sft.gang: 16 workers" in text and "raise --nodes" in text
    code, text = manifest("--nodes", "1", "--set", "pretrain.gang.cpus_per_worker=48")
    assert code == 2 and "pretrain.gang" in text  # 8 x 48 CPUs on a 192-CPU node
    assert manifest("--nodes", "2", "--set", "sft.gang.num_workers=16")[0] == 0


def test_no_secret_reaches_the_manifest():
    code, text = manifest(env={"WANDB_API_KEY": "planted-wandb-secret", "RAY_AUTH_TOKEN": "planted-ray-token"})
    assert code == 0 and "planted" not in text
    assert "-e WANDB_API_KEY" in text and "-e RAY_AUTH_TOKEN" in text  # by name, from the caller's env


def test_bad_options_are_named():
    assert "--target 'kuberay'" in manifest("--target", "kuberay")[1]
    assert "--preset 'v100'" in manifest("--preset", "v100")[1]
    assert "not under the shared storage" in manifest("--storage", "/mnt/other")[1]


@pytest.mark.parametrize("preset", ["a100-80g-x8", "h100-80g-x8"])
def test_the_shipped_examples_are_current(preset):
    code, text = manifest("--preset", preset, "--nodes", "2", "--image", "r1pipe:0.1.0")
    assert code == 0
    assert (SHIPPED / f"launcher-{preset}.yaml").read_text() == text, \
        f"regenerate: r1pipe cluster manifest recipes/cluster.yaml --preset {preset} --nodes 2 --image r1pipe:0.1.0"
