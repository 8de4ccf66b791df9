"""`r1pipe plan`: the table for the shipped recipes, warnings that name the stage, bad input."""
import json

from typer.testing import CliRunner

from pipelines.cli import app
from tests.conftest import REPO, write_recipe

runner = CliRunner()
RECIPES = REPO / "recipes"


def plan(*args):
    return runner.invoke(app, ["plan", *map(str, args)], env={"COLUMNS": "250"})


def rows_of(output: str) -> list[dict]:
    """The JSON array of `plan --json`. Worker logs of a Ray session that an earlier test left in
    this process may be printed into the captured output around it."""
    start = output.index("[\n")
    return json.loads(output[start:output.index("\n]", start) + 2])


def test_every_shipped_recipe_gets_a_row_per_training_stage():
    for name, stages in (("demo", ["pretrain", "sft", "dpo", "reward_model", "prl_1", "prl_2"]),
                         ("reasoning", ["pretrain", "sft", "dpo", "reward_model", "prl_1", "prl_2"]),
                         ("cluster", ["pretrain", "sft"])):
        res = plan(RECIPES / f"{name}.yaml", "--json")
        assert res.exit_code == 0, res.output
        rows = rows_of(res.output)
        assert [r["stage"] for r in rows] == stages
        for r in rows:
            m = r["memory"]
            assert m["total"] == sum(m[k] for k in ("weights", "gradients", "optimizer", "activations", "frozen"))
        table = plan(RECIPES / f"{name}.yaml", "--preset", "a100-80g-x8")
        assert table.exit_code == 0 and "capacity plan on a100-80g-x8" in table.output


def test_the_cluster_recipes_model_on_one_h100_node():
    [pretrain, _] = rows_of(plan(RECIPES / "cluster.yaml", "--json").output)
    assert pretrain["params_total"] > 2e9 and pretrain["engine"] == "ZeRO-2 bf16" and pretrain["world"] == 8
    assert 0 < pretrain["memory"]["total"] < 80 and pretrain["largest_micro_batch"] >= 4
    assert pretrain["step_seconds"] > 0


def test_warnings_name_the_stage_that_does_not_fit():
    res = plan(RECIPES / "cluster.yaml", "--set", "pretrain.data.micro_batch=64", "--set", "pretrain.data.global_batch=512")
    assert res.exit_code == 0
    assert "warn  pretrain: about" in res.output and "largest that fits" in res.output
    res = plan(RECIPES / "cluster.yaml", "--set", "sft.gang.num_workers=16")
    assert "warn  sft.gang: 16 workers need 16 GPUs; 1 node(s)" in res.output
    assert "sft.gang" not in plan(RECIPES / "cluster.yaml", "--set", "sft.gang.num_workers=16", "--nodes", "2").output


def test_bad_input_is_named(tmp_path):
    assert plan(RECIPES / "demo.yaml", "--preset", "tpu-v5").exit_code == 2
    recipe = write_recipe(tmp_path / "r.yaml", "stages: [tasks]\ntasks: {}\n")
    res = plan(recipe)
    assert res.exit_code == 2 and "put `pretrain` in stages" in res.output
