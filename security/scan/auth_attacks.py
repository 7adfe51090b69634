"""Authentication attacks, read from accounts.LoginEvent.

The database narrows first (one GROUP BY per pattern over the look-back, on indexes of
migration accounts 0005), then Python slides the time window over the few candidates'
events only: a million users' quiet history costs a few aggregates, not a million loops.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta

from django.db.models import CharField, Count, F, Q
from django.db.models.functions import Cast, Coalesce, Lower

from accounts.choices import UserStatus
from accounts.models import LoginEvent, User
from security.scan.findings import CRITICAL, WARNING, Finding

CHUNK = 500  # ids per IN (...) list
INACTIVE_STATUSES = [UserStatus.SUSPENDED, UserStatus.CLOSED]


def _minutes(window: timedelta) -> int:
    return int(window.total_seconds() // 60)


def _chunks(items: list, size: int = CHUNK) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def bursts(times: list[datetime], *, threshold: int, window: timedelta) -> list[tuple]:
    """Runs of sorted times with at least ``threshold`` of them inside ``window``, merged.

    Returns (first, last, count) per run; overlapping or touching windows are one run.
    """
    runs: list[list] = []
    left = 0
    for right, moment in enumerate(times):
        while moment - times[left] > window:
            left += 1
        if right - left + 1 < threshold:
            continue
        if runs and times[left] <= runs[-1][1]:
            runs[-1][1] = moment
            runs[-1][2] = right - runs[-1][3] + 1
        else:
            runs.append([times[left], moment, right - left + 1, left])
    return [(first, last, count) for first, last, count, _ in runs]


class _Accounts:
    """Who an event is about: a user (by id) or, without one, the address typed."""

    def __init__(self, events):
        self.events = events

    def failures_by_account(self, *, at_least: int) -> tuple[list, list]:
        failures = self.events.filter(success=False)
        users = [
            row["user_id"]
            for row in failures.filter(user__isnull=False)
            .values("user_id")
            .annotate(n=Count("id"))
            .filter(n__gte=at_least)
        ]
        addresses = [
            row["address"]
            for row in failures.filter(user__isnull=True)
            .annotate(address=Lower("email_attempted"))
            .values("address")
            .annotate(n=Count("id"))
            .filter(n__gte=at_least)
        ]
        return users, addresses

    def timelines(self, users: list, addresses: list) -> dict[str, list[tuple]]:
        """(time, success, ip) per account key, oldest first."""
        out: dict[str, list[tuple]] = defaultdict(list)
        for chunk in _chunks(users):
            rows = self.events.filter(user_id__in=chunk).order_by("user_id", "created_at")
            for user_id, at, ok, ip in rows.values_list(
                "user_id", "created_at", "success", "ip_address"
            ):
                out[str(user_id)].append((at, ok, ip))
        for chunk in _chunks(addresses):
            rows = (
                self.events.filter(user__isnull=True)
                .annotate(address=Lower("email_attempted"))
                .filter(address__in=chunk)
                .order_by("address", "created_at")
            )
            for address, at, ok, ip in rows.values_list(
                "address", "created_at", "success", "ip_address"
            ):
                out[f"email:{address}"].append((at, ok, ip))
        return out


def _names(database: str, keys: Iterable[str]) -> dict[str, str]:
    """Account key -> what an operator reads (the user's email, or the address typed)."""
    ids = [key for key in keys if not key.startswith("email:")]
    names = {
        key: key.removeprefix("email:") + " (no such account)" for key in keys if key not in ids
    }
    for chunk in _chunks(ids):
        for user_id, email in (
            User.all_objects.using(database).filter(id__in=chunk).values_list("id", "email")
        ):
            names[str(user_id)] = email
    return names


def scan(*, database: str, since: datetime, until: datetime, options: dict) -> list[Finding]:
    """Brute force, spraying/stuffing, success after failures, logins to inactive accounts."""
    events = LoginEvent.objects.using(database).filter(created_at__gte=since, created_at__lt=until)
    brute_n = options["BRUTE_FORCE_FAILURES"]
    brute_window = timedelta(minutes=options["BRUTE_FORCE_WINDOW_MINUTES"])
    after_n = options["SUCCESS_AFTER_FAILURES"]
    after_window = timedelta(minutes=options["SUCCESS_AFTER_WINDOW_MINUTES"])

    accounts = _Accounts(events)
    users, addresses = accounts.failures_by_account(at_least=min(brute_n, after_n))
    timelines = accounts.timelines(users, addresses)
    names = _names(database, timelines)
    findings: list[Finding] = []
    for key, timeline in timelines.items():
        findings += _brute_force(key, names[key], timeline, threshold=brute_n, window=brute_window)
        findings += _success_after(
            key, names[key], timeline, threshold=after_n, window=after_window
        )
    findings += _spraying(events, database, options)
    findings += _inactive_logins(events)
    return findings


def _brute_force(key, name, timeline, *, threshold, window) -> list[Finding]:
    failed = [(at, ip) for at, ok, ip in timeline if not ok]
    found = []
    for first, last, count in bursts([at for at, _ in failed], threshold=threshold, window=window):
        ips = Counter(ip for at, ip in failed if first <= at <= last and ip)
        found.append(
            Finding(
                "brute_force",
                WARNING,
                "account",
                name,
                count,
                first,
                last,
                f"{count} failed sign-ins (threshold {threshold} in {_minutes(window)} min) "
                f"from {len(ips)} IP address(es)",
                evidence={"ips": [ip for ip, _ in ips.most_common(10)]},
                subject_key=key,
                merge_within=window,
            )
        )
    return found


def _success_after(key, name, timeline, *, threshold, window) -> list[Finding]:
    found, run = [], []
    for at, ok, ip in timeline:
        if not ok:
            run.append(at)
            continue
        recent = [t for t in run if at - t <= window]
        if len(recent) >= threshold:
            found.append(
                Finding(
                    "success_after_failures",
                    CRITICAL,
                    "account",
                    name,
                    len(recent),
                    recent[0],
                    at,
                    f"signed in from {ip or 'an unknown address'} after {len(recent)} failed "
                    f"attempts in a row (threshold {threshold} in {_minutes(window)} min): "
                    "the password may be known to an attacker",
                    evidence={"ip": ip},
                    subject_key=key,
                )
            )
        run = []
    return found


def _spraying(events, database: str, options: dict) -> list[Finding]:
    threshold = options["SPRAY_ACCOUNTS"]
    window = timedelta(minutes=options["SPRAY_WINDOW_MINUTES"])
    account = Coalesce(Cast("user_id", CharField()), Lower("email_attempted"))
    candidates = [
        row["ip_address"]
        for row in events.filter(success=False, ip_address__isnull=False)
        .values("ip_address")
        .annotate(accounts=Count(account, distinct=True))
        .filter(accounts__gte=threshold)
    ]
    found = []
    for chunk in _chunks(candidates):
        rows = (
            events.filter(ip_address__in=chunk)
            .annotate(account=account)
            .order_by("ip_address", "created_at")
            .values_list("ip_address", "created_at", "success", "account", "user_id")
        )
        by_ip: dict[str, list] = defaultdict(list)
        for ip, at, ok, who, user_id in rows:
            by_ip[ip].append((at, ok, who, user_id))
        for ip, timeline in by_ip.items():
            found += _spray_runs(ip, timeline, database, threshold=threshold, window=window)
    return found


def _spray_runs(ip, timeline, database, *, threshold, window) -> list[Finding]:
    failed = [(at, who) for at, ok, who, _ in timeline if not ok]
    runs, left, seen = [], 0, Counter()
    for at, who in failed:
        seen[who] += 1
        while at - failed[left][0] > window:
            seen[failed[left][1]] -= 1
            if not seen[failed[left][1]]:
                del seen[failed[left][1]]
            left += 1
        if len(seen) < threshold:
            continue
        if runs and failed[left][0] <= runs[-1][1]:
            runs[-1][1] = at
        else:
            runs.append([failed[left][0], at])
    found = []
    for first, last in runs:
        targeted = {who for at, who in failed if first <= at <= last}
        tries = sum(1 for at, _ in failed if first <= at <= last)
        # a success from the same address on a targeted account: the list had a working password
        hits = sorted(
            {
                user_id
                for at, ok, who, user_id in timeline
                if ok and who in targeted and first <= at <= last + window
            },
            key=str,
        )
        detail = (
            f"{tries} failed sign-ins on {len(targeted)} accounts (threshold {threshold} "
            f"accounts in {_minutes(window)} min)"
        )
        if hits:
            names = _names(database, [str(h) for h in hits])
            detail += f"; then signed in to {len(hits)} of them: {', '.join(names.values())}"
        found.append(
            Finding(
                "spraying",
                CRITICAL if hits else WARNING,
                "ip",
                ip,
                tries,
                first,
                last,
                detail,
                evidence={"accounts": len(targeted), "signed_in": [str(h) for h in hits]},
                merge_within=window,
            )
        )
    return found


def _inactive_logins(events) -> list[Finding]:
    """Successful sign-ins to accounts deactivated, suspended, closed or deleted before them."""
    inactive = Q(user__is_active=False) | Q(user__status__in=INACTIVE_STATUSES)
    after_change = Q(user__deleted_at__isnull=False, created_at__gt=F("user__deleted_at")) | Q(
        inactive, user__deleted_at__isnull=True, created_at__gt=F("user__updated_at")
    )
    rows = (
        events.filter(success=True, user__isnull=False)
        .filter(inactive | Q(user__deleted_at__isnull=False))
        .filter(after_change)
        .order_by("user_id", "created_at")
        .values_list("user_id", "user__email", "created_at", "ip_address", "user__deleted_at")
    )
    by_user: dict = defaultdict(list)
    for user_id, email, at, ip, deleted_at in rows:
        by_user[(user_id, email, deleted_at is not None)].append((at, ip))
    return [
        Finding(
            "inactive_account_login",
            CRITICAL,
            "account",
            email,
            len(logins),
            logins[0][0],
            logins[-1][0],
            f"{len(logins)} successful sign-in(s) to a "
            f"{'deleted' if deleted else 'deactivated'} account, from "
            f"{', '.join(sorted({ip or '?' for _, ip in logins})[:5])}: the login path "
            "does not refuse it, or the account was reused",
            subject_key=str(user_id),
            merge_within=timedelta(hours=1),
        )
        for (user_id, email, deleted), logins in by_user.items()
    ]
