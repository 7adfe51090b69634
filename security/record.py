"""Keep scan findings in SecurityFinding: a re-scan updates, never duplicates."""

from __future__ import annotations

import dataclasses
from datetime import datetime

from django.db import IntegrityError, transaction

from security.models import SecurityFinding
from security.scan.findings import RANK, Finding


@dataclasses.dataclass
class RecordResult:
    new: int = 0
    updated: int = 0
    reopened: int = 0


def record(findings: list[Finding], *, database: str, now: datetime) -> RecordResult:
    """Create each new finding; fold a repeat into the finding it continues.

    A repeat is the same kind on the same subject whose window overlaps the recorded one (or
    starts within the kind's merge distance of it), or a standing problem still there.  A
    resolved finding seen again with newer evidence, or a standing one still present, is
    reopened.
    """
    result = RecordResult()
    for finding in findings:
        with transaction.atomic(using=database):
            latest = (
                SecurityFinding.objects.using(database)
                .select_for_update()
                .filter(key=finding.key)
                .order_by("-window_end")
                .first()
            )
            if latest and (
                finding.standing or finding.window_start <= latest.window_end + finding.merge_within
            ):
                _fold(latest, finding, now=now, result=result)
                continue
            try:
                with transaction.atomic(using=database):
                    _create(finding, database=database, now=now)
                result.new += 1
            except IntegrityError:  # the same fingerprint, recorded meanwhile
                same = SecurityFinding.objects.using(database).get(fingerprint=finding.fingerprint)
                _fold(same, finding, now=now, result=result)
    return result


def _create(finding: Finding, *, database: str, now: datetime) -> None:
    SecurityFinding.objects.using(database).create(
        fingerprint=finding.fingerprint,
        key=finding.key,
        kind=finding.kind,
        severity=finding.severity,
        subject_type=finding.subject_type,
        subject=finding.subject[:300],
        count=finding.count,
        window_start=finding.window_start,
        window_end=finding.window_end,
        first_seen=now,
        last_seen=now,
        detail=finding.detail,
        evidence=finding.evidence,
    )


def _fold(row: SecurityFinding, finding: Finding, *, now: datetime, result: RecordResult) -> None:
    newer = finding.window_end > row.window_end
    if row.resolved and (finding.standing or newer):
        row.resolved = False
        result.reopened += 1
    else:
        result.updated += 1
    row.window_start = min(row.window_start, finding.window_start)
    row.window_end = max(row.window_end, finding.window_end)
    # two scans may see different parts of one incident: keep the larger count, never a sum
    row.count = finding.count if finding.standing else max(row.count, finding.count)
    if RANK[finding.severity] > RANK[row.severity]:
        row.severity = finding.severity
    if newer or finding.standing:
        row.detail, row.evidence = finding.detail, finding.evidence
    row.last_seen = now
    row.save()
