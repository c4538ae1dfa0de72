"""Live terminal view of a federated run: one row per round, then a summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gateway import RoundResult

#: Clinical metrics shown per round and in the summary: (key, column title, as percent).
_CLINICAL = (
    ("balanced_accuracy", "balanced acc.", True),
    ("auc", "AUC", False),
    ("sensitivity", "sensitivity", True),
    ("specificity", "specificity", True),
)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _clinical(clinical: dict[str, float], key: str, percent: bool) -> str:
    value = clinical.get(key)
    if value is None or percent:
        return _percent(value)
    return f"{value:.3f}"


class RoundTable:
    def __init__(self, console: Console, *, rounds: int, devices: int, enabled: bool = True):
        self.console = console
        self.devices = devices
        self.enabled = enabled
        self.rows: list[RoundResult] = []
        self._status = "starting"
        self._progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
        )
        self._task = self._progress.add_task("starting", total=rounds)
        self._live: Live | None = None

    def _shown(self) -> list[tuple[str, str, bool]]:
        """The clinical columns some row has (sensitivity and specificity: two classes only)."""
        return [c for c in _CLINICAL if any(c[0] in r.clinical for r in self.rows)]

    def _table(self) -> Table:
        table = Table(show_edge=False, header_style="bold")
        shown = self._shown()
        for name in (
            "round",
            "participants",
            "accuracy",
            *(title for _, title, _ in shown),
            "bytes received",
            "rejected",
            "seconds",
        ):
            table.add_column(name, justify="right")
        for r in self.rows:
            table.add_row(
                str(r.round),
                f"{r.participants}/{self.devices}",
                _percent(r.accuracy),
                *(_clinical(r.clinical, key, percent) for key, _, percent in shown),
                f"{r.bytes_received:,}",
                str(r.rejected),
                f"{r.duration_s:.2f}",
            )
        return table

    def _render(self) -> Group:
        return Group(self._table(), self._progress)

    def __enter__(self) -> RoundTable:
        if self.enabled and self.console.is_terminal:
            self._live = Live(self._render(), console=self.console, refresh_per_second=8)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)  # type: ignore[arg-type]
            self._live = None

    def status(self, message: str) -> None:
        self._status = message
        self._progress.update(self._task, description=message)
        if self._live is not None:
            self._live.update(self._render())
        elif self.enabled:
            self.console.print(f"[dim]{message}[/]")

    def add(self, result: RoundResult) -> None:
        self.rows.append(result)
        self._progress.update(self._task, advance=1, description="training")
        if self._live is not None:
            self._live.update(self._render())
        elif self.enabled:
            clinical = "".join(
                f"  {title} {_clinical(result.clinical, key, percent)}"
                for key, title, percent in _CLINICAL
                if key in result.clinical
            )
            self.console.print(
                f"round {result.round:>3}  participants {result.participants}/{self.devices}"
                f"  accuracy {_percent(result.accuracy)}{clinical}"
                f"  bytes {result.bytes_received:,}  rejected {result.rejected}"
                f"  {result.duration_s:.2f}s"
            )

    def summary(self, report: dict[str, Any]) -> None:
        final = report["final_accuracy"]
        central = report["centralized_accuracy"]
        verified = "[green]verified[/]" if report["ledger_verified"] else "[red]FAILED[/]"
        lines = [
            "",
            f"[bold]Federated[/] {report['devices']} devices x {len(report['rounds'])} rounds"
            f" in {report['duration_s']:.1f} s",
            f"  final accuracy        {100 * final:.2f}%"
            if final is not None
            else "  no round closed",
            *self._final_clinical(report.get("final_clinical") or {}),
            f"  centralized accuracy  {100 * central:.2f}%  (same model on the pooled data)",
            f"  gap                   {report['gap_pp']:.2f} percentage points",
            f"  final model           {str(report['final_model'])[:16]}...",
            f"  ledger                {verified}: {report['ledger_blocks']} blocks (hash chain,"
            f" signatures, contract replay, {report['ledger_checked_models']} models and"
            f" {report['ledger_checked_updates']} updates against the store) in"
            f" {report['ledger_path']}",
            f"  report                {report['report_path']}",
        ]
        privacy = report.get("privacy")
        if privacy is not None:
            ended = (privacy.get("ended") or {}).get("status", "?")
            lines.append(
                f"  privacy               epsilon {privacy['epsilon']:.3f} at delta"
                f" {privacy['dp']['target_delta']:g} (budget {privacy['budget_epsilon']:g};"
                f" task {ended}); recompute: fedledger ledger privacy {report['task']}"
                f" --db {report['ledger_path']}"
            )
        if report.get("secure_aggregation"):
            lines.append(
                "  secure aggregation    the gateway learned each round's sum, no device's"
                f" update ({report.get('ledger_checked_aggregates', 0)} sums unmasked again"
                " from the store)"
            )
        if report.get("plot_path"):
            lines.append(f"  plot                  {report['plot_path']}")
        if report["ledger_problem"]:
            lines.append(f"  ledger problem        {report['ledger_problem']}")
        lines.append(
            f"  check it yourself:    fedledger ledger verify --db {report['ledger_path']}"
        )
        for line in lines:
            self.console.print(line, highlight=False, soft_wrap=True)

    @staticmethod
    def _final_clinical(clinical: dict[str, float]) -> list[str]:
        shown = [
            f"{title} {_clinical(clinical, key, percent)}"
            for key, title, percent in _CLINICAL
            if key in clinical
        ]
        return [f"  final clinical        {', '.join(shown)}"] if shown else []


class BlockProgress:
    """A progress bar of blocks verified, on a terminal only (so ``--json`` output stays clean)."""

    def __init__(self, console: Console):
        self._progress = Progress(
            TextColumn("[bold]blocks"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self._task = self._progress.add_task("verify", total=None)

    def __enter__(self) -> BlockProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, done: int, total: int) -> None:
        self._progress.update(self._task, completed=done, total=total)
