"""Research commands: ``flatscan zoo train`` (a seeded model zoo), ``flatscan zoo study`` (flatness against
generalisation) and ``flatscan demo`` (train, audit and rank a small zoo, offline)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from flatscan.cli.app import app, console, run_action
from flatscan.cli.options import DatasetOpt, Debug, DeviceOpt, EpochsOpt, PresetOpt, ZooSizeOpt
from flatscan.cli.render import bar, estimate, print_correlations, report_failure, training_progress
from flatscan.io.paths import writable_folder

if TYPE_CHECKING:
    from flatscan.audit.org import AuditRow

zoo_app = typer.Typer(
    help="Model zoos: small timm CNNs trained with varied hyperparameters, saved as a local organisation.",
    no_args_is_help=True,
)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("train")
def zoo_train(
    out: Annotated[Path, typer.Argument(help="zoo directory: one timm/Hub-format folder per model, manifest.json/csv")],
    preset: PresetOpt = "study",
    spec: Annotated[
        Path | None, typer.Option(help="JSON file of zoo spec fields (size, seed, grid, img_size, ...) over the preset")
    ] = None,
    size: ZooSizeOpt = None,
    seed: Annotated[int | None, typer.Option(help="seed of the sample and the models (default: the preset's)")] = None,
    epochs: EpochsOpt = None,
    img_size: Annotated[int | None, typer.Option(min=8, help="input size in pixels (default 16)")] = None,
    dataset: DatasetOpt = None,
    train_split: Annotated[str | None, typer.Option(help="split to train on (default train)")] = None,
    test_split: Annotated[str | None, typer.Option(help="split to test on (default test)")] = None,
    num_classes: Annotated[int | None, typer.Option(min=2, help="classes of the dataset (default 10)")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads while training (default 1)")] = None,
    debug: Debug = False,
) -> None:
    """Train a zoo (seeded: the same spec gives the same weights); audit it with `flatscan org DIR`."""

    def action() -> None:
        from flatscan.research import zoo

        zoo_spec = zoo.load_spec(
            preset, spec, size=size, seed=seed, epochs=epochs, img_size=img_size, dataset=dataset,
            train_split=train_split, test_split=test_split, num_classes=num_classes, threads=threads,
        )  # fmt: skip
        writable_folder(out, str(out))  # before training: minutes of work must not end on an unwritable folder
        progress = bar()
        with progress:
            on_model, on_step = training_progress(progress, progress.add_task("training the zoo", total=None))
            zoo.train_zoo(zoo_spec, out, on_model=on_model, on_step=on_step)
        root = out.expanduser().resolve()
        table = Table(title=f"{root}: {zoo.MANIFEST} / {zoo.MANIFEST_CSV}")
        for column in ("model", "architecture", "params", "train acc", "test acc", "seconds"):
            table.add_column(column, justify="left" if column in ("model", "architecture") else "right")
        for model in zoo.read_manifest(root):
            table.add_row(
                model.name, model.architecture, f"{model.params:,}", f"{100 * model.train_accuracy:.1f}",
                f"{100 * model.test_accuracy:.1f}", f"{model.seconds:.1f}",
            )  # fmt: skip
        console.print(table)
        console.print(f"audit it with: flatscan org {root} --dataset {zoo_spec.dataset} --split {zoo_spec.test_split}")

    run_action(debug, action)


@zoo_app.command("study")
def zoo_study(
    zoo_dir: Annotated[Path, typer.Argument(help="zoo directory trained by `flatscan zoo train`")],
    out: Annotated[Path, typer.Option(help="directory for study.md, study.csv, study_spec.json and plots")] = Path(
        "reports"
    ),
    probes: Annotated[int, typer.Option(min=2, help="Rademacher probes of the Hutchinson trace")] = 32,
    sharpness_criterion: Annotated[
        str, typer.Option(help="what the perturbation may raise: error (Jiang et al.) or cross_entropy")
    ] = "error",
    sharpness_threshold: Annotated[float, typer.Option(help="largest mean increase of the criterion")] = 0.1,
    sharpness_samples: Annotated[int, typer.Option(min=1, help="Gaussian draws per sigma")] = 8,
    weightwatcher: Annotated[
        bool, typer.Option("--weightwatcher/--no-weightwatcher", help="WeightWatcher's alpha_weighted (extra: study)")
    ] = True,
    resamples: Annotated[int, typer.Option(min=10, help="bootstrap resamples of the models")] = 1000,
    seed: Annotated[int, typer.Option(help="seed of the probes, perturbations and bootstrap")] = 0,
    device: DeviceOpt = "cpu",
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads while measuring (small models: 1)")] = 1,
    debug: Debug = False,
) -> None:
    """Does relative flatness predict generalisation? Measure every zoo model, rank-correlate with its gap."""

    def action() -> None:
        from flatscan.research import study

        options = study.StudyOptions(
            probes=probes,
            sharpness_criterion=sharpness_criterion,
            sharpness_threshold=sharpness_threshold,
            sharpness_samples=sharpness_samples,
            weightwatcher=weightwatcher,
            seed=seed,
            device=device,
            threads=threads,
        )
        arguments = [str(zoo_dir), "--out", str(out), "--probes", str(probes)]
        arguments += ["--sharpness-criterion", sharpness_criterion, "--sharpness-threshold", str(sharpness_threshold)]
        arguments += ["--sharpness-samples", str(sharpness_samples), "--resamples", str(resamples), "--seed", str(seed)]
        arguments += ["--device", device, "--threads", str(threads)] + ([] if weightwatcher else ["--no-weightwatcher"])
        progress = bar()
        with progress:
            task = progress.add_task("measuring the zoo", total=None)
            result = study.run_study(
                zoo_dir,
                options,
                resamples=resamples,
                on_model=lambda name, done, total, reused: progress.update(task, completed=done, total=total),
            )
        table = Table(title=Text("Kendall tau with the accuracy gap (train - test), 95% bootstrap CIs"))
        for column in ("measure", "n", "tau", "psi (granulated)"):
            table.add_column(column, justify="left" if column == "measure" else "right")
        rows = result.correlations[result.correlations["target"] == "gap_accuracy"]
        for row in rows.itertuples(index=False):
            tau = estimate(row.tau, row.tau_ci_low, row.tau_ci_high)
            table.add_row(row.measure, str(row.n), tau, estimate(row.psi, row.psi_ci_low, row.psi_ci_high))
        console.print(table)
        for path in study.write_study(result, out, "flatscan zoo study " + shlex.join(arguments)):
            console.print(f"wrote {path}")

    run_action(debug, action, str(zoo_dir))


@app.command()
def demo(
    zoo_dir: Annotated[
        Path | None, typer.Option(help="zoo directory (default: a cache folder per spec, ~/.cache/flatscan/zoo)")
    ] = None,
    size: ZooSizeOpt = None,
    epochs: EpochsOpt = None,
    store: Annotated[Path | None, typer.Option(help="results store (default: in the zoo directory)")] = None,
    out: Annotated[Path | None, typer.Option(help="directory for the reports (default: reports/ in the zoo)")] = None,
    debug: Debug = False,
) -> None:
    """Train (or reuse) ~10 small CNNs on digits, audit them as `flatscan org` does, rank them: offline, CPU."""

    def action() -> None:
        from flatscan.audit.leaderboard import write_reports
        from flatscan.research.demo import run_demo
        from flatscan.research.zoo import load_spec

        spec = load_spec("demo", size=size, epochs=epochs)
        progress = bar()
        with progress:
            on_model, on_step = training_progress(progress, progress.add_task("training the zoo", total=None))
            audit_task = progress.add_task("auditing", total=None, visible=False)

            def on_audit(row: AuditRow, done: int, total: int) -> None:
                progress.update(audit_task, completed=done, total=total, visible=True)
                report_failure(row)

            result = run_demo(spec, zoo_dir, store, on_model=on_model, on_step=on_step, on_audit=on_audit)
        console.print(result.board.rich_table())
        print_correlations(result.board)
        for path in write_reports(result.board, out or result.zoo / "reports"):
            console.print(f"wrote {path}")
        console.print(f"zoo: {result.zoo} ({len(result.models)} models; flatscan org {result.zoo} audits it again)")

    run_action(debug, action)
