"""The `r1pipe` command line.

    r1pipe run recipes/demo.yaml                       # embedded local Ray, CPU
    r1pipe run recipes/demo.yaml --stages ingest       # one stage
    r1pipe run recipes/demo.yaml --from dedup --force  # a stage and all after it
    r1pipe status [RUN_ID] [--json]
    r1pipe report [RUN_ID] [--out FILE]                # one self-contained HTML file
    r1pipe eval runs/demo/sft [--tasks FILE] [--seed N --n N] [--json]
    r1pipe lineage runs/demo/prl_2/model [--json]      # what a model was made from
    r1pipe plan recipes/cluster.yaml --preset h100-80g-x8 --nodes 2   # memory and step time per stage
    r1pipe submit recipes/cluster.yaml --address http://HEAD:8265 --follow
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from pipelines.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="r1pipe: raw text to an RL-tuned reasoning MoE, as a resumable Ray workflow.")
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

SetOpt = typer.Option(None, "--set", help="override a config key: a.b.c=value (repeatable)")


def _split(stages: Optional[str]) -> Optional[list[str]]:
    return [s.strip() for s in stages.split(",") if s.strip()] if stages else None


@app.command()
def run(config: str = typer.Argument(..., help="a YAML recipe, e.g. recipes/demo.yaml"),
        stages: Optional[str] = typer.Option(None, help="comma-separated stages to run"),
        from_stage: Optional[str] = typer.Option(None, "--from", help="run this stage and all after it"),
        force: bool = typer.Option(False, help="rerun the selected stages even if done"),
        run_id: Optional[str] = typer.Option(None, help="default: the recipe's name"),
        runs_dir: Optional[str] = typer.Option(None, help="default: the recipe's runs_dir"),
        address: Optional[str] = typer.Option(None, help="join an existing Ray cluster ('auto', ray://...)"),
        verbose: bool = typer.Option(False, "--verbose", "-v",
                                     help="show Ray's and DeepSpeed's logs and a failed stage's trace"),
        set_: Optional[list[str]] = SetOpt) -> None:
    """Run a recipe's stages in order; finished stages are skipped.

    Shows one progress line per running stage; Ray's, DeepSpeed's and the stages' own logs go
    to <run>/logs/ (--verbose shows them instead)."""
    from pipelines.runner import StageFailed, resolve_runs_dir
    from pipelines.store import RunStore
    log_path, run_root = None, None
    try:
        cfg = load_config(config, set_ or [])
        if address:
            cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": address})})
        cfg = resolve_runs_dir(cfg, runs_dir)
        rid = run_id or cfg.name
        run_root = RunStore(cfg.runs_dir, rid, cfg.cache_dir).root  # on object storage: the run's local mirror
        console.print(f"run [bold]{rid}[/] in {_where(cfg.runs_dir, run_root)}")
        if not verbose:
            log_path = run_root / "logs" / time.strftime("run-%Y%m%d-%H%M%S.log")
            console.print(f"logs  {log_path}", style="dim")
        _run_with_progress(cfg, rid, stages=_split(stages), from_stage=from_stage, force=force,
                           log_path=log_path)
    except (ConfigError, ValueError) as err:
        err_console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    except StageFailed as err:
        err_console.print(f"[red]failed:[/] stage [bold]{err.stage}[/]: {err.error}")
        if verbose:
            err_console.print(err.detail, markup=False)
        else:
            err_console.print(f"the trace is in {log_path} (--verbose prints it)", style="dim")
        raise typer.Exit(1)
    finally:
        if run_root is not None:
            _final_report(run_root, cfg.runs_dir, log_path)


def _where(runs_dir: str, run_root: Path) -> str:
    """A run's place for humans: its folder, or its URI and local mirror on object storage."""
    from cluster.storage import is_uri
    return f"{runs_dir}/{run_root.name} (local mirror {run_root})" if is_uri(runs_dir) else str(run_root)


