"""The `watch` flow: which watched data sources changed since they were last seen?

Scheduled (every 10 minutes, prefect.yaml) or run by hand (`prefect deployment run
'watch/default'`), it computes each source's content digest (tasks/source_digest.py), compares it
with the digest it saw last time (a Prefect variable per source, `fitflow_watch_<hash of the
path>`, visible under Variables in the UI) and emits `fitflow.data.changed` (source, digest,
previous digest, and the target and model name a retrain uses) for each one that changed. The train deployment's trigger (prefect.yaml) starts
a retrain on that event. A source seen for the first time is only remembered: nothing is known
to have changed. A retrain whose data and config equal the current champion's ends at once as
"Unchanged" (flows/train.py), so a spurious event costs nothing.
"""

from __future__ import annotations

import hashlib
import logging

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.variables import Variable
from pydantic import BaseModel, Field

from flows import events
from tasks.data import resolve_source
from tasks.source_digest import content_digest

log = logging.getLogger("fitflow")


class Seen(BaseModel):
    source: str
    digest: str
    previous: str | None  # None: seen for the first time
    changed: bool


@flow(name="watch", description="Emit fitflow.data.changed for each watched data source whose content changed.")
def watch(
    sources: list[str] = Field(default=["breast_cancer"], description="Tables or data folders to watch (paths as "
                               "the worker sees them, or names of datasets in data/)", min_length=1),
    target: str = Field(default="diagnosis", min_length=1, description="The column (or 0/1 columns a,b,c) a retrain "
                        "predicts; passed in the event"),
    register_model: str = Field(default="breast-cancer", pattern=r"^[A-Za-z0-9_.-]+$",
                                description="Registered model a retrain registers to (its champion is what "
                                "'unchanged' is judged against); passed in the event"),
) -> list[Seen]:
    """Digest each source -> compare with the last digest seen -> remember it -> announce the changes."""
    log.setLevel(logging.INFO)
    seen = []
    for source in sources:
        digest = digest_task(source)
        previous = remember_task(source, digest)
        seen.append(Seen(source=source, digest=digest, previous=previous, changed=previous not in (None, digest)))
        if previous is None:
            log.info("watching %s from now on (%s)", source, digest)
        elif previous == digest:
            log.info("%s is unchanged (%s)", source, digest)
        else:
            log.info("%s changed: %s -> %s", source, previous, digest)
            events.emit(events.DATA_CHANGED, events.data_source(source, digest), [],
                        {"source": source, "digest": digest, "previous_digest": previous,
                         "target": target, "register_model": register_model})
    return seen


def variable_name(source: str) -> str:
    """The Prefect variable holding the last digest of `source` (names are short, lowercase, no slashes)."""
    where = str(resolve_source(source).resolve())
    return f"fitflow_watch_{hashlib.sha256(where.encode()).hexdigest()[:24]}"


def remember(source: str, digest: str) -> str | None:
    """Store `digest` as the last one seen for `source`; returns the one stored before (None the first time)."""
    name = variable_name(source)
    before = Variable.get(name, default=None)
    Variable.set(name, {"source": source, "digest": digest}, tags=["fitflow", "watch"], overwrite=True)
    return before["digest"] if isinstance(before, dict) else None


digest_task = task(content_digest, name="content_digest", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
remember_task = task(remember, name="remember_digest", cache_policy=NO_CACHE)
