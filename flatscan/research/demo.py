"""``flatscan demo``: train (or reuse) a small zoo on digits, audit it as ``flatscan org`` does and rank its models'
relative flatness against the test accuracy the zoo recorded, offline on a CPU."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flatscan.audit.leaderboard import Leaderboard, build_leaderboard
from flatscan.audit.options import AuditOptions
from flatscan.audit.org import AuditRow, audit_org
from flatscan.audit.reported import ReportedAccuracy
from flatscan.audit.store import ResultsStore
from flatscan.io.data import DataOptions
from flatscan.research.zoo import (
    DEMO,
    MANIFEST_CSV,
    STORE,
    ZooModel,
    ZooSpec,
    default_zoo_dir,
    torch_threads,
    train_zoo,
)

# Columns that only timm's own results fill: dropped from the demo's table when empty.
TIMM_ONLY = ("reported_top5", "reported_img_size", "top1_real", "top1_v2")


@dataclass(frozen=True)
class DemoResult:
    """What ``flatscan demo`` shows: the zoo, the audit's rows and the leaderboard."""

    zoo: Path
    models: list[ZooModel]
    audit: list[AuditRow]
    board: Leaderboard


def run_demo(
    spec: ZooSpec = DEMO,
    zoo: str | Path | None = None,
    store: str | Path | None = None,
    *,
    on_model: Callable[[ZooModel, int, int, bool], None] | None = None,
    on_step: Callable[[str, int, int], None] | None = None,
    on_audit: Callable[[AuditRow, int, int], None] | None = None,
) -> DemoResult:
    """Train (or reuse) the zoo of ``spec``, audit it as ``flatscan org <zoo>`` does on the test split, and rank it
    against the test accuracy the zoo recorded (its ``manifest.csv``, read as a ``--reported`` file)."""
    root = (Path(zoo).expanduser() if zoo is not None else default_zoo_dir(spec)).resolve()
    models = train_zoo(spec, root, on_model=on_model, on_step=on_step)
    options = DataOptions(dataset=spec.dataset, split=spec.test_split, batch_size=128, workers=0, seed=spec.data_seed)
    # The zoo's thread count for its tiny models too: more threads gain little, and lose much on busy cores.
    with ResultsStore(Path(store) if store is not None else root / STORE) as results, torch_threads(spec.threads):
        rows = audit_org(str(root), results, AuditOptions(options, device="cpu"), on_model=on_audit)
        frame = results.frame()
    ours = {str(root / model.name) for model in models}
    frame = frame[frame["model"].isin(ours) & (frame["split"] == spec.test_split)].copy()
    # The zoo's families are finer than the adapters' (MobileNet-V1 is an EfficientNet-class model): rank within them.
    families = {str(root / model.name): model.config.family for model in models}
    frame["family"] = frame["model"].map(families)
    board = build_leaderboard(frame, ReportedAccuracy(user_csv=root / MANIFEST_CSV, offline=True))
    # For display: folder names instead of absolute paths, without the columns that only timm's results fill.
    table = board.table.assign(model=board.table["model"].map(lambda path: Path(path).name))
    table = table.drop(columns=[c for c in TIMM_ONLY if c in table and table[c].isna().all()])
    skipped = board.skipped.assign(model=board.skipped["model"].map(lambda path: Path(path).name))
    return DemoResult(root, models, rows, dataclasses.replace(board, table=table, skipped=skipped))
