"""The `r1pipe` command line.

    r1pipe run recipes/demo.yaml                       # embedded local Ray, CPU
    r1pipe run recipes/demo.yaml --stages ingest       # one stage
    r1pipe run recipes/demo.yaml --from dedup --force  # a stage and all after it
    r1pipe status [RUN_ID] [--json]
    r1pipe eval runs/demo/sft [--tasks FILE] [--seed N --n N] [--json]
    r1pipe submit recipes/cluster.yaml --address http://HEAD:8265 --follow
"""
from __future__ import annotations

import json
import os
import sys
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
        set_: Optional[list[str]] = SetOpt) -> None:
    """Run a recipe's stages in order; finished stages are skipped."""
    from pipelines.runner import StageFailed, resolve_runs_dir, run_pipeline
    try:
        cfg = load_config(config, set_ or [])
        if address:
            cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": address})})
        cfg = resolve_runs_dir(cfg, runs_dir)
        rid = run_id or cfg.name
        console.print(f"run [bold]{rid}[/] in {cfg.runs_dir}/{rid}")
        run_pipeline(cfg, rid, stages=_split(stages), from_stage=from_stage, force=force,
                     echo=console.print, fault=os.environ.get("R1PIPE_FAULT"))
    except (ConfigError, ValueError) as err:
        err_console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    except StageFailed as err:
        err_console.print(f"[red]failed:[/] {err}")
        raise typer.Exit(1)
    finally:
        from cluster.session import shutdown
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
