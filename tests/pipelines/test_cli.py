"""The r1pipe command line: run/skip, config errors, a killed driver, status, submit."""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from tests.conftest import REPO, VENV_BIN, write_jsonl_with_malformed, write_recipe

runner = CliRunner()


@pytest.fixture()
def recipe(tmp_path):
    write_jsonl_with_malformed(tmp_path / "in.jsonl")
    return write_recipe(tmp_path / "r.yaml", f"""
name: cli
runs_dir: {tmp_path / 'runs'}
stages: [ingest]
ray: {{num_cpus: 2, data_concurrency: 1}}
ingest:
  inputs: [{{path: {tmp_path / 'in.jsonl'}}}]
  chunk_bytes: 1500
""")


def test_unknown_key_exits_nonzero_and_names_it():
    res = runner.invoke(app, ["run", str(REPO / "recipes" / "demo.yaml"), "--set", "ingest.no_such_key=1"])
    assert res.exit_code == 2
    assert "ingest.no_such_key" in res.output


def test_stage_needing_undone_input_says_what_to_run(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", f"runs_dir: {tmp_path}\nstages: [ingest]\n")
    res = runner.invoke(app, ["run", str(recipe)])
    assert res.exit_code == 2 and "no `ingest:` section" in res.output


def test_run_twice_skips_then_status(recipe, tmp_path):
    first = runner.invoke(app, ["run", str(recipe), "--stages", "ingest"])
    assert first.exit_code == 0, first.output
    assert "done  ingest" in first.output
    second = runner.invoke(app, ["run", str(recipe), "--stages", "ingest"])
    assert second.exit_code == 0 and "skip  ingest: done" in second.output

    res = runner.invoke(app, ["status", "--runs-dir", str(tmp_path / "runs"), "--json"])
    report = json.loads(res.output)
    [stage] = report["stages"]
    assert (stage["stage"], stage["status"]) == ("ingest", "done")
    assert stage["metrics"]["kept"] == 95
    table = runner.invoke(app, ["status", "cli", "--runs-dir", str(tmp_path / "runs")])
    assert "data funnel" in table.output and "bad_json=1" in table.output


def test_a_users_mistake_is_one_line_naming_stage_and_cause(recipe, tmp_path):
    over_budget = ["run", str(recipe), "--set", "ingest.max_reject_fraction=0.01"]
    res = runner.invoke(app, over_budget, env={"COLUMNS": "500"})
    assert res.exit_code == 1
    assert "failed: stage ingest: ingest: 5 of 100 rows rejected, over the error budget" in res.output
    assert "RayTaskError" not in res.output and "Traceback" not in res.output
    [log] = (tmp_path / "runs" / "cli" / "logs").glob("run-*.log")  # Ray's logs and the trace went here
    assert "Traceback" in log.read_text() and str(log) in res.output
    assert "Traceback" in runner.invoke(app, over_budget + ["--verbose"], env={"COLUMNS": "500"}).output

    report = runner.invoke(app, ["report", "cli", "--runs-dir", str(tmp_path / "runs")])
    assert report.exit_code == 0, report.output
    html = (tmp_path / "runs" / "cli" / "report.html").read_text()
    assert "failed" in html and "over the error budget" in html  # the failed stage and its cause


def test_an_empty_input_file_is_an_error_naming_it(tmp_path):
    write_jsonl_with_malformed(tmp_path / "in.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    recipe = write_recipe(tmp_path / "r.yaml", f"""
name: cli
runs_dir: {tmp_path / 'runs'}
stages: [ingest]
ray: {{num_cpus: 2, data_concurrency: 1}}
ingest:
  inputs: [{{path: {tmp_path / 'in.jsonl'}}}, {{path: {tmp_path / 'empty.jsonl'}}}]
""")
    res = runner.invoke(app, ["run", str(recipe)], env={"COLUMNS": "500"})
    assert res.exit_code == 1
    assert f"failed: stage ingest: ingest: input file {tmp_path / 'empty.jsonl'} holds no rows" in res.output


def _r1pipe(*args, env=None, **kw):
    return subprocess.Popen([str(VENV_BIN / "r1pipe"), *args], env={**os.environ, **(env or {})},
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_killed_driver_resumes(recipe, tmp_path):
    stage = tmp_path / "runs" / "cli" / "ingest"
    done = stage / ".work" / "shards" / "done"
    # Two workers: one hangs in shard 1 while the other finishes shards (Ray Data picks the order).
    proc = _r1pipe("run", str(recipe), "--set", "ray.data_concurrency=2",
                   env={"R1PIPE_FAULT": "ingest:after_write:1=hang"})
    try:
        _wait_for(lambda: any(done.glob("part-*.json")), 180, "a finished shard")
        time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert json.loads((stage / "manifest.json").read_text())["status"] == "running"
    first_done = {p.name: p.stat().st_mtime_ns for p in done.glob("part-*.json")}
    assert "part-00001.json" not in first_done

    again = _r1pipe("run", str(recipe))
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "resume ingest" in out
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["attempts"] == 2
    assert manifest["metrics"]["kept"] == 95 and manifest["metrics"]["shards_reused"] == len(first_done)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head(tmp_path_factory):
    """A real Ray head with the dashboard (Jobs API) on loopback, token auth as Ray 2.60 sets it."""
    # The embedded cluster of this test session already holds the agent's default port.
    port, dash, agent = _free_port(), _free_port(), _free_port()
    temp = Path("/tmp") / f"r1pipe-head-{os.getpid()}"
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.2",
         f"--port={port}", "--dashboard-host=127.0.0.2", f"--dashboard-port={dash}",
         "--include-dashboard=true", f"--dashboard-agent-listen-port={agent}", "--num-cpus=2", f"--temp-dir={temp}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.2:{dash}"

    def up():
        try:
            socket.create_connection(("127.0.0.2", dash), timeout=1).close()
            return True
        except OSError:
            return False
    try:
        _wait_for(up, 120, "the Ray dashboard")
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:  # `ray start --block` often outlives SIGTERM by 30 s: the whole group goes after 5
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_submit_to_loopback_head(ray_head, tmp_path):
    write_jsonl_with_malformed(tmp_path / "in.jsonl")
    work = tmp_path / "job"
    work.mkdir()
    write_recipe(work / "job.yaml", f"""
name: job
stages: [ingest]
ingest:
  inputs: [{{path: {tmp_path / 'in.jsonl'}}}]
""")
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [str(VENV_BIN / "r1pipe"), "submit", "job.yaml", "--address", ray_head, "--working-dir", ".",
         "--runs-dir", str(runs), "--follow"],
        cwd=work, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "raysubmit_" in proc.stdout and "SUCCEEDED" in proc.stdout
    manifest = json.loads((runs / "job" / "ingest" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["metrics"]["kept"] == 95