def _final_report(run_root: Path, runs_dir: str, log_path: Optional[Path] = None) -> None:
    """Every run ends by writing its report; a report that cannot be written never fails the run.
    A run on object storage gets its report and this invocation's log uploaded beside it."""
    from cluster.storage import is_uri, push
    from pipelines.report import write_report
    if not (run_root / "pipeline.json").is_file():
        return  # stopped before anything ran
    try:
        path = write_report(runs_dir if is_uri(runs_dir) else run_root.parent, run_root.name)
        if log_path is not None and log_path.is_file():
            push(log_path)
    except Exception as err:  # noqa: BLE001 - the run's own outcome is what the exit code says
        err_console.print(f"[yellow]warning:[/] the report could not be written: {type(err).__name__}: {err}")
        return
    console.print(f"report {path}", style="dim")


def _run_with_progress(cfg, rid: str, *, stages, from_stage, force, log_path: Optional[Path]) -> None:
    """run_pipeline with a live progress line and the process's other output in log_path
    (None: everything on the terminal, no progress line)."""
    from cluster.session import shutdown
    from pipelines.progress import LiveProgress, quiet_output
    from pipelines.runner import StageFailed, run_pipeline
    fault = os.environ.get("R1PIPE_FAULT")
    if log_path is None:
        try:
            run_pipeline(cfg, rid, stages=stages, from_stage=from_stage, force=force,
                         echo=console.print, fault=fault)
        finally:
            shutdown()
        return
    with quiet_output(log_path) as (out, _):
        term = Console(file=out, highlight=False)
        try:
            run_pipeline(cfg, rid, stages=stages, from_stage=from_stage, force=force,
                         echo=term.print, fault=fault, watch=LiveProgress(term))
        except StageFailed as err:
            print(err.detail, file=sys.stderr)  # into the log
            raise
        finally:
            shutdown()


