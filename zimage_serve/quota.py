"""Per-subject quotas kept in Redis: jobs per minute (a counter per minute) and jobs queued or running at once."""
from __future__ import annotations

import time


def minute_key(subject: str, minute: int) -> str:
    return f"zimage:quota:{subject}:{minute}"


def active_key(subject: str) -> str:
    return f"zimage:active:{subject}"  # a set of the subject's job ids that are queued or running


def check(r, subject: str, count: int, per_minute: int, max_active: int) -> int | None:
    """Take `count` jobs from the subject's quota; None if allowed, else the seconds to wait (Retry-After)."""
    active = r.scard(active_key(subject))
    if active + count > max_active:
        return 5  # a queued job takes seconds to a few minutes; ask again soon
    now = time.time()
    minute = int(now // 60)
    key = minute_key(subject, minute)
    used = r.incrby(key, count)
    r.expire(key, 120)
    if used > per_minute:
        r.decrby(key, count)  # refused jobs do not use the quota
        return max(1, int(60 - now % 60) + 1)
    return None


def refund(r, subject: str, count: int) -> None:
    """Give back jobs-a-minute charged for jobs that were not queued after all."""
    if count > 0:
        r.decrby(minute_key(subject, int(time.time() // 60)), count)


def largest_batch(per_minute: int, max_active: int) -> int:
    """The most jobs one request may hold: a larger batch could never pass the quotas, however long it waited."""
    return max(0, min(per_minute, max_active))


def add_active(r, subject: str, job_id: str) -> None:
    r.sadd(active_key(subject), job_id)


def remove_active(r, subject: str, job_id: str) -> None:
    r.srem(active_key(subject), job_id)
