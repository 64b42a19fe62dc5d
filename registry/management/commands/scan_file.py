"""`manage.py scan_file PATH...`: the model scanner for operators, on local files.

Exit status: 0 clean, 1 findings, 2 something could not be analysed (the registry treats that as
not clean too; see registry.scanners.base.is_unanalysable).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from registry.scanners import SCANNER_VERSION, ScanResult, Severity, is_unanalysable, scan
from registry.scanners.base import FileSource


def _files(paths: list[str]) -> Iterator[str]:
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    yield os.path.join(root, name)
        elif os.path.isfile(path):
            yield path
        else:
            raise CommandError(f"{path}: no such file or folder. Give files or folders to scan.")


class Command(BaseCommand):
    help = "Scan local model files or folders for unsafe serialization (never loads them)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("paths", nargs="+", metavar="PATH")
        parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
        parser.add_argument(
            "--min-severity",
            default="low",
            choices=[s.name.lower() for s in Severity],
            help="report findings at or above this severity (default: low, so info notes such as "
            "an unrecognised file do not fail the run)",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        threshold = Severity.parse(opts["min_severity"])
        reports = []
        status = 0
        for path in _files(opts["paths"]):
            with FileSource(path) as source:
                result: ScanResult = scan(source, name=os.path.basename(path))
            findings = [f for f in result.findings if f.severity >= threshold]
            if any(is_unanalysable(f) for f in findings):
                status = 2
            elif findings and status == 0:
                status = 1
            reports.append((path, result.formats, findings))
        if opts["json"]:
            document = {
                "scanner_version": SCANNER_VERSION,
                "files": [
                    {
                        "path": path,
                        "formats": formats,
                        "findings": [
                            {
                                "rule": f.rule,
                                "severity": f.severity.name.lower(),
                                "message": f.message,
                                "member": f.member,
                                "offset": f.offset,
                                "reference": f.reference,
                                "unanalysable": is_unanalysable(f),
                            }
                            for f in findings
                        ],
                    }
                    for path, formats, findings in reports
                ],
            }
            self.stdout.write(json.dumps(document, indent=2))
        else:
            for path, formats, findings in reports:
                kinds = ", ".join(formats) or "unrecognised"
                self.stdout.write(f"{path}: {kinds}: {len(findings) or 'no'} finding(s)")
                for f in findings:
                    where = f"{f.member} " if f.member else ""
                    at = f"@{f.offset} " if f.offset is not None else ""
                    ref = f" [{f.reference}]" if f.reference else ""
                    self.stdout.write(
                        f"  {f.severity.name:<8} {f.rule} {where}{at}{f.message}{ref}"
                    )
        self.stdout.flush()
        sys.exit(status)