@app.command()
def status(run_id: Optional[str] = typer.Argument(None, help="default: the newest run"),
           runs_dir: str = typer.Option("runs", help="where runs live"),
           as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables")) -> None:
    """Show where a run stands: stage, status, duration, key metrics."""
    from pipelines.status import collect, render
    try:
        report = collect(runs_dir, run_id)
    except ValueError as err:
        err_console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        render(report, console)


@app.command()
def report(run_id: Optional[str] = typer.Argument(None, help="default: the newest run"),
           runs_dir: str = typer.Option("runs", help="where runs live"),
           out: Optional[str] = typer.Option(None, help="default: <runs_dir>/<run>/report.html")) -> None:
    """Write one self-contained HTML file about a run (opens offline): stage timeline and configs,
    data funnel, difficulty grading, training curves, expert loads, held-out evaluation, lineage."""
    from pipelines.report import write_report
    try:
        path = write_report(runs_dir, run_id, out)
    except ValueError as err:
        err_console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    console.print(f"report {path}")


@app.command()
def plan(config: str = typer.Argument(..., help="a YAML recipe"),
         preset: str = typer.Option("h100-80g-x8", help="the GPU nodes: a100-80g-x8 | h100-80g-x8"),
         nodes: int = typer.Option(1, min=1, help="nodes of that preset"),
         mfu: float = typer.Option(0.4, min=0.01, max=1.0, help="the MFU the step time assumes"),
         as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
         set_: Optional[list[str]] = SetOpt) -> None:
    """Memory per GPU, the largest micro-batch and the step time of each training stage, before it runs."""
    from dataclasses import asdict

    from pipelines.plan import plan_recipe, render
    from training.plan import PRESETS
    try:
        if preset not in PRESETS:
            raise ValueError(f"--preset {preset!r}: one of {sorted(PRESETS)}")
        cfg = load_config(config, set_ or [], check_files=False)
        plans = plan_recipe(cfg, PRESETS[preset], nodes=nodes, mfu=mfu)
    except (ConfigError, ValueError) as err:
        err_console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    if as_json:
        sys.stdout.write(json.dumps([asdict(p) for p in plans], indent=2) + "\n")
    else:
        render(plans, PRESETS[preset], mfu, console)


cluster_app = typer.Typer(no_args_is_help=True, help="Files for running r1pipe on a GPU cluster.")
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("manifest")
def cluster_manifest(config: str = typer.Argument(..., help="a YAML recipe"),
                     target: str = typer.Option("launcher", help="launcher: the Ray cluster launcher's YAML; "
                                                                 "kuberay: a KubeRay RayJob"),
                     preset: str = typer.Option("h100-80g-x8", help="a100-80g-x8 | h100-80g-x8"),
                     nodes: int = typer.Option(1, help="GPU nodes of the preset"),
                     image: str = typer.Option("r1pipe:latest", help="the container image (cluster/manifests/Dockerfile)"),
                     provider: str = typer.Option("aws", help="launcher: aws | gcp"),
                     region: str = typer.Option("us-west-2", help="launcher: the cloud region"),
                     storage: Optional[str] = typer.Option(None, help="the shared mount (default: runs_dir's parent)"),
                     pvc: str = typer.Option("r1pipe-shared", help="kuberay: the ReadWriteMany claim mounted there"),
                     auth_secret: str = typer.Option("r1pipe-ray-auth", help="kuberay: the Secret whose "
                                                     "auth_token is Ray's token"),
                     wandb_secret: str = typer.Option("r1pipe-wandb", help="kuberay: the Secret whose api_key is "
                                                      "W&B's key ('' for none)"),
                     s3_secret: str = typer.Option("r1pipe-s3", help="kuberay, runs_dir on object storage: the "
                                                   "Secret whose keys (AWS_ACCESS_KEY_ID, ...) become variables"),
                     recipe_path: Optional[str] = typer.Option(None, help="kuberay: the recipe inside the image or "
                                                               "on the shared storage (default: the image's recipes/)"),
                     out: Optional[str] = typer.Option(None, help="write here instead of stdout"),
                     set_: Optional[list[str]] = SetOpt) -> None:
    """A cluster config for a recipe whose GPU workers hold every gang of it (checked first)."""
    import yaml

    from cluster.deploy import recipe_gangs
    from training.plan import PRESETS
    try:
        if target not in ("launcher", "kuberay"):
            raise ValueError(f"--target {target!r}: one of ['kuberay', 'launcher']")
        if preset not in PRESETS:
            raise ValueError(f"--preset {preset!r}: one of {sorted(PRESETS)}")
        cfg = load_config(config, set_ or [], check_files=False)
        common = dict(name=cfg.name, gangs=recipe_gangs(cfg), runs_dir=cfg.runs_dir, preset=PRESETS[preset],
                      nodes=nodes, image=image, storage=storage)
        if target == "launcher":
            from cluster.launcher import launcher_config
            manifest = launcher_config(**common, provider=provider, region=region)
        else:
            from cluster.kuberay import IMAGE_WORKDIR, rayjob
            manifest = rayjob(**common, recipe_path=recipe_path or f"{IMAGE_WORKDIR}/recipes/{Path(config).name}",
                              overrides=set_ or [], pvc=pvc, auth_secret=auth_secret, wandb_secret=wandb_secret or None,
                              s3_secret=s3_secret)
    except (ConfigError, ValueError) as err:
        err_console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    text = f"# generated by `r1pipe cluster manifest` for recipe {cfg.name!r}: --target {target} " \
           f"--preset {preset} --nodes {nodes}\n" + yaml.safe_dump(manifest, sort_keys=False)
    if out:
        Path(out).write_text(text)
        console.print(f"wrote {out}")
    else:
        sys.stdout.write(text)


@app.command()
def submit(config: str = typer.Argument(..., help="a YAML recipe inside the working dir"),
           address: str = typer.Option(..., help="the Ray dashboard, e.g. http://HEAD:8265"),
           working_dir: str = typer.Option(".", help="uploaded as the job's working_dir"),
           stages: Optional[str] = typer.Option(None), from_stage: Optional[str] = typer.Option(None, "--from"),
           force: bool = typer.Option(False), run_id: Optional[str] = typer.Option(None),
           runs_dir: Optional[str] = typer.Option(None, help="a path every node can reach"),
           follow: bool = typer.Option(False, help="stream the job's logs until it ends"),
           python: str = typer.Option("python", help="the interpreter on the cluster with r1pipe's deps"),
           set_: Optional[list[str]] = SetOpt) -> None:
    """Submit the pipeline to a Ray cluster as a Ray job (Jobs API) and print its id."""
    from pipelines.submit import submit_job
    try:
        load_config(config, set_ or [], check_files=False)  # fail here, not on the cluster; files there
        job_id, code = submit_job(config, address=address, working_dir=working_dir,
                                  stages=stages, from_stage=from_stage, force=force,
                                  run_id=run_id, runs_dir=runs_dir, overrides=set_ or [],
                                  follow=follow, python=python, echo=console.print)
    except (ConfigError, ValueError) as err:
        err_console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    console.print(f"job {job_id}")
    if code:
        raise typer.Exit(code)


@app.command()
def export(stage_folder: str = typer.Argument(..., help="a training stage folder (or its model/ folder)"),
           out: str = typer.Argument(..., help="where to write the transformers model"),
           overwrite: bool = typer.Option(False, help="replace OUT if it exists")) -> None:
    """Export a trained model to HF transformers (Qwen2-MoE): safetensors, config.json, tokenizer.

    The result loads with transformers.AutoModelForCausalLM.from_pretrained(OUT), no custom code.
    """
    from pipelines.export import export_stage
    try:
        path = export_stage(stage_folder, out, overwrite=overwrite)
    except (ValueError, FileNotFoundError) as err:
        err_console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    console.print(f"exported {stage_folder} -> {path}")


@app.command()
def lineage(path: str = typer.Argument(..., help="a stage folder, its model/ or a checkpoint in it, or an export"),
            as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """Show what a model was made from: every upstream stage with its fingerprint, code version and
    finish time, and the sha256 of the files each read."""
    from pipelines.lineage import find_lineage, render
    try:
        found = find_lineage(path)
    except ValueError as err:
        err_console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    if found is None:
        err_console.print(f"[red]error:[/] {path}: no lineage here; give a stage folder of a run, its model/ "
                          f"or checkpoints/, or an exported model with lineage.json")
        raise typer.Exit(2)
    if as_json:
        sys.stdout.write(json.dumps(found, indent=2, sort_keys=True) + "\n")
    else:
        render(found, console)


@app.command("eval")
def eval_(model_dir: str = typer.Argument(..., help="a training stage folder, its model/ folder, or an export"),
          tasks: Optional[str] = typer.Option(None, help="held-out tasks: a tasks stage's eval split or a JSONL"),
          seed: int = typer.Option(0, help="sampling seed (and the generator's, without --tasks)"),
          n: int = typer.Option(260, help="tasks to generate when there is no --tasks and no run"),
          max_new_tokens: int = typer.Option(384, help="per completion"),
          pass_k: int = typer.Option(8, help="the k of pass@k"),
          pass_k_tasks: int = typer.Option(64, help="tasks sampled for pass@k (0: off)"),
          workers: Optional[int] = typer.Option(None, help="Ray tasks (default: one per CPU)"),
          as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables")) -> None:
    """Evaluate a model on held-out tasks: greedy accuracy (overall, by family and difficulty),
    well-formed answers, mean length, pass@k."""
    from pipelines.evaluate import evaluate_folder
    from rl.config import EvalConfig
    try:
        cfg = EvalConfig(max_new_tokens=max_new_tokens, workers=workers,
                         pass_at_k={"k": pass_k, "tasks": pass_k_tasks})
        report = evaluate_folder(model_dir, tasks=tasks, seed=seed, n=n, cfg=cfg)
    except ValueError as err:
        err_console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    finally:
        from cluster.session import shutdown
        shutdown()
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
        return
    from pipelines.status import _table
    console.print(f"{report['model']} on {report['eval/n']} tasks from {report['tasks']}")
    pass_k_key = f"eval/pass@{pass_k}"
    console.print(f"accuracy {report['eval/accuracy']:.4f}   format {report['eval/format_rate']:.4f}   "
                  f"mean length {report['eval/mean_length']:.1f}"
                  + (f"   pass@{pass_k} {report[pass_k_key]:.4f}" if pass_k_key in report else ""))
    for name, t in report.get("tables", {}).items():
        console.print(_table(name, t["columns"], t["rows"]))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
